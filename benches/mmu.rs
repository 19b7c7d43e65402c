//! Issue 3: the shadow MMU.
//!
//! A guest whose shadow maps 1, 1,000 and 1,000,000 pages: guest RAM at gpa
//! 0 in one memslot, mapped at gva `GVA_BASE` by 2 MiB guest large pages
//! (cheap guest tables: 3 to 6 table pages), which the shadow MMU splits
//! into 4 KiB sptes under direct level-1 shadow pages. Every page is
//! write-faulted in once, when the size is first used (that first touch is
//! reported as the cold fault cost per page), and the guest is reused by
//! every benchmark of that size. The TLB flush is [`NoFlush`], so the
//! numbers measure the MMU (and the simulated host mm), not a flush backend.
//!
//! * `mmu_zap/rmap`: `madvise_dontneed` of one page: the host mm's
//!   `invalidate_range_start` → the MMU finds the spte through the rmap and
//!   zaps it. Only the madvise is timed; the page is write-faulted back in
//!   (untimed) after each one, so the next iteration has an spte to zap.
//!   Each iteration takes a different page, scattered over the mapping;
//!   `mmu_zap/rmap_same` always takes the same one (hot caches).
//!   `mmu_zap/rmap_mmu_only[_same]`: only the MMU's share of that drop: the
//!   notifier's `invalidate_range_start` + `invalidate_range_end` for the
//!   page, called directly (the host page stays; the re-fault is warm).
//!   `rmap_mmu_only_window1000` (big guest only) cycles over 1,000 of its
//!   pages: the 1,000-page guest's work with 1,000 times more mapped.
//! * `mmu_zap/scan`: the same single-gfn zap through
//!   `ShadowMmu::zap_gfn_by_scan` (every shadow page read), the page then
//!   re-faulted untimed (the host page is still there: a warm fault).
//! * `mmu_fault/cold`: a write fault with no host page (dropped untimed by
//!   `madvise_dontneed`): guest walk + host demand-zero + spte install.
//!   `mmu_fault/warm`: host page present, spte dropped untimed by `invlpg`.
//! * `mmu_aging`: `Mm::age_range(.., flush = true)` over N pages whose
//!   sptes all have the Accessed bit set (set untimed before each pass, as
//!   the CPU would on an access): one `clear_flush_young` per page through
//!   the notifier → the MMU clears the spte's A bit. Throughput is sptes
//!   harvested per second; every pass checks that all N were. N = all of
//!   the 1,000-page guest, and 1,000 and 65,536 pages of the big one.
//!
//! * `first_touch/<folio>/<guest>_prefetch<N>` (issue 12): the first touch
//!   of every page of 8 MiB of guest RAM through the library fault path, as
//!   a guest walking fresh memory does: for each page in order, if no spte
//!   maps it (a software walk of the shadow tables, standing for the CPU's
//!   access), a write fault. Host folios of 4 KiB (THP off), 16 KiB, 64 KiB
//!   (mTHP) or 2 MiB (THP), prefetch of 0, 8 or 16 neighbours, guest 4 KiB
//!   PTEs (accessed and dirty, as a guest that wants fault-around builds
//!   them) or guest 2 MiB pages. Between runs the RAM is dropped untimed
//!   (MADV_DONTNEED), which zaps the sptes and frees the folios. Each
//!   configuration also prints faults per page and, for a sparse touch
//!   (every 16th page), pages populated per page touched: the memory cost
//!   of fault-around.
//!
//! Under `cargo test --benches` (criterion's test mode) the big size shrinks
//! so that the routines are only smoke-tested.
//!
//! Run: `cargo bench --bench mmu`. Results: docs/PERFORMANCE.md.

use std::cell::OnceCell;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{Bencher, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shadowvm::mm::{FrameAccess, Hva, Mm, MmapFlags, PAGE_SIZE, Pfn, Prot, ThpConfig, ThpEnabled};
// Guest paging-entry bits, by the names the MMU under test gives them.
use shadowvm::mmu::pte::{
    PT_ACCESSED_MASK as A, PT_BASE_ADDR_MASK as ADDR, PT_DIRTY_MASK as D, PT_PAGE_SIZE_MASK as PS,
    PT_PRESENT_MASK as P, PT_USER_MASK as US, PT_WRITABLE_MASK as RW,
};
use shadowvm::mmu::{
    FaultOutcome, Memslot, Memslots, NoFlush, PfErrorCode, ShadowMmu, ShadowMmuConfig,
};
use shadowvm::notifier::{MmuNotifierRange, MmuNotifyEvent};

/// Criterion's test mode (`cargo test --benches`, `cargo bench -- --test`):
/// no `--bench` argument, or `--test`.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// Where the guest maps its RAM: PML4 slot 1, so PDPT slot 0 onwards.
const GVA_BASE: u64 = 1 << 39;
/// 4 KiB pages per 2 MiB guest page (and entries per table).
const LARGE: u64 = 512;
/// Coprime to 1,000 and 1,000,000 (and to 4,096): a full cycle of pages.
const STRIDE: u64 = 618_033;

/// An mm over `frames` frames with `ram_pages` of guest RAM (at `at`, or
/// anywhere) bound to gpa 0, and a shadow MMU over it with `cfg`.
fn guest_ram(
    frames: u64,
    ram_pages: u64,
    at: Option<Hva>,
    cfg: ShadowMmuConfig,
) -> (Arc<Mm>, ShadowMmu, Hva) {
    let mm = Mm::new_anonymous(frames).expect("machine memory");
    let ram = mm
        .mmap(
            at,
            ram_pages * PAGE_SIZE,
            Prot::READ | Prot::WRITE,
            MmapFlags::empty(),
        )
        .expect("mmap");
    let mut slots = Memslots::default();
    slots
        .add(Memslot {
            base_gfn: 0,
            npages: ram_pages,
            userspace_addr: ram,
        })
        .expect("memslot");
    let mmu = ShadowMmu::new(mm.clone(), slots, Arc::new(NoFlush), cfg).expect("shadow MMU");
    (mm, mmu, ram)
}

/// Writes a guest page table at `hva`: `(index, entry)` pairs, the rest 0.
fn write_table(mm: &Mm, hva: Hva, entries: &[(u64, u64)]) {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for &(i, e) in entries {
        buf[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    mm.write(hva, &buf).expect("guest table");
}

/// A guest with `pages` pages mapped by sptes (gva page `i` → gfn `i`).
struct Vm {
    mm: Arc<Mm>,
    mmu: ShadowMmu,
    ram: Hva,
    pages: u64,
}

impl Vm {
    fn new(pages: u64) -> Self {
        let chunks = pages.div_ceil(LARGE);
        let data = chunks * LARGE;
        let pds = chunks.div_ceil(LARGE);
        let tables = 2 + pds;
        let ram_pages = data + tables;
        // Frames: the faulted data pages, the guest tables, the shadow pages
        // (one direct level-1 page per 2 MiB, one level 2 per PD, a level 3
        // and the root), and a few spare for the re-fault before a drop.
        let frames = pages + tables + (chunks + pds + 2) + 64;
        let (mm, mmu, ram) = guest_ram(frames, ram_pages, None, ShadowMmuConfig::default());

        // Guest tables above the data: PML4, PDPT, then the PDs.
        let (pml4, pdpt) = (data * PAGE_SIZE, (data + 1) * PAGE_SIZE);
        let write_table = |gpa: u64, entries: &[(u64, u64)]| write_table(&mm, ram + gpa, entries);
        write_table(pml4, &[((GVA_BASE >> 39) & 511, pdpt | P | RW | US | A)]);
        let pd = |j: u64| (data + 2 + j) * PAGE_SIZE;
        let pdpt_entries: Vec<_> = (0..pds).map(|j| (j, pd(j) | P | RW | US | A)).collect();
        write_table(pdpt, &pdpt_entries);
        for j in 0..pds {
            let entries: Vec<_> = (j * LARGE..chunks.min((j + 1) * LARGE))
                .map(|c| {
                    (
                        c % LARGE,
                        (c * LARGE * PAGE_SIZE) | PS | P | RW | US | A | D,
                    )
                })
                .collect();
            write_table(pd(j), &entries);
        }
        mmu.load_cr3(0, pml4).expect("load_cr3");

        let vm = Vm {
            mm,
            mmu,
            ram,
            pages,
        };
        let t = Instant::now();
        for i in 0..pages {
            vm.fault(i);
        }
        let took = t.elapsed();
        assert_eq!(vm.mmu.nr_sptes() as u64, pages);
        println!(
            "  ({pages} pages faulted in cold, first touch: {took:.2?}, {:.0} ns/page; {} shadow pages)",
            took.as_nanos() as f64 / pages as f64,
            vm.mmu.nr_shadow_pages()
        );
        vm
    }

    /// Unregisters the MMU and waits for the notifier's SRCU callbacks
    /// before the mm goes. Without the wait, the retired notifier-list
    /// snapshot freed on the SRCU callback thread can hold the last
    /// reference to the MMU, hence to the mm, and the mm's notifier list
    /// would then be dropped on its own callback thread, which panics
    /// ("srcu_barrier called from an SRCU callback of the same domain").
    fn teardown(self) {
        let Vm { mm, mmu, .. } = self;
        drop(mmu);
        mm.notifiers().synchronize();
        drop(mm);
    }

    fn gva(&self, i: u64) -> u64 {
        GVA_BASE + i * PAGE_SIZE
    }

    fn hva(&self, i: u64) -> Hva {
        self.ram + i * PAGE_SIZE
    }

    fn fault(&self, i: u64) {
        let r = self
            .mmu
            .page_fault(0, self.gva(i), PfErrorCode::WRITE)
            .expect("fault");
        assert_eq!(r, FaultOutcome::Fixed);
    }

    /// The level-1 shadow page of each 2 MiB chunk, by a software walk of
    /// the shadow tables from the root (as the CPU would walk them).
    fn leaf_tables(&self) -> Vec<Pfn> {
        let mem = self.mm.memory();
        let root = self.mmu.root(0).expect("root");
        (0..self.pages.div_ceil(LARGE))
            .map(|c| {
                let gva = self.gva(c * LARGE);
                let mut t = root;
                for level in (2..=4u32).rev() {
                    let idx = ((gva >> (12 + 9 * (level - 1))) & 511) as usize;
                    let e = mem
                        .frame_word(t, idx)
                        .expect("spte")
                        .load(Ordering::Acquire);
                    assert!(e & P != 0, "no shadow path for chunk {c}");
                    t = (e & ADDR) >> 12;
                }
                t
            })
            .collect()
    }
}

/// Has criterion time `op(i)`, each run preceded by untimed `before(i)`
/// and followed by untimed `after(i)`; `i` walks the first `span` pages
/// with `STRIDE`, or stays at the middle page if `span == 0`. Returns the
/// runs timed.
fn iter_timed(
    b: &mut Bencher,
    vm: &Vm,
    span: u64,
    mut before: impl FnMut(u64),
    mut op: impl FnMut(u64),
    mut after: impl FnMut(u64),
) -> u64 {
    let mut cursor = 0;
    let mut runs = 0;
    b.iter_custom(|iters| {
        runs += iters;
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let i = if span > 0 {
                cursor = (cursor + STRIDE) % span;
                cursor
            } else {
                vm.pages / 2
            };
            before(i);
            let t = Instant::now();
            op(black_box(i));
            total += t.elapsed();
            after(i);
        }
        total
    });
    runs
}

fn benches(c: &mut Criterion) {
    let big = if test_mode() { 4_096 } else { 1_000_000 };
    let sizes = [1u64, 1_000, big];
    let cells: Vec<OnceCell<Vm>> = sizes.iter().map(|_| OnceCell::new()).collect();
    let vm = |k: usize| cells[k].get_or_init(|| Vm::new(sizes[k]));

    let mut g = c.benchmark_group("mmu_zap");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (k, &n) in sizes.iter().enumerate() {
        // (name, pages cycled over (0: the same page), whole madvise (true)
        // or only the MMU's notifier callbacks (false)). The window variant
        // cycles over 1,000 pages of the big guest: the same work as the
        // 1,000-page guest, with 1,000 times more mapped.
        let mut variants = vec![
            ("rmap", n, true),
            ("rmap_same", 0, true),
            ("rmap_mmu_only", n, false),
            ("rmap_mmu_only_same", 0, false),
        ];
        if n > 1_000 {
            variants.push(("rmap_mmu_only_window1000", 1_000, false));
        }
        for (name, span, madvise) in variants {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                let v = vm(k);
                let notifiers = v.mm.notifiers().clone();
                let before = v.mmu.stats().spte_zapped;
                let total_iters = iter_timed(
                    b,
                    v,
                    span,
                    |_| {},
                    |i| {
                        if madvise {
                            v.mm.madvise_dontneed(v.hva(i), PAGE_SIZE)
                                .expect("dontneed");
                        } else {
                            // What zap_page_range calls around its own
                            // work: start (the MMU zaps via the rmap),
                            // then end (invalidate_range + seq bump).
                            let r = MmuNotifierRange::new(
                                MmuNotifyEvent::Clear,
                                v.hva(i),
                                v.hva(i) + PAGE_SIZE,
                            );
                            notifiers.invalidate_range_start(&r).expect("start");
                            notifiers.invalidate_range_end(&r, false);
                        }
                    },
                    |i| v.fault(i),
                );
                assert_eq!(
                    v.mmu.stats().spte_zapped - before,
                    total_iters,
                    "one spte zapped per drop"
                );
            });
        }
        g.bench_with_input(BenchmarkId::new("scan", n), &n, |b, _| {
            let v = vm(k);
            iter_timed(
                b,
                v,
                v.pages,
                |_| {},
                |i| assert_eq!(v.mmu.zap_gfn_by_scan(i).unwrap(), 1),
                |i| v.fault(i),
            );
        });
    }
    g.finish();

    let mut g = c.benchmark_group("mmu_fault");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (k, &n) in sizes.iter().enumerate().skip(1) {
        g.bench_with_input(BenchmarkId::new("cold", n), &n, |b, _| {
            let v = vm(k);
            let drop_page = |i| {
                v.mm.madvise_dontneed(v.hva(i), PAGE_SIZE)
                    .expect("dontneed")
            };
            iter_timed(b, v, v.pages, drop_page, |i| v.fault(i), |_| {});
        });
        g.bench_with_input(BenchmarkId::new("warm", n), &n, |b, _| {
            let v = vm(k);
            let drop_spte = |i| v.mmu.invlpg(0, v.gva(i)).expect("invlpg");
            iter_timed(b, v, v.pages, drop_spte, |i| v.fault(i), |_| {});
        });
    }
    g.finish();

    let mut g = c.benchmark_group("mmu_aging");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (k, window) in [(1usize, 1_000u64), (2, 1_000), (2, big.min(65_536))] {
        let n = sizes[k];
        g.throughput(Throughput::Elements(window));
        g.bench_with_input(
            BenchmarkId::new(format!("harvest_of_{n}"), window),
            &window,
            |b, _| {
                let v = vm(k);
                let mem = v.mm.memory().clone();
                let leaves = v.leaf_tables();
                let (start, end) = (v.hva(0), v.hva(window));
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // The CPU's accesses: set A in every spte of the window.
                        for i in 0..window {
                            let w = mem
                                .frame_word(leaves[(i / LARGE) as usize], (i % LARGE) as usize)
                                .expect("spte");
                            assert!(
                                w.fetch_or(A, Ordering::AcqRel) & P != 0,
                                "spte {i} not present"
                            );
                        }
                        let flushed = v.mmu.stats().remote_tlb_flush_frames;
                        let t = Instant::now();
                        let r = v.mm.age_range(start, end, true).expect("age_range");
                        total += t.elapsed();
                        assert_eq!(r.young.len() as u64, window);
                        // One AccessedCleared frame per spte whose A bit was cleared.
                        assert_eq!(
                            v.mmu.stats().remote_tlb_flush_frames - flushed,
                            window,
                            "sptes harvested"
                        );
                    }
                    total
                });
            },
        );
    }
    g.finish();

    for v in cells.into_iter().filter_map(OnceCell::into_inner) {
        v.mmu
            .check_coherence()
            .expect("coherent after the benchmarks");
        v.teardown();
    }
}

/// A guest for the first-touch benchmark: `pages` pages of RAM at gpa 0
/// (at a 2 MiB-aligned hva), mapped at `GVA_BASE` by 4 KiB guest PTEs or by
/// 2 MiB guest pages, all accessed and dirty; the tables after the data.
struct TouchVm {
    mm: Arc<Mm>,
    mmu: ShadowMmu,
    ram: Hva,
    pages: u64,
}

impl TouchVm {
    fn new(pages: u64, guest_2m: bool, thp: ThpConfig, prefetch: usize) -> Self {
        let pts = if guest_2m { 0 } else { pages / LARGE };
        let ram_pages = pages + 3 + pts;
        // Data, tables, shadow pages, and room for the buddy allocator to
        // keep 2 MiB runs free.
        let frames = ram_pages + pts + 16 + 2 * LARGE;
        let cfg = ShadowMmuConfig {
            pte_prefetch: prefetch,
            ..ShadowMmuConfig::default()
        };
        let (mm, mmu, ram) = guest_ram(frames, ram_pages, Some(0x7f00_0000_0000), cfg);
        let write_table = |gpa: u64, entries: &[(u64, u64)]| write_table(&mm, ram + gpa, entries);
        let table = |k: u64| (pages + k) * PAGE_SIZE;
        let (pml4, pdpt, pd) = (table(0), table(1), table(2));
        let ad = A | D;
        write_table(pml4, &[((GVA_BASE >> 39) & 511, pdpt | P | RW | US | A)]);
        write_table(pdpt, &[(0, pd | P | RW | US | A)]);
        let chunks = pages / LARGE;
        let pdes: Vec<_> = (0..chunks)
            .map(|c| match guest_2m {
                true => (c, (c * LARGE * PAGE_SIZE) | PS | P | RW | US | ad),
                false => (c, table(3 + c) | P | RW | US | A),
            })
            .collect();
        write_table(pd, &pdes);
        for c in 0..pts {
            let ptes: Vec<_> = (0..LARGE)
                .map(|i| (i, ((c * LARGE + i) * PAGE_SIZE) | P | RW | US | ad))
                .collect();
            write_table(table(3 + c), &ptes);
        }
        // THP only now: the tables above are small pages.
        mm.set_thp_config(thp);
        mmu.load_cr3(0, pml4).expect("load_cr3");
        TouchVm {
            mm,
            mmu,
            ram,
            pages,
        }
    }

    /// Drops the RAM (untimed between runs): zaps the sptes, frees folios.
    fn reset(&self) {
        self.mm
            .madvise_dontneed(self.ram, self.pages * PAGE_SIZE)
            .expect("dontneed");
        assert_eq!(self.mmu.nr_sptes(), 0);
    }

    /// Touches every `step`-th page: a write fault where no spte maps it.
    /// Returns the faults taken.
    fn touch(&self, step: u64) -> u64 {
        let before = self.mmu.stats().pf_fixed;
        for i in (0..self.pages).step_by(step as usize) {
            let gva = GVA_BASE + i * PAGE_SIZE;
            if self.mmu.lookup_spte(0, gva).expect("lookup").is_none() {
                let r = self
                    .mmu
                    .page_fault(0, gva, PfErrorCode::WRITE)
                    .expect("fault");
                assert_eq!(r, FaultOutcome::Fixed);
            }
        }
        self.mmu.stats().pf_fixed - before
    }

    /// Host pages present in the RAM's data.
    fn populated(&self) -> u64 {
        (0..self.pages)
            .filter(|&i| self.mm.pte(self.ram + i * PAGE_SIZE).is_some())
            .count() as u64
    }

    fn teardown(self) {
        let TouchVm { mm, mmu, .. } = self;
        drop(mmu);
        mm.notifiers().synchronize();
        drop(mm);
    }
}

fn first_touch(c: &mut Criterion) {
    let pages = if test_mode() { 1024 } else { 2048 };
    let folio = |name: &str| -> ThpConfig {
        match name {
            "4k" => ThpConfig::off(),
            "2m" => ThpConfig::pmd(ThpEnabled::Always),
            size => {
                let mut t = ThpConfig::off();
                t.enable_sizes(size).expect("size");
                t
            }
        }
    };
    let configs: &[(&str, bool, usize)] = &[
        ("4k", false, 0),
        ("4k", false, 8),
        ("16K", false, 0),
        ("16K", false, 8),
        ("64K", false, 0),
        ("64K", false, 8),
        ("64K", false, 16),
        ("2m", false, 0),
        ("2m", false, 8),
        ("2m", false, 16),
        ("4k", true, 0),
        ("2m", true, 0),
    ];
    let mut g = c.benchmark_group("first_touch");
    g.sample_size(10);
    g.throughput(Throughput::Elements(pages));
    let vms: Vec<(String, TouchVm)> = configs
        .iter()
        .map(|&(name, guest_2m, prefetch)| {
            let id = format!(
                "{}/{}_prefetch{prefetch}",
                name.to_lowercase(),
                if guest_2m { "guest2m" } else { "guest4k" }
            );
            (id, TouchVm::new(pages, guest_2m, folio(name), prefetch))
        })
        .collect();
    for (id, vm) in &vms {
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    vm.reset();
                    let t = Instant::now();
                    black_box(vm.touch(1));
                    total += t.elapsed();
                }
                total
            });
        });
    }
    g.finish();
    // The ratios: rounds that run every configuration once, in turn, so a
    // busy moment of the (shared) machine weighs on all of them alike;
    // the median of each.
    let rounds = if test_mode() { 3 } else { 21 };
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); vms.len()];
    let mut faults = vec![0; vms.len()];
    for _ in 0..rounds {
        for (k, (_, vm)) in vms.iter().enumerate() {
            vm.reset();
            let t = Instant::now();
            faults[k] = vm.touch(1);
            times[k].push(t.elapsed());
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_nanos() as f64 / pages as f64
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    println!(
        "first touch of {pages} pages, median of {rounds} interleaved rounds; ratio to {}; \
         sparse touch (every 16th page): pages populated per page touched",
        vms[0].0
    );
    for (k, (id, vm)) in vms.iter().enumerate() {
        vm.reset();
        let touched = pages / 16;
        vm.touch(16);
        let populated = vm.populated();
        vm.mmu.check_coherence().expect("coherent");
        vm.mm.check_consistency().expect("consistent");
        println!(
            "  {id:<26} {:>7.0} ns/page  x{:.2}  {:.3} faults/page  sparse: {touched} -> {populated} ({:.1}x)",
            medians[k],
            medians[k] / medians[0],
            faults[k] as f64 / pages as f64,
            populated as f64 / touched as f64
        );
    }
    for (_, vm) in vms {
        vm.teardown();
    }
}

criterion_group!(mmu, benches, first_touch);
criterion_main!(mmu);
