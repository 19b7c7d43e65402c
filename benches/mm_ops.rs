//! Issue 2: the simulated host mm.
//!
//! * `madvise_dontneed` of one present page in an mm with 1, 1,000 and
//!   1,000,000 mapped (present) pages: the cost must not grow with the
//!   mapped total. Each mm is populated once per size, lazily, the first time
//!   one of its benchmarks runs (1M pages take a few seconds and 4 GiB).
//! * KSM over 256 MiB (65,536 pages) of a MERGEABLE VMA, half of the pages
//!   copies of a few patterns and half unique: time of `ksm_scan` passes
//!   until merging converges, measured by criterion (`iter_custom`, a fresh
//!   mm built untimed for every iteration, 10 flat samples), then a per-pass
//!   table with MiB/s scanned and merged and the memory saved.
//!
//! Under `cargo test --benches` (criterion's test mode) the sizes shrink so
//! that the routines are only smoke-tested.
//!
//! Run: `cargo bench --bench mm_ops`. Results: docs/PERFORMANCE.md.

use std::cell::{OnceCell, RefCell};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use shadowvm::mm::{Access, Hva, KsmStats, Mm, MmapFlags, PAGE_SIZE, Prot};
use shadowvm::notifier::{MmuNotifier, MmuNotifierOps};

/// Criterion's test mode (`cargo test --benches`, `cargo bench -- --test`):
/// no `--bench` argument, or `--test`.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

/// An mm with `pages` present, writable pages in one VMA.
struct Populated {
    mm: Arc<Mm>,
    base: Hva,
    pages: u64,
    _notifier: Option<MmuNotifier>,
}

impl Populated {
    fn new(pages: u64, with_notifier: bool) -> Self {
        // A few spare frames: a re-fault allocates before the next drop.
        let mm = Mm::new_anonymous(pages + 64).expect("machine memory");
        let base = mm
            .mmap(None, pages * PAGE_SIZE, rw(), MmapFlags::empty())
            .expect("mmap");
        let t = Instant::now();
        for i in 0..pages {
            mm.handle_mm_fault(base + i * PAGE_SIZE, Access::Write)
                .expect("populate");
        }
        let took = t.elapsed();
        assert_eq!(mm.nr_present() as u64, pages);
        println!("  (populated {pages} pages in {took:.2?})");
        let notifier = with_notifier.then(|| {
            mm.mmu_notifier_register(Arc::new(Noop))
                .expect("register notifier")
        });
        Self {
            mm,
            base,
            pages,
            _notifier: notifier,
        }
    }

    fn page(&self, i: u64) -> Hva {
        self.base + (i % self.pages) * PAGE_SIZE
    }
}

/// A notifier with every callback, each a no-op.
struct Noop;
impl MmuNotifierOps for Noop {}

fn madvise(c: &mut Criterion) {
    let big = if test_mode() { 4_096 } else { 1_000_000 };
    let mut g = c.benchmark_group("madvise_dontneed");
    for mapped in [1, 1_000, big] {
        let cell = OnceCell::new();
        let mm = || cell.get_or_init(|| Populated::new(mapped, false));

        // Drop one page and write it back (a re-fault: zero-fill of a fresh
        // frame), the pair timed together.
        g.bench_with_input(
            BenchmarkId::new("dontneed+refault", mapped),
            &mapped,
            |b, _| {
                let p = mm();
                let page = p.page(p.pages / 2);
                b.iter(|| {
                    p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap();
                    p.mm.write(page, &[1]).unwrap();
                })
            },
        );

        // Only the drop is timed; the page is re-faulted in the setup.
        g.bench_with_input(BenchmarkId::new("dontneed", mapped), &mapped, |b, _| {
            let p = mm();
            let page = p.page(p.pages / 2);
            b.iter_batched(
                || p.mm.write(page, &[1]).unwrap(),
                |()| p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap(),
                BatchSize::PerIteration,
            )
        });

        // As above, but every iteration drops a different page, scattered
        // over the whole mapping (cold page-table and page-metadata lines).
        if mapped > 1 {
            g.bench_with_input(
                BenchmarkId::new("dontneed_scattered", mapped),
                &mapped,
                |b, _| {
                    let p = mm();
                    // 618,033 is coprime to 1,000 and 1,000,000: a full cycle.
                    let mut i = 0u64;
                    b.iter_batched(
                        || {
                            i = (i + 618_033) % p.pages;
                            let page = p.page(i);
                            p.mm.write(page, &[1]).unwrap();
                            page
                        },
                        |page| p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap(),
                        BatchSize::PerIteration,
                    )
                },
            );
        }
    }

    // The same one-page drop with a no-op notifier registered: the cost of
    // the notifier calls (invalidate_range_start, invalidate_range,
    // invalidate_range_end) inside a real operation.
    let cell = OnceCell::new();
    g.bench_with_input(BenchmarkId::new("dontneed_1_notifier", 1), &1, |b, _| {
        let p = cell.get_or_init(|| Populated::new(1, true));
        let page = p.page(0);
        b.iter_batched(
            || p.mm.write(page, &[1]).unwrap(),
            |()| p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

// ---- KSM ----

/// Distinct contents of the duplicate half.
const PATTERNS: u64 = 16;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Content of page `i`: even pages are one of `PATTERNS` patterns, odd pages
/// are unique.
fn fill_page(buf: &mut [u8], i: u64) {
    let seed = if i.is_multiple_of(2) {
        u64::MAX - (i / 2) % PATTERNS
    } else {
        i
    };
    for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let v = splitmix64(splitmix64(seed) ^ w as u64);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// A fresh mm with `pages` pages of the half-duplicate content in one
/// MERGEABLE VMA.
fn ksm_mm(pages: u64) -> Arc<Mm> {
    let mm = Mm::new_anonymous(pages + 64).expect("machine memory");
    let len = pages * PAGE_SIZE;
    let base = mm.mmap(None, len, rw(), MmapFlags::empty()).expect("mmap");
    mm.madvise_mergeable(base, len).expect("MADV_MERGEABLE");
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for i in 0..pages {
        fill_page(&mut buf, i);
        mm.write(base + i * PAGE_SIZE, &buf).expect("write");
    }
    mm
}

struct Pass {
    time: Duration,
    scanned: u64,
    merged: u64,
}

struct KsmRun {
    total: Duration,
    passes: Vec<Pass>,
    stats: KsmStats,
}

/// Full passes (one `ksm_scan(pages)` call each) until a pass merges
/// nothing, and at least 3: a page must be seen unchanged on two passes
/// before it enters the unstable tree.
fn ksm_converge(mm: &Mm, pages: u64) -> KsmRun {
    let mut passes = Vec::new();
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let r = mm.ksm_scan(pages).expect("ksm_scan");
        passes.push(Pass {
            time: t.elapsed(),
            scanned: r.scanned,
            merged: r.merged,
        });
        if passes.len() >= 3 && r.merged == 0 {
            break;
        }
        assert!(passes.len() < 20, "KSM did not converge");
    }
    let total = start.elapsed();
    let stats = mm.ksm_stats();
    // Every duplicate but one per pattern now maps a shared page.
    assert_eq!(stats.pages_shared, PATTERNS);
    assert_eq!(stats.pages_sharing, pages / 2 - PATTERNS);
    KsmRun {
        total,
        passes,
        stats,
    }
}

fn mib(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / (1024.0 * 1024.0)
}

fn ksm(c: &mut Criterion) {
    let pages: u64 = if test_mode() { 1_024 } else { 65_536 };
    let runs = RefCell::new(Vec::<KsmRun>::new());
    let mut g = c.benchmark_group("ksm");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.bench_function(format!("converge_{}MiB", mib(pages) as u64), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let mm = ksm_mm(pages);
                let run = ksm_converge(&mm, pages);
                timed += run.total;
                runs.borrow_mut().push(run);
            }
            timed
        })
    });
    g.finish();

    let mut runs = runs.into_inner();
    if runs.is_empty() {
        return; // filtered out
    }
    runs.sort_by_key(|r| r.total);
    let med = &runs[runs.len() / 2];
    let scanned: u64 = med.passes.iter().map(|p| p.scanned).sum();
    let merged: u64 = med.passes.iter().map(|p| p.merged).sum();
    let secs = med.total.as_secs_f64();
    println!(
        "\nKSM over {:.0} MiB ({pages} pages, half duplicates of {PATTERNS} patterns), \
         median of {} runs (total {:.1?}, min {:.1?}, max {:.1?}):",
        mib(pages),
        runs.len(),
        med.total,
        runs[0].total,
        runs[runs.len() - 1].total,
    );
    println!("| pass | time | pages scanned | pages merged | MiB/s scanned | MiB/s merged |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, p) in med.passes.iter().enumerate() {
        let s = p.time.as_secs_f64();
        println!(
            "| {} | {:.1?} | {} | {} | {:.0} | {:.0} |",
            i + 1,
            p.time,
            p.scanned,
            p.merged,
            mib(p.scanned) / s,
            mib(p.merged) / s,
        );
    }
    println!(
        "| all | {:.1?} | {scanned} | {merged} | {:.0} | {:.0} |",
        med.total,
        mib(scanned) / secs,
        mib(merged) / secs,
    );
    let st = med.stats;
    println!(
        "pages_shared {}, pages_sharing {} (saved {:.1} MiB), pages_unshared {}, \
         full_scans {}, merges {}\n",
        st.pages_shared,
        st.pages_sharing,
        mib(st.pages_sharing),
        st.pages_unshared,
        st.full_scans,
        st.merges,
    );
}

criterion_group! {
    name = benches;
    // Short runs: 2 shared, noisy vCPUs; compare ratios from one run.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = madvise, ksm
}
criterion_main!(benches);
