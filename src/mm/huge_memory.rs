//! Large anonymous folios (`mm/huge_memory.c`, `mm/memory.c`'s
//! `alloc_anon_folio`): allocating them on a fault, mapping a PMD-size one
//! with a huge PMD, and the splits that drive the notifier as Linux does:
//!
//! * `split_huge_pmd`: a huge PMD becomes a table of PTEs mapping the same
//!   pages, inside `invalidate_range_start` / `invalidate_range_only_end`
//!   over the whole 2 MiB (`__split_huge_pmd`), with the folio locked;
//! * `split_folio`: a large folio becomes small ones, under its lock, after
//!   the unmap step of `split_huge_page_to_list` (`unmap_folio` →
//!   `try_to_unmap_one`: one `invalidate_range_start`/`end` per VMA over the
//!   folio's part in it); only when nothing but its mappings and the
//!   caller hold references (`can_split_folio`);
//! * the deferred split queue: a folio partly unmapped is queued
//!   (`deferred_split_folio`) and split by `deferred_split_scan`, which
//!   runs right after the operation that unmapped it and from reclaim (the
//!   shrinker), skipping folios it cannot lock or split now.

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::pgtable::{HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PresentPte, pmd_base, vpn};
use super::stats::inc;
use super::vma::VmaTree;
use super::{Hva, Mm, MmError, PAGE_SIZE, Pfn};

/// A huge PMD as a secondary MMU sees it (`host_pfn_mapping_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePmd {
    /// First address it maps (2 MiB aligned).
    pub haddr: Hva,
    /// First frame (the folio's head, 512-frame aligned).
    pub pfn: Pfn,
    pub writable: bool,
    pub dirty: bool,
}

impl Mm {
    /// The huge PMD mapping `hva`, if one does now (KVM reads the host
    /// table for `host_pfn_mapping_level` the same way: without faulting,
    /// the result checked later by the invalidation sequence).
    pub fn huge_pmd(&self, hva: Hva) -> Option<HugePmd> {
        let pt = self.pt.lock();
        let haddr = pmd_base(hva);
        if !pt.is_huge(haddr) {
            return None;
        }
        let p = pt.present(haddr)?;
        Some(HugePmd {
            haddr,
            pfn: p.pfn,
            writable: p.writable,
            dirty: p.dirty,
        })
    }

    /// `do_huge_pmd_anonymous_page` for order 9, `alloc_anon_folio` for the
    /// smaller ones: a zeroed folio of 2^`order` pages for the aligned range
    /// around `page`, mapped writable and dirty (a write fault), if the
    /// range is still empty (`pmd_none` / `pte_range_none`) and a run of
    /// free frames exists. `None`: fall back to the next order (counted as
    /// a fallback only when the allocation failed, as Linux counts).
    pub(super) fn do_anonymous_folio(
        &self,
        page: Hva,
        order: u8,
    ) -> Result<Option<super::fault::Step>, MmError> {
        use super::fault::Step;
        let nr = 1u64 << order;
        let start = page & !((PAGE_SIZE << order) - 1);
        let range_none = |pt: &super::pgtable::PageTables| {
            if order == HPAGE_PMD_ORDER {
                pt.ptes.leaf_is_none(vpn(start))
            } else {
                !pt.is_huge(start) && pt.ptes.range(vpn(start), vpn(start) + nr).next().is_none()
            }
        };
        if !range_none(&self.pt.lock()) {
            return Ok(None);
        }
        let head = match self.frames.alloc_contig(order, self.frame_owner()) {
            Ok(h) => h,
            Err(MmError::OutOfFrames) => {
                inc(&self.mthp.get(order).anon_fault_fallback);
                if order == HPAGE_PMD_ORDER {
                    inc(&self.stats.thp_fault_fallback);
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut pt = self.pt.lock();
        if !range_none(&pt) {
            // Raced with another fault in the range: release and let the
            // access fault again.
            drop(pt);
            self.free_folios([(head, order)]);
            return Ok(Some(Step::Retry));
        }
        pt.new_folio(head, order, start);
        let entry = PresentPte::fresh(head, true);
        if order == HPAGE_PMD_ORDER {
            pt.map_pmd(start, entry);
            inc(&self.stats.thp_fault_alloc);
        } else {
            for i in 0..nr {
                pt.map(
                    start + i * PAGE_SIZE,
                    PresentPte {
                        pfn: head + i,
                        ..entry
                    },
                );
            }
        }
        inc(&self.mthp.get(order).anon_fault_alloc);
        inc(&self.stats.pgfault_zero);
        crate::trace::emit!(FolioAlloc {
            hva: start,
            frame: head,
            order,
        });
        Ok(Some(Step::Done(PresentPte {
            pfn: head + (page - start) / PAGE_SIZE,
            ..entry
        })))
    }

    /// `__split_huge_pmd` at `haddr`: inside `invalidate_range_start` and
    /// `invalidate_range_only_end` over the whole 2 MiB (event `Clear`),
    /// with the folio locked (`lock_page` if `trylock_page` fails, the
    /// huge PMD rechecked after), the huge PMD becomes PTEs mapping the same
    /// pages with the same bits. No `invalidate_range`: nothing a secondary
    /// MMU maps changed (Linux's comment in `__split_huge_pmd`), and every
    /// secondary mapping of the range was dropped by the start.
    ///
    /// Deviation: Linux's `split_huge_pmd_address` (VMA splits) calls the
    /// notifier even where the PMD is not huge; here only an actual huge
    /// PMD is split, and notified. `locked` names a folio the caller
    /// already holds locked (`__split_huge_pmd`'s `folio` argument).
    pub(super) fn split_huge_pmd(&self, haddr: Hva, locked: Option<Pfn>) -> Result<(), MmError> {
        debug_assert!(haddr.is_multiple_of(HPAGE_PMD_SIZE));
        if !self.pt.lock().is_huge(haddr) {
            return Ok(());
        }
        let range = MmuNotifierRange::new(MmuNotifyEvent::Clear, haddr, haddr + HPAGE_PMD_SIZE);
        self.mn_invalidate_range_start(&range);
        let split = self.split_huge_pmd_locked_folio(haddr, locked);
        self.mn_invalidate_range_end(&range, true);
        split
    }

    fn split_huge_pmd_locked_folio(&self, haddr: Hva, locked: Option<Pfn>) -> Result<(), MmError> {
        let mut pt = self.pt.lock();
        loop {
            if !pt.is_huge(haddr) {
                return Ok(());
            }
            let head = pt.present(haddr).ok_or(MmError::BadFrame(0))?.pfn;
            if locked.is_some_and(|l| pt.folio_head(l) == Some(head)) {
                pt.split_pmd(haddr);
                inc(&self.stats.thp_split_pmd);
                return Ok(());
            }
            if !pt.trylock_page(head) {
                pt.get_page(head);
                self.lock_page(&mut pt, head)?;
                let same = pt.is_huge(haddr) && pt.present(haddr).map(|p| p.pfn) == Some(head);
                if !same {
                    // pmd_same failed: the PMD changed while we slept.
                    self.unlock_page(&mut pt, head);
                    if let Some(freed) = pt.put_page(head) {
                        parking_lot::MutexGuard::unlocked(&mut pt, || self.free_folios([freed]));
                    }
                    continue;
                }
                let freed = pt.put_page(head);
                debug_assert!(freed.is_none(), "a mapped folio is referenced");
            }
            pt.split_pmd(haddr);
            inc(&self.stats.thp_split_pmd);
            crate::trace::emit!(SplitPmd {
                hva: haddr,
                frame: head,
            });
            self.unlock_page(&mut pt, head);
            return Ok(());
        }
    }

    /// Splits every huge PMD that `[start, end)` covers only in part, so
    /// the PTEs of the range can be changed one by one (`zap_pmd_range`'s
    /// and `change_pmd_range`'s `__split_huge_pmd` when `next - addr !=
    /// HPAGE_PMD_SIZE`). Returns the huge PMDs wholly inside the range.
    pub(super) fn split_partial_pmds(&self, start: Hva, end: Hva) -> Result<Vec<Hva>, MmError> {
        let huge = self.pt.lock().huge_pmds_in(start, end);
        let mut whole = Vec::new();
        for haddr in huge {
            if haddr >= start && haddr + HPAGE_PMD_SIZE <= end {
                whole.push(haddr);
            } else {
                self.split_huge_pmd(haddr, None)?;
            }
        }
        Ok(whole)
    }

    /// `vma_adjust_trans_huge`: before a VMA is split at `start` or `end`
    /// (munmap, mprotect, mlock, madvise flags, MAP_FIXED), a huge PMD
    /// across either boundary is split, so no huge PMD ever spans two VMAs.
    pub(super) fn vma_adjust_trans_huge(&self, start: Hva, end: Hva) -> Result<(), MmError> {
        for addr in [start, end] {
            if !addr.is_multiple_of(HPAGE_PMD_SIZE) {
                self.split_huge_pmd(pmd_base(addr), None)?;
            }
        }
        Ok(())
    }

    /// `split_folio` (`split_huge_page_to_list`) of the folio holding `pfn`,
    /// which the caller has locked and holds the references `pins` to (one
    /// per entry, on the page named); the lock stays with page `pfn`. A huge PMD is split first; then, if nothing but
    /// the mappings and the caller's pins hold the folio, each VMA part of
    /// the folio's range with a page mapped gets `invalidate_range_start` /
    /// `end` (the unmap of `unmap_folio`; the pages stay where they are, so
    /// no PTE changes), and the folio becomes small folios. Pages nobody
    /// maps are freed. Returns whether it split; a folio still mapped in
    /// part that could not be split stays on the deferred queue.
    pub(super) fn split_folio(
        &self,
        vmas: &VmaTree,
        pfn: Pfn,
        pins: &[Pfn],
    ) -> Result<bool, MmError> {
        let npins = pins.len() as u32;
        let (head, f) = {
            let pt = self.pt.lock();
            let Some(head) = pt.folio_head(pfn) else {
                return Ok(false);
            };
            let f = pt.folios[&head].clone();
            debug_assert!(f.locked, "split_folio needs the folio lock");
            (head, f)
        };
        if !f.is_large() {
            return Ok(true);
        }
        let order = f.order;
        let fail = |this: &Self| {
            inc(&this.mthp.get(order).split_failed);
            if order == HPAGE_PMD_ORDER {
                inc(&this.stats.thp_split_page_failed);
            }
            Ok(false)
        };
        if !self.pt.lock().can_split_folio(pfn, npins) {
            return fail(self);
        }
        if f.pmd {
            self.split_huge_pmd(f.hva, Some(head))?;
        }
        // unmap_folio: one start/end per VMA part that maps a page.
        let end = f.hva + (f.nr() << super::PAGE_SHIFT);
        let mut ranges: Vec<(Hva, Hva)> = Vec::new();
        {
            let pt = self.pt.lock();
            let Some(cur) = pt.folios.get(&head) else {
                return fail(self);
            };
            for v in vmas.overlapping(f.hva, end) {
                let (s, e) = (v.start.max(f.hva), v.end.min(end));
                let first = ((s - f.hva) / PAGE_SIZE) as usize;
                let last = ((e - f.hva) / PAGE_SIZE) as usize;
                if cur.rmap[first..last].iter().any(|r| !r.is_empty()) {
                    ranges.push((s, e));
                }
            }
        }
        for &(s, e) in &ranges {
            let range = MmuNotifierRange::new(MmuNotifyEvent::Clear, s, e);
            self.mn_invalidate_range_start(&range);
            self.mn_invalidate_range_end(&range, false);
        }
        // folio_ref_freeze: a pin taken meanwhile makes the split fail.
        let freed = {
            let mut pt = self.pt.lock();
            if pt.folio_head(pfn) != Some(head) || !pt.can_split_folio(pfn, npins) {
                drop(pt);
                return fail(self);
            }
            pt.split_folio(pfn, pins)
        };
        self.free_frames(freed);
        inc(&self.mthp.get(order).split);
        if order == HPAGE_PMD_ORDER {
            inc(&self.stats.thp_split_page);
        }
        crate::trace::emit!(SplitFolio {
            hva: f.hva,
            frame: head,
            order,
        });
        Ok(true)
    }

    /// `deferred_split_scan`: tries to split every queued folio (partly
    /// unmapped), taking a reference and the folio lock without waiting
    /// (`trylock`), as the shrinker does. Returns the folios split.
    pub fn deferred_split_scan(&self) -> Result<u64, MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        let queued: Vec<Pfn> = self.pt.lock().deferred.iter().copied().collect();
        self.split_deferred(&vmas, queued)
    }

    /// After an unmap: counts the folios it queued and tries to split
    /// them now, so their unmapped pages go back at once when they can.
    pub(super) fn split_queued_by_unmap(&self, vmas: &VmaTree) -> Result<u64, MmError> {
        let heads = self.count_deferred();
        if heads.is_empty() {
            return Ok(0);
        }
        self.split_deferred(vmas, heads)
    }

    /// Tries to split the queued folios `queued`, under the mmap lock.
    pub(super) fn split_deferred(&self, vmas: &VmaTree, queued: Vec<Pfn>) -> Result<u64, MmError> {
        let mut split = 0;
        for head in queued {
            {
                let mut pt = self.pt.lock();
                if !pt.folios.get(&head).is_some_and(|f| f.partially_mapped()) {
                    pt.deferred.remove(&head);
                    continue;
                }
                pt.get_page(head);
                if !pt.trylock_page(head) {
                    let freed = pt.put_page(head);
                    debug_assert!(freed.is_none(), "a mapped folio is referenced");
                    continue;
                }
            }
            let done = self.split_folio(vmas, head, &[head]);
            let mut pt = self.pt.lock();
            self.unlock_page(&mut pt, head);
            let freed = pt.put_page(head);
            drop(pt);
            self.free_folios(freed);
            if done? {
                split += 1;
            }
        }
        Ok(split)
    }

    /// Counts the folios unmaps queued for a deferred split since the
    /// last call (`deferred_split_folio`'s counters); returns their heads.
    pub(super) fn count_deferred(&self) -> Vec<Pfn> {
        let mut pt = self.pt.lock();
        let new = std::mem::take(&mut pt.deferred_new);
        new.into_iter()
            .filter(|(head, _)| pt.deferred.contains(head))
            .map(|(head, order)| {
                inc(&self.mthp.get(order).split_deferred);
                inc(&self.stats.thp_deferred_split_page);
                head
            })
            .collect()
    }
}
