//! Property tests of the simulated host mm (`src/mm/`).
//!
//! Random sequences of host operations (writes, reads, munmap, MAP_FIXED
//! mmap, MADV_DONTNEED, mprotect, mlock, KSM scans, aging, reclaim, the OOM
//! reaper, get_user_pages pins, a shadow-MMU style `hva_to_pfn` mirror,
//! MADV_HUGEPAGE / NOHUGEPAGE, MADV_POPULATE_WRITE, THP setting changes,
//! deferred splits, and exit_mmap) run against a reference model of what
//! every page must hold and how it is mapped, with random THP settings:
//! mTHP sizes over small regions in the first test, PMD-size THP (and
//! mTHP) over a region of 2 MiB and more in the second, so that faults
//! allocate large folios and partial unmaps, DONTNEED, mprotect, KSM and
//! reclaim split them. After every step:
//!
//! * every result is exactly the one the model predicts (error variants and
//!   addresses included); `OutOfFrames` is accepted only when it is
//!   legitimate: no free frame and no evictable page left;
//! * `Mm::check_consistency` holds (refcounts, mapcounts, rmaps, PTEs vs
//!   frames, swap counts, frame ownership, clean pages without a copy are
//!   zero), and no PTE or pin points at a frame the mm does not own;
//! * every page holds the model's bytes: read through the frame behind a
//!   present PTE without disturbing the mm, zero when no PTE exists, and (in
//!   half the cases after every step, in all cases at the end) through
//!   `Mm::read`, which faults pages in and swaps them back;
//! * the registered notifier saw a well-formed protocol (start/end paired,
//!   `invalidate_range` and `change_pte` only inside a covering range, nothing
//!   after `release`, `release` exactly once), and its tiny secondary MMU,
//!   filled only by explicit `hva_to_pfn` mirroring and maintained only by
//!   the callbacks, agrees with the host page table: the notifier alone keeps
//!   a secondary MMU coherent.
//!
//! Failure persistence is off (`failure_persistence: None`): a failure prints
//! the shrunk operation sequence, which is the regression to add here as a
//! deterministic test. `PROPTEST_CASES` overrides the number of cases.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

use common::scenario::{ScenarioHarness, cov, get, run_scenarios};
use shadowvm::mm::{
    Access, FrameAccess, FrameOwner, Hva, MMAP_BASE, Mm, MmError, MmapFlags, OrderEnabled,
    PAGE_SIZE, PagePin, Prot, Pte, ThpConfig, ThpEnabled,
};
use shadowvm::notifier::{
    MmuNotifier, MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent, NotifierError, NotifierPte,
};

const PAGE: usize = PAGE_SIZE as usize;
/// Distinct whole-page patterns (0 is an explicit write of zeros), few so
/// that KSM finds duplicates.
const PATTERNS: u8 = 4;
/// Pins held at once (each makes a page unevictable).
const MAX_PINS: usize = 2;

// ---------------------------------------------------------------------------
// The recording notifier with a tiny secondary MMU
// ---------------------------------------------------------------------------

/// One entry of the secondary MMU: what a shadow MMU would keep in an spte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spte {
    pfn: u64,
    writable: bool,
    young: bool,
}

#[derive(Default, Debug)]
struct Calls {
    starts: u64,
    refused: u64,
    change_pte: u64,
    change_pte_installed: u64,
    young: u64,
    invalidate_range: u64,
    /// Events of the ranges started, in order.
    events: Vec<MmuNotifyEvent>,
}

#[derive(Default)]
struct MirrorState {
    /// Ranges started and not yet ended, with whether our start refused.
    active: Vec<(MmuNotifierRange, bool)>,
    /// The hvas the secondary MMU covers (think: memslots). Never shrinks
    /// except at release.
    mirrored: HashSet<Hva>,
    /// The secondary page table: hva → spte.
    cache: BTreeMap<Hva, Spte>,
    /// `change_pte` calls of ranges still in progress.
    pending: Vec<(Hva, NotifierPte)>,
    /// `change_pte` values whose range ended: the host PTE must match them
    /// after the step unless a later invalidation covered the address.
    to_verify: BTreeMap<Hva, NotifierPte>,
    released: u32,
    violations: Vec<String>,
    calls: Calls,
    /// The range ended last: `tlb_finish_mmu` flushes the PTEs it cleared
    /// (`invalidate_range`) right after the end.
    last_ended: Option<MmuNotifierRange>,
}

impl MirrorState {
    fn covering(&self, start: u64, end: u64) -> Option<&(MmuNotifierRange, bool)> {
        self.active
            .iter()
            .find(|(r, _)| r.start <= start && end <= r.end)
    }

    fn after_release(&mut self, what: &str) {
        if self.released > 0 {
            self.violations.push(format!("{what} after release"));
        }
    }
}

/// A secondary MMU in miniature. Entries are created only by the test (as a
/// shadow MMU's fault path calls `hva_to_pfn`) and by `change_pte` for an
/// address the MMU covers; they are dropped by `invalidate_range_start` and
/// `release`. Young bits live in the entries, as the CPU would set them in
/// sptes.
///
/// A non-blockable `invalidate_range_start` is refused (`Again`) when the
/// range holds entries, as a shadow MMU that must wait for a TLB shootdown
/// would. The mm calls `invalidate_range_end` for every notifier after a
/// failed start (see `non_blockable_invalidation_failure_reaches_the_oom_reaper`
/// in `tests/notifier.rs`), so a refused range stays "active" until its end.
#[derive(Default)]
struct Mirror {
    state: Mutex<MirrorState>,
}

impl MmuNotifierOps for Mirror {
    fn release(&self) {
        let mut st = self.state.lock();
        st.released += 1;
        if !st.active.is_empty() {
            let a = format!("release inside invalidations {:?}", st.active);
            st.violations.push(a);
        }
        st.cache.clear();
        st.mirrored.clear();
        st.pending.clear();
        st.to_verify.clear();
    }

    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.clear_young(start, end)
    }

    fn clear_young(&self, start: u64, end: u64) -> bool {
        let mut st = self.state.lock();
        st.after_release("clear_young");
        st.calls.young += 1;
        let mut young = false;
        for s in st.cache.range_mut(start..end).map(|(_, s)| s) {
            young |= s.young;
            s.young = false;
        }
        young
    }

    fn test_young(&self, address: u64) -> bool {
        let mut st = self.state.lock();
        st.after_release("test_young");
        st.calls.young += 1;
        st.cache.get(&address).is_some_and(|s| s.young)
    }

    fn change_pte(&self, address: u64, pte: NotifierPte) {
        let mut st = self.state.lock();
        st.after_release("change_pte");
        st.calls.change_pte += 1;
        match st.covering(address, address + PAGE_SIZE).copied() {
            None => {
                let v = format!(
                    "change_pte({address:#x}) outside every invalidation {:?}",
                    st.active
                );
                st.violations.push(v);
                return;
            }
            Some((r, true)) => {
                let v = format!("change_pte({address:#x}) inside the refused range {r:?}");
                st.violations.push(v);
                return;
            }
            Some(_) => {}
        }
        if st.mirrored.contains(&address) {
            // kvm_set_spte_hva: point the secondary mapping at the new frame.
            st.calls.change_pte_installed += 1;
            st.cache.insert(
                address,
                Spte {
                    pfn: pte.frame,
                    writable: pte.writable,
                    young: false,
                },
            );
        }
        st.pending.push((address, pte));
    }

    fn invalidate_range_start(&self, range: &MmuNotifierRange) -> Result<(), NotifierError> {
        let mut st = self.state.lock();
        st.after_release("invalidate_range_start");
        st.calls.starts += 1;
        st.calls.events.push(range.event);
        st.last_ended = None;
        if range.start >= range.end
            || !range.start.is_multiple_of(PAGE_SIZE)
            || !range.end.is_multiple_of(PAGE_SIZE)
        {
            st.violations.push(format!("malformed range {range:?}"));
        }
        if !range.blockable() && st.cache.range(range.start..range.end).next().is_some() {
            st.calls.refused += 1;
            st.active.push((*range, true));
            return Err(NotifierError::Again);
        }
        let doomed: Vec<Hva> = st
            .cache
            .range(range.start..range.end)
            .map(|(h, _)| *h)
            .collect();
        for h in doomed {
            st.cache.remove(&h);
        }
        let stale: Vec<Hva> = st
            .to_verify
            .range(range.start..range.end)
            .map(|(h, _)| *h)
            .collect();
        for h in stale {
            st.to_verify.remove(&h);
        }
        st.active.push((*range, false));
        Ok(())
    }

    fn invalidate_range_end(&self, range: &MmuNotifierRange) {
        let mut st = self.state.lock();
        st.after_release("invalidate_range_end");
        match st.active.iter().position(|(r, _)| r == range) {
            Some(i) => {
                st.active.remove(i);
                st.last_ended = Some(*range);
            }
            None => {
                let v = format!(
                    "invalidate_range_end({range:?}) without a start; active {:?}",
                    st.active
                );
                st.violations.push(v);
            }
        }
        let pending = std::mem::take(&mut st.pending);
        for (hva, pte) in pending {
            if range.contains(hva) {
                st.to_verify.insert(hva, pte);
            } else {
                st.pending.push((hva, pte));
            }
        }
    }

    fn invalidate_range(&self, start: u64, end: u64) {
        let mut st = self.state.lock();
        st.after_release("invalidate_range");
        st.calls.invalidate_range += 1;
        let after_end = st
            .last_ended
            .is_some_and(|r| r.start <= start && end <= r.end);
        if st.covering(start, end).is_none() && !after_end {
            let v = format!(
                "invalidate_range({start:#x}, {end:#x}) outside every invalidation {:?}",
                st.active
            );
            st.violations.push(v);
        }
    }
}

// ---------------------------------------------------------------------------
// Operations and scenarios
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum YoungKind {
    ClearFlush,
    Clear,
    Test,
}

#[derive(Clone, Debug)]
enum Op {
    /// A whole page of pattern `pattern`, or a few bytes at an offset.
    Write {
        page: Index,
        pattern: u8,
        partial: Option<(u16, Vec<u8>)>,
    },
    Read {
        page: Index,
    },
    Munmap {
        page: Index,
        len: u8,
    },
    /// MAP_FIXED over `[page, page + len)`.
    Mmap {
        page: Index,
        len: u8,
        prot: Prot,
        mergeable: bool,
    },
    Dontneed {
        page: Index,
        len: u8,
    },
    Mprotect {
        page: Index,
        len: u8,
        prot: Prot,
    },
    Mlock {
        page: Index,
        len: u8,
    },
    Mergeable {
        page: Index,
        len: u8,
    },
    KsmScan {
        n: u16,
    },
    Age {
        page: Index,
        len: u8,
        flush: bool,
    },
    Young {
        page: Index,
        kind: YoungKind,
    },
    Reclaim {
        n: u8,
    },
    OomReap,
    /// `hva_to_pfn` as a shadow MMU's fault path calls it; the result goes
    /// into the notifier's secondary MMU.
    Mirror {
        page: Index,
        write: bool,
    },
    /// `get_user_page`, held for `hold` steps.
    Pin {
        page: Index,
        write: bool,
        hold: u8,
    },
    Unpin,
    /// `mmap(NULL, len)`: the lowest gap at or above `MMAP_BASE`, where the
    /// region starts (run only when that gap lies inside the region).
    MmapAnywhere {
        len: u8,
        prot: Prot,
    },
    /// `cmpxchg_u64` of word `word`, with the value the model holds or not.
    Cmpxchg {
        page: Index,
        word: u16,
        expect_current: bool,
        new: u64,
    },
    /// A write of `len` bytes starting `tail` bytes before the end of a page.
    WriteSpan {
        page: Index,
        tail: u8,
        len: u8,
    },
    /// madvise(MADV_HUGEPAGE) (`on`) or MADV_NOHUGEPAGE.
    Hugepage {
        page: Index,
        len: u8,
        on: bool,
    },
    /// madvise(MADV_POPULATE_WRITE).
    Populate {
        page: Index,
        len: u8,
    },
    /// New THP settings (sysfs writes).
    SetThp {
        cfg: ThpConfig,
    },
    /// The deferred-split shrinker.
    DeferredSplit,
    /// DONTNEED or mprotect of `len` pages, as wide as the region.
    Wide {
        page: Index,
        len: u16,
        prot: Option<Prot>,
    },
}

fn prot_strategy() -> impl Strategy<Value = Prot> {
    prop_oneof![
        4 => Just(Prot::READ | Prot::WRITE),
        3 => Just(Prot::READ),
        2 => Just(Prot::NONE),
        1 => Just(Prot::WRITE),
        1 => Just(Prot::EXEC),
    ]
}

/// THP settings: mTHP sizes up to `max_order`, and (with `pmd`) the
/// PMD-size policy.
fn thp_strategy(max_order: u8, pmd: bool) -> impl Strategy<Value = ThpConfig> {
    let policy = || {
        prop_oneof![
            3 => Just(OrderEnabled::Always),
            1 => Just(OrderEnabled::Madvise),
            1 => Just(OrderEnabled::Inherit),
            2 => Just(OrderEnabled::Never),
        ]
    };
    // With the PMD size in play, mostly on: the region is mostly huge.
    let on = if pmd { 6 } else { 1 };
    let enabled = prop_oneof![
        on => Just(ThpEnabled::Always),
        1 => Just(ThpEnabled::Madvise),
        1 => Just(ThpEnabled::Never)
    ];
    (
        enabled,
        prop::collection::vec(policy(), max_order as usize),
        prop_oneof![
            4 => Just(OrderEnabled::Inherit),
            2 => Just(OrderEnabled::Always),
            1 => Just(OrderEnabled::Madvise),
            1 => Just(OrderEnabled::Never),
        ],
    )
        .prop_map(move |(enabled, orders, pmd_policy)| {
            let mut cfg = ThpConfig::off();
            cfg.enabled = enabled;
            for (i, p) in orders.into_iter().enumerate() {
                cfg.set_order(i as u8 + 1, p);
            }
            if pmd {
                cfg.set_order(9, pmd_policy);
            }
            cfg
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    op_strategy_for(3, false)
}

fn op_strategy_for(max_order: u8, pmd: bool) -> impl Strategy<Value = Op> {
    let page = any::<Index>;
    let len = || 1u8..=4;
    prop_oneof![
        10 => (page(), 0..PATTERNS, prop::option::weighted(0.25, (0u16..(PAGE as u16 - 8), prop::collection::vec(any::<u8>(), 1..8))))
            .prop_map(|(page, pattern, partial)| Op::Write { page, pattern, partial }),
        2 => page().prop_map(|page| Op::Read { page }),
        2 => (page(), len()).prop_map(|(page, len)| Op::Munmap { page, len }),
        3 => (page(), len(), prot_strategy(), any::<bool>())
            .prop_map(|(page, len, prot, mergeable)| Op::Mmap { page, len, prot, mergeable }),
        3 => (page(), len()).prop_map(|(page, len)| Op::Dontneed { page, len }),
        3 => (page(), len(), prot_strategy()).prop_map(|(page, len, prot)| Op::Mprotect { page, len, prot }),
        1 => (page(), 1u8..=2).prop_map(|(page, len)| Op::Mlock { page, len }),
        1 => (page(), len()).prop_map(|(page, len)| Op::Mergeable { page, len }),
        // Over 2 MiB, ksmd needs whole passes to see a page twice.
        6 => (1u16..=if pmd { 1200 } else { 48 }).prop_map(|n| Op::KsmScan { n }),
        2 => (page(), 1u8..=24, any::<bool>()).prop_map(|(page, len, flush)| Op::Age { page, len, flush }),
        2 => (page(), prop_oneof![Just(YoungKind::ClearFlush), Just(YoungKind::Clear), Just(YoungKind::Test)])
            .prop_map(|(page, kind)| Op::Young { page, kind }),
        4 => (1u8..=32).prop_map(|n| Op::Reclaim { n }),
        1 => Just(Op::OomReap),
        4 => (page(), any::<bool>()).prop_map(|(page, write)| Op::Mirror { page, write }),
        2 => (page(), any::<bool>(), 1u8..=6).prop_map(|(page, write, hold)| Op::Pin { page, write, hold }),
        1 => Just(Op::Unpin),
        1 => (1u8..=4, prot_strategy()).prop_map(|(len, prot)| Op::MmapAnywhere { len, prot }),
        2 => (page(), 0u16..512, any::<bool>(), prop_oneof![Just(0u64), any::<u64>()])
            .prop_map(|(page, word, expect_current, new)| Op::Cmpxchg { page, word, expect_current, new }),
        2 => (page(), 1u8..=16, 2u8..=32)
            .prop_map(|(page, tail, len)| Op::WriteSpan { page, tail, len: len.max(tail + 1) }),
        2 => (page(), len(), any::<bool>()).prop_map(|(page, len, on)| Op::Hugepage { page, len, on }),
        3 => (page(), 1u8..=24).prop_map(|(page, len)| Op::Populate { page, len }),
        1 => thp_strategy(max_order, pmd).prop_map(|cfg| Op::SetThp { cfg }),
        1 => Just(Op::DeferredSplit),
        2 => (page(), 1u16..=600, prop::option::of(prot_strategy()))
            .prop_map(|(page, len, prot)| Op::Wide { page, len, prot }),
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    /// Pages of the region.
    pages: usize,
    /// The first `mergeable` pages start MADV_MERGEABLE.
    mergeable: usize,
    /// Frames of machine memory: fewer than the pages (direct reclaim and
    /// swap on most faults) or the 48–64 of an unpressured mm.
    frames: u64,
    /// Read every page back through `Mm::read` after every step (otherwise
    /// only at the end, which leaves pages swapped out and absent between
    /// steps).
    readback_each_step: bool,
    /// End with exit_mmap; `Some(true)` drops the pins first.
    exit: Option<bool>,
    /// The THP settings at the start.
    thp: ThpConfig,
    ops: Vec<Op>,
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (8usize..=24).prop_flat_map(|n| {
        let frames = prop_oneof![
            1 => (n as u64 / 3 + 2)..=(n as u64 / 2 + 2),
            3 => (n as u64 / 2 + 2)..=(n as u64 + 2),
            1 => 48u64..=64,
        ];
        (
            Just(n),
            0..=n,
            frames,
            any::<bool>(),
            prop::option::of(any::<bool>()),
            thp_strategy(4, false),
            prop::collection::vec(op_strategy(), 1..60),
        )
            .prop_map(
                |(pages, mergeable, frames, readback_each_step, exit, thp, ops)| Scenario {
                    pages,
                    mergeable,
                    frames,
                    readback_each_step,
                    exit,
                    thp,
                    ops,
                },
            )
    })
}

/// A region of 2 MiB and a little more, PMD-size THP and mTHP on, with
/// frames for one or two huge folios (or too few for one, so faults fall
/// back), and fewer steps: every step checks every page.
fn thp_scenario_strategy() -> impl Strategy<Value = Scenario> {
    (520usize..=560).prop_flat_map(|n| {
        let frames = prop_oneof![
            1 => 300u64..=500,
            3 => 600u64..=1100,
        ];
        // MADV_MERGEABLE of part of the first 2 MiB would split its VMA and
        // keep THP out of it: none, all, or past it.
        let mergeable = prop_oneof![Just(0), Just(n), 512..=n];
        (
            Just(n),
            mergeable,
            frames,
            prop::option::of(any::<bool>()),
            thp_strategy(4, true),
            prop::collection::vec(op_strategy_for(4, true), 1..30),
        )
            .prop_map(|(pages, mergeable, frames, exit, thp, ops)| Scenario {
                pages,
                mergeable,
                frames,
                readback_each_step: false,
                exit,
                thp,
                ops,
            })
    })
}

// ---------------------------------------------------------------------------
// The model and the harness
// ---------------------------------------------------------------------------

fn pattern_page(k: u8) -> Vec<u8> {
    let k = k as usize;
    (0..PAGE)
        .map(|j| {
            if k == 0 {
                0
            } else {
                (j * (2 * k + 1) + k * 37) as u8
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
struct PageModel {
    mapped: bool,
    prot: Prot,
    mergeable: bool,
    locked: bool,
    data: Vec<u8>,
}

impl PageModel {
    fn fresh(prot: Prot, mergeable: bool) -> Self {
        Self {
            mapped: true,
            prot,
            mergeable,
            locked: false,
            data: vec![0; PAGE],
        }
    }
}

fn readable(prot: Prot) -> bool {
    // x86: write and exec imply read.
    prot.intersects(Prot::READ | Prot::WRITE | Prot::EXEC)
}

fn allows(prot: Prot, access: Access) -> bool {
    match access {
        Access::Read => readable(prot),
        Access::Write => prot.contains(Prot::WRITE),
    }
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Read => "read",
        Access::Write => "write",
    }
}

/// Where two pages differ, in a few words.
fn page_diff(got: &[u8], want: &[u8]) -> Option<String> {
    let first = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{n} bytes differ, first at offset {first}: got {:#04x}, want {:#04x} (got[0..8] = {:02x?})",
        got[first],
        want[first],
        &got[..8]
    ))
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

/// Counters summed over all cases, to show (and assert) that the sequences
/// reach the interesting paths.
#[derive(Default)]
struct Coverage {
    cases: AtomicU64,
    steps: AtomicU64,
    exits: AtomicU64,
    ksm_merges: AtomicU64,
    pgcow: AtomicU64,
    pswpout: AtomicU64,
    pswpin: AtomicU64,
    pgsteal: AtomicU64,
    explicit_evicted: AtomicU64,
    oom: AtomicU64,
    oom_reap_refused: AtomicU64,
    change_pte_installed: AtomicU64,
    mirrored: AtomicU64,
    expected_errors: AtomicU64,
    swapped_seen: AtomicU64,
    thp_fault_alloc: AtomicU64,
    mthp_fault_alloc: AtomicU64,
    thp_split_pmd: AtomicU64,
    folio_splits: AtomicU64,
    populated: AtomicU64,
}

thread_local! {
    /// Per test thread: the two tests run side by side.
    static COVERAGE: Coverage = const { Coverage {
    cases: AtomicU64::new(0),
    steps: AtomicU64::new(0),
    exits: AtomicU64::new(0),
    ksm_merges: AtomicU64::new(0),
    pgcow: AtomicU64::new(0),
    pswpout: AtomicU64::new(0),
    pswpin: AtomicU64::new(0),
    pgsteal: AtomicU64::new(0),
    explicit_evicted: AtomicU64::new(0),
    oom: AtomicU64::new(0),
    oom_reap_refused: AtomicU64::new(0),
    change_pte_installed: AtomicU64::new(0),
    mirrored: AtomicU64::new(0),
    expected_errors: AtomicU64::new(0),
    swapped_seen: AtomicU64::new(0),
    thp_fault_alloc: AtomicU64::new(0),
    mthp_fault_alloc: AtomicU64::new(0),
    thp_split_pmd: AtomicU64::new(0),
    folio_splits: AtomicU64::new(0),
    populated: AtomicU64::new(0),
} };
}

struct Harness {
    mm: Arc<Mm>,
    mirror: Arc<Mirror>,
    reg: Option<MmuNotifier>,
    base: Hva,
    model: Vec<PageModel>,
    /// Pins held, with the step after which each is dropped.
    pins: VecDeque<(PagePin, usize)>,
    step: usize,
}

impl Harness {
    fn n(&self) -> usize {
        self.model.len()
    }

    fn hva(&self, i: usize) -> Hva {
        self.base + i as u64 * PAGE_SIZE
    }

    /// `[i, i + len)` clipped to the region.
    fn span(&self, page: &Index, len: u8) -> std::ops::Range<usize> {
        let i = page.index(self.n());
        i..(i + len as usize).min(self.n())
    }

    /// The pages of `span` from its start up to the first unmapped one.
    fn mapped_prefix(&self, span: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let end = span
            .clone()
            .find(|&j| !self.model[j].mapped)
            .unwrap_or(span.end);
        span.start..end
    }

    fn page_of(&self, hva: Hva) -> usize {
        ((hva - self.base) / PAGE_SIZE) as usize
    }

    /// The error an access to page `i` at `addr` must fail with, if any.
    fn expected_fault(&self, i: usize, addr: Hva, access: Access) -> Option<MmError> {
        let m = &self.model[i];
        if !m.mapped {
            Some(MmError::NoVma(addr))
        } else if !allows(m.prot, access) {
            Some(MmError::Access {
                addr,
                access: access_name(access),
            })
        } else {
            None
        }
    }

    /// Present pages reclaim could evict: unlocked VMA, not KSM, mapped
    /// once, no pin on its folio (a large one is split first).
    fn evictable(&self) -> Vec<Hva> {
        let mut out = Vec::new();
        for v in self.mm.vmas() {
            if v.flags.contains(MmapFlags::LOCKED) {
                continue;
            }
            for hva in v.pages() {
                if let Some(Pte::Present(p)) = self.mm.pte(hva)
                    && let Some(meta) = self.mm.page_meta(p.pfn)
                    && !meta.ksm
                    && meta.mapcount == 1
                    && meta.refcount == meta.mapping_refs
                {
                    out.push(hva);
                }
            }
        }
        out
    }

    /// `OutOfFrames` is only acceptable when there is truly nothing left:
    /// no free frame and no page reclaim could evict.
    fn oom_is_legit(&self, what: &str) -> Result<(), TestCaseError> {
        cov!(oom, 1);
        let free = self.mm.frames().nr_free();
        let ev = self.evictable();
        if free != 0 || !ev.is_empty() {
            return Err(fail(format!(
                "{what}: OutOfFrames with {free} free frames and evictable pages at {ev:x?}"
            )));
        }
        Ok(())
    }

    /// Handles the result of an operation the model says must succeed.
    fn settle<T: std::fmt::Debug>(
        &self,
        r: Result<T, MmError>,
        what: &str,
    ) -> Result<Option<T>, TestCaseError> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(MmError::OutOfFrames) => self.oom_is_legit(what).map(|()| None),
            Err(e) => Err(fail(format!("{what}: unexpected error {e:?}"))),
        }
    }

    /// Handles the result of an access (fault) of page `i`.
    fn settle_access<T: std::fmt::Debug>(
        &self,
        i: usize,
        addr: Hva,
        access: Access,
        r: Result<T, MmError>,
        what: &str,
    ) -> Result<Option<T>, TestCaseError> {
        match self.expected_fault(i, addr, access) {
            Some(e) => {
                cov!(expected_errors, 1);
                match r {
                    Err(got) if got == e => Ok(None),
                    other => Err(fail(format!(
                        "{what} of page {i}: got {other:?}, want Err({e:?})"
                    ))),
                }
            }
            None => self.settle(r, what),
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mm = self.mm.clone();
        match op {
            Op::Write {
                page,
                pattern,
                partial,
            } => {
                let i = page.index(self.n());
                let (off, bytes) = match partial {
                    Some((o, b)) => (*o as usize, b.clone()),
                    None => (0, pattern_page(*pattern)),
                };
                let addr = self.hva(i) + off as u64;
                let r = mm.write(addr, &bytes);
                if self
                    .settle_access(i, addr, Access::Write, r, "write")?
                    .is_some()
                {
                    self.model[i].data[off..off + bytes.len()].copy_from_slice(&bytes);
                }
            }
            Op::Read { page } => {
                let i = page.index(self.n());
                let mut buf = vec![0xeeu8; PAGE];
                let r = mm.read(self.hva(i), &mut buf);
                if self
                    .settle_access(i, self.hva(i), Access::Read, r, "read")?
                    .is_some()
                    && let Some(d) = page_diff(&buf, &self.model[i].data)
                {
                    return Err(fail(format!("read of page {i}: {d}")));
                }
            }
            Op::Munmap { page, len } => {
                let span = self.span(page, *len);
                let r = mm.munmap(self.hva(span.start), span.len() as u64 * PAGE_SIZE);
                prop_assert_eq!(r, Ok(()));
                for m in &mut self.model[span] {
                    m.mapped = false;
                    m.locked = false;
                    m.mergeable = false;
                    m.data.fill(0);
                }
            }
            Op::Mmap {
                page,
                len,
                prot,
                mergeable,
            } => {
                let span = self.span(page, *len);
                let flags = if *mergeable {
                    MmapFlags::MERGEABLE
                } else {
                    MmapFlags::empty()
                };
                let addr = self.hva(span.start);
                let r = mm.mmap(Some(addr), span.len() as u64 * PAGE_SIZE, *prot, flags);
                prop_assert_eq!(r, Ok(addr));
                for m in &mut self.model[span] {
                    *m = PageModel::fresh(*prot, *mergeable);
                }
            }
            Op::Dontneed { page, len } => self.dontneed(self.span(page, *len))?,
            Op::Mprotect { page, len, prot } => self.mprotect(self.span(page, *len), *prot)?,
            Op::Mergeable { page, len } => {
                // madvise(): every VMA in the range, ENOMEM for a hole.
                let span = self.span(page, *len);
                let r = mm.madvise_mergeable(self.hva(span.start), span.len() as u64 * PAGE_SIZE);
                for m in self.model[span.clone()].iter_mut().filter(|m| m.mapped) {
                    m.mergeable = true;
                }
                if span.clone().any(|j| !self.model[j].mapped) {
                    prop_assert_eq!(r, Err(MmError::NoMemory));
                } else {
                    prop_assert_eq!(r, Ok(()));
                }
            }
            Op::Mlock { page, len } => {
                // do_mlock: VM_LOCKED up to the first hole, then the locked
                // part is populated in order (write faults where writable);
                // the first page that cannot be faulted ends it; a hole is
                // ENOMEM afterwards.
                let span = self.span(page, *len);
                let r = mm.mlock(self.hva(span.start), span.len() as u64 * PAGE_SIZE);
                let prefix = self.mapped_prefix(span.clone());
                for m in &mut self.model[prefix.clone()] {
                    m.locked = true;
                }
                let first_bad = prefix.clone().find(|&j| !readable(self.model[j].prot));
                match (first_bad, r) {
                    (_, Err(MmError::OutOfFrames)) => self.oom_is_legit("mlock")?,
                    (Some(j), r) => prop_assert_eq!(
                        r,
                        Err(MmError::Access {
                            addr: self.hva(j),
                            access: "read"
                        })
                    ),
                    (None, r) if prefix.end == span.end => prop_assert_eq!(r, Ok(())),
                    (None, r) => prop_assert_eq!(r, Err(MmError::NoMemory)),
                }
            }
            Op::KsmScan { n } => {
                let r = mm.ksm_scan(*n as u64);
                prop_assert!(r.is_ok(), "ksm_scan: {:?}", r);
            }
            Op::Age { page, len, flush } => {
                let span = self.span(page, *len);
                let (start, end) = (self.hva(span.start), self.hva(span.end));
                let present: Vec<Hva> = span
                    .clone()
                    .map(|j| self.hva(j))
                    .filter(|h| matches!(mm.pte(*h), Some(Pte::Present(_))))
                    .collect();
                let res = mm
                    .age_range(start, end, *flush)
                    .map_err(|e| fail(format!("age_range: {e:?}")))?;
                prop_assert_eq!(res.scanned, present.len() as u64);
                prop_assert!(
                    res.young.iter().all(|h| present.contains(h)),
                    "young {:x?}",
                    res.young
                );
                // Nothing touched the pages since: all bits are clear now.
                for h in present {
                    prop_assert_eq!(
                        mm.test_young(h),
                        Ok(false),
                        "page {:#x} young right after aging",
                        h
                    );
                }
            }
            Op::Young { page, kind } => {
                let hva = self.hva(page.index(self.n()));
                let r = match kind {
                    YoungKind::ClearFlush => mm.clear_flush_young(hva),
                    YoungKind::Clear => mm.clear_young(hva),
                    YoungKind::Test => mm.test_young(hva),
                };
                let young = r.map_err(|e| fail(format!("{kind:?}: {e:?}")))?;
                let present = matches!(mm.pte(hva), Some(Pte::Present(_)));
                prop_assert!(
                    present || !young,
                    "{:?}: a page without a PTE is young",
                    kind
                );
                match kind {
                    YoungKind::Test => {
                        prop_assert_eq!(mm.test_young(hva), Ok(young), "test_young changed state")
                    }
                    _ => prop_assert_eq!(
                        mm.test_young(hva),
                        Ok(false),
                        "young right after {:?}",
                        kind
                    ),
                }
            }
            Op::Reclaim { n } => {
                let res = mm
                    .reclaim(*n as u64)
                    .map_err(|e| fail(format!("reclaim: {e:?}")))?;
                prop_assert!(res.scanned <= *n as u64, "{:?}", res);
                prop_assert_eq!(
                    res.evicted,
                    res.swapped_out + res.dropped_clean,
                    "{:?}",
                    res
                );
                prop_assert_eq!(
                    res.scanned,
                    res.evicted + res.kept_young + res.skipped,
                    "{:?}",
                    res
                );
                cov!(explicit_evicted, res.evicted);
            }
            Op::MmapAnywhere { len, prot } => {
                prop_assert_eq!(self.base, MMAP_BASE);
                let len = *len as usize;
                let gap = (0..=self.n())
                    .find(|&i| (i..i + len).all(|j| j >= self.n() || !self.model[j].mapped));
                let Some(i) = gap.filter(|&i| i + len <= self.n()) else {
                    return Ok(()); // it would land past the region
                };
                let r = mm.mmap(None, len as u64 * PAGE_SIZE, *prot, MmapFlags::empty());
                prop_assert_eq!(r, Ok(self.hva(i)), "get_unmapped_area");
                for m in &mut self.model[i..i + len] {
                    *m = PageModel::fresh(*prot, false);
                }
            }
            Op::Cmpxchg {
                page,
                word,
                expect_current,
                new,
            } => {
                let i = page.index(self.n());
                let off = *word as usize * 8;
                let addr = self.hva(i) + off as u64;
                let cur = u64::from_le_bytes(
                    self.model[i].data[off..off + 8]
                        .try_into()
                        .unwrap_or_default(),
                );
                let old = if *expect_current { cur } else { cur ^ 1 };
                let r = mm.cmpxchg_u64(addr, old, *new);
                if let Some(found) = self.settle_access(i, addr, Access::Write, r, "cmpxchg_u64")? {
                    prop_assert_eq!(found, cur, "cmpxchg_u64 found another value");
                    if *expect_current {
                        self.model[i].data[off..off + 8].copy_from_slice(&new.to_le_bytes());
                    }
                }
            }
            Op::WriteSpan { page, tail, len } => {
                // A write that starts `tail` bytes before the end of page `i`
                // and runs into the next page (or past the region).
                let i = page.index(self.n());
                if mm.frames().nr_free() < 2 {
                    // Which page ran out of frames would be ambiguous (the
                    // second fault's direct reclaim may evict the first
                    // page): cross-page writes run with frames to spare.
                    return Ok(());
                }
                let start = self.hva(i + 1) - *tail as u64;
                let bytes: Vec<u8> = (0..*len as usize)
                    .map(|k| (k as u8).wrapping_mul(29) ^ 0x5c)
                    .collect();
                let r = mm.write(start, &bytes);
                // Page by page, as Mm::write goes: the first page that
                // refuses ends it; earlier pages keep what was written.
                let mut done = 0usize;
                let mut want = Ok(());
                while done < bytes.len() {
                    let addr = start + done as u64;
                    let j = self.page_of(addr);
                    let off = (addr % PAGE_SIZE) as usize;
                    let n = (PAGE - off).min(bytes.len() - done);
                    let e = if j < self.n() {
                        self.expected_fault(j, addr, Access::Write)
                    } else {
                        Some(MmError::NoVma(addr))
                    };
                    if let Some(e) = e {
                        want = Err(e);
                        break;
                    }
                    self.model[j].data[off..off + n].copy_from_slice(&bytes[done..done + n]);
                    done += n;
                }
                prop_assert_eq!(r, want);
            }
            Op::OomReap => self.oom_reap()?,
            Op::Mirror { page, write } => {
                let i = page.index(self.n());
                let hva = self.hva(i);
                let access = if *write { Access::Write } else { Access::Read };
                let r = mm.hva_to_pfn(hva, access);
                if let Some(hp) = self.settle_access(i, hva, access, r, "hva_to_pfn")? {
                    cov!(mirrored, 1);
                    match mm.pte(hva) {
                        Some(Pte::Present(p)) if p.pfn == hp.pfn && p.writable == hp.writable => {}
                        other => {
                            return Err(fail(format!(
                                "hva_to_pfn({hva:#x}) = {hp:?} but the PTE is {other:?}"
                            )));
                        }
                    }
                    prop_assert!(
                        !write || hp.writable,
                        "write hva_to_pfn returned a read-only frame"
                    );
                    let mut st = self.mirror.state.lock();
                    st.mirrored.insert(hva);
                    st.cache.insert(
                        hva,
                        Spte {
                            pfn: hp.pfn,
                            writable: hp.writable,
                            young: true,
                        },
                    );
                }
            }
            Op::Pin { page, write, hold } => {
                let i = page.index(self.n());
                let hva = self.hva(i);
                let access = if *write { Access::Write } else { Access::Read };
                // PagePin is not Debug: settle errors as `Result<(), _>`.
                let pin = match mm.get_user_page(hva, access) {
                    Ok(pin) => Some(pin),
                    Err(e) => {
                        self.settle_access(i, hva, access, Err::<(), _>(e), "get_user_page")?;
                        None
                    }
                };
                if let Some(pin) = pin {
                    prop_assert!(
                        self.expected_fault(i, hva, access).is_none(),
                        "get_user_page of page {} succeeded, want {:?}",
                        i,
                        self.expected_fault(i, hva, access)
                    );
                    match mm.pte(hva) {
                        Some(Pte::Present(p)) if p.pfn == pin.pfn() && (p.writable || !write) => {}
                        other => {
                            return Err(fail(format!(
                                "pin of {hva:#x} took frame {} but the PTE is {other:?}",
                                pin.pfn()
                            )));
                        }
                    }
                    if self.pins.len() >= MAX_PINS {
                        self.pins.pop_front();
                    }
                    self.pins.push_back((pin, self.step + *hold as usize));
                }
            }
            Op::Unpin => {
                self.pins.pop_front();
            }
            Op::Hugepage { page, len, on } => {
                let span = self.span(page, *len);
                let (a, l) = (self.hva(span.start), span.len() as u64 * PAGE_SIZE);
                let r = if *on {
                    mm.madvise_hugepage(a, l)
                } else {
                    mm.madvise_nohugepage(a, l)
                };
                if span.clone().any(|j| !self.model[j].mapped) {
                    prop_assert_eq!(r, Err(MmError::NoMemory));
                } else {
                    prop_assert_eq!(r, Ok(()));
                }
            }
            Op::Populate { page, len } => {
                // madvise_populate: page by page; a hole is ENOMEM, a VMA
                // that is not writable EINVAL; nothing is written.
                let span = self.span(page, *len);
                let r =
                    mm.madvise_populate_write(self.hva(span.start), span.len() as u64 * PAGE_SIZE);
                let first_bad = span
                    .clone()
                    .find(|&j| !self.model[j].mapped || !self.model[j].prot.contains(Prot::WRITE));
                let oom = r == Err(MmError::OutOfFrames);
                match (first_bad, r) {
                    (_, Err(MmError::OutOfFrames)) => self.oom_is_legit("populate")?,
                    (None, r) => prop_assert_eq!(r, Ok(())),
                    (Some(j), r) if !self.model[j].mapped => {
                        prop_assert_eq!(r, Err(MmError::NoMemory))
                    }
                    (Some(_), r) => prop_assert!(
                        matches!(r, Err(MmError::InvalidArgument(_))),
                        "populate of a read-only VMA: {:?}",
                        r
                    ),
                }
                // Up to a hole or a read-only page every page was faulted in
                // (out of frames, the pages before the one that failed).
                let upto = if oom {
                    span.start
                } else {
                    first_bad.unwrap_or(span.end)
                };
                for j in span.start..upto {
                    match mm.pte(self.hva(j)) {
                        Some(Pte::Present(p)) if p.writable => {}
                        // Direct reclaim of a later fault may take it again.
                        _ if mm.stats().pgsteal > 0 => {}
                        other => {
                            return Err(fail(format!("populated page {j} is {other:?}")));
                        }
                    }
                }
                cov!(populated, 1);
            }
            Op::SetThp { cfg } => mm.set_thp_config(*cfg),
            Op::DeferredSplit => {
                let r = mm.deferred_split_scan();
                prop_assert!(r.is_ok(), "deferred_split_scan: {:?}", r);
            }
            Op::Wide { page, len, prot } => {
                let i = page.index(self.n());
                let span = i..(i + *len as usize).min(self.n());
                match prot {
                    None => self.dontneed(span)?,
                    Some(prot) => self.mprotect(span, *prot)?,
                }
            }
        }
        Ok(())
    }

    /// madvise(MADV_DONTNEED) of `span`: VMA by VMA in address order; the
    /// first VM_LOCKED one fails with EINVAL after the ones before it were
    /// zapped; a hole is ENOMEM once every VMA was done.
    fn dontneed(&mut self, span: std::ops::Range<usize>) -> Result<(), TestCaseError> {
        let r = self
            .mm
            .madvise_dontneed(self.hva(span.start), span.len() as u64 * PAGE_SIZE);
        let locked = span
            .clone()
            .find(|&j| self.model[j].mapped && self.model[j].locked);
        let zapped = span.start..locked.unwrap_or(span.end);
        for m in self.model[zapped].iter_mut().filter(|m| m.mapped) {
            m.data.fill(0);
        }
        let any = span.clone().any(|j| self.model[j].mapped);
        let hole = span.clone().any(|j| !self.model[j].mapped);
        let expected = match locked {
            Some(j) => Err(MmError::Locked(self.hva(j))),
            None if hole || !any => Err(MmError::NoMemory),
            None => Ok(()),
        };
        prop_assert_eq!(r, expected);
        Ok(())
    }

    /// mprotect of `span` (`do_mprotect_pkey`): up to the first hole, then
    /// ENOMEM.
    fn mprotect(&mut self, span: std::ops::Range<usize>, prot: Prot) -> Result<(), TestCaseError> {
        let r = self
            .mm
            .mprotect(self.hva(span.start), span.len() as u64 * PAGE_SIZE, prot);
        let prefix = self.mapped_prefix(span.clone());
        for m in &mut self.model[prefix.clone()] {
            m.prot = prot;
        }
        if prefix.end == span.end {
            prop_assert_eq!(r, Ok(()));
        } else {
            prop_assert_eq!(r, Err(MmError::NoMemory));
        }
        Ok(())
    }

    /// The OOM reaper: every unlocked VMA is zapped, except those whose
    /// non-blockable invalidation our notifier refuses (it holds entries
    /// there); those keep their pages and the result is `Again`.
    fn oom_reap(&mut self) -> Result<(), TestCaseError> {
        let cached: Vec<Hva> = self.mirror.state.lock().cache.keys().copied().collect();
        let mut refused = false;
        let mut zapped = Vec::new();
        let mut present = 0;
        for v in self.mm.vmas() {
            if v.flags.contains(MmapFlags::LOCKED) {
                continue;
            }
            if cached.iter().any(|h| v.contains(*h)) {
                refused = true;
                continue;
            }
            for hva in v.pages() {
                if matches!(self.mm.pte(hva), Some(Pte::Present(_))) {
                    present += 1;
                }
                zapped.push(self.page_of(hva));
            }
        }
        let r = self.mm.oom_reap();
        if refused {
            cov!(oom_reap_refused, 1);
            prop_assert_eq!(r, Err(MmError::Notifier(NotifierError::Again)));
        } else {
            prop_assert_eq!(r, Ok(present));
        }
        for i in zapped {
            self.model[i].data.fill(0);
        }
        Ok(())
    }

    /// Everything that must hold between two operations.
    fn check(&mut self, readback: bool) -> Result<(), TestCaseError> {
        self.check_quiet()?;
        if readback {
            self.readback()?;
            self.check_quiet()?;
        }
        Ok(())
    }

    /// The checks that do not change the mm.
    fn check_quiet(&mut self) -> Result<(), TestCaseError> {
        let mm = &self.mm;
        let me = mm.frame_owner();
        // The notifier protocol. Take what we need and drop the lock: the mm
        // calls the notifier under its page-table lock, so the test must not
        // hold the notifier's lock while calling into the mm.
        let (cache, to_verify) = {
            let mut st = self.mirror.state.lock();
            if !st.violations.is_empty() {
                return Err(fail(format!(
                    "notifier protocol violated: {:?}",
                    st.violations
                )));
            }
            if !st.active.is_empty() || !st.pending.is_empty() {
                return Err(fail(format!(
                    "invalidations left open after the step: active {:?}, pending change_pte {:?}",
                    st.active, st.pending
                )));
            }
            (st.cache.clone(), std::mem::take(&mut st.to_verify))
        };
        // The secondary MMU is coherent with the host page table.
        for (hva, s) in &cache {
            match mm.pte(*hva) {
                Some(Pte::Present(p)) if p.pfn == s.pfn && (p.writable || !s.writable) => {}
                other => {
                    return Err(fail(format!(
                        "secondary MMU maps {hva:#x} -> {s:?} but the host PTE is {other:?}"
                    )));
                }
            }
            prop_assert_eq!(
                mm.frames().owner(s.pfn),
                Ok(me),
                "secondary MMU maps a frame the mm does not own"
            );
        }
        // change_pte told the truth: once its range ended, the host PTE is
        // what it announced.
        for (hva, npte) in &to_verify {
            match mm.pte(*hva) {
                Some(Pte::Present(p)) if p.pfn == npte.frame && p.writable == npte.writable => {}
                other => {
                    return Err(fail(format!(
                        "change_pte({hva:#x}, {npte:?}) but after its range the host PTE is {other:?}"
                    )));
                }
            }
        }
        // The mm's own checker.
        mm.check_consistency().map_err(|e| fail(format!("{e}")))?;
        // Pins keep their frames.
        for (pin, _) in &self.pins {
            prop_assert_eq!(
                mm.frames().owner(pin.pfn()),
                Ok(me),
                "pinned frame {} was freed",
                pin.pfn()
            );
            let refs = mm.page_meta(pin.pfn()).map(|m| m.refcount).unwrap_or(0);
            prop_assert!(refs >= 1, "pinned frame {} has no reference", pin.pfn());
        }
        // Every page against the model, without faulting anything in.
        let mut buf = vec![0u8; PAGE];
        let mut swapped = 0;
        for (i, m) in self.model.iter().enumerate() {
            let hva = self.base + i as u64 * PAGE_SIZE;
            let vma = mm.find_vma(hva);
            let pte = mm.pte(hva);
            if !m.mapped {
                prop_assert!(
                    vma.is_none(),
                    "page {} is mapped by {:?}, want unmapped",
                    i,
                    vma
                );
                prop_assert!(pte.is_none(), "unmapped page {} has PTE {:?}", i, pte);
                continue;
            }
            let v = vma.ok_or_else(|| fail(format!("page {i} has no VMA")))?;
            prop_assert_eq!(v.prot, m.prot, "protection of page {}", i);
            prop_assert_eq!(
                v.flags.contains(MmapFlags::MERGEABLE),
                m.mergeable,
                "MERGEABLE of page {}",
                i
            );
            prop_assert_eq!(
                v.flags.contains(MmapFlags::LOCKED),
                m.locked,
                "LOCKED of page {}",
                i
            );
            match pte {
                None => {
                    if let Some(d) = page_diff(&vec![0; PAGE], &m.data) {
                        return Err(fail(format!(
                            "page {i} has no PTE (reads as zero) but: {d}"
                        )));
                    }
                }
                Some(Pte::Present(p)) => {
                    // No PTE points at a free frame (or anyone else's).
                    prop_assert_eq!(
                        mm.frames().owner(p.pfn),
                        Ok(me),
                        "page {} maps frame {}",
                        i,
                        p.pfn
                    );
                    mm.memory()
                        .read_frame(p.pfn, 0, &mut buf)
                        .map_err(|e| fail(e.to_string()))?;
                    if let Some(d) = page_diff(&buf, &m.data) {
                        return Err(fail(format!("page {i} (frame {}): {d}", p.pfn)));
                    }
                }
                Some(Pte::Swap(_)) => swapped += 1,
            }
        }
        cov!(swapped_seen, swapped);
        Ok(())
    }

    /// Every page through `Mm::read` (faulting in, swapping in).
    fn readback(&mut self) -> Result<(), TestCaseError> {
        let mut buf = vec![0u8; PAGE];
        for i in 0..self.n() {
            let hva = self.hva(i);
            buf.fill(0xee);
            let r = self.mm.read(hva, &mut buf);
            if self
                .settle_access(i, hva, Access::Read, r, "read-back")?
                .is_some()
                && let Some(d) = page_diff(&buf, &self.model[i].data)
            {
                return Err(fail(format!("read-back of page {i}: {d}")));
            }
        }
        Ok(())
    }

    fn record_coverage(&self) {
        let st = self.mm.stats();
        cov!(pgcow, st.pgcow);
        cov!(pswpout, st.pswpout);
        cov!(pswpin, st.pswpin);
        cov!(pgsteal, st.pgsteal);
        cov!(ksm_merges, self.mm.ksm_stats().merges);
        cov!(thp_fault_alloc, st.thp_fault_alloc);
        cov!(thp_split_pmd, st.thp_split_pmd);
        let mthp = self.mm.mthp_stats();
        let small: u64 = mthp.iter().take(8).map(|s| s.anon_fault_alloc).sum();
        cov!(mthp_fault_alloc, small);
        cov!(folio_splits, mthp.iter().map(|s| s.split).sum());
        cov!(
            change_pte_installed,
            self.mirror.state.lock().calls.change_pte_installed,
        );
    }

    /// Ends the case: exit_mmap (maybe with pins held) or a final read-back
    /// and unregister.
    fn finish(mut self, exit: Option<bool>) -> Result<(), TestCaseError> {
        self.record_coverage();
        let Some(drop_pins_first) = exit else {
            self.check(true)?;
            self.pins.clear();
            self.check(false)?;
            if let Some(reg) = self.reg.take() {
                reg.unregister();
            }
            prop_assert_eq!(
                self.mirror.state.lock().released,
                1,
                "release after unregister"
            );
            return Ok(());
        };
        cov!(exits, 1);
        if drop_pins_first {
            self.pins.clear();
        }
        let mm = self.mm.clone();
        mm.exit_mmap();
        {
            let st = self.mirror.state.lock();
            prop_assert_eq!(st.released, 1, "release must run exactly once at exit");
            prop_assert!(st.violations.is_empty(), "{:?}", st.violations);
            prop_assert!(st.active.is_empty() && st.cache.is_empty());
        }
        mm.check_consistency()
            .map_err(|e| fail(format!("after exit: {e}")))?;
        prop_assert!(
            mm.vmas().is_empty(),
            "VMAs left after exit: {:?}",
            mm.vmas()
        );
        prop_assert_eq!(mm.nr_present(), 0);
        assert_exited(&mm, self.base)?;
        mm.exit_mmap(); // a second exit does nothing
        // Pins held across exit keep their frames until dropped.
        for (pin, _) in &self.pins {
            prop_assert_eq!(mm.frames().owner(pin.pfn()), Ok(mm.frame_owner()));
        }
        self.pins.clear();
        prop_assert_eq!(
            mm.frames().nr_free(),
            mm.frames().nr_frames(),
            "frames left allocated after exit"
        );
        prop_assert_eq!(mm.swap_used(), 0, "swap slots left after exit");
        if let Some(reg) = self.reg.take() {
            prop_assert!(reg.has_released());
            reg.unregister();
        }
        let st = self.mirror.state.lock();
        prop_assert_eq!(st.released, 1, "release ran again on unregister after exit");
        prop_assert!(st.violations.is_empty(), "{:?}", st.violations);
        Ok(())
    }
}

impl ScenarioHarness for Harness {
    type Scenario = Scenario;

    fn new(s: &Scenario) -> Result<Self, TestCaseError> {
        let mm = Mm::new_anonymous(s.frames).map_err(|e| fail(e.to_string()))?;
        mm.set_thp_config(s.thp);
        let rw = Prot::READ | Prot::WRITE;
        let base = mm
            .mmap(None, s.pages as u64 * PAGE_SIZE, rw, MmapFlags::empty())
            .map_err(|e| fail(e.to_string()))?;
        if s.mergeable > 0 {
            mm.madvise_mergeable(base, s.mergeable as u64 * PAGE_SIZE)
                .map_err(|e| fail(e.to_string()))?;
        }
        let mirror = Arc::new(Mirror::default());
        let reg = mm
            .mmu_notifier_register(mirror.clone())
            .map_err(|e| fail(e.to_string()))?;
        let model = (0..s.pages)
            .map(|i| PageModel::fresh(rw, i < s.mergeable))
            .collect();
        Ok(Self {
            mm,
            mirror,
            reg: Some(reg),
            base,
            model,
            pins: VecDeque::new(),
            step: 0,
        })
    }

    fn run(&mut self, s: &Scenario) -> Result<(), TestCaseError> {
        self.check(false)?;
        for (step, op) in s.ops.iter().enumerate() {
            self.step = step;
            while self.pins.front().is_some_and(|(_, until)| *until <= step) {
                self.pins.pop_front();
            }
            self.apply(op)
                .map_err(|e| fail(format!("step {step} {op:?}: {e}")))?;
            self.check(s.readback_each_step)
                .map_err(|e| fail(format!("after step {step} {op:?}: {e}")))?;
        }
        cov!(steps, s.ops.len() as u64);
        Ok(())
    }

    fn end(self, s: &Scenario) -> Result<(), TestCaseError> {
        self.finish(s.exit)?;
        cov!(cases, 1);
        Ok(())
    }
}

/// After exit_mmap every operation fails with `Exited`.
fn assert_exited(mm: &Arc<Mm>, hva: Hva) -> Result<(), TestCaseError> {
    let ex = Err(MmError::Exited);
    let mut b = [0u8; 8];
    prop_assert_eq!(mm.read(hva, &mut b), ex.clone());
    prop_assert_eq!(mm.write(hva, &b), ex.clone());
    prop_assert_eq!(mm.read_u64(hva).map(|_| ()), ex.clone());
    prop_assert_eq!(mm.cmpxchg_u64(hva, 0, 1).map(|_| ()), ex.clone());
    prop_assert_eq!(
        mm.handle_mm_fault(hva, Access::Read).map(|_| ()),
        ex.clone()
    );
    prop_assert_eq!(mm.hva_to_pfn(hva, Access::Write).map(|_| ()), ex.clone());
    prop_assert!(matches!(
        mm.get_user_page(hva, Access::Read),
        Err(MmError::Exited)
    ));
    let rw = Prot::READ | Prot::WRITE;
    prop_assert_eq!(
        mm.mmap(Some(hva), PAGE_SIZE, rw, MmapFlags::empty())
            .map(|_| ()),
        ex.clone()
    );
    prop_assert_eq!(
        mm.mmap(None, PAGE_SIZE, rw, MmapFlags::empty()).map(|_| ()),
        ex.clone()
    );
    prop_assert_eq!(mm.munmap(hva, PAGE_SIZE), ex.clone());
    prop_assert_eq!(mm.madvise_dontneed(hva, PAGE_SIZE), ex.clone());
    prop_assert_eq!(mm.madvise_mergeable(hva, PAGE_SIZE), ex.clone());
    prop_assert_eq!(mm.mlock(hva, PAGE_SIZE), ex.clone());
    prop_assert_eq!(mm.mprotect(hva, PAGE_SIZE, Prot::READ), ex.clone());
    prop_assert_eq!(mm.ksm_scan(16).map(|_| ()), ex.clone());
    prop_assert_eq!(
        mm.age_range(hva, hva + PAGE_SIZE, true).map(|_| ()),
        ex.clone()
    );
    prop_assert_eq!(mm.clear_flush_young(hva).map(|_| ()), ex.clone());
    prop_assert_eq!(mm.clear_young(hva).map(|_| ()), ex.clone());
    prop_assert_eq!(mm.test_young(hva).map(|_| ()), ex.clone());
    prop_assert_eq!(mm.reclaim(16).map(|_| ()), ex.clone());
    prop_assert_eq!(mm.oom_reap().map(|_| ()), ex.clone());
    let late = Arc::new(Mirror::default());
    prop_assert!(matches!(
        mm.mmu_notifier_register(late),
        Err(MmError::Exited)
    ));
    Ok(())
}

fn report(c: &Coverage) {
    eprintln!(
        "mm_proptest coverage: {} cases, {} steps, {} exits; KSM merges {}, COW breaks {}, \
         swap-outs {}, swap-ins {}, evictions {} ({} by explicit reclaim), swap PTEs seen {}, \
         legit OutOfFrames {}, OOM-reap refusals {}, mirrored hva_to_pfn {}, change_pte \
         installs {}, expected errors {}; THP faults {}, mTHP faults {}, PMD splits {}, \
         folio splits {}, populates {}",
        get(&c.cases),
        get(&c.steps),
        get(&c.exits),
        get(&c.ksm_merges),
        get(&c.pgcow),
        get(&c.pswpout),
        get(&c.pswpin),
        get(&c.pgsteal),
        get(&c.explicit_evicted),
        get(&c.swapped_seen),
        get(&c.oom),
        get(&c.oom_reap_refused),
        get(&c.mirrored),
        get(&c.change_pte_installed),
        get(&c.expected_errors),
        get(&c.thp_fault_alloc),
        get(&c.mthp_fault_alloc),
        get(&c.thp_split_pmd),
        get(&c.folio_splits),
        get(&c.populated),
    );
}

fn assert_reached(c: &Coverage, paths: &[(&str, &AtomicU64)]) {
    for (name, v) in paths {
        assert!(
            get(v) > 0,
            "no {name} in {} cases: the generator lost coverage",
            get(&c.cases)
        );
    }
}

#[test]
fn random_operation_sequences_keep_the_mm_consistent() {
    run_scenarios::<Harness>(scenario_strategy(), common::proptest_cases());
    COVERAGE.with(|c| {
        report(c);
        // The sequences must reach the paths the properties are about
        // (counted over the successful cases only, so this holds for any
        // seed with enough cases).
        if common::proptest_cases() >= 128 {
            assert_reached(
                c,
                &[
                    ("KSM merges", &c.ksm_merges),
                    ("KSM COW breaks", &c.pgcow),
                    ("swap-outs", &c.pswpout),
                    ("swap-ins", &c.pswpin),
                    ("direct or explicit evictions", &c.pgsteal),
                    ("exits", &c.exits),
                    ("mirrored pages", &c.mirrored),
                    ("OOM-reap refusals", &c.oom_reap_refused),
                    ("mTHP faults", &c.mthp_fault_alloc),
                    ("folio splits", &c.folio_splits),
                ],
            );
            assert!(
                get(&c.pgsteal) > get(&c.explicit_evicted),
                "no eviction by direct reclaim"
            );
        }
    });
}

#[test]
fn random_operation_sequences_over_huge_pages_keep_the_mm_consistent() {
    // Each step checks ~540 pages: fewer cases than the small-region test.
    let n = (common::proptest_cases() / 8).max(8);
    run_scenarios::<Harness>(thp_scenario_strategy(), n);
    COVERAGE.with(|c| {
        report(c);
        if n >= 48 {
            assert_reached(
                c,
                &[
                    ("THP faults", &c.thp_fault_alloc),
                    ("huge PMD splits", &c.thp_split_pmd),
                    ("folio splits", &c.folio_splits),
                    ("swap-outs", &c.pswpout),
                    ("KSM merges", &c.ksm_merges),
                ],
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Deterministic byte-fidelity tests
// ---------------------------------------------------------------------------

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

fn read_page(mm: &Mm, hva: Hva) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE];
    mm.read(hva, &mut buf).unwrap();
    buf
}

/// A page of distinct bytes, different for every `seed`.
fn unique_page(seed: u64) -> Vec<u8> {
    (0..PAGE as u64)
        .map(|j| (j.wrapping_mul(131).wrapping_add(seed.wrapping_mul(977)) >> 3) as u8 ^ seed as u8)
        .collect()
}

#[test]
fn swap_out_then_swap_in_returns_the_same_bytes() {
    // 8 frames, 16 written pages: writing them all forces direct reclaim
    // to swap pages out, and reading them back swaps them in again.
    let mm = Mm::new_anonymous(8).unwrap();
    let base = mm
        .mmap(None, 16 * PAGE_SIZE, rw(), MmapFlags::empty())
        .unwrap();
    let pages: Vec<Vec<u8>> = (0..16).map(unique_page).collect();
    for (i, p) in pages.iter().enumerate() {
        mm.write(base + i as u64 * PAGE_SIZE, p).unwrap();
        mm.check_consistency().unwrap();
    }
    let after_writes = mm.stats();
    assert!(
        after_writes.pswpout >= 8,
        "direct reclaim swapped out only {} pages",
        after_writes.pswpout
    );
    let swapped = (0..16)
        .filter(|i| matches!(mm.pte(base + i * PAGE_SIZE), Some(Pte::Swap(_))))
        .count();
    assert!(swapped >= 8, "only {swapped} swap PTEs");
    for round in 0..3 {
        for (i, p) in pages.iter().enumerate() {
            let got = read_page(&mm, base + i as u64 * PAGE_SIZE);
            assert!(
                page_diff(&got, p).is_none(),
                "round {round} page {i}: {:?}",
                page_diff(&got, p)
            );
            mm.check_consistency().unwrap();
        }
    }
    assert!(mm.stats().pswpin >= 16, "pages were not swapped back in");

    // Explicit reclaim of a clean swapped-in page reuses its swap copy; a
    // rewritten page goes out again with its new bytes.
    let hva = base;
    read_page(&mm, hva);
    mm.write(hva + 100, b"rewritten").unwrap();
    let mut want = pages[0].clone();
    want[100..109].copy_from_slice(b"rewritten");
    for _ in 0..4 {
        mm.reclaim(64).unwrap();
    }
    assert!(
        matches!(mm.pte(hva), Some(Pte::Swap(_))),
        "page 0 was not reclaimed: {:?}",
        mm.pte(hva)
    );
    mm.check_consistency().unwrap();
    assert_eq!(page_diff(&read_page(&mm, hva), &want), None);
    mm.exit_mmap();
    assert_eq!(mm.frames().nr_free(), 8);
    assert_eq!(mm.swap_used(), 0);
}

#[test]
fn ksm_merges_identical_pages_and_a_write_breaks_the_sharing() {
    let mm = Mm::new_anonymous(64).unwrap();
    let base = mm
        .mmap(None, 4 * PAGE_SIZE, rw(), MmapFlags::empty())
        .unwrap();
    mm.madvise_mergeable(base, 4 * PAGE_SIZE).unwrap();
    let mirror = Arc::new(Mirror::default());
    let reg = mm.mmu_notifier_register(mirror.clone()).unwrap();
    let (a, b) = (pattern_page(1), pattern_page(2));
    let hv = |i: u64| base + i * PAGE_SIZE;
    mm.write(hv(0), &a).unwrap();
    mm.write(hv(1), &a).unwrap();
    mm.write(hv(2), &b).unwrap();
    mm.write(hv(3), &unique_page(7)).unwrap();
    // The secondary MMU maps page 1; KSM must move it with change_pte.
    let before = mm.hva_to_pfn(hv(1), Access::Read).unwrap();
    {
        let mut st = mirror.state.lock();
        st.mirrored.insert(hv(1));
        st.cache.insert(
            hv(1),
            Spte {
                pfn: before.pfn,
                writable: before.writable,
                young: true,
            },
        );
    }
    let pfn = |i: u64| match mm.pte(hv(i)) {
        Some(Pte::Present(p)) => p.pfn,
        other => panic!("page {i}: {other:?}"),
    };
    let mut passes = 0;
    while mm.ksm_stats().pages_sharing < 1 {
        passes += 1;
        assert!(
            passes <= 4,
            "KSM did not merge after {passes} passes: {:?}",
            mm.ksm_stats()
        );
        mm.ksm_scan(4).unwrap();
        mm.check_consistency().unwrap();
    }
    let st = mm.ksm_stats();
    assert_eq!((st.pages_shared, st.pages_sharing), (1, 1), "{st:?}");
    assert_eq!(pfn(0), pfn(1), "identical pages do not share a frame");
    assert_ne!(pfn(2), pfn(0));
    assert_ne!(pfn(3), pfn(0));
    assert!(mm.page_meta(pfn(0)).unwrap().ksm);
    assert_eq!(mm.page_meta(pfn(0)).unwrap().mapcount, 2);
    for i in 0..2 {
        assert_eq!(
            page_diff(&read_page(&mm, hv(i)), &a),
            None,
            "merged page {i}"
        );
        let p = mm.pte(hv(i));
        assert!(
            matches!(p, Some(Pte::Present(p)) if !p.writable),
            "merged page {i} is writable: {p:?}"
        );
    }
    assert_eq!(page_diff(&read_page(&mm, hv(2)), &b), None);
    {
        // The secondary MMU follows the host: dropped at start, or moved to
        // the KSM frame by change_pte.
        let st = mirror.state.lock();
        assert!(st.violations.is_empty(), "{:?}", st.violations);
        if let Some(s) = st.cache.get(&hv(1)) {
            assert_eq!(s.pfn, pfn(1));
        }
    }

    // A write to one page breaks the sharing by copy-on-write.
    let shared = pfn(0);
    mm.write(hv(0) + 5, &[0xa5, 0x5a]).unwrap();
    mm.check_consistency().unwrap();
    let mut a0 = a.clone();
    a0[5..7].copy_from_slice(&[0xa5, 0x5a]);
    assert_eq!(page_diff(&read_page(&mm, hv(0)), &a0), None, "written page");
    assert_eq!(
        page_diff(&read_page(&mm, hv(1)), &a),
        None,
        "the other sharer lost its bytes"
    );
    assert_ne!(pfn(0), pfn(1));
    assert_eq!(pfn(1), shared, "the untouched sharer keeps the KSM frame");
    assert_eq!(mm.ksm_stats().pages_sharing, 0, "{:?}", mm.ksm_stats());
    assert_eq!(mm.stats().pgcow, 1);
    // The untouched sharer breaks COW too, and the KSM frame is freed.
    mm.write(hv(1), &[1]).unwrap();
    mm.check_consistency().unwrap();
    assert_eq!(mm.frames().owner(shared), Ok(FrameOwner::Free));
    assert_eq!(mm.ksm_stats().pages_shared, 0);
    {
        let st = mirror.state.lock();
        assert!(st.violations.is_empty(), "{:?}", st.violations);
        assert!(st.active.is_empty());
        assert!(
            st.calls.change_pte >= 2,
            "KSM merge and COW must call change_pte"
        );
        assert!(
            st.calls.events.contains(&MmuNotifyEvent::KsmMerge),
            "{:?}",
            st.calls.events
        );
        assert!(
            st.calls.events.contains(&MmuNotifyEvent::CowBreak),
            "{:?}",
            st.calls.events
        );
    }
    reg.unregister();
}

#[test]
fn dontneed_and_remap_read_zero_and_exit_frees_everything() {
    let mm = Mm::new_anonymous(16).unwrap();
    let base = mm
        .mmap(None, 4 * PAGE_SIZE, rw(), MmapFlags::empty())
        .unwrap();
    let mirror = Arc::new(Mirror::default());
    let _reg = mm.mmu_notifier_register(mirror.clone()).unwrap();
    for i in 0..4 {
        mm.write(base + i * PAGE_SIZE, &unique_page(i)).unwrap();
    }
    mm.madvise_dontneed(base, PAGE_SIZE).unwrap();
    assert_eq!(read_page(&mm, base), vec![0; PAGE]);
    mm.munmap(base + PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(
        mm.read(base + PAGE_SIZE, &mut [0]),
        Err(MmError::NoVma(base + PAGE_SIZE))
    );
    mm.mmap(Some(base + PAGE_SIZE), PAGE_SIZE, rw(), MmapFlags::empty())
        .unwrap();
    assert_eq!(read_page(&mm, base + PAGE_SIZE), vec![0; PAGE]);
    mm.mprotect(base + 2 * PAGE_SIZE, PAGE_SIZE, Prot::READ)
        .unwrap();
    assert_eq!(
        mm.write(base + 2 * PAGE_SIZE + 1, &[1]),
        Err(MmError::Access {
            addr: base + 2 * PAGE_SIZE + 1,
            access: "write"
        })
    );
    assert_eq!(
        page_diff(&read_page(&mm, base + 2 * PAGE_SIZE), &unique_page(2)),
        None
    );
    mm.mlock(base + 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(
        mm.madvise_dontneed(base + 3 * PAGE_SIZE, PAGE_SIZE),
        Err(MmError::Locked(base + 3 * PAGE_SIZE))
    );
    let pin = mm
        .get_user_page(base + 3 * PAGE_SIZE, Access::Read)
        .unwrap();
    mm.check_consistency().unwrap();
    mm.exit_mmap();
    assert_eq!(mirror.state.lock().released, 1);
    assert_eq!(
        mm.frames().nr_free(),
        15,
        "only the pinned frame stays allocated"
    );
    drop(pin);
    assert_eq!(mm.frames().nr_free(), 16);
    assert_eq!(mm.swap_used(), 0);
    assert!(mirror.state.lock().violations.is_empty());
}

#[test]
fn direct_reclaim_evicts_young_pages_rather_than_failing() {
    // Every frame holds a young page and the reclaim clock stands past the
    // last one: a fault must still get a frame (second chance, then evict),
    // as the clock gives a young page a second chance and then evicts it.
    let mm = Mm::new_anonymous(4).unwrap();
    let base = mm
        .mmap(None, 8 * PAGE_SIZE, rw(), MmapFlags::empty())
        .unwrap();
    for i in 0..4 {
        mm.write(base + i * PAGE_SIZE, &unique_page(i)).unwrap();
    }
    let r = mm.reclaim(4).unwrap();
    assert_eq!(r.kept_young, 4, "{r:?}");
    for i in 0..4 {
        read_page(&mm, base + i * PAGE_SIZE); // young again
    }
    assert_eq!(mm.frames().nr_free(), 0);
    mm.write(base + 4 * PAGE_SIZE, &unique_page(4)).unwrap();
    mm.check_consistency().unwrap();
    for i in 0..5 {
        assert_eq!(
            page_diff(&read_page(&mm, base + i * PAGE_SIZE), &unique_page(i)),
            None
        );
    }
}
