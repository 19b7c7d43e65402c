//! The `dma` guest (issue 13: "a guest can hand the device a buffer, and
//! the device's DMA is visible to the guest, and the guest's writes to the
//! device"), through the DMA hypercall: in both paging modes, with
//! `--check` and the host operations of `builtin:dma`, under ksmd and
//! kswapd at full rate with 1 and 2 vCPUs, and a VMM-side failure (a stale
//! IOTLB entry) that must stop the VM with one line.

mod common;

use common::{Run, both_modes, shadowvm};

/// The lines both modes print: the header and the argument checks.
const COMMON: &[&str] = &[
    "dma: buffer of 128 pages at 0x1000000, 1 lanes x 20 rounds, 0 ballast pages",
    "dma: 13 of 13 bad calls rejected with EINVAL",
];

/// What shadow mode checks, in order (with `--host-ops builtin:dma`).
const SHADOW_STEPS: &[&str] = &[
    "COPY, FILL and DETACH before ATTACH are ENODEV",
    "ATTACH of 128 pages at 0x1000000",
    "a second ATTACH is EBUSY",
    "transfers outside the buffer are EINVAL",
    "the device copied 64 KiB the guest wrote",
    "the device sees the guest's later writes",
    "an overlapping COPY moves like memmove",
    "the device filled 32 KiB with 0xa5",
    "an unaligned FILL across a page boundary writes its 7 bytes only",
    "the device filled pages 40-55",
    "BALLOON gave pages 40-47 back",
    "the device reads ballooned pages as zero (fresh pages)",
    "the device writes ballooned pages back into use",
    "the device filled pages 56-59",
    "checkpoint 1 made page 56 read-only",
    "a device write to the read-only page is EFAULT",
    "a device read of it works",
    "a guest write to it faults too",
    "checkpoint 2 made it writable",
    "the device writes it again",
    "checkpoint 3 dropped page 57",
    "the device reads the dropped page as zero",
    "checkpoint 4 unmapped page 58",
    "a device read of the unmapped page is EFAULT",
    "a device write to it is EFAULT",
    "a COPY that runs into it is EFAULT",
    "a guest read of it faults too",
    "a PTE the device wrote takes effect at the next TLB flush",
    "DETACH",
    "COPY and DETACH after DETACH are ENODEV",
    "a device attached again copies again",
];

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A shadow-mode run that passed every step, the coherence check (the
/// device's IOTLB included) and the teardown; returns the `--json` object.
fn passed(r: &Run, lanes: u64, rounds: u64) -> serde_json::Value {
    r.check(r.code == Some(0), "exit 0");
    r.check(!r.stderr.contains("panicked"), "no panic");
    for step in SHADOW_STEPS {
        r.check(
            r.stdout.contains(&format!("dma: {step}: ok\n")),
            &format!("step {step:?} ok"),
        );
    }
    r.check(!r.stdout.contains("FAIL"), "no failed check");
    r.check(
        r.stdout.contains(&format!(
            "dma: {lanes} lanes x {rounds} rounds: 0 bad bytes, 0 failed transfers\n"
        )),
        "every lane's bytes as written",
    );
    r.check(
        r.stdout.ends_with("dma: 45 checks, 0 failures\n"),
        "45 checks",
    );
    r.check(r.stderr.contains("coherence check: ok"), "--check ok");
    let v = r.json();
    let d = &v["dma"];
    assert_eq!(v["check"], "ok", "{v}");
    // Left attached at exit: the mm's exit invalidated it, the VMM detached
    // it, and every frame came back.
    assert_eq!(
        d["attached_at_exit"],
        serde_json::json!([0x100_0000, 0x4000])
    );
    assert_eq!(d["iotlb_after_exit"], 0, "{d}");
    assert_eq!(v["exit"]["frames_returned"], true, "{v}");
    assert_eq!(d["freed_frame_accesses"], 0, "{d}");
    assert_eq!((n(&d["attaches"]), n(&d["detaches"])), (2, 1), "{d}");
    // The four refusals of builtin:dma's read-only and unmapped pages.
    assert_eq!(n(&d["refused"]), 4, "{d}");
    assert_eq!(n(&d["busy"]), 2, "{d}");
    // Each lane round is a copy and a fill, besides the steps' 8 copies
    // and 6 fills that completed (a transfer retried after EAGAIN counts
    // once).
    assert_eq!(n(&d["copies"]), 8 + lanes * rounds, "{d}");
    assert_eq!(n(&d["fills"]), 6 + lanes * rounds, "{d}");
    // The device faulted pages in and the mm invalidated it: the balloon,
    // the script's three operations and the exit at least.
    assert!(n(&d["faults"]) >= 100, "{d}");
    assert!(n(&d["invalidations"]) >= 5, "{d}");
    assert!(n(&d["iotlb_invalidated"]) >= 8, "{d}");
    assert!(n(&v["hypercalls"]["dma"]) >= n(&d["copies"]) + n(&d["fills"]));
    // Every vCPU but the one that exits halts once: a halted vCPU never
    // runs again (it re-entered the guest, halting again hundreds of times,
    // while the VM was stopping).
    assert_eq!(n(&v["hypercalls"]["halt"]), lanes - 1, "{v}");
    v
}

fn shadow(vcpus: &str, extra: &[&str], guest: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "dma",
        "--vcpus",
        vcpus,
        "--host-ops",
        "builtin:dma",
        "--check",
        "--json",
        "--timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(guest);
    shadowvm(&args)
}

/// kvm mode has no device: the argument checks print the same lines, then
/// each mode its own (checked here).
#[test]
fn dma_guest_in_both_modes() {
    if !common::require_kvm_and_guest("dma") {
        return;
    }
    let (kvm, s) = both_modes(&["run", "dma", "--mem", "32M"], &["--timeout", "30s"]);
    for (mode, r) in [("kvm", &kvm), ("shadow", &s)] {
        r.check(r.code == Some(0), &format!("{mode} mode exits 0"));
        let head: Vec<&str> = r.stdout.lines().take(COMMON.len()).collect();
        r.check(
            head == COMMON,
            &format!("{mode} mode starts with {COMMON:?}"),
        );
    }
    kvm.check(
        kvm.stdout.lines().skip(COMMON.len()).collect::<Vec<_>>()
            == [
                "dma: kvm mode: no DMA device, ATTACH, COPY, FILL and DETACH are EOPNOTSUPP: ok",
                "dma: 14 checks, 0 failures",
            ],
        "kvm mode: EOPNOTSUPP, nothing else",
    );
    // Without builtin:dma, shadow mode says what it skipped.
    s.check(
        s.stdout
            .contains("dma: host refusals: not checked (run with --host-ops builtin:dma)\n")
            && s.stdout.ends_with("dma: 32 checks, 0 failures\n"),
        "shadow mode without the script",
    );
    // Two vCPUs in kvm mode: the other vCPU has nothing to do and halts.
    let r = shadowvm(&["run", "dma", "--paging", "kvm", "--vcpus", "2"]);
    r.check(
        r.code == Some(0) && r.stdout.ends_with("dma: 14 checks, 0 failures\n"),
        "kvm mode, 2 vCPUs",
    );
}

/// Every step with `--check`, 1 and 2 vCPUs: the device sees the guest's
/// writes, the guest sees the device's, host refusals are EFAULT, and the
/// stats show the device's faults and the mm's invalidations.
#[test]
fn dma_guest_with_host_operations_and_check() {
    if !common::require_kvm_and_guest("dma") {
        return;
    }
    for (vcpus, lanes) in [("1", 1), ("2", 2)] {
        let r = shadow(vcpus, &["--mem", "32M"], &[]);
        passed(&r, lanes, 20);
    }
}

/// ksmd merging and kswapd swapping at full rate under the device, with
/// ballast so that reclaim keeps evicting: nothing corrupted, the device
/// invalidated and re-faulted throughout, coherent at the end.
#[test]
fn dma_guest_under_full_rate_ksmd_and_kswapd() {
    if !common::require_kvm_and_guest("dma") {
        return;
    }
    let full_rate = [
        "--mem",
        "32M",
        "--machine-mem",
        "8M",
        "--ksm",
        "--ksm-sleep-ms",
        "0",
        "--ksm-pages-to-scan",
        "1000",
        "--reclaim",
        "--reclaim-interval-ms",
        "1",
    ];
    for (vcpus, lanes) in [("1", 1), ("2", 2)] {
        let r = shadow(vcpus, &full_rate, &["rounds=40", "ballast=2048"]);
        let v = passed(&r, lanes, 40);
        let d = &v["dma"];
        assert!(n(&v["ksm"]["merges"]) > 0, "{v}");
        assert!(n(&v["host_mm"]["pswpout"]) > 0, "{v}");
        // Far more invalidations than the script's: ksmd's and kswapd's.
        assert!(n(&d["invalidations"]) >= 50, "{d}");
        assert!(n(&d["iotlb_invalidated"]) >= 20, "{d}");
        assert!(n(&d["faults"]) > n(&d["iotlb_invalidated"]) / 2, "{d}");
    }
}

/// A VMM bug, injected: the device's IOTLB keeps an entry for a frame the
/// mm does not own (a missed invalidation). The first DMA there stops the
/// VM: exit 125, one line, the frame never touched.
#[test]
fn a_stale_device_translation_stops_the_vm_with_one_line() {
    if !common::require_kvm_and_guest("dma") {
        return;
    }
    for vcpus in ["1", "2"] {
        let r = shadowvm(&["run", "dma", "--vcpus", vcpus, "--test-dma-stale-entry"]);
        r.check(r.code == Some(125), "exit 125");
        r.check(
            r.stdout.contains("dma: a second ATTACH is EBUSY: ok")
                && !r.stdout.contains("the device copied"),
            "the guest ran up to its first DMA at iova 0 and no further",
        );
        let last = r.stderr.lines().last().unwrap_or_default();
        r.check(
            r.stderr
                .lines()
                .filter(|l| l.contains("DMA device"))
                .count()
                == 1
                && last.contains("DMA device: DMA at iova 0x0 reached frame")
                && last.contains("which the mm does not own"),
            "one line naming the iova and the frame",
        );
        r.check(!r.stderr.contains("panicked"), "no panic");
    }
}
