//! Issue 2: the simulated host mm.
//!
//! * `madvise_dontneed` of one present page in an mm with 1, 1,000 and
//!   1,000,000 mapped (present) pages: the cost must not grow with the
//!   mapped total. Each mm is populated once, the first time one of its
//!   benchmarks runs (1M pages take 10-20 s and 4 GiB), and kept until the
//!   process exits. After the criterion benchmarks, the same cases run
//!   interleaved (every repetition measures every size) and are printed as
//!   min / median: on this shared, noisy machine that gives the fairest
//!   ratio between sizes.
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

use std::cell::RefCell;
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

/// The populated mm of `pages` pages (with a no-op notifier or not), built
/// on first use and kept (leaked) until the process exits, so the criterion
/// benchmarks and the interleaved table share one 1M-page mm.
fn populated(pages: u64, with_notifier: bool) -> &'static Populated {
    thread_local! {
        static CACHE: RefCell<Vec<(u64, bool, &'static Populated)>> =
            const { RefCell::new(Vec::new()) };
    }
    CACHE.with(|c| {
        if let Some(&(_, _, p)) = c
            .borrow()
            .iter()
            .find(|&&(n, w, _)| n == pages && w == with_notifier)
        {
            return p;
        }
        let p: &'static Populated = Box::leak(Box::new(Populated::new(pages, with_notifier)));
        c.borrow_mut().push((pages, with_notifier, p));
        p
    })
}

fn sizes() -> [u64; 3] {
    [1, 1_000, if test_mode() { 4_096 } else { 1_000_000 }]
}

/// Steps through every page of an mm of `pages` pages in a scattered order:
/// 618,033 is coprime to 1,000 and 1,000,000 (and to 4,096).
fn scatter(i: u64, pages: u64) -> u64 {
    (i + 618_033) % pages
}

fn madvise(c: &mut Criterion) {
    let mut g = c.benchmark_group("madvise_dontneed");
    for mapped in sizes() {
        // Drop one page and write it back (a re-fault: zero-fill of a fresh
        // frame), the pair timed together.
        g.bench_with_input(
            BenchmarkId::new("dontneed+refault", mapped),
            &mapped,
            |b, &n| {
                let p = populated(n, false);
                let page = p.page(p.pages / 2);
                b.iter(|| {
                    p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap();
                    p.mm.write(page, &[1]).unwrap();
                })
            },
        );

        // Only the drop is timed; the page is re-faulted in the setup.
        g.bench_with_input(BenchmarkId::new("dontneed", mapped), &mapped, |b, &n| {
            let p = populated(n, false);
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
                |b, &n| {
                    let p = populated(n, false);
                    let mut i = 0u64;
                    b.iter_batched(
                        || {
                            i = scatter(i, p.pages);
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
    g.bench_with_input(BenchmarkId::new("dontneed_1_notifier", 1), &1, |b, &n| {
        let p = populated(n, true);
        let page = p.page(0);
        b.iter_batched(
            || p.mm.write(page, &[1]).unwrap(),
            |()| p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Minimum and median of per-operation times, in ns.
fn min_median(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

/// The madvise cases again, interleaved: every repetition measures every
/// size once, so a burst of noise on this shared machine hits all sizes
/// alike, and the minimum over the repetitions filters preemption out.
/// Printed as a table of ns per operation; runs unless a criterion filter
/// excludes `madvise_dontneed`.
fn madvise_interleaved(_c: &mut Criterion) {
    if !table_wanted("madvise_dontneed") {
        return;
    }
    let (reps, pairs) = if test_mode() { (3, 2) } else { (10_000, 16) };
    let mms: Vec<&Populated> = sizes().iter().map(|&n| populated(n, false)).collect();
    let with_notifier = populated(1, true);
    let k = mms.len();
    let (mut drop_t, mut scat_t, mut pair_t) = (vec![vec![]; k], vec![vec![]; k], vec![vec![]; k]);
    let (mut noti_t, mut timer_t) = (vec![], vec![]);
    let mut cursor = vec![0u64; k];
    let timed = |page: Hva, p: &Populated| {
        p.mm.write(page, &[1]).unwrap();
        let t = Instant::now();
        p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap();
        t.elapsed().as_nanos() as f64
    };
    for _ in 0..reps {
        let t = Instant::now();
        timer_t.push(black_box(t).elapsed().as_nanos() as f64);
        for (i, p) in mms.iter().enumerate() {
            drop_t[i].push(timed(p.page(p.pages / 2), p));
            cursor[i] = scatter(cursor[i], p.pages);
            scat_t[i].push(timed(p.page(cursor[i]), p));
            let page = p.page(p.pages / 2);
            let t = Instant::now();
            for _ in 0..pairs {
                p.mm.madvise_dontneed(black_box(page), PAGE_SIZE).unwrap();
                p.mm.write(page, &[1]).unwrap();
            }
            pair_t[i].push(t.elapsed().as_nanos() as f64 / pairs as f64);
        }
        noti_t.push(timed(with_notifier.page(0), with_notifier));
    }
    let (timer_min, timer_med) = min_median(&mut timer_t);
    println!(
        "\nmadvise(DONTNEED) of one page, interleaved, {reps} repetitions, ns per operation \
         as min / median (single drops include one Instant::now pair: {timer_min:.0} / \
         {timer_med:.0} ns):"
    );
    println!("| mapped pages | dontneed+refault | dontneed | dontneed, scattered page |");
    println!("| ---: | ---: | ---: | ---: |");
    let mut rows = Vec::new();
    for i in 0..k {
        let pr = min_median(&mut pair_t[i]);
        let dr = min_median(&mut drop_t[i]);
        let sc = min_median(&mut scat_t[i]);
        let scat = if mms[i].pages > 1 {
            format!("{:.0} / {:.0}", sc.0, sc.1)
        } else {
            "—".into()
        };
        println!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0} | {scat} |",
            mms[i].pages, pr.0, pr.1, dr.0, dr.1
        );
        rows.push((pr, dr, sc));
    }
    let (last, first) = (rows[k - 1], rows[0]);
    println!(
        "ratio {} pages / 1 page (min, median): dontneed+refault {:.2}× / {:.2}×, \
         dontneed {:.2}× / {:.2}×; scattered {} / {} pages: {:.2}× / {:.2}×",
        mms[k - 1].pages,
        last.0.0 / first.0.0,
        last.0.1 / first.0.1,
        last.1.0 / first.1.0,
        last.1.1 / first.1.1,
        mms[k - 1].pages,
        mms[1].pages,
        last.2.0 / rows[1].2.0,
        last.2.1 / rows[1].2.1,
    );
    let nt = min_median(&mut noti_t);
    println!(
        "1-page mm with one no-op notifier: dontneed {:.0} / {:.0} ns ({:+.0} / {:+.0} ns \
         against none)\n",
        nt.0,
        nt.1,
        nt.0 - first.1.0,
        nt.1 - first.1.1,
    );
}

/// Whether an extra table belongs to this run: not when a criterion filter
/// (a bare argument) is given that does not select `group`.
fn table_wanted(group: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| group.contains(f.as_str()) || f.contains(group))
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
    targets = madvise, madvise_interleaved, ksm
}
criterion_main!(benches);
