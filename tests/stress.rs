//! Issue 6's reliability run: `shadowvm stress` runs the verify guest on
//! 2 vCPUs under ksmd, kswapd (machine memory below what is touched) and a
//! host thread doing DONTNEED, mprotect, balloon and host writes on the RAM
//! verify does not use; nothing may be corrupted, the coherence check must
//! pass, and every frame must come back. A DMA device on the same mm
//! writes and reads back the top of RAM meanwhile (issue 13).

mod common;

use serde_json::Value;

#[test]
fn stress_two_seconds_no_corruption_every_op_kind_runs() {
    if !common::require_kvm_and_guest("verify") {
        return;
    }
    let run = common::shadowvm(&["stress", "--seconds", "2", "--json"]);
    run.check(run.code == Some(0), "stress exits 0");
    let v = run.stdout_json();
    run.check(v["ok"] == Value::Bool(true), "the report says ok");
    run.check(v["corrupted_bytes"] == 0, "zero corrupted bytes");
    run.check(
        v["dma_corrupted_bytes"] == 0,
        "the DMA device reads back what it wrote",
    );
    run.check(
        v["dma_freed_frame_accesses"] == 0,
        "the DMA device never reaches a freed frame",
    );
    run.check(v.get("dma_error").is_none(), "the DMA device keeps running");
    run.check(
        v["check_ok"] == Value::Bool(true),
        "the coherence check passes",
    );
    run.check(
        v["frames_returned"] == Value::Bool(true),
        "every frame comes back",
    );
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    run.check(!runs.is_empty(), "at least one verify run");
    for r in &runs {
        run.check(r["exit_code"] == 0, "verify exits 0");
        run.check(
            r["corrupted_bytes"] == 0,
            "verify reports 0 corrupted bytes",
        );
        run.check(r["check"] == "ok", "each run's check passes");
    }
    for kind in [
        "faults_fixed",
        "ksm_merges",
        "cow_breaks",
        "reclaim_evictions",
        "swap_ins",
        "dontneed",
        "mprotect",
        "balloon",
        "shootdowns",
        "dma_writes",
        "dma_reads",
        "dma_invalidations",
        "dma_host_ops",
        "dma_checks",
    ] {
        run.check(
            v["ops"][kind].as_u64().is_some_and(|n| n > 0),
            &format!("{kind} > 0"),
        );
    }
    for r in &runs {
        run.check(
            r["budget_seconds"].as_f64().is_some_and(|b| b > 0.0) && r.get("overrun").is_none(),
            "every run has a budget and none overran it",
        );
    }
    run.check(
        run.stderr.contains("stress: PASS"),
        "the verdict line says PASS",
    );
}

/// The same run over large folios (THP for PMD-size ranges, 16K and 64K
/// mTHP elsewhere): every split, large spte and prefetch under the same
/// load (which of them happen depends on timing: only the allocations are
/// asserted), and `--check` after each guest run also proves that no page
/// exception delivery needs shares a folio with memory reclaim may split
/// (that once triple-faulted the guest about one run in seven).
#[test]
fn stress_over_large_folios_no_corruption() {
    if !common::require_kvm_and_guest("verify") {
        return;
    }
    let run = common::shadowvm(&[
        "stress",
        "--seconds",
        "2",
        "--json",
        "--host-thp",
        "always",
        "--host-mthp",
        "16K,64K",
    ]);
    run.check(run.code == Some(0), "stress exits 0");
    let v = run.stdout_json();
    run.check(v["ok"] == Value::Bool(true), "the report says ok");
    for r in v["runs"].as_array().cloned().unwrap_or_default() {
        run.check(r["check"] == "ok", "each run's check passes");
    }
    for kind in ["thp_fault_alloc", "mthp_fault_alloc"] {
        run.check(
            v["ops"][kind].as_u64().is_some_and(|n| n > 0),
            &format!("{kind} > 0"),
        );
    }
}

/// The negative control: the same run with the host flush of zapped frames
/// skipped (a missing shootdown, injected through the test-only
/// `--test-flush-fault`) must be caught: the guest reads and writes frames
/// the host took back, and the run fails.
#[test]
fn stress_catches_a_missing_shootdown() {
    if !common::require_kvm_and_guest("verify") {
        return;
    }
    let run = common::shadowvm(&[
        "stress",
        "--seconds",
        "3",
        "--json",
        "--test-flush-fault",
        "skip-zapped",
    ]);
    run.check(run.code == Some(1), "stress exits 1");
    let v = run.stdout_json();
    run.check(v["ok"] == Value::Bool(false), "the report says not ok");
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    let caught = v["corrupted_bytes"].as_u64().is_some_and(|n| n > 0)
        || runs.iter().any(|r| r["exit_code"] != 0);
    run.check(caught, "verify saw the corruption (or crashed on it)");
    run.check(
        run.stderr.contains("stress: FAIL"),
        "the verdict line says FAIL",
    );
}

#[test]
fn stress_rejects_pages_that_do_not_fit() {
    let run = common::shadowvm(&["stress", "--seconds", "1", "--pages", "8192"]);
    run.check(run.code == Some(2), "status 2");
    run.check(
        run.stderr.contains("does not fit in the lower half"),
        "says why",
    );
}
