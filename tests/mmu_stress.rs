//! The shadow MMU under real concurrency: vCPU threads faulting while host
//! threads invalidate, with the checkers run at quiescent points; and the
//! fault/invalidate race (docs/design.md rule 2) forced with threads, in both of
//! its shapes: an invalidation that completes inside the fault's window, and
//! one still in progress when the fault takes the MMU lock.
//!
//! The second stress run attacks large folios: ksmd, kswapd and a splitter
//! at full rate against vCPUs whose faults install 2 MiB sptes over THPs,
//! prefetch over mTHP folios, and pre-fault ranges.
//!
//! `SHADOWVM_STRESS_MS` sets each stress run's length (default 1500 ms).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::mmu_guest::{ADDR, D, Guest, P, RW, US, spte_pfn};
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use shadowvm::mm::{FrameOwner, MmError, MmapFlags, PAGE_SIZE, Prot, Pte, ThpConfig, ThpEnabled};
use shadowvm::mmu::{FaultOutcome, MmuError, PfErrorCode, RaceHook, ShadowMmu, ShadowMmuConfig};
use shadowvm::notifier::{MmuNotifierOps, MmuNotifierRange, NotifierError};

/// A quiescent point must be reached within this, or something deadlocked.
const WATCHDOG: Duration = Duration::from_secs(10);

/// A small deterministic generator per thread: proptest's xorshift (the
/// crate is here already), seeded from `seed`.
fn seeded_rng(seed: u64) -> TestRng {
    let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&mixed.to_le_bytes());
    bytes[8..].copy_from_slice(&(!mixed).to_le_bytes());
    TestRng::from_seed(RngAlgorithm::XorShift, &bytes)
}

// ---------------------------------------------------------------------------
// The stress run
// ---------------------------------------------------------------------------

const RAM_PAGES: u64 = 64;
/// Less machine memory than RAM plus tables plus shadow pages: reclaim (and
/// now and then an out-of-memory fault) happens.
const FRAMES: u64 = 60;
/// Guest pages 0..NR_DATA are mapped at `DATA_GVA + page * 4 KiB`.
const NR_DATA: u64 = 40;
/// Guest pages NR_DATA..NR_DATA + NR_VICTIM are mapped through a leaf table
/// the host now and then drops with MADV_DONTNEED (the guest then sees
/// not-present faults there until the main thread restores the table).
const NR_VICTIM: u64 = 8;
const DATA_GVA: u64 = 0x8000_0000;
const VICTIM_GVA: u64 = DATA_GVA + (1 << 21);
const STAMPS: [u8; 4] = [0, 1, 2, 3];

fn gva_of(page: u64) -> u64 {
    if page < NR_DATA {
        DATA_GVA + page * PAGE_SIZE
    } else {
        VICTIM_GVA + (page - NR_DATA) * PAGE_SIZE
    }
}

/// Threads stop at a quiescent point when `pause` is raised, and go on when
/// `generation` moves.
#[derive(Default)]
struct Gate {
    pause: AtomicBool,
    stop: AtomicBool,
    arrived: AtomicUsize,
    generation: AtomicU64,
}

impl Gate {
    /// Called by a worker at the top of its loop; returns false to stop.
    fn checkpoint(&self) -> bool {
        if self.pause.load(Ordering::Acquire) {
            let generation = self.generation.load(Ordering::Acquire);
            self.arrived.fetch_add(1, Ordering::AcqRel);
            while self.generation.load(Ordering::Acquire) == generation
                && !self.stop.load(Ordering::Acquire)
            {
                thread::sleep(Duration::from_micros(100));
            }
        }
        !self.stop.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct Counts {
    faults: AtomicU64,
    fixed: AtomicU64,
    host_faults: AtomicU64,
    victim_not_present: AtomicU64,
    out_of_memory: AtomicU64,
    /// Faults that hit `MAX_FAULT_RETRIES` because invalidations kept
    /// landing in their window (the VMM resumes the guest, which faults
    /// again).
    gave_up: AtomicU64,
    invlpg: AtomicU64,
    cr3_loads: AtomicU64,
    mm_ops: AtomicU64,
    mm_errors: AtomicU64,
    victim_drops: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Setup {
    g: Guest,
    cr3s: [u64; 2],
    /// The leaf table of the victim pages, and its entries.
    victim_pt: u64,
    victim_ptes: Vec<(u64, u64)>,
}

fn setup() -> Setup {
    let cfg = ShadowMmuConfig {
        nr_vcpus: 2,
        ..Default::default()
    };
    let mut g = Guest::with_config(RAM_PAGES, FRAMES, cfg, MmapFlags::MERGEABLE);
    let cr3_a = g.cr3;
    let cr3_b = g.alloc_table();
    for page in 0..NR_DATA + NR_VICTIM {
        g.map_in(cr3_a, gva_of(page), page * PAGE_SIZE, P | RW | US);
    }
    // The second CR3 shares the first one's PDPT (like a kernel half).
    let pml4e = cr3_a + 8 * ((DATA_GVA >> 39) & 511);
    let shared = g.read_u64(pml4e);
    g.write_u64(cr3_b + 8 * ((DATA_GVA >> 39) & 511), shared);
    let victim_pt = g.pte_gpa(cr3_a, VICTIM_GVA, 1) & ADDR;
    let victim_ptes = (NR_DATA..NR_DATA + NR_VICTIM)
        .map(|page| {
            let e = g.pte_gpa(cr3_a, gva_of(page), 1);
            (e, g.read_u64(e) & !(common::mmu_guest::A | D))
        })
        .collect();
    // Nothing was shadowed from these tables yet, so writing them behind
    // the MMU's back was safe.
    g.mmu.load_cr3(0, cr3_a).expect("load_cr3");
    g.mmu.load_cr3(1, cr3_b).expect("load_cr3");
    Setup {
        g,
        cr3s: [cr3_a, cr3_b],
        victim_pt,
        victim_ptes,
    }
}

/// A vCPU: faults on random pages, now and then invlpg, a TLB flush or a CR3
/// switch. Returns an error message on a wrong outcome.
fn vcpu_thread(
    s: Arc<Setup>,
    gate: Arc<Gate>,
    counts: Arc<Counts>,
    vcpu: usize,
) -> Result<(), String> {
    let mut rng = seeded_rng(0x5eed + vcpu as u64);
    let mmu = &s.g.mmu;
    while gate.checkpoint() {
        let page = rng.random_range(0..NR_DATA + NR_VICTIM);
        let gva = gva_of(page);
        match rng.random_range(0..1000u64) {
            0..10 => {
                mmu.invlpg(vcpu, gva).map_err(|e| format!("invlpg: {e}"))?;
                bump(&counts.invlpg);
            }
            10..12 => mmu.flush_tlb(vcpu).map_err(|e| format!("flush_tlb: {e}"))?,
            12..15 => {
                match mmu.load_cr3(vcpu, s.cr3s[rng.random_range(0..2u64) as usize]) {
                    Ok(_) => {}
                    Err(MmuError::OutOfShadowPages | MmuError::Memory(MmError::OutOfFrames)) => {
                        bump(&counts.out_of_memory)
                    }
                    Err(e) => return Err(format!("load_cr3: {e}")),
                }
                bump(&counts.cr3_loads);
            }
            _ => {
                let mut ec = PfErrorCode::empty();
                ec.set(PfErrorCode::WRITE, rng.random_range(0..2u64) == 0);
                ec.set(PfErrorCode::USER, rng.random_range(0..2u64) == 0);
                bump(&counts.faults);
                match mmu.page_fault(vcpu, gva, ec) {
                    Ok(FaultOutcome::Fixed) => bump(&counts.fixed),
                    Ok(FaultOutcome::Retry) => {}
                    // Another thread has the page mprotected or munmapped.
                    Ok(FaultOutcome::HostFault {
                        error: MmError::Access { .. } | MmError::NoVma(_),
                        ..
                    }) => bump(&counts.host_faults),
                    // The victim table was dropped: a not-present fault, with
                    // exactly the access bits (never RSVD: the walker must
                    // not read a freed table frame).
                    Ok(FaultOutcome::Guest(pf))
                        if page >= NR_DATA && pf.error_code == ec && pf.address == gva =>
                    {
                        bump(&counts.victim_not_present)
                    }
                    Err(MmuError::OutOfShadowPages | MmuError::Memory(MmError::OutOfFrames)) => {
                        bump(&counts.out_of_memory)
                    }
                    Err(MmuError::TooManyRetries(_)) => bump(&counts.gave_up),
                    // A CR3 load ran out of memory: load again.
                    Err(MmuError::NoRoot(_)) => {
                        let _ = mmu.load_cr3(vcpu, s.cr3s[vcpu]);
                    }
                    other => {
                        return Err(format!("vCPU {vcpu} fault at {gva:#x} ({ec:?}): {other:?}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The host: MADV_DONTNEED, mprotect toggles, KSM, reclaim, aging, VMM
/// writes, munmap + MAP_FIXED, and (thread 0) dropping the victim table.
fn invalidator_thread(
    s: Arc<Setup>,
    gate: Arc<Gate>,
    counts: Arc<Counts>,
    id: u64,
) -> Result<(), String> {
    let mut rng = seeded_rng(0xabcd + id);
    let mm = &s.g.mm;
    let hva = |page: u64| s.g.hva(page * PAGE_SIZE);
    while gate.checkpoint() {
        let page = rng.random_range(0..NR_DATA + NR_VICTIM);
        let n = (1 + rng.random_range(0..3u64)).min(NR_DATA + NR_VICTIM - page);
        let len = n * PAGE_SIZE;
        bump(&counts.mm_ops);
        // Errors another invalidator can cause: a hole from its munmap
        // (NoMemory, NoVma), its mprotect (Access), no frame (OutOfFrames).
        let ok = |r: Result<(), MmError>| match r {
            Ok(()) => Ok(()),
            Err(
                MmError::NoMemory
                | MmError::NoVma(_)
                | MmError::Access { .. }
                | MmError::OutOfFrames,
            ) => {
                bump(&counts.mm_errors);
                Ok(())
            }
            Err(e) => Err(format!("invalidator {id}: {e}")),
        };
        match rng.random_range(0..100u64) {
            0..25 => ok(mm.madvise_dontneed(hva(page), len))?,
            25..40 => {
                let prot = if rng.random_range(0..2u64) == 0 {
                    Prot::READ
                } else {
                    Prot::NONE
                };
                ok(mm.mprotect(hva(page), len, prot))?;
                ok(mm.mprotect(hva(page), len, Prot::READ | Prot::WRITE))?;
            }
            40..50 => ok(mm.ksm_scan(8 + rng.random_range(0..56u64)).map(|_| ()))?,
            50..60 => ok(mm.reclaim(8 + rng.random_range(0..24u64)).map(|_| ()))?,
            60..75 => ok(mm
                .clear_flush_young(hva(rng.random_range(0..RAM_PAGES)))
                .map(|_| ()))?,
            75..90 => {
                let stamp = STAMPS[rng.random_range(0..4u64) as usize];
                ok(mm.write(hva(page), &[stamp; 64]))?;
            }
            90..95 => {
                ok(mm.munmap(hva(page), len))?;
                let at = mm.mmap(
                    Some(hva(page)),
                    len,
                    Prot::READ | Prot::WRITE,
                    MmapFlags::MERGEABLE,
                );
                if at != Ok(hva(page)) {
                    return Err(format!("MAP_FIXED back at {:#x}: {at:?}", hva(page)));
                }
            }
            95..97 if id == 0 => {
                ok(mm.madvise_dontneed(s.g.hva(s.victim_pt), PAGE_SIZE))?;
                bump(&counts.victim_drops);
            }
            _ => ok(mm.age_range(hva(0), hva(RAM_PAGES), true).map(|_| ()))?,
        }
        // Let the vCPUs in now and then: back to back, the host's
        // invalidations would keep every fault retrying.
        thread::yield_now();
    }
    Ok(())
}

/// The mm's consistency check and the MMU's coherence check.
fn checkers(g: &Guest, round: usize) -> Result<(), String> {
    g.mm.check_consistency()
        .map_err(|e| format!("round {round}: {e}"))?;
    g.mmu
        .check_coherence()
        .map_err(|e| format!("round {round}: {e}"))
}

/// What must hold at a quiescent point: both checkers, and every spte of a
/// tracked gva maps the host's current frame of its (fixed) gpa, writable
/// only over a writable host PTE.
fn quiescent_checks(s: &Setup, round: usize) -> Result<(), String> {
    let g = &s.g;
    checkers(g, round)?;
    for vcpu in 0..2 {
        for page in 0..NR_DATA + NR_VICTIM {
            let Some(e) = g
                .mmu
                .lookup_spte(vcpu, gva_of(page))
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let host = g.mm.pte(g.hva(page * PAGE_SIZE));
            let ok = match host {
                Some(Pte::Present(p)) => p.pfn == spte_pfn(e) && (e & RW == 0 || p.writable),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "round {round}: vCPU {vcpu} spte {e:#x} for page {page} but the host PTE is {host:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Puts the victim table back if the host dropped it. Safe behind the MMU's
/// back: nothing can have been shadowed from a zeroed table (a walk through
/// it fails), and not-present → present needs no invalidation.
fn restore_victim(s: &Setup) -> Result<(), String> {
    for &(e, v) in &s.victim_ptes {
        let hva = s.g.hva(e);
        let cur = match s.g.mm.read_u64(hva) {
            Ok(cur) => cur,
            Err(MmError::OutOfFrames) => return Ok(()), // next round
            Err(err) => return Err(format!("reading the victim table: {err}")),
        };
        if cur & !(common::mmu_guest::A | D) != v {
            match s.g.mm.write(hva, &v.to_le_bytes()) {
                Ok(()) | Err(MmError::OutOfFrames) => {}
                Err(err) => return Err(format!("restoring the victim table: {err}")),
            }
        }
    }
    Ok(())
}

/// Runs `workers` until `total` has passed, stopping them at a quiescent
/// point every `round` to run `checks`; then stops and joins them. Panics
/// on a worker's error, a failed check or a deadlock. Returns the rounds.
fn drive(
    gate: &Gate,
    mut workers: Vec<thread::JoinHandle<Result<(), String>>>,
    total: Duration,
    round: Duration,
    checks: impl Fn(usize) -> Result<(), String>,
) -> usize {
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < total {
        thread::sleep(round);
        rounds += 1;
        // Quiescent point: every worker parks at the top of its loop.
        gate.arrived.store(0, Ordering::Release);
        gate.pause.store(true, Ordering::Release);
        let t = Instant::now();
        while gate.arrived.load(Ordering::Acquire) < workers.len() {
            if let Some(w) = workers.iter().position(|w| w.is_finished()) {
                gate.stop.store(true, Ordering::Release);
                let r = workers.remove(w).join();
                panic!("round {rounds}: a worker stopped early: {r:?}");
            }
            assert!(
                t.elapsed() < WATCHDOG,
                "round {rounds}: only {} of {} threads reached the quiescent point in {WATCHDOG:?}: deadlock",
                gate.arrived.load(Ordering::Acquire),
                workers.len()
            );
            thread::sleep(Duration::from_micros(200));
        }
        if let Err(e) = checks(rounds) {
            gate.stop.store(true, Ordering::Release);
            panic!("{e}");
        }
        gate.pause.store(false, Ordering::Release);
        gate.generation.fetch_add(1, Ordering::AcqRel);
    }
    gate.stop.store(true, Ordering::Release);
    let t = Instant::now();
    while !workers.iter().all(|w| w.is_finished()) {
        assert!(
            t.elapsed() < WATCHDOG,
            "workers did not stop in {WATCHDOG:?}: deadlock"
        );
        thread::sleep(Duration::from_millis(1));
    }
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    rounds
}

fn stress_total() -> Duration {
    Duration::from_millis(
        std::env::var("SHADOWVM_STRESS_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    )
}

#[test]
fn faults_and_invalidations_race_and_the_tables_stay_coherent() {
    let total = stress_total();
    let round = Duration::from_millis(50);
    let s = Arc::new(setup());
    // Widen the race window (between hva → frame and the MMU lock) so that
    // invalidations land in it often.
    s.g.mmu
        .set_race_hook(Some(Arc::new(|_| thread::yield_now())));
    let gate = Arc::new(Gate::default());
    let counts = Arc::new(Counts::default());
    let mut workers: Vec<thread::JoinHandle<Result<(), String>>> = Vec::new();
    for vcpu in 0..2 {
        let (s, gate, counts) = (s.clone(), gate.clone(), counts.clone());
        workers.push(thread::spawn(move || vcpu_thread(s, gate, counts, vcpu)));
    }
    for id in 0..2 {
        let (s, gate, counts) = (s.clone(), gate.clone(), counts.clone());
        workers.push(thread::spawn(move || {
            invalidator_thread(s, gate, counts, id)
        }));
    }
    let start = Instant::now();
    let rounds = drive(&gate, workers, total, round, |r| {
        quiescent_checks(&s, r).and_then(|()| restore_victim(&s))
    });
    quiescent_checks(&s, rounds + 1).unwrap_or_else(|e| panic!("{e}"));

    let st = s.g.mmu.stats();
    let ms = s.g.mm.stats();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "mmu_stress: {:?} in {rounds} rounds; faults {} (pf_fixed {}, pf_retry {}, host faults {}, \
         victim not-present {}, out of memory {}, gave up {}); invlpg {}, CR3 loads {}; mm ops {} ({} refused); \
         invalidations {} (change_pte {}, young {}), victim drops {}; KSM merges {}, COW {}, \
         swap-ins {}, evictions {}",
        start.elapsed(),
        get(&counts.faults),
        st.pf_fixed,
        st.pf_retry,
        get(&counts.host_faults),
        get(&counts.victim_not_present),
        get(&counts.out_of_memory),
        get(&counts.gave_up),
        get(&counts.invlpg),
        get(&counts.cr3_loads),
        get(&counts.mm_ops),
        get(&counts.mm_errors),
        st.mn_invalidate_range_start,
        st.mn_change_pte,
        st.mn_clear_flush_young,
        get(&counts.victim_drops),
        s.g.mm.ksm_stats().merges,
        ms.pgcow,
        ms.pswpin,
        ms.pgsteal,
    );
    assert!(rounds > 0 && st.pf_fixed > 0 && st.mn_invalidate_range_start > 0);
    // With the window widened, invalidations land in it all the time.
    assert!(st.pf_retry > 0, "no fault ever raced an invalidation");
    assert!(
        get(&counts.gave_up) * 20 <= get(&counts.faults),
        "more than 5% of the faults gave up retrying: {} of {}",
        get(&counts.gave_up),
        get(&counts.faults)
    );
    assert_eq!(
        st.mn_invalidate_range_start, st.mn_invalidate_range_end,
        "every invalidation ended"
    );

    let Ok(s) = Arc::try_unwrap(s) else {
        panic!("a worker still holds the guest")
    };
    s.g.mm.exit_mmap();
    assert_eq!(s.g.mm.frames().nr_free(), s.g.mm.frames().nr_frames());
    assert_eq!(
        s.g.mmu.page_fault(0, DATA_GVA, PfErrorCode::empty()),
        Err(MmuError::Released)
    );
}

// ---------------------------------------------------------------------------
// The attack on large folios: ksmd, kswapd and splits at full rate against
// faults that install 2 MiB sptes and prefetch
// ---------------------------------------------------------------------------

/// 4 MiB of guest RAM: a guest 2 MiB page over gpa 0 (a THP on the host),
/// 4 KiB mappings of the next 256 pages (prefetch over mTHP folios), the
/// tables at the top.
const HUGE_RAM: u64 = 1024;
/// Frames enough that a 2 MiB run is often free again after a split (the
/// buddy allocator merges it back); kswapd evicts anyway.
const HUGE_FRAMES: u64 = 2600;
const LARGE_GVA: u64 = 0x20_0000_0000;
const SMALL_GVA: u64 = 0x20_4000_0000;
const NR_SMALL: u64 = 256;

struct HugeSetup {
    g: Guest,
}

fn huge_setup() -> HugeSetup {
    let cfg = ShadowMmuConfig {
        nr_vcpus: 2,
        pte_prefetch: 16,
        ..Default::default()
    };
    let mut g = Guest::with_config(HUGE_RAM, HUGE_FRAMES, cfg, MmapFlags::MERGEABLE);
    let mut thp = ThpConfig::pmd(ThpEnabled::Always);
    thp.enable_sizes("16K,64K").expect("sizes");
    g.mm.set_thp_config(thp);
    let cr3 = g.cr3;
    // Accessed and dirty from the start, as a guest that wants prefetch and
    // pre-faults builds them.
    let ad = common::mmu_guest::A | D;
    let pde = g.pte_gpa(cr3, LARGE_GVA, 2);
    g.write_u64(pde, P | RW | US | ad | common::mmu_guest::PS);
    for i in 0..NR_SMALL {
        g.map_in(
            cr3,
            SMALL_GVA + i * PAGE_SIZE,
            (512 + i) * PAGE_SIZE,
            P | RW | US | ad,
        );
    }
    for gva in [LARGE_GVA, SMALL_GVA] {
        for level in 2..=4 {
            let e = g.pte_gpa(cr3, gva, level);
            let v = g.read_u64(e);
            if v & common::mmu_guest::PS == 0 {
                g.write_u64(e, v | common::mmu_guest::A);
            }
        }
    }
    g.mmu.load_cr3(0, cr3).expect("load_cr3");
    g.mmu.load_cr3(1, cr3).expect("load_cr3");
    HugeSetup { g }
}

/// The gva of tracked page `i`: 512 in the large page, then the small ones.
fn huge_gva(i: u64) -> u64 {
    if i < 512 {
        LARGE_GVA + i * PAGE_SIZE
    } else {
        SMALL_GVA + (i - 512) * PAGE_SIZE
    }
}

/// A vCPU: faults everywhere, pre-faults now and then.
fn huge_vcpu(s: Arc<HugeSetup>, gate: Arc<Gate>, vcpu: usize) -> Result<(), String> {
    let mut rng = seeded_rng(0xf01 + vcpu as u64);
    let mmu = &s.g.mmu;
    while gate.checkpoint() {
        let gva = huge_gva(rng.random_range(0..512 + NR_SMALL));
        let r = if rng.random_range(0..20u64) == 0 {
            mmu.pre_fault(vcpu, gva, (1 + rng.random_range(0..64u64)) * PAGE_SIZE)
                .map(|_| FaultOutcome::Fixed)
        } else {
            let mut ec = PfErrorCode::empty();
            ec.set(PfErrorCode::WRITE, rng.random_range(0..2u64) == 0);
            mmu.page_fault(vcpu, gva, ec)
        };
        match r {
            Ok(FaultOutcome::Fixed | FaultOutcome::Retry) => {}
            // The splitter has the page mprotected.
            Ok(FaultOutcome::HostFault {
                error: MmError::Access { .. },
                ..
            }) => {}
            Err(MmuError::OutOfShadowPages | MmuError::Memory(MmError::OutOfFrames)) => {}
            Err(MmuError::TooManyRetries(_)) => {}
            other => return Err(format!("vCPU {vcpu} at {gva:#x}: {other:?}")),
        }
    }
    Ok(())
}

/// The host at full rate: `role` 0 is ksmd, 1 kswapd, 2 the splitter
/// (partial DONTNEED and mprotect, whole-PMD DONTNEED then
/// MADV_POPULATE_WRITE to make a new THP, deferred splits, VMM writes
/// that give KSM duplicates).
fn huge_host(s: Arc<HugeSetup>, gate: Arc<Gate>, role: u64) -> Result<(), String> {
    let mut rng = seeded_rng(0xb16 + role);
    let mm = &s.g.mm;
    let hva = |page: u64| s.g.hva(page * PAGE_SIZE);
    let ok = |r: Result<(), MmError>| match r {
        Ok(()) | Err(MmError::OutOfFrames | MmError::Access { .. }) => Ok(()),
        Err(e) => Err(format!("host {role}: {e}")),
    };
    while gate.checkpoint() {
        match role {
            0 => ok(mm.ksm_scan(256).map(|_| ()))?,
            1 => {
                ok(mm.reclaim(64).map(|_| ()))?;
                ok(mm
                    .age_range(hva(0), hva(HUGE_RAM), rng.random_range(0..2u64) == 0)
                    .map(|_| ()))?;
            }
            _ => {
                let page = rng.random_range(0..512 + NR_SMALL);
                match rng.random_range(0..100u64) {
                    0..30 => ok(mm.madvise_dontneed(hva(page), PAGE_SIZE))?,
                    30..45 => {
                        ok(mm.mprotect(hva(page), PAGE_SIZE, Prot::READ))?;
                        ok(mm.mprotect(hva(page), PAGE_SIZE, Prot::READ | Prot::WRITE))?;
                    }
                    45..55 => {
                        ok(mm.madvise_dontneed(hva(0), 512 * PAGE_SIZE))?;
                        ok(mm.madvise_populate_write(hva(0), 512 * PAGE_SIZE))?;
                    }
                    55..65 => ok(mm.deferred_split_scan().map(|_| ()))?,
                    65..85 => ok(mm.madvise_populate_write(hva(page), 16 * PAGE_SIZE))?,
                    _ => {
                        ok(mm.write(hva(page), &[STAMPS[rng.random_range(0..4u64) as usize]; 64]))?
                    }
                }
            }
        }
        thread::yield_now();
    }
    Ok(())
}

/// Both checkers, and every tracked gva's spte (a 2 MiB one read as the
/// 4 KiB page it maps) maps the host's current frame.
fn huge_checks(s: &HugeSetup, round: usize) -> Result<(), String> {
    let g = &s.g;
    checkers(g, round)?;
    for vcpu in 0..2 {
        for i in 0..512 + NR_SMALL {
            let gva = huge_gva(i);
            let Some((e, level)) = g.mmu.leaf_at(vcpu, gva).map_err(|e| e.to_string())? else {
                continue;
            };
            let gpa = i * PAGE_SIZE;
            let pfn = spte_pfn(e) + if level == 2 { (gva >> 12) & 511 } else { 0 };
            let ok = matches!(g.mm.pte(g.hva(gpa)), Some(Pte::Present(p)) if p.pfn == pfn && (e & RW == 0 || p.writable));
            if !ok {
                return Err(format!(
                    "round {round}: vCPU {vcpu} level-{level} spte {e:#x} for gva {gva:#x}, host PTE {:?}",
                    g.mm.pte(g.hva(gpa))
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn ksmd_kswapd_and_splits_at_full_rate_never_leave_a_stale_large_spte_or_prefetch() {
    let s = Arc::new(huge_setup());
    // Widen the window between the host lookups (hva_to_pfn, the huge PMD,
    // the neighbours' pages) and the MMU lock.
    s.g.mmu
        .set_race_hook(Some(Arc::new(|_| thread::yield_now())));
    let gate = Arc::new(Gate::default());
    let mut workers: Vec<thread::JoinHandle<Result<(), String>>> = Vec::new();
    for vcpu in 0..2 {
        let (s, gate) = (s.clone(), gate.clone());
        workers.push(thread::spawn(move || huge_vcpu(s, gate, vcpu)));
    }
    for role in 0..3 {
        let (s, gate) = (s.clone(), gate.clone());
        workers.push(thread::spawn(move || huge_host(s, gate, role)));
    }
    let start = Instant::now();
    let rounds = drive(
        &gate,
        workers,
        stress_total(),
        Duration::from_millis(50),
        |r| huge_checks(&s, r),
    );
    huge_checks(&s, rounds + 1).unwrap_or_else(|e| panic!("{e}"));
    let st = s.g.mmu.stats();
    let ms = s.g.mm.stats();
    eprintln!(
        "large-folio stress: {:?} in {rounds} rounds; pf_fixed {} ({} with 2 MiB sptes), \
         prefetched {} ({} raced), pre-faulted pages {}, 2 MiB sptes zapped {}, retries {}; \
         THP faults {}, PMD splits {}, folio splits {}, KSM merges {}, evictions {}",
        start.elapsed(),
        st.pf_fixed,
        st.pf_fixed_2m,
        st.pf_prefetch,
        st.pf_prefetch_raced,
        st.prefault_pages,
        st.spte_zapped_2m,
        st.pf_retry,
        ms.thp_fault_alloc,
        ms.thp_split_pmd,
        ms.thp_split_page,
        s.g.mm.ksm_stats().merges,
        ms.pgsteal,
    );
    assert!(st.pf_fixed_2m > 0, "no 2 MiB spte was ever installed");
    assert!(st.spte_zapped_2m > 0, "no 2 MiB spte was ever zapped");
    assert!(st.pf_prefetch > 0, "nothing was ever prefetched");
    assert!(ms.thp_split_pmd > 0, "no huge PMD was split");
    assert_eq!(st.mn_invalidate_range_start, st.mn_invalidate_range_end);
    let Ok(s) = Arc::try_unwrap(s) else {
        panic!("a worker still holds the guest")
    };
    s.g.mm.exit_mmap();
    assert_eq!(s.g.mm.frames().nr_free(), s.g.mm.frames().nr_frames());
}

// ---------------------------------------------------------------------------
// The race, forced with threads
// ---------------------------------------------------------------------------

const GVA: u64 = 0x40_0000;
const GPA: u64 = 0x10_000;

/// A race hook that parks the fault in the window on its first `n` calls:
/// it reports the hva to the test and waits for a go.
fn parking_hook(n: usize) -> (RaceHook, mpsc::Receiver<u64>, mpsc::Sender<()>) {
    let (in_window, window_rx) = mpsc::channel();
    let (go_tx, go) = mpsc::channel::<()>();
    let go = Mutex::new(go);
    let calls = AtomicUsize::new(0);
    let hook = Arc::new(move |hva: u64| {
        if calls.fetch_add(1, Ordering::SeqCst) < n {
            let _ = in_window.send(hva);
            // If the test gave up, the sender is gone: carry on.
            let _ = go.lock().map(|rx| rx.recv_timeout(WATCHDOG));
        }
    });
    (hook, window_rx, go_tx)
}

/// A fault parks between looking up the frame and taking the MMU lock; a
/// whole MADV_DONTNEED runs meanwhile on another thread and frees that
/// frame. The fault must see the sequence move, drop the stale frame and
/// retry, installing the new one.
#[test]
fn a_fault_parked_in_the_window_retries_after_an_invalidation_completes() {
    let mut g = Guest::new(64, 128);
    g.map(GVA, GPA, P | RW | US | D);
    g.mm.write(g.hva(GPA), b"old").expect("host write");
    let old = g.host_pfn(GPA).expect("present");
    let (hook, window, go) = parking_hook(1);
    g.mmu.set_race_hook(Some(hook));
    let g = Arc::new(g);
    let retry_before = g.mmu.stats().pf_retry;
    let fault = {
        let g = g.clone();
        thread::spawn(move || g.mmu.page_fault(0, GVA, PfErrorCode::WRITE))
    };
    let hva = window
        .recv_timeout(WATCHDOG)
        .expect("the fault never reached the window");
    assert_eq!(hva, g.hva(GPA));
    g.mm.madvise_dontneed(hva, PAGE_SIZE).expect("dontneed");
    assert_eq!(
        g.mm.frames().owner(old),
        Ok(FrameOwner::Free),
        "the frame the fault holds is freed"
    );
    go.send(()).expect("hook gone");
    let out = fault.join().expect("fault thread");
    assert_eq!(out, Ok(FaultOutcome::Fixed));
    assert_eq!(
        g.mmu.stats().pf_retry,
        retry_before + 1,
        "the stale attempt must be dropped"
    );
    let spte = g.spte(GVA).expect("spte");
    assert_eq!(
        Some(spte_pfn(spte)),
        g.host_pfn(GPA),
        "the spte maps the live frame"
    );
    let mut b = [0xffu8; 3];
    g.mm.read(g.hva(GPA), &mut b).expect("read");
    assert_eq!(b, [0; 3], "the guest sees DONTNEED's zero page");
    g.check();
}

/// A notifier that blocks in `invalidate_range_start` when armed. Registered
/// before the MMU, it runs after the MMU's start (newest first), so the MMU
/// has raised its in-progress count when this one blocks.
struct Blocker {
    armed: AtomicBool,
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl MmuNotifierOps for Blocker {
    fn invalidate_range_start(&self, _range: &MmuNotifierRange) -> Result<(), NotifierError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.entered.lock().map(|tx| tx.send(()));
            let _ = self.release.lock().map(|rx| rx.recv_timeout(WATCHDOG));
        }
        Ok(())
    }
}

/// The other shape of the race: the fault takes the MMU lock while an
/// invalidation of its page is between start and end (its PTE not cleared
/// yet, the sequence not bumped yet). It must retry, and it sleeps until the
/// invalidation ends instead of spinning against it (`pf_invalidate_wait`):
/// its next attempt runs after the end and maps the new frame.
#[test]
fn a_fault_during_an_invalidation_in_progress_retries_until_it_ends() {
    let mut g = Guest::new(64, 128);
    g.map(GVA, GPA, P | RW | US | D);
    g.mm.write(g.hva(GPA), b"old").expect("host write");
    let old = g.host_pfn(GPA).expect("present");
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let blocker = Arc::new(Blocker {
        armed: AtomicBool::new(false),
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    });
    // Register the blocker, then a fresh MMU after it.
    let mm = g.mm.clone();
    let slots = g.mmu.memslots().clone();
    g.mmu.unregister();
    let reg = mm.mmu_notifier_register(blocker.clone()).expect("register");
    g.mmu = ShadowMmu::new(
        mm.clone(),
        slots,
        g.flush.clone(),
        ShadowMmuConfig::default(),
    )
    .expect("mmu");
    g.mmu.load_cr3(0, g.cr3).expect("load_cr3");
    let (hook, window, go) = parking_hook(2);
    g.mmu.set_race_hook(Some(hook));
    let g = Arc::new(g);
    let fault = {
        let g = g.clone();
        thread::spawn(move || g.mmu.page_fault(0, GVA, PfErrorCode::empty()))
    };
    // Attempt 1 is in the window: start an invalidation and hold it open.
    window
        .recv_timeout(WATCHDOG)
        .expect("attempt 1 never reached the window");
    blocker.armed.store(true, Ordering::SeqCst);
    let inval = {
        let g = g.clone();
        thread::spawn(move || g.mm.madvise_dontneed(g.hva(GPA), PAGE_SIZE))
    };
    entered
        .recv_timeout(WATCHDOG)
        .expect("the invalidation never started");
    assert_eq!(g.mmu.stats().pf_retry, 0);
    go.send(()).expect("hook gone");
    // Attempt 1 saw the invalidation in progress and sleeps until its end.
    let t = std::time::Instant::now();
    while g.mmu.stats().pf_invalidate_wait == 0 {
        assert!(t.elapsed() < WATCHDOG, "attempt 1 never waited");
        thread::yield_now();
    }
    assert_eq!(g.host_pfn(GPA), Some(old));
    release.send(()).expect("blocker gone");
    assert_eq!(inval.join().expect("invalidator"), Ok(()));
    // Attempt 2 starts only after the end (the invalidator has returned):
    // its translation is of the page faulted in after the discard.
    window
        .recv_timeout(WATCHDOG)
        .expect("attempt 2 never reached the window");
    assert_eq!(g.mm.stats().pgzap, 1);
    assert_eq!(
        g.mmu.stats().pf_retry,
        1,
        "attempt 1 must retry: invalidation in progress"
    );
    go.send(()).expect("hook gone");
    assert_eq!(fault.join().expect("fault thread"), Ok(FaultOutcome::Fixed));
    assert_eq!(
        g.mmu.stats().pf_retry,
        1,
        "attempt 2 had nothing to retry for"
    );
    let spte = g.spte(GVA).expect("spte");
    assert_eq!(Some(spte_pfn(spte)), g.host_pfn(GPA));
    g.check();
    g.mmu.set_race_hook(None);
    let Ok(g) = Arc::try_unwrap(g) else {
        panic!("a thread still holds the guest")
    };
    drop(g);
    reg.unregister();
}
