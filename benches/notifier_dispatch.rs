//! Issue 2: the cost of MMU notifier dispatch.
//!
//! For 0, 1 and 4 registered no-op notifiers, each dispatch function of
//! `MmuNotifierMm`, beside two baselines: a plain indirect call through
//! `&dyn MmuNotifierOps` and a bare SRCU `read_lock`/`read_unlock`. With 0
//! notifiers the mm's own fast path (`if has_notifiers() { .. }`, what the
//! private `Mm::mn_*` wrappers do) is measured too.
//!
//! Run: `cargo bench --bench notifier_dispatch`. Results: docs/PERFORMANCE.md.

use std::any::Any;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use shadowvm::notifier::{
    MmuNotifier, MmuNotifierMm, MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent, NotifierPte, Srcu,
};

/// A notifier that provides every callback (the default `callbacks()`), each
/// a no-op: what is left is the cost of getting there.
struct Noop;
impl MmuNotifierOps for Noop {}

const START: u64 = 0x7000_0000_0000;
const END: u64 = START + 4096;
const PTE: NotifierPte = NotifierPte {
    frame: 42,
    writable: false,
};

fn range() -> MmuNotifierRange {
    MmuNotifierRange::new(MmuNotifyEvent::Clear, START, END)
}

/// A notifier list and the registrations that must stay alive while it is
/// measured.
type Registered = (Arc<MmuNotifierMm>, Vec<MmuNotifier>);

/// An `MmuNotifierMm` with `n` no-op notifiers.
fn list_with(n: usize) -> Registered {
    let list = Arc::new(MmuNotifierMm::new());
    let pin: Arc<dyn Any + Send + Sync> = Arc::new(());
    let regs = (0..n)
        .map(|_| list.register_locked(Arc::new(Noop), pin.clone()))
        .collect();
    assert_eq!(list.len(), n);
    (list, regs)
}

/// Takes each measured operation, by name: criterion's groups and the
/// interleaved table time the same closures.
trait Ops<'a> {
    fn op<R>(&mut self, name: &str, f: impl Fn() -> R + Copy + 'a);
}

/// The baselines: one indirect call through the same trait object type
/// dispatch uses (`black_box` on the reference keeps the call from being
/// devirtualized), a pair of them, and srcu_read_lock + srcu_read_unlock
/// with nothing inside.
fn baseline_ops<'a>(
    ops: &'a dyn MmuNotifierOps,
    srcu: &'a Srcu,
    r: &'a MmuNotifierRange,
    to: &mut impl Ops<'a>,
) {
    to.op("indirect_call", move || {
        black_box(ops).invalidate_range_start(black_box(r))
    });
    to.op("indirect_call_pair", move || {
        let o = black_box(ops);
        let res = o.invalidate_range_start(black_box(r));
        o.invalidate_range_end(black_box(r));
        res
    });
    to.op("srcu_read_lock_unlock", move || {
        drop(black_box(srcu).read_lock())
    });
}

/// Each dispatch function of the list `l`, which has `n` notifiers.
fn dispatch_ops<'a>(
    l: &'a MmuNotifierMm,
    n: usize,
    r: &'a MmuNotifierRange,
    to: &mut impl Ops<'a>,
) {
    // The pair as the mm issues it (zap_page_range, KSM, COW:
    // `invalidate_range` already called under the PTE lock, only_end).
    to.op("invalidate_range_start_end", move || {
        let l = black_box(l);
        let res = l.invalidate_range_start(black_box(r));
        l.invalidate_range_end(black_box(r), true);
        res
    });
    // The full `invalidate_range_end`, which calls `invalidate_range`
    // first.
    to.op("invalidate_range_start_end_full", move || {
        let l = black_box(l);
        let res = l.invalidate_range_start(black_box(r));
        l.invalidate_range_end(black_box(r), false);
        res
    });
    to.op("change_pte", move || {
        black_box(l).change_pte(black_box(START), black_box(PTE))
    });
    to.op("clear_flush_young", move || {
        black_box(l).clear_flush_young(black_box(START), black_box(END))
    });
    to.op("clear_young", move || {
        black_box(l).clear_young(black_box(START), black_box(END))
    });
    to.op("test_young", move || {
        black_box(l).test_young(black_box(START))
    });
    to.op("invalidate_range", move || {
        black_box(l).invalidate_range(black_box(START), black_box(END))
    });
    if n == 0 {
        // What `Mm::mn_invalidate_range_start/end` do: test
        // `mm_has_notifiers` first and skip SRCU entirely.
        to.op("mm_fast_path_start_end", move || {
            let l = black_box(l);
            let mut res = Ok(());
            if l.has_notifiers() {
                res = l.invalidate_range_start(black_box(r));
            }
            if l.has_notifiers() {
                l.invalidate_range_end(black_box(r), true);
            }
            res
        });
    }
}

/// Each operation a benchmark of the group.
impl<'a> Ops<'a> for BenchmarkGroup<'_, WallTime> {
    fn op<R>(&mut self, name: &str, f: impl Fn() -> R + Copy + 'a) {
        self.bench_function(name, |b| b.iter(f));
    }
}

/// Short runs: the machine has 2 shared, noisy vCPUs; compare ratios.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

fn baselines(c: &mut Criterion) {
    let (noop, srcu, r) = (Noop, Srcu::new(), range());
    let mut g = c.benchmark_group("baseline");
    baseline_ops(&noop, &srcu, &r, &mut g);
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    let r = range();
    for n in [0usize, 1, 4] {
        let (list, regs) = list_with(n);
        let mut g = c.benchmark_group(format!("dispatch/{n}_notifiers"));
        dispatch_ops(&list, n, &r, &mut g);
        g.finish();
        drop(regs);
    }
}

/// Criterion's test mode (`cargo test --benches`, `cargo bench -- --test`).
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// Whether the interleaved table belongs to this run: not when a criterion
/// filter (a bare argument) is given that selects neither `dispatch` nor
/// `baseline`.
fn table_wanted() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty()
        || filters.iter().any(|f| {
            ["dispatch", "baseline"]
                .iter()
                .any(|g| g.contains(f.as_str()) || f.contains(g))
        })
}

/// A case of the interleaved table: runs its operation `n` times and returns
/// the elapsed time.
type Case<'a> = (String, Box<dyn Fn(u32) -> Duration + 'a>);

/// The cases of the table, each name after `prefix`.
struct Cases<'a> {
    prefix: String,
    cases: Vec<Case<'a>>,
}

impl<'a> Ops<'a> for Cases<'a> {
    fn op<R>(&mut self, name: &str, f: impl Fn() -> R + Copy + 'a) {
        let run = move |n| {
            let t = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            t.elapsed()
        };
        let name = format!("{}{name}", self.prefix);
        self.cases.push((name, Box::new(run)));
    }
}

/// Every case of the criterion groups again, interleaved: each repetition
/// times a batch of every case in turn, so noise on this shared machine hits
/// all cases alike, and the minimum over the repetitions filters preemption
/// out. Printed as ns per operation (min / median), with the ratios.
fn interleaved(_c: &mut Criterion) {
    if !table_wanted() {
        return;
    }
    let (reps, batch) = if test_mode() { (3, 10) } else { (2_000, 2_000) };
    let (noop, srcu, r) = (Noop, Srcu::new(), range());
    let lists: Vec<(usize, Registered)> =
        [0, 1, 4].into_iter().map(|n| (n, list_with(n))).collect();

    let mut table = Cases {
        prefix: String::new(),
        cases: Vec::new(),
    };
    baseline_ops(&noop, &srcu, &r, &mut table);
    for (n, (list, _)) in &lists {
        table.prefix = format!("{n}/");
        dispatch_ops(list, *n, &r, &mut table);
    }
    let cases = table.cases;

    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); cases.len()];
    for _ in 0..reps {
        for (i, (_, run)) in cases.iter().enumerate() {
            times[i].push(run(batch).as_nanos() as f64 / f64::from(batch));
        }
    }
    let stats: Vec<(f64, f64)> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        })
        .collect();
    let get = |name: &str| {
        let i = cases.iter().position(|(n, _)| n == name).expect("case");
        stats[i]
    };

    println!("\nInterleaved, {reps} repetitions of {batch} calls, ns per call as min / median:");
    for (i, (name, _)) in cases.iter().enumerate() {
        if !name.contains('/') {
            println!("  {name}: {:.2} / {:.2}", stats[i].0, stats[i].1);
        }
    }
    println!(
        "  0/mm_fast_path_start_end: {:.2} / {:.2}",
        get("0/mm_fast_path_start_end").0,
        get("0/mm_fast_path_start_end").1
    );
    let (call, pair) = (get("indirect_call"), get("indirect_call_pair"));
    println!(
        "| callback | 0 notifiers | 1 notifier | 4 notifiers | per extra notifier, (4 − 1) / 3 | \
         1 notifier / plain indirect call |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for cb in [
        "invalidate_range_start_end",
        "invalidate_range_start_end_full",
        "change_pte",
        "clear_flush_young",
        "clear_young",
        "test_young",
        "invalidate_range",
    ] {
        let [s0, s1, s4] = [0, 1, 4].map(|n| get(&format!("{n}/{cb}")));
        // The pair makes two calls per notifier; compare with two plain calls.
        let base = if cb.starts_with("invalidate_range_start") {
            pair
        } else {
            call
        };
        println!(
            "| {cb} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1}× / {:.1}× |",
            s0.0,
            s0.1,
            s1.0,
            s1.1,
            s4.0,
            s4.1,
            (s4.0 - s1.0) / 3.0,
            (s4.1 - s1.1) / 3.0,
            s1.0 / base.0,
            s1.1 / base.1,
        );
    }
    println!();
}

criterion_group! {
    name = benches;
    config = config();
    targets = baselines, dispatch, interleaved
}
criterion_main!(benches);
