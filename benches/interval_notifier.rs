//! Issue 13: the cost of `mmu_interval_notifier`.
//!
//! * Invalidation (`invalidate_range_start` + `invalidate_range_end`) with
//!   1, 100 and 10,000 subscribers of which exactly one overlaps the range:
//!   interval subscriptions found through the interval tree, against list
//!   notifiers, every one of which is called and compares the range with
//!   its own (what a driver on the 4.19 API must do).
//! * A device fault through `read_begin` / `hva_to_pfn` / device lock /
//!   `read_retry` / install, beside its parts: `hva_to_pfn` alone, the
//!   sequence protocol alone, and a DMA that hits the IOTLB.
//!
//! Run: `cargo bench --bench interval_notifier`. Results:
//! docs/PERFORMANCE.md. Ends with an interleaved table (every repetition
//! times every case once in turn), the figures to read on a shared machine.

use std::any::Any;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use parking_lot::Mutex;
use shadowvm::dma::{DmaConfig, DmaDevice};
use shadowvm::mm::{Access, Mm, MmapFlags, PAGE_SIZE, Prot};
use shadowvm::notifier::{
    Callbacks, MmuInterval, MmuIntervalNotifier, MmuIntervalNotifierOps, MmuNotifier,
    MmuNotifierMm, MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent, NotifierError,
};

const BASE: u64 = 0x7000_0000_0000;
/// Each subscriber covers its own 2-page slot.
const SLOT: u64 = 2 * PAGE_SIZE;
const SIZES: [usize; 3] = [1, 100, 10_000];

/// A list notifier with a range of its own: called for every invalidation,
/// it tests the overlap and returns.
struct RangedListNotifier {
    start: u64,
    end: u64,
}

impl RangedListNotifier {
    fn hit(&self, r: &MmuNotifierRange) -> bool {
        r.start < self.end && self.start < r.end
    }
}

impl MmuNotifierOps for RangedListNotifier {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }
    fn invalidate_range_start(&self, r: &MmuNotifierRange) -> Result<(), NotifierError> {
        black_box(self.hit(r));
        Ok(())
    }
    fn invalidate_range_end(&self, r: &MmuNotifierRange) {
        black_box(self.hit(r));
    }
}

/// An interval driver that does only what the protocol asks.
struct SetSeq;

impl MmuIntervalNotifierOps for SetSeq {
    fn invalidate(&self, interval: &MmuInterval, _r: &MmuNotifierRange, cur_seq: u64) -> bool {
        interval.set_seq(cur_seq);
        true
    }
}

fn pin() -> Arc<dyn Any + Send + Sync> {
    Arc::new(())
}

/// The range: one page inside the middle subscriber's slot.
fn range(n: usize) -> MmuNotifierRange {
    let s = BASE + (n as u64 / 2) * SLOT;
    MmuNotifierRange::new(MmuNotifyEvent::Clear, s, s + PAGE_SIZE)
}

fn with_list(n: usize) -> (Arc<MmuNotifierMm>, Vec<MmuNotifier>) {
    let l = Arc::new(MmuNotifierMm::new());
    let regs = (0..n as u64)
        .map(|i| {
            let start = BASE + i * SLOT;
            l.register_locked(
                Arc::new(RangedListNotifier {
                    start,
                    end: start + SLOT,
                }),
                pin(),
            )
        })
        .collect();
    (l, regs)
}

fn with_itree(n: usize) -> (Arc<MmuNotifierMm>, Vec<MmuIntervalNotifier>) {
    let l = Arc::new(MmuNotifierMm::new());
    let subs = (0..n as u64)
        .map(|i| {
            l.mmu_interval_notifier_insert_locked(BASE + i * SLOT, SLOT, Arc::new(SetSeq), pin())
                .expect("insert")
        })
        .collect();
    (l, subs)
}

fn start_end(l: &MmuNotifierMm, r: &MmuNotifierRange) {
    let l = black_box(l);
    black_box(l.invalidate_range_start(black_box(r))).ok();
    l.invalidate_range_end(black_box(r), true);
}

/// A device over one present page of a fresh mm.
struct Fault {
    mm: Arc<Mm>,
    hva: u64,
    dev: DmaDevice,
    /// One interval and a driver lock, for the protocol alone.
    proto: (Arc<MmuNotifierMm>, MmuIntervalNotifier, Mutex<()>),
}

fn fault_setup() -> Fault {
    let mm = Mm::new_anonymous(64).expect("mm");
    let hva = mm
        .mmap(
            None,
            PAGE_SIZE,
            Prot::READ | Prot::WRITE,
            MmapFlags::empty(),
        )
        .expect("mmap");
    mm.write(hva, &[1; 8]).expect("write");
    let dev = DmaDevice::attach(&mm, hva, PAGE_SIZE, DmaConfig::default()).expect("attach");
    let l = Arc::new(MmuNotifierMm::new());
    let sub = l
        .mmu_interval_notifier_insert_locked(BASE, PAGE_SIZE, Arc::new(SetSeq), pin())
        .expect("insert");
    Fault {
        mm,
        hva,
        dev,
        proto: (l, sub, Mutex::new(())),
    }
}

fn protocol_alone(sub: &MmuIntervalNotifier, lock: &Mutex<()>) -> bool {
    let seq = black_box(sub).read_begin();
    let _g = lock.lock();
    sub.read_retry(seq)
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

fn invalidate(c: &mut Criterion) {
    let mut g = c.benchmark_group("invalidate");
    for n in SIZES {
        let r = range(n);
        let (list, _regs) = with_list(n);
        g.bench_with_input(BenchmarkId::new("list", n), &n, |b, _| {
            b.iter(|| start_end(&list, &r))
        });
        let (tree, _subs) = with_itree(n);
        g.bench_with_input(BenchmarkId::new("itree", n), &n, |b, _| {
            b.iter(|| start_end(&tree, &r))
        });
    }
    g.finish();
}

fn device_fault(c: &mut Criterion) {
    let f = fault_setup();
    let mut g = c.benchmark_group("device_fault");
    g.bench_function("fault", |b| {
        b.iter(|| black_box(&f.dev).fault(0, Access::Read).expect("fault"))
    });
    g.bench_function("hva_to_pfn", |b| {
        b.iter(|| {
            f.mm.hva_to_pfn(black_box(f.hva), Access::Read)
                .expect("pfn")
        })
    });
    g.bench_function("read_begin_retry", |b| {
        b.iter(|| protocol_alone(&f.proto.1, &f.proto.2))
    });
    g.bench_function("dma_read_u64_hit", |b| {
        b.iter(|| black_box(&f.dev).read_u64(0).expect("dma"))
    });
    g.finish();
}

/// Criterion's test mode (`cargo test --benches`, `cargo bench -- --test`).
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

type Case<'a> = (String, Box<dyn Fn(u32) -> Duration + 'a>);

fn case<'a, R>(name: impl Into<String>, f: impl Fn() -> R + 'a) -> Case<'a> {
    let run = move |n| {
        let t = Instant::now();
        for _ in 0..n {
            black_box(f());
        }
        t.elapsed()
    };
    (name.into(), Box::new(run))
}

/// Every case again, interleaved; ns per operation, min / median.
fn interleaved(_c: &mut Criterion) {
    let (reps, batch) = if test_mode() { (3, 10) } else { (1_000, 200) };
    let setups: Vec<_> = SIZES
        .iter()
        .map(|&n| (n, range(n), with_list(n), with_itree(n)))
        .collect();
    let f = fault_setup();
    let mut cases: Vec<Case<'_>> = Vec::new();
    for (n, r, (list, _), (tree, _)) in &setups {
        cases.push(case(format!("list/{n}"), move || start_end(list, r)));
        cases.push(case(format!("itree/{n}"), move || start_end(tree, r)));
    }
    let f = &f;
    cases.push(case("fault", || f.dev.fault(0, Access::Read).is_ok()));
    cases.push(case("hva_to_pfn", || {
        f.mm.hva_to_pfn(f.hva, Access::Read).is_ok()
    }));
    cases.push(case("read_begin_retry", || {
        protocol_alone(&f.proto.1, &f.proto.2)
    }));
    cases.push(case("dma_read_u64_hit", || f.dev.read_u64(0).is_ok()));

    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); cases.len()];
    for _ in 0..reps {
        for (i, (_, run)) in cases.iter().enumerate() {
            times[i].push(run(batch).as_nanos() as f64 / f64::from(batch));
        }
    }
    let stat: Vec<(f64, f64)> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        })
        .collect();
    let get = |name: &str| stat[cases.iter().position(|(n, _)| n == name).expect("case")];

    println!("\nInterleaved, {reps} repetitions of {batch} calls, ns as min / median:");
    println!("| start+end, one subscriber hit | list | interval tree | list / tree |");
    println!("| --- | ---: | ---: | ---: |");
    for n in SIZES {
        let (l, t) = (get(&format!("list/{n}")), get(&format!("itree/{n}")));
        println!(
            "| {n} subscribers | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} / {:.2} |",
            l.0,
            l.1,
            t.0,
            t.1,
            l.0 / t.0,
            l.1 / t.1
        );
    }
    println!("| device fault and its parts | ns | / fault |");
    println!("| --- | ---: | ---: |");
    let fault = get("fault");
    for name in [
        "fault",
        "hva_to_pfn",
        "read_begin_retry",
        "dma_read_u64_hit",
    ] {
        let s = get(name);
        println!(
            "| {name} | {:.0} / {:.0} | {:.2} / {:.2} |",
            s.0,
            s.1,
            s.0 / fault.0,
            s.1 / fault.1
        );
    }
    println!();
}

criterion_group! {
    name = benches;
    config = config();
    targets = invalidate, device_fault, interleaved
}
criterion_main!(benches);
