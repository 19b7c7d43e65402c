//! docs/design.md rule 5 (isolation).
//!
//! `test-hostile` (issue 5) writes hostile page tables (frames beyond its
//! RAM and where machine memory and the shadow pool lie, reserved bits,
//! tables pointing at themselves), loads 10,000 distinct CR3 values and CR3
//! values the VMM must refuse, and makes hypercalls with garbage arguments.
//! Every probe must fault, every garbage hypercall must be refused, the VMM
//! must not fail or panic, and after the run the shadow MMU must pass the
//! coherence checker (`--check`), which also checks that no leaf spte maps
//! a frame outside guest RAM and that the switcher is what the VMM wrote.
//!
//! `test-escape` (issue 11, ABI v2) tries every way out of ring 1 and
//! counts each try as faulted, refused or harmless; one escape fails the
//! run. The tries that stop the VM on this backend (`int n`, `int3`,
//! `icebp`, `sysenter`, far jumps to a TSS in ring 1) run one per VM and
//! must end as a clean guest crash (exit status 125). The recycled-root
//! attack that broke ABI v1 has its own test, and so has the livelock
//! detector.

mod common;

use common::{Run, guest_code, require_kvm, shadowvm, temp_file, tiny_elf};
use serde_json::Value;

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

/// `shadowvm run GUEST --paging PAGING --vcpus VCPUS --check --json`, then
/// `more` (options, and the guest's command line after a `--`).
fn run_checked(guest: &str, paging: &str, vcpus: &str, more: &[&str]) -> Run {
    let args = [
        &[
            "run", guest, "--paging", paging, "--vcpus", vcpus, "--check", "--json",
        ][..],
        more,
    ];
    shadowvm(&args.concat())
}

/// The `--check` verdict of a shadow-mode run: ok, on stderr and in the
/// `--json` object, which it returns.
fn coherent(r: &Run) -> Value {
    r.check(
        r.stderr.lines().any(|l| l == "coherence check: ok"),
        "coherence check: ok",
    );
    let v = r.json();
    assert_eq!(v["check"], "ok", "{v}");
    v
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
        let r = run_checked("test-hostile", "shadow", vcpus, &[]);
        let (probes, _, _) = hostile_passes(&r);
        // The frames beyond RAM are probed in shadow mode only.
        r.check(probes > 400, "the probes beyond RAM ran");
        let v = coherent(&r);
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
/// is any machine frame. `wrmsr` faults in ring 1 anyway; behind that, the
/// VMM hides the PV CPUID leaves and has KVM enforce them. Here the #GP
/// finds no registered handler: #NP, #DF, triple fault, exit 125.
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

/// One line of `test-escape`'s report: (tries, faulted, refused, harmless,
/// escaped) for `section`.
fn escape_counts(r: &Run, section: &str) -> [u64; 5] {
    let prefix = format!("escape: {section}: ");
    let Some(line) = r.stdout.lines().find(|l| l.starts_with(&prefix)) else {
        r.check(false, &format!("a report line for {section}"));
        unreachable!()
    };
    let nums: Vec<u64> = line[prefix.len()..]
        .split([' ', ','])
        .filter_map(|w| w.parse().ok())
        .collect();
    r.check(nums.len() == 5, &format!("five counts in {line:?}"));
    [nums[0], nums[1], nums[2], nums[3], nums[4]]
}

fn json_u64(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[k]).as_u64().unwrap_or(0)
}

#[test]
fn every_way_out_of_ring_1_faults_or_is_refused() {
    if !require_kvm() {
        return;
    }
    for paging in ["kvm", "shadow"] {
        for vcpus in ["1", "2"] {
            let r = run_checked("test-escape", paging, vcpus, &["--timeout", "120s"]);
            let what = format!("{paging} mode, {vcpus} vCPU(s)");
            r.check(r.code == Some(0), &format!("test-escape exits 0 ({what})"));
            r.check(
                !r.stdout.contains("ESCAPED") && !r.stdout.contains("FAIL"),
                "nothing escaped",
            );
            let [tries, faulted, refused, harmless, escaped] = escape_counts(&r, "total");
            r.check(escaped == 0, "0 escaped");
            r.check(
                faulted + refused + harmless == tries,
                "every try accounted for",
            );
            // Every port but the 13 the bitmap allows, in and out, from ring 1.
            r.check(
                escape_counts(&r, "ports")[0] >= 2 * (65536 - 13),
                "every port tried",
            );
            r.check(
                escape_counts(&r, "ports")[1] == escape_counts(&r, "ports")[0],
                "every port faulted",
            );
            r.check(
                escape_counts(&r, "gates")[0] == 256,
                "int n through every gate from ring 3",
            );
            r.check(escape_counts(&r, "sel")[0] > 1000, "the far transfers ran");
            r.check(
                r.stdout.contains(
                    "escape: handlers: vectors checked in ring 1: 0 1 3 6 8 12 13 14 16 17 19",
                ),
                "a privileged instruction faulted in every handler that ran",
            );
            r.check(
                escape_counts(&r, "recycled")[0] > 30_000,
                "the native CR3 loads ran",
            );
            if vcpus == "2" {
                r.check(
                    escape_counts(&r, "vCPU 1")[4] == 0,
                    "the second vCPU did not escape either",
                );
            }
            let v = r.json();
            // No try reached the VMM except through the devices it allows:
            // the guest stopped on its own, with no internal error.
            assert_eq!(json_u64(&v, &["exits", "internal_error"]), 0, "{v}");
            // kvm mode: the writes the switcher's read-only memslot
            // dropped, one MMIO exit each; shadow mode: none.
            let dropped = if paging == "kvm" {
                escape_counts(&r, "switcher")[2]
            } else {
                0
            };
            assert_eq!(json_u64(&v, &["exits", "mmio"]), dropped, "{v}");
            if paging == "shadow" {
                coherent(&r);
                assert_eq!(json_u64(&v, &["host_invalidate", "errors"]), 0, "{v}");
            }
        }
    }
}

/// How `crash=WHAT` ended: a clean guest crash (exit 125, the failure on
/// stderr's first line), or a fault or completion that stayed in ring 1
/// (the guest's exit 3, saying so).
fn crash_is_clean(paging: &str, what: &str) -> Result<(), String> {
    let arg = format!("crash={what}");
    let r = shadowvm(&[
        "run",
        "test-escape",
        "--paging",
        paging,
        "--timeout",
        "30s",
        "--",
        &arg,
    ]);
    let first = r.stderr.lines().next().unwrap_or_default();
    match r.code {
        Some(125)
            if first.starts_with("shadowvm: guest failed: vCPU 0: KVM internal error")
                && !r.stderr.contains("panicked") =>
        {
            Ok(())
        }
        Some(3)
            if r.stdout.contains("in ring 1")
                && r.stdout.contains("mov %cr0 faults")
                && !r.stdout.contains("RUNS") =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{paging} {what}: exit {:?}\n{}\n{}",
            r.code, r.stdout, r.stderr
        )),
    }
}

/// `int $n` in ring 1 through every vector (shadow mode; a sample in kvm
/// mode), and the other instructions this backend cannot run in ring 1.
#[test]
fn int_n_and_friends_in_ring_1_are_a_clean_crash() {
    if !require_kvm() {
        return;
    }
    let mut tries: Vec<(&str, String)> = (0..256).map(|n| ("shadow", format!("int:{n}"))).collect();
    for n in [0, 3, 13, 14, 23, 26, 27, 0x80, 0xff] {
        tries.push(("kvm", format!("int:{n}")));
    }
    for paging in ["kvm", "shadow"] {
        for what in [
            "int3",
            "icebp",
            "sysenter",
            "far:0:0x28",
            "far:1:0x28",
            "far:0:0x30",
            "far:1:0x2b",
        ] {
            tries.push((paging, what.to_string()));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((paging, what)) = tries.get(i) else {
                        break;
                    };
                    if let Err(e) = crash_is_clean(paging, what) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} tries did not end cleanly:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// ABI v1's hole: a guest kernel filled pages with page-table entries,
/// recycled shadow roots until their frames came back as its pages, and
/// loaded machine addresses into CR3 natively, reading and writing the
/// VMM's shadow tables. In ring 1 every native load faults; LOAD_CR3 takes
/// gpas only; the tables it builds from those pages reach guest RAM only
/// (`--check`: no spte maps a frame outside guest RAM, every root holds the
/// switcher, the switcher is intact).
#[test]
fn recycled_root_attack_is_refused() {
    if !require_kvm() {
        return;
    }
    for vcpus in ["1", "2"] {
        let r = run_checked(
            "test-escape",
            "shadow",
            vcpus,
            &["--timeout", "120s", "--", "only=recycled"],
        );
        r.check(r.code == Some(0), "the attack is refused");
        let [tries, faulted, refused, _, escaped] = escape_counts(&r, "recycled");
        r.check(escaped == 0, "0 escaped");
        // 2 x 64 MiB of guessed frames loaded natively, each a #GP.
        r.check(
            faulted >= (128 << 20) / 4096,
            "every native CR3 load faulted",
        );
        r.check(
            refused > 0 && tries > faulted,
            "LOAD_CR3 refused the frames beyond RAM",
        );
        let v = r.json();
        assert!(
            json_u64(&v, &["mmu", "mmu_recycled"]) > 0,
            "roots were recycled: {v}"
        );
        assert_eq!(v["check"], "ok", "{v}");
    }
}

/// A #PF handler that lies to RESOLVE_PF (calls every write a read) would
/// loop for ever: the VMM fixes the read, the write faults again. The VMM
/// notices the same fault with nothing changed and stops the VM with both
/// views, in one line.
#[test]
fn a_resolve_pf_livelock_stops_the_vm() {
    if !require_kvm() {
        return;
    }
    // A VMM without the detector loops until --timeout (exit 124).
    let r = shadowvm(&[
        "run",
        "test-escape",
        "--paging",
        "shadow",
        "--timeout",
        "60s",
        "--",
        "crash=livelock",
    ]);
    r.check(r.code == Some(125), "exit status 125");
    let lines: Vec<&str> = r.stderr.lines().collect();
    r.check(lines.len() == 1, "one line");
    let line = lines.first().copied().unwrap_or_default();
    r.check(
        line.contains("RESOLVE_PF livelock on vCPU 0")
            && line.contains("supervisor read at gva 0x")
            && line.contains("the VMM's view: spte 0x")
            && line.contains("the hardware's: it faults with error code 0x1"),
        "names the address, the access and both views",
    );
}
