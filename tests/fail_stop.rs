//! Fail-stop, never stale (issue 9): when the host refuses a TLB shootdown,
//! the VM stops before any vCPU can run again on a translation the flush
//! was to remove — exit 125 and one line naming the frames and the errno.
//! The failure is injected with the test-only `--test-flush-fault`.

mod common;

fn fail_stop(args: &[&str]) -> common::Run {
    common::shadowvm(args)
}

#[test]
fn a_refused_shootdown_stops_the_vm_with_one_line() {
    if !common::require_kvm_and_guest("memtest") {
        return;
    }
    for vcpus in ["1", "2"] {
        // memtest's first flush is its balloon's DONTNEED, after the
        // patterns: it must never report the balloon done.
        let r = fail_stop(&[
            "run",
            "memtest",
            "--vcpus",
            vcpus,
            "--test-flush-fault",
            "fail-after=0",
            "--",
            "size=4M",
        ]);
        r.check(r.code == Some(125), "exit 125");
        r.check(
            r.stdout.contains("pattern random: ok") && !r.stdout.contains("ballooned"),
            "the guest ran up to the failed flush and no further",
        );
        let last = r.stderr.lines().last().unwrap_or_default();
        r.check(
            r.stderr.lines().filter(|l| l.contains("fail-stop")).count() == 1
                && last.contains("fail-stop: host invalidation (injected) of frames 0x")
                && last.contains("Input/output error"),
            "one line naming the frames and the errno",
        );
    }
}

/// A flush kswapd makes itself (the batched aging flush), not the shadow
/// MMU, stops the VM the same way.
#[test]
fn a_refused_aging_flush_stops_the_vm_too() {
    if !common::require_kvm_and_guest("wss") {
        return;
    }
    let r = common::shadowvm_line(
        "run wss --reclaim --reclaim-interval-ms 5 --test-flush-fault fail-after=2",
    );
    r.check(r.code == Some(125), "exit 125");
    r.check(
        r.stderr.contains("fail-stop: host invalidation (injected)"),
        "says it stopped on a failed flush",
    );
}
