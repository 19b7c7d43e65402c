//! Issue 6's reliability run: `shadowvm stress` runs the verify guest on
//! 2 vCPUs under ksmd, kswapd (machine memory below what is touched) and a
//! host thread doing DONTNEED, mprotect, balloon and host writes on the RAM
//! verify does not use; nothing may be corrupted, the coherence check must
//! pass, and every frame must come back.

mod common;

use serde_json::Value;

#[test]
fn stress_two_seconds_no_corruption_every_op_kind_runs() {
    if !common::require_kvm() || shadowvm::vmm::guests::find("verify").is_none() {
        return;
    }
    let run = common::shadowvm(&["stress", "--seconds", "2", "--json"]);
    run.check(run.code == Some(0), "stress exits 0");
    let line = run.stdout.lines().last().unwrap_or_default();
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => {
            run.check(false, "stdout ends with the JSON report");
            return;
        }
    };
    run.check(v["ok"] == Value::Bool(true), "the report says ok");
    run.check(v["corrupted_bytes"] == 0, "zero corrupted bytes");
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
    ] {
        run.check(
            v["ops"][kind].as_u64().is_some_and(|n| n > 0),
            &format!("{kind} > 0"),
        );
    }
    run.check(
        v["seconds"].as_f64().is_some_and(|s| s < 10.0),
        "bounded: under 10 s",
    );
    run.check(
        run.stderr.contains("stress: PASS"),
        "the verdict line says PASS",
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
