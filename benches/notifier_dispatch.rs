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
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
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

/// An `MmuNotifierMm` with `n` no-op notifiers; the registrations must be
/// kept alive for as long as the list is measured.
fn list_with(n: usize) -> (Arc<MmuNotifierMm>, Vec<MmuNotifier>) {
    let list = Arc::new(MmuNotifierMm::new());
    let pin: Arc<dyn Any + Send + Sync> = Arc::new(());
    let regs = (0..n)
        .map(|_| list.register_locked(Arc::new(Noop), pin.clone()))
        .collect();
    assert_eq!(list.len(), n);
    (list, regs)
}

/// Short runs: the machine has 2 shared, noisy vCPUs; compare ratios.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

fn baselines(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");

    // One indirect call through the same trait object type dispatch uses.
    // `black_box` on the reference keeps the call from being devirtualized.
    let noop = Noop;
    let ops: &dyn MmuNotifierOps = &noop;
    let r = range();
    g.bench_function("indirect_call", |b| {
        b.iter(|| black_box(ops).invalidate_range_start(black_box(&r)))
    });
    g.bench_function("indirect_call_pair", |b| {
        b.iter(|| {
            let o = black_box(ops);
            let res = o.invalidate_range_start(black_box(&r));
            o.invalidate_range_end(black_box(&r));
            res
        })
    });

    // srcu_read_lock + srcu_read_unlock, nothing inside.
    let srcu = Srcu::new();
    g.bench_function("srcu_read_lock_unlock", |b| {
        b.iter(|| drop(black_box(&srcu).read_lock()))
    });
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    let r = range();
    for n in [0usize, 1, 4] {
        let (list, regs) = list_with(n);
        let mut g = c.benchmark_group(format!("dispatch/{n}_notifiers"));

        // The pair as the mm issues it (zap_page_range, KSM, COW:
        // `invalidate_range` already called under the PTE lock, only_end).
        g.bench_function("invalidate_range_start_end", |b| {
            b.iter(|| {
                let l = black_box(&*list);
                let res = l.invalidate_range_start(black_box(&r));
                l.invalidate_range_end(black_box(&r), true);
                res
            })
        });
        // The full `invalidate_range_end`, which calls `invalidate_range`
        // first.
        g.bench_function("invalidate_range_start_end_full", |b| {
            b.iter(|| {
                let l = black_box(&*list);
                let res = l.invalidate_range_start(black_box(&r));
                l.invalidate_range_end(black_box(&r), false);
                res
            })
        });
        g.bench_function("change_pte", |b| {
            b.iter(|| black_box(&*list).change_pte(black_box(START), black_box(PTE)))
        });
        g.bench_function("clear_flush_young", |b| {
            b.iter(|| black_box(&*list).clear_flush_young(black_box(START), black_box(END)))
        });
        g.bench_function("clear_young", |b| {
            b.iter(|| black_box(&*list).clear_young(black_box(START), black_box(END)))
        });
        g.bench_function("test_young", |b| {
            b.iter(|| black_box(&*list).test_young(black_box(START)))
        });
        g.bench_function("invalidate_range", |b| {
            b.iter(|| black_box(&*list).invalidate_range(black_box(START), black_box(END)))
        });
        if n == 0 {
            // What `Mm::mn_invalidate_range_start/end` do: test
            // `mm_has_notifiers` first and skip SRCU entirely.
            g.bench_with_input(BenchmarkId::new("mm_fast_path_start_end", n), &r, |b, r| {
                b.iter(|| {
                    let l = black_box(&*list);
                    let mut res = Ok(());
                    if l.has_notifiers() {
                        res = l.invalidate_range_start(black_box(r));
                    }
                    if l.has_notifiers() {
                        l.invalidate_range_end(black_box(r), true);
                    }
                    res
                })
            });
        }
        g.finish();
        drop(regs);
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = baselines, dispatch
}
criterion_main!(benches);
