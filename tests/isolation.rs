//! docs/design.md rule 5 (isolation), issue 5: `test-hostile` writes hostile
//! page tables (frames beyond its RAM and where machine memory and the
//! shadow pool lie, reserved bits, tables pointing at themselves), loads
//! 10,000 distinct CR3 values and CR3 values the VMM must refuse, and makes
//! hypercalls with garbage arguments. Every probe must fault, every garbage
//! hypercall must be refused, the VMM must not fail or panic, and after the
//! run the shadow MMU must pass the coherence checker (`--check`), which
//! also checks that no leaf spte maps a frame outside guest RAM.

mod common;

use common::{Run, guest_code, require_kvm, shadowvm, temp_file, tiny_elf};

guest_code! {
    /// Turns on kvm-clock at gpa 0x1000, then halts (reached only if KVM
    /// accepted the MSR).
    fn pvclock() {
        "mov $0x4b564d01, %ecx" // MSR_KVM_SYSTEM_TIME_NEW
        "mov $0x1001, %eax" // gpa 0x1000 | enable
        "xor %edx, %edx"
        "wrmsr"
        "hlt"
    }
}

/// The summary line's counts: (probes, faults, rejected hypercalls).
fn summary(r: &Run) -> (u64, u64, u64) {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("hostile: "))
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| words.get(i).and_then(|w| w.parse().ok());
    match (num(1), num(3), num(5)) {
        (Some(p), Some(f), Some(h)) if words.get(6) == Some(&"hypercalls") => (p, f, h),
        _ => {
            r.check(false, "summary line");
            unreachable!()
        }
    }
}

fn hostile_passes(r: &Run) -> (u64, u64, u64) {
    r.check(r.code == Some(0), "test-hostile exits 0");
    r.check(!r.stdout.contains("FAIL"), "no failed expectation");
    r.check(!r.stderr.contains("panicked"), "no panic");
    let (probes, faults, rejected) = summary(r);
    r.check(probes > 0 && faults == probes, "every probe faulted");
    r.check(rejected >= 1000, "garbage hypercalls rejected");
    (probes, faults, rejected)
}

#[test]
fn hostile_guest_in_shadow_mode_stays_isolated_and_coherent() {
    if !require_kvm() {
        return;
    }
    for vcpus in ["1", "2"] {
        let r = shadowvm(&[
            "run",
            "test-hostile",
            "--paging",
            "shadow",
            "--vcpus",
            vcpus,
            "--check",
            "--json",
        ]);
        let (probes, _, _) = hostile_passes(&r);
        // The frames beyond RAM are probed in shadow mode only.
        r.check(probes > 400, "the probes beyond RAM ran");
        r.check(
            r.stderr.lines().any(|l| l == "coherence check: ok"),
            "coherence check: ok",
        );
        let v = r.json();
        assert_eq!(v["check"], "ok", "{v}");
        // The gpas beyond RAM were never mapped: the faults there were
        // answered as MMIO (a guest fault).
        assert!(v["mmu"]["pf_mmio"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(
            v["hypercalls"]["load_cr3"].as_u64().unwrap_or(0) >= 10_000,
            "{v}"
        );
        assert_eq!(v["host_invalidate"]["errors"], 0, "{v}");
    }
}

#[test]
fn hostile_guest_in_kvm_mode() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "test-hostile", "--paging", "kvm", "--check"]);
    hostile_passes(&r);
    r.check(
        r.stderr.contains("coherence check: nothing to check"),
        "nothing to check in kvm mode",
    );
}

/// KVM's paravirtual MSRs (kvm-clock, steal time, async PF) make KVM write
/// to a KVM guest-physical address the guest chooses, which in shadow mode
/// is any machine frame. The VMM hides the PV CPUID leaves and has KVM
/// enforce them, so the write is refused with #GP (here: no IDT yet, so a
/// triple fault) instead of landing in machine memory.
#[test]
fn kvm_paravirtual_msrs_are_refused() {
    if !require_kvm() {
        return;
    }
    let code = pvclock();
    let elf = temp_file("pvclock.elf", &tiny_elf(code, code.len() as u64));
    for paging in ["shadow", "kvm"] {
        let r = shadowvm(&["run", elf.to_str().unwrap(), "--paging", paging]);
        r.check(r.code == Some(125), "the wrmsr must fault (status 125)");
        r.check(!r.stderr.contains("panicked"), "no panic");
    }
}
