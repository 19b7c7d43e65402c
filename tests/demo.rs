//! `shadowvm demo`: every scenario runs, narrated and as JSON lines, and
//! its key events come in order.

mod common;

use serde_json::Value;

/// The JSON lines' `kind` (or `kind:op` for host operations) in order.
fn kinds(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            match v["op"].as_str() {
                Some(op) => format!("{kind}:{op}"),
                None => match v["event"].as_str() {
                    Some(ev) => format!("{kind}:{ev}"),
                    None => kind,
                },
            }
        })
        .collect()
}

/// Checks that `want` appears in `got` as a subsequence.
fn in_order(run: &common::Run, got: &[String], want: &[&str]) {
    let mut it = got.iter();
    for w in want {
        run.check(
            it.any(|k| k == w),
            &format!("event {w} in order {want:?}; got {got:?}"),
        );
    }
}

fn scenario(name: &str, want: &[&str], narrated: &[&str]) {
    let run = common::shadowvm(&["demo", name, "--json"]);
    run.check(run.code == Some(0), "demo --json exits 0");
    in_order(&run, &kinds(&run.stdout), want);
    run.check(
        run.stdout
            .lines()
            .last()
            .unwrap_or_default()
            .contains("\"summary\""),
        "the last JSON line is the summary",
    );
    let run = common::shadowvm(&["demo", name]);
    run.check(run.code == Some(0), "demo exits 0");
    for n in narrated {
        run.check(run.stdout.contains(n), &format!("narration has `{n}`"));
    }
    run.check(run.stdout.contains("counters:"), "the counters table");
}

#[test]
fn lists_scenarios_and_rejects_unknown_ones() {
    let run = common::shadowvm(&["demo"]);
    run.check(run.code == Some(0), "demo lists");
    for s in [
        "munmap", "dontneed", "mprotect", "ksm", "cow", "aging", "reclaim", "release", "thp", "dma",
    ] {
        run.check(run.stdout.contains(s), s);
    }
    let run = common::shadowvm(&["demo", "nope"]);
    run.check(run.code == Some(2), "unknown scenario: status 2");
    run.check(run.stderr.lines().count() == 1, "one-line error");
}

#[test]
fn every_scenario_narrates_its_events_in_order() {
    if !common::require_kvm_and_guest("test-counter") {
        return;
    }
    scenario(
        "dontneed",
        &[
            "host_op:madvise_dontneed",
            "invalidate_range_start:Clear",
            "spte_zapped",
            "shootdown",
            "invalidate_range_end:Clear",
            "resolve_pf",
            "guest_saw",
        ],
        &["[host mm] madvise(MADV_DONTNEED)", "refaulted"],
    );
    scenario(
        "munmap",
        &[
            "host_op:munmap",
            "invalidate_range_start:Unmap",
            "spte_zapped",
            "shootdown",
            "invalidate_range_end:Unmap",
            "resolve_pf",
            "guest_saw",
        ],
        &["fault vector 14"],
    );
    scenario(
        "mprotect",
        &[
            "host_op:mprotect",
            "invalidate_range_start:ProtectionVma",
            "spte_zapped",
            "shootdown",
            "invalidate_range_end:ProtectionVma",
            "resolve_pf",
            "guest_saw",
        ],
        &["fault vector 14"],
    );
    scenario(
        "ksm",
        &[
            "host_op:madvise_mergeable",
            "host_op:ksm_scan",
            "invalidate_range_start:KsmMerge",
            "change_pte",
            "invalidate_range_end:KsmMerge",
            "guest_saw",
        ],
        &["ksm.pages_sharing"],
    );
    scenario(
        "aging",
        &[
            "host_op:clear_flush_young",
            "clear_flush_young",
            "accessed_cleared",
            "shootdown",
            "test_young",
            "guest_saw",
        ],
        &["young again (true)"],
    );
    scenario(
        "reclaim",
        &["host_op:reclaim", "clear_flush_young", "guest_saw"],
        &["[host mm] reclaim"],
    );
    scenario(
        "release",
        &[
            "host_op:exit_mmap",
            "release",
            "shadow_page_zapped",
            "spte_zapped",
            "shootdown",
            "guest_saw",
        ],
        &["[notifier] release"],
    );
    // Issue 12: the DONTNEED of one 4 KiB page of a host huge page splits
    // the huge PMD inside an invalidation of the whole 2 MiB range, which
    // zaps the 2 MiB spte; the guest refaults.
    scenario(
        "thp",
        &[
            "host_op:madvise_dontneed",
            "invalidate_range_start:Clear",
            "spte_zapped",
            "shootdown",
            "split_pmd",
            "invalidate_range_end:Clear",
            "resolve_pf",
            "guest_saw",
        ],
        &["large=true", "huge PMD split", "mapped by a 4 KiB spte"],
    );
    // Issue 13: one DONTNEED reaches both secondary MMUs: the DMA device's
    // interval (before the list, as in Linux) and the shadow MMU.
    scenario(
        "dma",
        &[
            "dma_attach",
            "dma_fault",
            "host_op:madvise_dontneed",
            "invalidate_range_start:Clear",
            "dma_invalidate:Clear",
            "spte_zapped",
            "shootdown",
            "invalidate_range_end:Clear",
            "dma_fault",
            "guest_saw",
        ],
        &["[DMA device]", "visible to it"],
    );
}

#[test]
fn cow_scenario_merges_then_breaks_sharing_through_the_shadow_fault_path() {
    if !common::require_kvm_and_guest("ksm") {
        return;
    }
    scenario(
        "cow",
        &[
            "invalidate_range_start:ProtectionPage",
            "invalidate_range_start:KsmMerge",
            "change_pte",
            "invalidate_range_start:CowBreak",
            "spte_zapped",
            "shootdown",
            "change_pte",
            "invalidate_range_end:CowBreak",
            "cow",
            "resolve_pf",
            "guest_saw",
        ],
        &["event=CowBreak", "0 errors"],
    );
}
