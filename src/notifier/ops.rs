//! The callbacks a secondary MMU implements, and the range they receive.
//!
//! Mirrors `struct mmu_notifier_ops` (`include/linux/mmu_notifier.h`, 4.19)
//! with the 5.0–5.2 change that passes a `struct mmu_notifier_range`
//! carrying start, end, blockability and the event, and the 5.5
//! `struct mmu_interval_notifier_ops`.

use bitflags::bitflags;

use super::NotifierError;
use super::interval_core::MmuInterval;

/// Why an invalidation happens (`enum mmu_notifier_event`, Linux 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MmuNotifyEvent {
    /// `MMU_NOTIFY_UNMAP`: the range is being unmapped (munmap, reclaim).
    Unmap,
    /// `MMU_NOTIFY_CLEAR`: page-table entries are cleared but the VMA stays
    /// (madvise(DONTNEED), zap on exit).
    Clear,
    /// `MMU_NOTIFY_PROTECTION_VMA`: the protection of the VMA changes
    /// (mprotect).
    ProtectionVma,
    /// `MMU_NOTIFY_PROTECTION_PAGE`: the protection of one page changes
    /// without a VMA change (copy-on-write write-protect, KSM write-protect).
    ProtectionPage,
    /// `MMU_NOTIFY_SOFT_DIRTY`: soft-dirty tracking write-protects the range.
    SoftDirty,
    /// `MMU_NOTIFY_RELEASE`: the mm is going away (exit_mmap).
    Release,
    /// KSM replaces a page by the shared stable page (`replace_page`, where
    /// `change_pte` follows). Linux 5.2 reports this as `MMU_NOTIFY_CLEAR`;
    /// a distinct event lets a tracer tell merges from zaps.
    KsmMerge,
    /// A copy-on-write fault replaces the page by a private copy
    /// (`wp_page_copy`, where `change_pte` follows; Linux: `MMU_NOTIFY_CLEAR`).
    CowBreak,
}

bitflags! {
    /// `MMU_NOTIFIER_RANGE_BLOCKABLE` and friends.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RangeFlags: u32 {
        /// The caller may sleep: callbacks may block (take sleeping locks,
        /// wait for a TLB shootdown).
        const BLOCKABLE = 1;
    }
}

/// `struct mmu_notifier_range`: what is being invalidated and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuNotifierRange {
    /// First host virtual address of the range (page aligned).
    pub start: u64,
    /// One past the last address (page aligned, `end > start`).
    pub end: u64,
    pub flags: RangeFlags,
    pub event: MmuNotifyEvent,
}

impl MmuNotifierRange {
    /// `mmu_notifier_range_init`: a blockable range.
    pub fn new(event: MmuNotifyEvent, start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            flags: RangeFlags::BLOCKABLE,
            event,
        }
    }

    /// The same range, marked non-blockable (the OOM reaper's context).
    pub fn nonblocking(mut self) -> Self {
        self.flags.remove(RangeFlags::BLOCKABLE);
        self
    }

    /// `mmu_notifier_range_blockable`.
    pub fn blockable(&self) -> bool {
        self.flags.contains(RangeFlags::BLOCKABLE)
    }

    /// Whether `addr` lies in `[start, end)`.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// The new host PTE passed to `change_pte` (`pte_t` in Linux): only what a
/// secondary MMU may look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierPte {
    /// Frame number the host PTE now maps.
    pub frame: u64,
    /// Whether the host PTE is writable.
    pub writable: bool,
}

bitflags! {
    /// Which callbacks an implementation provides. Linux tests each
    /// `mn->ops->x` pointer for NULL; a Rust trait always has every method,
    /// so an implementation declares the ones it really has, and dispatch
    /// and `mm_has_blockable_invalidate_notifiers` skip the others.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Callbacks: u32 {
        const RELEASE = 1 << 0;
        const CLEAR_FLUSH_YOUNG = 1 << 1;
        const CLEAR_YOUNG = 1 << 2;
        const TEST_YOUNG = 1 << 3;
        const CHANGE_PTE = 1 << 4;
        const INVALIDATE_RANGE_START = 1 << 5;
        const INVALIDATE_RANGE_END = 1 << 6;
        const INVALIDATE_RANGE = 1 << 7;
        const INVALIDATE = Self::INVALIDATE_RANGE_START.bits()
            | Self::INVALIDATE_RANGE_END.bits()
            | Self::INVALIDATE_RANGE.bits();
    }
}

/// `struct mmu_notifier_ops`: every callback is optional (a no-op by
/// default). Callbacks run inside an SRCU read-side critical section of the
/// mm's notifier list and may block when the range says so.
pub trait MmuNotifierOps: Send + Sync {
    /// The callbacks this implementation provides (default: all of them).
    fn callbacks(&self) -> Callbacks {
        Callbacks::all()
    }

    /// `MMU_INVALIDATE_DOES_NOT_BLOCK`: the invalidate callbacks never sleep,
    /// so the mm may call them from a non-blockable context.
    fn invalidate_does_not_block(&self) -> bool {
        false
    }

    /// The mm is being torn down (exit_mmap) or the notifier unregistered,
    /// whichever comes first; runs exactly once. After it returns the
    /// secondary MMU must hold no translation and create none.
    fn release(&self) {}

    /// Clear the young bits of `[start, end)` and flush them from the
    /// secondary TLB; return whether any was young.
    fn clear_flush_young(&self, _start: u64, _end: u64) -> bool {
        false
    }

    /// Clear the young bits of `[start, end)` without a flush.
    fn clear_young(&self, _start: u64, _end: u64) -> bool {
        false
    }

    /// Whether `address` is young in the secondary MMU (no side effect).
    fn test_young(&self, _address: u64) -> bool {
        false
    }

    /// The host PTE of `address` now maps `pte` (KSM merge, COW); called
    /// between `invalidate_range_start` and `invalidate_range_end`.
    fn change_pte(&self, _address: u64, _pte: NotifierPte) {}

    /// Translations of the range are about to change: drop them. May fail
    /// only when the range is not blockable (`-EAGAIN`). Whatever every
    /// notifier answered, the caller then ends the range with
    /// `invalidate_range_end` (Linux 4.19's OOM reaper did not, leaving
    /// KVM's `mmu_notifier_count` raised; later kernels end it), so count
    /// the invalidation before refusing.
    fn invalidate_range_start(&self, _range: &MmuNotifierRange) -> Result<(), NotifierError> {
        Ok(())
    }

    /// The host page table of the range is final again.
    fn invalidate_range_end(&self, _range: &MmuNotifierRange) {}

    /// For MMUs that share the host page table (IOMMUs): called under the
    /// page-table lock when entries were cleared, and again from
    /// `invalidate_range_end` unless the caller says it already was.
    fn invalidate_range(&self, _start: u64, _end: u64) {}
}

/// `struct mmu_interval_notifier_ops`: the one callback of an interval
/// subscription (Linux 5.5+). It replaces the
/// `invalidate_range_start`/`end` pair: the end is implied by the sequence
/// (`mmu_interval_read_begin` waits for it).
pub trait MmuIntervalNotifierOps: Send + Sync {
    /// `invalidate`: `range` overlaps `interval` and its translations are
    /// about to change. Under the lock the fault path holds for
    /// `read_retry`, call `interval.set_seq(cur_seq)` first, then drop every
    /// mapping of `range`. Return `false` only if `range` is not blockable
    /// and this would have to sleep (take a contended lock): the mm then
    /// fails with `-EAGAIN`. A refusal of a blockable range is a bug (Linux
    /// warns and goes on).
    fn invalidate(&self, interval: &MmuInterval, range: &MmuNotifierRange, cur_seq: u64) -> bool;
}
