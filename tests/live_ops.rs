//! Host-side memory threads while the guest runs (issue 6), in shadow mode:
//! ksmd merging identical guest pages (`--ksm`), kswapd aging and swapping
//! guest pages out under a small `--machine-mem` (`--reclaim`), the aging
//! property (a page the guest keeps touching stays young, an untouched page
//! goes cold: fresh Accessed bits need the pass's host invalidation), and
//! the exit report (every frame came back after exit_mmap).

mod common;

use std::sync::Arc;

use common::{CounterGuest, wait_for};
use serde_json::Value;
use shadowvm::mmu::TlbFlush;
use shadowvm::vmm::host::aging::{AGING_HISTORY, Aging};

/// The `--json` object (the last stderr line).
fn json(run: &common::Run) -> Value {
    run.json_at_end()
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{} missing in {v}", path.join(".")))
}

fn frames_returned(run: &common::Run, v: &Value) {
    run.check(
        v["exit"]["frames_returned"] == Value::Bool(true),
        "the exit report says every frame came back",
    );
    // The switcher's frames (GDT, an IDT and a TSS per vCPU, three page
    // tables) are the VMM's for the whole run; every other frame is free.
    let reserved = 1 + 2 * num(v, &["vcpus"]) + 3;
    run.check(
        num(v, &["exit", "frames_reserved"]) == reserved,
        "the switcher's frames are the only reserved ones",
    );
    run.check(
        num(v, &["exit", "frames_free"]) + reserved == num(v, &["exit", "frames_total"]),
        "every frame but the switcher's is free after exit_mmap",
    );
}

/// `shadowvm run guest --mem mem`, then `options`, `--json` and a
/// `--timeout` (a bound on a hang), and `guest_args` after `--`. The guest
/// must exit 0; gives the run and its `--json` object.
fn run_ok(
    guest: &str,
    mem: &str,
    options: &[&str],
    timeout: &str,
    guest_args: &[&str],
) -> (common::Run, Value) {
    let mut args = vec!["run", guest, "--mem", mem];
    args.extend_from_slice(options);
    args.extend(["--json", "--timeout", timeout]);
    if !guest_args.is_empty() {
        args.push("--");
        args.extend_from_slice(guest_args);
    }
    let run = common::shadowvm(&args);
    run.check(
        run.code == Some(0),
        &format!("{guest} exits 0 with `{}`", options.join(" ")),
    );
    let v = json(&run);
    (run, v)
}

/// memtest over 16M of 32M of guest RAM under `options`: it must exit 0 and
/// find every byte it wrote.
fn memtest_16m(options: &[&str], timeout: &str) -> (common::Run, Value) {
    let (run, v) = run_ok("memtest", "32M", options, timeout, &["size=16M"]);
    run.check(
        run.stdout.contains("16384 KiB, 4 patterns, 0 errors"),
        &format!("memtest reports 0 errors with `{}`", options.join(" ")),
    );
    (run, v)
}

/// ksmd with `pages` pages a pass, 1 ms apart: it merges while the guest runs.
fn ksm(pages: &str) -> [&str; 5] {
    ["--ksm", "--ksm-pages-to-scan", pages, "--ksm-sleep-ms", "1"]
}

#[test]
fn ksm_merges_duplicate_pages_and_memtest_sees_no_errors() {
    if !common::require_kvm() {
        return;
    }
    // memtest balloons its 16M back, then reads it all: 4096 identical zero
    // pages for ksmd to merge while the guest verifies them.
    let (run, v) = memtest_16m(&ksm("2000"), "60s");
    let k = &v["ksm"];
    run.check(num(k, &["pages_sharing"]) > 0, "pages_sharing > 0");
    run.check(num(k, &["pages_shared"]) > 0, "pages_shared > 0");
    run.check(num(k, &["full_scans"]) > 0, "full_scans > 0");
    run.check(
        num(k, &["max_pages_sharing"]) >= num(k, &["pages_sharing"]),
        "max_pages_sharing bounds pages_sharing",
    );
    for name in ["pages_unshared", "pages_volatile", "merges", "wakeups"] {
        num(k, &[name]);
    }
    frames_returned(&run, &v);
}

/// The `ksm` guest fills pages with 4 page patterns, waits, verifies,
/// then writes one byte in every other page and verifies again: ksmd
/// merges while it waits, and every write must break the sharing (shadow
/// fault, host copy-on-write) without touching the other sharers.
#[test]
fn ksm_sharing_is_broken_by_guest_writes() {
    if !common::require_kvm_and_guest("ksm") {
        return;
    }
    let (run, v) = run_ok("ksm", "16M", &ksm("1000"), "60s", &[]);
    run.check(
        run.stdout.contains("verify after writes: 0 errors") && run.stdout.contains(", 0 errors"),
        "the ksm guest reports 0 errors",
    );
    let k = &v["ksm"];
    run.check(
        num(k, &["max_pages_sharing"]) >= 512,
        "most of the 1024 pages were merged",
    );
    run.check(num(k, &["pages_sharing"]) > 0, "pages_sharing > 0 at exit");
    run.check(
        num(k, &["pgcow"]) >= 512,
        "every write to a merged page broke the sharing by copy-on-write",
    );
    frames_returned(&run, &v);
}

#[test]
fn reclaim_swaps_out_under_small_machine_mem() {
    if !common::require_kvm() {
        return;
    }
    // 16M touched on 8M of machine memory: pages must go to swap and come back.
    let small = [
        "--machine-mem",
        "8M",
        "--reclaim",
        "--reclaim-interval-ms",
        "20",
    ];
    let (run, v) = memtest_16m(&small, "120s");
    let r = &v["reclaim"];
    run.check(num(r, &["pswpout"]) > 0, "pswpout > 0");
    run.check(num(r, &["pswpin"]) > 0, "pswpin > 0 (pages faulted back)");
    run.check(num(r, &["passes"]) > 0, "aging passes ran");
    run.check(num(r, &["working_set_max_pages"]) > 0, "a working set");
    run.check(num(r, &["pages_evicted"]) > 0, "kswapd evicted pages");
    frames_returned(&run, &v);
}

/// Both threads at once on a small machine: merged pages are skipped by
/// reclaim, evicted pages are not merged, writes break sharing of pages
/// that may also have been swapped; memtest still sees its bytes, and the
/// shadow MMU stays coherent with the host mm (`--check`).
#[test]
fn ksm_and_reclaim_together_stay_coherent() {
    if !common::require_kvm() {
        return;
    }
    let both = ["--machine-mem", "8M", "--reclaim", "--check"];
    let (run, v) = memtest_16m(&[&both[..], &ksm("1000")].concat(), "120s");
    run.check(v["check"] == "ok", "the coherence check passes");
    run.check(num(&v, &["ksm", "max_pages_sharing"]) > 0, "ksmd merged");
    run.check(num(&v, &["reclaim", "pswpout"]) > 0, "pages were swapped");
    frames_returned(&run, &v);
}

#[test]
fn exit_report_every_frame_comes_back() {
    if !common::require_kvm() {
        return;
    }
    for extra in [&[][..], &["--ksm", "--reclaim"][..]] {
        let (run, v) = run_ok("hello", "16M", extra, "30s", &[]);
        frames_returned(&run, &v);
        run.check(
            num(&v, &["exit", "shadow_pages_left"]) == 0,
            "no shadow page left",
        );
    }
}

#[test]
fn ksm_and_reclaim_need_shadow_paging() {
    for flag in ["--ksm", "--reclaim"] {
        let run = common::shadowvm(&["run", "hello", "--paging", "kvm", flag]);
        run.check(run.code == Some(2), "status 2");
        run.check(
            run.stderr.trim() == format!("shadowvm: error: {flag} needs --paging shadow"),
            "one-line error",
        );
    }
}

/// test-counter increments a counter on its own page forever; the host
/// writes one page the guest never touches. Aging passes (clear the young
/// bits, then one batched host invalidation) must see the counter page
/// young in every pass and the untouched page young only in the first.
#[test]
fn aging_keeps_the_hot_page_young_and_the_idle_page_goes_cold() {
    let Some(g) = CounterGuest::start(0, |_| {}) else {
        return;
    };
    let (sp, mm, hot) = (g.shadow.clone(), g.mm.clone(), g.hva);
    let counter = wait_for("the counter page", || g.pfn());
    // A page the guest never uses: the host writes it once.
    let idle = sp.ram().base() + (12 << 20);
    mm.write(idle, &[0x5a]).expect("host write");

    // Between passes the guest must have run: its counter moves on (an
    // event, not a time).
    const PROGRESS: u64 = 100_000;
    let flush: Arc<dyn TlbFlush> = sp.host_flush().clone();
    let mut aging = Aging::for_ram(sp.ram());
    let mut passes = Vec::new();
    for _ in 0..6 {
        g.progress_on(counter, PROGRESS);
        passes.push(aging.pass(&mm, &*flush).expect("aging pass"));
    }
    let (hot_history, idle_history) = (aging.history(hot), aging.history(idle));
    let working_set = aging.working_set();
    // The control: the same passes without the host invalidation. The
    // first still sees the bit the last real pass let the CPU set; after it
    // the host KVM keeps its stale translation and the counter page the
    // guest keeps writing looks cold: the batched flush is what makes the
    // Accessed bits fresh.
    let no_flush = shadowvm::mmu::NoFlush;
    let unflushed: Vec<_> = (0..3)
        .map(|_| {
            g.progress_on(counter, PROGRESS);
            aging.pass(&mm, &no_flush).expect("aging pass")
        })
        .collect();
    let report = common::vm::stop_vm(g.vm);

    for (i, p) in passes.iter().enumerate() {
        assert!(
            p.young.contains(&hot),
            "pass {i}: the counter page the guest keeps writing is young"
        );
        assert_eq!(
            p.young.contains(&idle),
            i == 0,
            "pass {i}: the untouched page is young only in the first pass"
        );
        assert!(
            p.flushed_frames > 0,
            "pass {i} ends with a host invalidation"
        );
    }
    assert!(
        unflushed[0].young.contains(&hot),
        "set before the last flush"
    );
    for (i, p) in unflushed.iter().enumerate().skip(1) {
        assert!(
            !p.young.contains(&hot),
            "unflushed pass {i}: without the host invalidation the Accessed bit stays clear"
        );
    }
    let full = (1u8 << AGING_HISTORY) - 1;
    assert_eq!(hot_history, Some(full), "hot page: young in every pass");
    assert_eq!(idle_history, Some(0), "idle page: out of the working set");
    // Boot-time pages went cold too: the working set shrinks to the few
    // pages the counting loop uses.
    let first = passes[0].young.len();
    let last = passes.last().map_or(0, |p| p.young.len());
    assert!(
        last < first && last <= 16,
        "young pages: {first} in the first pass, {last} in the last"
    );
    assert!(working_set <= 16, "working set {working_set}");
    let exit = report.stats.exit.expect("shadow mode reports the teardown");
    assert!(exit.frames_returned, "{exit:?}");
}
