//! A simulated host `mm_struct` over real frames.
//!
//! VMAs, a host page table with young/dirty bits and swap entries, per-page
//! refcount/mapcount/reverse map, an mmap lock and a page-table lock, and the
//! operations that drive the MMU notifier, each calling it where Linux does:
//!
//! | operation | file | Linux |
//! | --- | --- | --- |
//! | fault (demand-zero, COW, swap-in) | `fault.rs` | `mm/memory.c` `handle_mm_fault` |
//! | mmap, munmap, exit, OOM reap | `mmap.rs` | `mm/mmap.c`, `mm/oom_kill.c` |
//! | madvise(MADV_DONTNEED, MADV_HUGEPAGE, MADV_POPULATE_WRITE) | `madvise.rs` | `mm/madvise.c` |
//! | mprotect | `mprotect.rs` | `mm/mprotect.c` |
//! | large folios: THP settings, PMD mappings, splits | `thp.rs`, `huge_memory.rs` | `mm/huge_memory.c` |
//! | KSM | `ksm.rs` | `mm/ksm.c` |
//! | aging, reclaim | `reclaim.rs` | `mm/rmap.c`, `mm/vmscan.c` |
//! | a read-only snapshot for observers (`--timeline`) | `snapshot.rs` | |
//!
//! Lock order: the KSM scanner lock, then `mmap_lock`, then a page lock
//! (`PG_locked` of a folio, see `pgtable.rs`), then the page-table lock. A page lock is
//! waited for with the page-table lock dropped (`lock_page` sleeps), and only
//! by a thread that holds a reference to the page. Notifier
//! `invalidate_range_start`/`end` run with the mmap lock (and possibly a page
//! lock) held and the page-table lock dropped (they may block);
//! `invalidate_range`, `change_pte` and the young callbacks run under the
//! page-table lock, as in Linux.

/// Runs the test hook at `$point` (`hooks.rs`); nothing without the
/// `test-hooks` feature.
macro_rules! mm_hook {
    ($mm:expr, $point:ident, $hva:expr) => {
        #[cfg(feature = "test-hooks")]
        $mm.run_hook($crate::mm::MmHookPoint::$point, $hva);
    };
}

mod check;
mod error;
mod fault;
mod frame;
#[cfg(feature = "test-hooks")]
mod hooks;
mod huge_memory;
mod interval;
mod ksm;
mod madvise;
mod memory;
mod mmap;
mod mprotect;
mod pgtable;
mod reclaim;
mod snapshot;
mod stats;
mod swap;
mod thp;
mod vma;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use crate::notifier::{MmuNotifier, MmuNotifierMm, MmuNotifierOps, MmuNotifierRange};

pub use check::MmCheckError;
pub use error::{MachineError, MmError};
pub use fault::HostPfn;
pub use frame::{FrameAllocator, FrameOwner, MAX_ORDER, POISON_FREE};
#[cfg(feature = "test-hooks")]
pub use hooks::{MmHook, MmHookPoint};
pub use huge_memory::HugePmd;
pub use ksm::{KsmConfig, KsmScanResult, KsmStats};
pub use madvise::Advice;
pub use memory::{AnonMemory, FrameAccess, MachineMemory};
pub use pgtable::{
    Folio, HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PageMeta, PresentPte, Pte,
};
pub use reclaim::{AgingResult, ReclaimResult};
pub use snapshot::PageSnapshot;
pub use stats::{MmStats, MmStatsSnapshot};
pub use thp::{
    MthpStatsSnapshot, OrderEnabled, ThpConfig, ThpConfigError, ThpEnabled, parse_size_order,
};
pub use vma::{MmapFlags, Prot, Vma};

use ksm::KsmState;
use pgtable::PageTables;
use vma::VmaTree;

/// A host virtual address.
pub type Hva = u64;
/// A frame number of machine memory.
pub type Pfn = u64;
/// Index of a swap slot (`swp_entry_t`'s offset).
pub type SwapSlot = u32;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// `TASK_SIZE` of x86-64 with 4-level paging.
pub const TASK_SIZE: Hva = 1 << 47;
/// Where `mmap` without a fixed address starts looking.
pub const MMAP_BASE: Hva = 0x7000_0000_0000;

static NEXT_MM_ID: AtomicU64 = AtomicU64::new(1);

/// The access a fault is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn is_write(self) -> bool {
        self == Access::Write
    }
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// Page-aligns a length (`PAGE_ALIGN`); `None` on overflow.
pub fn page_align(len: u64) -> Option<u64> {
    len.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1))
}

pub fn is_page_aligned(addr: u64) -> bool {
    addr & (PAGE_SIZE - 1) == 0
}

/// A simulated process address space (`struct mm_struct`).
pub struct Mm {
    id: u64,
    /// `mmap_sem`.
    mmap_lock: RwLock<VmaTree>,
    /// `page_table_lock` (one lock for the whole table, as with split PTE
    /// locks disabled).
    pt: Mutex<PageTables>,
    /// The page wait queue (`page_waitqueue`): `lock_page` sleeps here, with
    /// the page-table lock dropped, until `unlock_page` wakes it.
    page_wait: Condvar,
    frames: Arc<FrameAllocator>,
    notifiers: Arc<MmuNotifierMm>,
    /// ksmd's private state (`ksm_mmlist` cursor, stable and unstable trees).
    ksm: Mutex<KsmState>,
    stats: MmStats,
    /// The THP settings (`/sys/kernel/mm/transparent_hugepage`).
    thp: RwLock<ThpConfig>,
    /// Per folio size counters.
    mthp: thp::MthpStats,
    /// Where the reclaim clock hand stands.
    reclaim_cursor: Mutex<Hva>,
    /// `mm_users == 0`: exit_mmap has run.
    exited: AtomicBool,
    #[cfg(feature = "test-hooks")]
    hook: hooks::HookSlot,
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Mm {
    /// An mm whose pages come from `frames`.
    pub fn new(frames: Arc<FrameAllocator>) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_MM_ID.fetch_add(1, Ordering::Relaxed),
            mmap_lock: RwLock::new(VmaTree::default()),
            pt: Mutex::new(PageTables::default()),
            page_wait: Condvar::new(),
            frames,
            notifiers: Arc::new(MmuNotifierMm::new()),
            ksm: Mutex::new(KsmState::default()),
            stats: MmStats::default(),
            thp: RwLock::new(ThpConfig::off()),
            mthp: Default::default(),
            reclaim_cursor: Mutex::new(0),
            exited: AtomicBool::new(false),
            #[cfg(feature = "test-hooks")]
            hook: Default::default(),
        })
    }

    /// An mm over a fresh anonymous machine memory of `nr_frames` frames.
    pub fn new_anonymous(nr_frames: u64) -> Result<Arc<Self>, MmError> {
        let mem: Arc<dyn MachineMemory> = Arc::new(AnonMemory::new(nr_frames)?);
        Ok(Self::new(FrameAllocator::new(mem)))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The owner tag of this mm's frames.
    pub fn frame_owner(&self) -> FrameOwner {
        FrameOwner::Mm(self.id)
    }

    pub fn frames(&self) -> &Arc<FrameAllocator> {
        &self.frames
    }

    pub fn memory(&self) -> &Arc<dyn MachineMemory> {
        self.frames.memory()
    }

    /// The notifier list (`mm->mmu_notifier_mm`).
    pub fn notifiers(&self) -> &Arc<MmuNotifierMm> {
        &self.notifiers
    }

    pub fn stats(&self) -> MmStatsSnapshot {
        self.stats.snapshot()
    }

    /// The counters of every folio size, 8 KiB to 2 MiB
    /// (`hugepages-<size>kB/stats`).
    pub fn mthp_stats(&self) -> Vec<MthpStatsSnapshot> {
        self.mthp.snapshot()
    }

    /// Sets the THP settings: later faults follow them; folios already
    /// mapped stay as they are (as when sysfs changes).
    pub fn set_thp_config(&self, cfg: ThpConfig) {
        *self.thp.write() = cfg;
    }

    pub fn thp_config(&self) -> ThpConfig {
        *self.thp.read()
    }

    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    fn check_alive(&self) -> Result<(), MmError> {
        if self.has_exited() {
            Err(MmError::Exited)
        } else {
            Ok(())
        }
    }

    /// `mmu_notifier_register`: takes the mmap lock for writing and every
    /// other lock of the mm (`mm_take_all_locks`), so the registration is
    /// serialized against every mm operation. The notifier pins the mm until
    /// it is unregistered.
    pub fn mmu_notifier_register(
        self: &Arc<Self>,
        ops: Arc<dyn MmuNotifierOps>,
    ) -> Result<MmuNotifier, MmError> {
        let _ksm = self.ksm.lock();
        let guard = self.mmap_write_lock();
        self.mmu_notifier_register_locked(&guard, ops)
    }

    /// `__mmu_notifier_register`: the caller holds the mmap lock for writing.
    pub fn mmu_notifier_register_locked(
        self: &Arc<Self>,
        _mmap_locked: &MmapWriteGuard<'_>,
        ops: Arc<dyn MmuNotifierOps>,
    ) -> Result<MmuNotifier, MmError> {
        self.check_alive()?;
        let _pt = self.pt.lock(); // mm_take_all_locks
        Ok(self.notifiers.register_locked(ops, self.clone()))
    }

    /// `down_write(&mm->mmap_sem)`. A wait (another holder) is counted in
    /// `mmap_lock_wait`.
    pub fn mmap_write_lock(&self) -> MmapWriteGuard<'_> {
        if let Some(g) = self.mmap_lock.try_write() {
            return MmapWriteGuard(g);
        }
        stats::inc(&self.stats.mmap_lock_wait);
        MmapWriteGuard(self.mmap_lock.write())
    }

    /// `mm_has_blockable_invalidate_notifiers` (takes the mmap lock for
    /// reading, as Linux requires of its caller).
    pub fn has_blockable_invalidate_notifiers(&self) -> bool {
        let _guard = self.mmap_lock.read();
        self.notifiers.has_blockable_invalidate_notifiers()
    }

    /// All VMAs, in address order.
    pub fn vmas(&self) -> Vec<Vma> {
        self.mmap_lock.read().iter().copied().collect()
    }

    /// The VMA containing `addr`.
    pub fn find_vma(&self, addr: Hva) -> Option<Vma> {
        self.mmap_lock.read().find(addr).copied()
    }

    /// The host PTE of `hva`, if any.
    pub fn pte(&self, hva: Hva) -> Option<Pte> {
        self.pt.lock().pte(hva & !(PAGE_SIZE - 1))
    }

    /// The page metadata of an anonymous frame of this mm (the page and
    /// its folio).
    pub fn page_meta(&self, pfn: Pfn) -> Option<PageMeta> {
        self.pt.lock().page_meta(pfn)
    }

    /// The folio holding `pfn`, with its head frame.
    pub fn folio(&self, pfn: Pfn) -> Option<(Pfn, Folio)> {
        let pt = self.pt.lock();
        let head = pt.folio_head(pfn)?;
        Some((head, pt.folios[&head].clone()))
    }

    /// Number of present PTEs.
    pub fn nr_present(&self) -> usize {
        self.pt
            .lock()
            .ptes
            .values()
            .filter(|p| matches!(p, Pte::Present(_)))
            .count()
    }

    /// Swap slots in use.
    pub fn swap_used(&self) -> usize {
        self.pt.lock().swap.used()
    }

    // Notifier wrappers: skip everything when nobody is registered, as the
    // inline `mmu_notifier_*` helpers test `mm_has_notifiers` first.

    /// `mmu_notifier_invalidate_range_start` for a blockable range. In 4.19
    /// it returns nothing: a notifier may not fail a blockable start, and
    /// one that does anyway is counted and logged, and still gets its
    /// `invalidate_range_end` from the caller, which always ends the range.
    fn mn_invalidate_range_start(&self, range: &MmuNotifierRange) {
        debug_assert!(range.blockable());
        if self.notifiers.has_notifiers()
            && let Err(e) = self.notifiers.invalidate_range_start(range)
        {
            stats::inc(&self.stats.mn_start_failed);
            tracing::warn!(
                "a notifier failed a blockable invalidate_range_start [{:#x}, {:#x}): {e}",
                range.start,
                range.end
            );
        }
    }

    /// `mmu_notifier_invalidate_range_start_nonblock` (the OOM reaper): a
    /// notifier that would have to block refuses with `Again`.
    fn mn_invalidate_range_start_nonblock(&self, range: &MmuNotifierRange) -> Result<(), MmError> {
        debug_assert!(!range.blockable());
        if self.notifiers.has_notifiers() {
            self.notifiers.invalidate_range_start(range)?;
        }
        Ok(())
    }

    fn mn_invalidate_range_end(&self, range: &MmuNotifierRange, only_end: bool) {
        if self.notifiers.has_notifiers() {
            self.notifiers.invalidate_range_end(range, only_end);
        }
    }

    fn mn_invalidate_range(&self, start: Hva, end: Hva) {
        if self.notifiers.has_notifiers() {
            self.notifiers.invalidate_range(start, end);
        }
    }

    /// Returns frames whose last reference went away to the allocator.
    fn free_frames(&self, frames: impl IntoIterator<Item = Pfn>) {
        self.free_folios(frames.into_iter().map(|p| (p, 0)));
    }

    /// Returns folios (head, order) whose last reference went away.
    fn free_folios(&self, folios: impl IntoIterator<Item = (Pfn, u8)>) {
        for (head, order) in folios {
            let freed = self.frames.free_contig(head, order, self.frame_owner());
            debug_assert!(freed.is_ok(), "freeing folio {head}: {freed:?}");
        }
    }

    /// `lock_page`: takes `PG_locked` of the folio of `pfn`, sleeping with
    /// the page-table lock dropped while another thread holds it. The
    /// caller holds a reference to the folio, so it cannot be freed
    /// meanwhile (it may be split: the lock then stays with `pfn`'s page).
    fn lock_page(&self, pt: &mut MutexGuard<'_, PageTables>, pfn: Pfn) -> Result<(), MmError> {
        let mut waited = false;
        loop {
            match pt.folio_mut(pfn) {
                Some(m) if !m.locked => {
                    m.locked = true;
                    return Ok(());
                }
                Some(_) => {
                    if !waited {
                        stats::inc(&self.stats.page_lock_wait);
                        waited = true;
                    }
                    self.page_wait.wait(pt);
                }
                None => return Err(MmError::BadFrame(pfn)),
            }
        }
    }

    /// `unlock_page`: clears `PG_locked` and wakes the waiters.
    fn unlock_page(&self, pt: &mut PageTables, pfn: Pfn) {
        pt.clear_page_locked(pfn);
        self.page_wait.notify_all();
    }

    /// Drops page references gathered while unmapping (`tlb_finish_mmu`).
    fn put_pages(&self, pfns: Vec<Pfn>) {
        if pfns.is_empty() {
            return;
        }
        let freed: Vec<(Pfn, u8)> = {
            let mut pt = self.pt.lock();
            pfns.into_iter().filter_map(|p| pt.put_page(p)).collect()
        };
        self.free_folios(freed);
    }
}

/// The mmap lock held for writing.
pub struct MmapWriteGuard<'a>(RwLockWriteGuard<'a, VmaTree>);

impl MmapWriteGuard<'_> {
    /// The VMA containing `addr`, read under the held lock.
    pub fn find_vma(&self, addr: Hva) -> Option<Vma> {
        self.0.find(addr).copied()
    }
}

/// A page reference taken by [`Mm::get_user_page`] (`get_user_pages`): the
/// frame stays allocated, and KSM and reclaim leave the page alone, until it
/// is dropped (`put_page`).
pub struct PagePin {
    mm: Arc<Mm>,
    pfn: Pfn,
}

impl PagePin {
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
}

impl Drop for PagePin {
    fn drop(&mut self) {
        self.mm.put_pages(vec![self.pfn]);
    }
}

impl Mm {
    /// `get_user_pages` for one page: faults it in and takes a reference.
    pub fn get_user_page(self: &Arc<Self>, hva: Hva, access: Access) -> Result<PagePin, MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        let page = hva & !(PAGE_SIZE - 1);
        loop {
            let p = self.fault_locked(&vmas, page, access)?;
            let mut pt = self.pt.lock();
            if pt
                .present(page)
                .is_some_and(|c| c.pfn == p.pfn && (c.writable || !access.is_write()))
            {
                pt.get_page(p.pfn);
                return Ok(PagePin {
                    mm: self.clone(),
                    pfn: p.pfn,
                });
            }
        }
    }
}
