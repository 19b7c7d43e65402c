//! Page aging and reclaim (`mm/rmap.c`, `mm/vmscan.c`).
//!
//! A page is young if the host PTE's Accessed bit is set *or* a secondary
//! MMU says so (`ptep_clear_flush_young_notify` and friends): the guest
//! touches memory through the shadow MMU, whose Accessed bits the CPU sets,
//! so without the notifier every guest page would look cold.
//!
//! A huge PMD has one young bit for its 2 MiB, tested and cleared with the
//! notifier over the whole range (`pmdp_clear_flush_young_notify`). Reclaim
//! takes a large folio as one unit: referenced if any of its mappings is
//! young (`folio_referenced`); a cold one is split (`split_folio` in
//! `shrink_folio_list`) and its pages swapped out one by one, since swap
//! slots, swap-in and the swap cache here are per page (Linux 4.19 did the
//! same without `CONFIG_THP_SWAP`).

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::pgtable::{HPAGE_PMD_SIZE, PresentPte, Pte, pmd_base, vpn};
use super::stats::{add, inc};
use super::vma::{MmapFlags, VmaTree};
use super::{Hva, Mm, MmError, PAGE_SHIFT, PAGE_SIZE, Pfn};

/// What an aging pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgingResult {
    /// Present pages looked at.
    pub scanned: u64,
    /// Pages that were young (their bits are now clear).
    pub young: Vec<Hva>,
}

/// What one reclaim call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimResult {
    pub scanned: u64,
    /// Pages unmapped and freed.
    pub evicted: u64,
    /// Of those, written to swap because they were dirty.
    pub swapped_out: u64,
    /// Of those, dropped because an identical swap copy or nothing (a
    /// never-written zero page) already existed.
    pub dropped_clean: u64,
    /// Pages found young and given another round.
    pub kept_young: u64,
    /// Pages that cannot be reclaimed (locked VMA, KSM, pinned).
    pub skipped: u64,
}

enum Unmapped {
    Evicted { swapped: bool },
    Young,
    Skipped,
}

impl Mm {
    /// `ptep_clear_flush_young_notify`: test and clear the host young bit and
    /// every secondary MMU's, flushing the secondary TLBs.
    pub fn clear_flush_young(&self, hva: Hva) -> Result<bool, MmError> {
        let _slice =
            crate::trace::slice!(HostOp(crate::trace::HostOp::ClearFlushYoung { start: hva }));
        self.young_op(hva, true, true)
    }

    /// `ptep_clear_young_notify`: the same without the flush (idle page
    /// tracking).
    pub fn clear_young(&self, hva: Hva) -> Result<bool, MmError> {
        self.young_op(hva, true, false)
    }

    /// `mmu_notifier_test_young` combined with the host bit: is the page
    /// young anywhere? Nothing is cleared.
    pub fn test_young(&self, hva: Hva) -> Result<bool, MmError> {
        self.young_op(hva, false, false)
    }

    fn young_op(&self, hva: Hva, clear: bool, flush: bool) -> Result<bool, MmError> {
        self.check_alive()?;
        let mut page = hva & !(PAGE_SIZE - 1);
        let mut pt = self.pt.lock();
        if pt.is_huge(page) {
            page = pmd_base(page);
        }
        let Some(mut p) = pt.present(page) else {
            return Ok(false);
        };
        Ok(self.age_pte_locked(&mut pt, page, &mut p, clear, flush))
    }

    /// The body of the young operations, under the page-table lock (where
    /// Linux calls the young notifiers). Under a huge PMD, `page` is its
    /// first address and the notifiers get its whole range.
    fn age_pte_locked(
        &self,
        pt: &mut super::pgtable::PageTables,
        page: Hva,
        p: &mut PresentPte,
        clear: bool,
        flush: bool,
    ) -> bool {
        let mut young = p.young;
        if clear && p.young {
            p.young = false;
            pt.update(page, *p);
        }
        if self.notifiers.has_notifiers() {
            let end = page
                + if pt.is_huge(page) {
                    HPAGE_PMD_SIZE
                } else {
                    PAGE_SIZE
                };
            young |= match (clear, flush) {
                (true, true) => self.notifiers.clear_flush_young(page, end),
                (true, false) => self.notifiers.clear_young(page, end),
                (false, _) => young || self.notifiers.test_young(page),
            };
        }
        young
    }

    /// One aging pass over `[start, end)`: clears (and, with `flush`,
    /// flushes) the young bits of every present page and reports which were
    /// young.
    pub fn age_range(&self, start: Hva, end: Hva, flush: bool) -> Result<AgingResult, MmError> {
        let _slice =
            crate::trace::slice!(HostOp(crate::trace::HostOp::AgeRange { start, end, flush }));
        self.check_alive()?;
        let mut res = AgingResult::default();
        let pages: Vec<Hva> = {
            let pt = self.pt.lock();
            pt.present_in(start, end)
                .into_iter()
                .map(|(h, _)| h)
                .collect()
        };
        // A huge PMD is aged once (pmdp_clear_young), for all its pages.
        let mut pmd_young: Option<(Hva, bool)> = None;
        for hva in pages {
            let mut pt = self.pt.lock();
            let Some(mut p) = pt.present(hva) else {
                continue;
            };
            res.scanned += 1;
            let young = if pt.is_huge(hva) {
                let base = pmd_base(hva);
                match pmd_young {
                    Some((b, y)) if b == base => y,
                    _ => {
                        let mut head = pt.present(base).unwrap_or(p);
                        let y = self.age_pte_locked(&mut pt, base, &mut head, true, flush);
                        pmd_young = Some((base, y));
                        y
                    }
                }
            } else {
                self.age_pte_locked(&mut pt, hva, &mut p, true, flush)
            };
            if young {
                res.young.push(hva);
            }
        }
        Ok(res)
    }

    /// kswapd's work for `nr_to_scan` pages: a clock over the present pages
    /// of unlocked VMAs. A young page gets a second chance (its bits are
    /// cleared); a cold one is unmapped under `invalidate_range_start/end`,
    /// written to swap if dirty, and freed. A later access swaps it back in.
    pub fn reclaim(&self, nr_to_scan: u64) -> Result<ReclaimResult, MmError> {
        let _slice = crate::trace::slice!(HostOp(crate::trace::HostOp::Reclaim { nr_to_scan }));
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        self.reclaim_locked(&vmas, nr_to_scan)
    }

    /// Reclaim under the mmap lock (held for reading by the caller: kswapd,
    /// or a fault doing direct reclaim).
    fn reclaim_locked(&self, vmas: &VmaTree, nr_to_scan: u64) -> Result<ReclaimResult, MmError> {
        // The deferred-split shrinker runs first (shrink_slab).
        let queued: Vec<Pfn> = self.pt.lock().deferred.iter().copied().collect();
        self.split_deferred(vmas, queued)?;
        self.reclaim_until(vmas, nr_to_scan, u64::MAX)
    }

    /// Scans up to `nr_to_scan` pages, stopping early once `nr_to_evict`
    /// pages were evicted.
    fn reclaim_until(
        &self,
        vmas: &VmaTree,
        nr_to_scan: u64,
        nr_to_evict: u64,
    ) -> Result<ReclaimResult, MmError> {
        let mut res = ReclaimResult::default();
        let mut cursor = self.reclaim_cursor.lock();
        let mut wraps = 0;
        while res.scanned < nr_to_scan && res.evicted < nr_to_evict {
            let next = {
                let pt = self.pt.lock();
                pt.ptes
                    .range(vpn(*cursor), u64::MAX)
                    .find_map(|(v, pte)| match pte {
                        Pte::Present(p) => Some((v << PAGE_SHIFT, *p)),
                        Pte::Swap(_) => None,
                    })
            };
            let Some((hva, p)) = next else {
                // Two turns of the clock: one clears young bits, the next
                // finds the pages that stayed cold.
                wraps += 1;
                if wraps > 2 {
                    break;
                }
                *cursor = 0;
                continue;
            };
            *cursor = hva + PAGE_SIZE;
            res.scanned += 1;
            inc(&self.stats.pgscan);
            if vmas
                .find(hva)
                .is_none_or(|v| v.flags.contains(MmapFlags::LOCKED))
            {
                res.skipped += 1;
                continue;
            }
            // A large folio is one unit of the clock: once looked at, the
            // hand moves past it.
            let folio_end = {
                let pt = self.pt.lock();
                pt.folio(p.pfn)
                    .filter(|f| f.is_large())
                    .map(|f| f.hva + (f.nr() << PAGE_SHIFT))
            };
            match self.try_to_unmap_one(vmas, hva, p.pfn)? {
                Unmapped::Evicted { swapped } => {
                    res.evicted += 1;
                    if swapped {
                        res.swapped_out += 1;
                    } else {
                        res.dropped_clean += 1;
                    }
                }
                Unmapped::Young => {
                    res.kept_young += 1;
                    if let Some(end) = folio_end {
                        *cursor = (*cursor).max(end);
                    }
                }
                Unmapped::Skipped => res.skipped += 1,
            }
        }
        add(&self.stats.pgsteal, res.evicted);
        add(&self.stats.pgactivate, res.kept_young);
        Ok(res)
    }

    /// Direct reclaim from the allocation path: up to two turns of the
    /// clock over every present page (one to clear young bits, one to find
    /// them cold), stopping as soon as `nr` pages were freed, so an
    /// allocation fails only when nothing at all can be evicted.
    pub(super) fn direct_reclaim(&self, vmas: &VmaTree, nr: u64) -> Result<(), MmError> {
        let queued: Vec<Pfn> = self.pt.lock().deferred.iter().copied().collect();
        self.split_deferred(vmas, queued)?;
        let present = self.pt.lock().ptes.len() as u64;
        self.reclaim_until(vmas, 2 * present + 2, nr)?;
        Ok(())
    }

    /// `folio_referenced`: tests and clears the young bits of every mapping
    /// of the folio holding `pfn` (the PMD's, or each PTE's), asking the
    /// secondary MMUs too.
    fn folio_referenced(&self, hva: Hva, pfn: Pfn) -> Result<bool, MmError> {
        let mapped: Vec<Hva> = {
            let pt = self.pt.lock();
            match pt.folio(pfn) {
                Some(f) if f.is_large() && !f.pmd => f.rmap.iter().flatten().copied().collect(),
                _ => vec![hva],
            }
        };
        let mut young = false;
        for h in mapped {
            young |= self.clear_flush_young(h)?;
        }
        Ok(young)
    }

    /// `shrink_page_list` for one anonymous page: `page_referenced` (the
    /// host bit and every secondary MMU's), then with a reference and the
    /// page lock held (`isolate_lru_page`, `trylock_page`: a page KSM is
    /// merging is skipped this round), `try_to_unmap_one`. A large folio
    /// is referenced if any mapping of it is young (`folio_referenced`);
    /// a cold one is split first and only this page unmapped now.
    fn try_to_unmap_one(&self, vmas: &VmaTree, hva: Hva, pfn: Pfn) -> Result<Unmapped, MmError> {
        if self.folio_referenced(hva, pfn)? {
            return Ok(Unmapped::Young);
        }
        {
            let mut pt = self.pt.lock();
            if pt.present(hva).map(|p| p.pfn) != Some(pfn) {
                return Ok(Unmapped::Skipped);
            }
            pt.get_page(pfn);
            if !pt.trylock_page(pfn) {
                let freed = pt.put_page(pfn);
                debug_assert!(freed.is_none(), "a mapped page is referenced");
                return Ok(Unmapped::Skipped);
            }
        }
        mm_hook!(self, ReclaimPageLocked, hva);
        let large = self.pt.lock().folio(pfn).is_some_and(|f| f.is_large());
        let outcome = match large {
            true => match self.split_folio(vmas, pfn, &[pfn]) {
                Ok(true) => self.unmap_locked_page(hva, pfn),
                Ok(false) => Ok(Unmapped::Skipped),
                Err(e) => Err(e),
            },
            false => self.unmap_locked_page(hva, pfn),
        };
        let mut pt = self.pt.lock();
        self.unlock_page(&mut pt, pfn);
        drop(pt);
        let mut put = vec![pfn]; // our reference
        if matches!(outcome, Ok(Unmapped::Evicted { .. })) {
            put.push(pfn); // the mapping's
        }
        self.put_pages(put);
        outcome
    }

    /// `try_to_unmap_one` with the page locked and referenced: inside
    /// `invalidate_range_start/end`, rechecks the young bits
    /// (`ptep_clear_flush_young_notify`), clears the PTE, stores the swap
    /// entry (written to swap if the page is dirty) and flushes
    /// (`mmu_notifier_invalidate_range`).
    fn unmap_locked_page(&self, hva: Hva, pfn: Pfn) -> Result<Unmapped, MmError> {
        let range = MmuNotifierRange::new(MmuNotifyEvent::Clear, hva, hva + PAGE_SIZE);
        self.mn_invalidate_range_start(&range);
        let outcome = self.unmap_in_range(hva, pfn);
        self.mn_invalidate_range_end(&range, false);
        outcome
    }

    fn unmap_in_range(&self, hva: Hva, pfn: Pfn) -> Result<Unmapped, MmError> {
        let mut pt = self.pt.lock();
        let Some(mut p) = pt.present(hva).filter(|p| p.pfn == pfn) else {
            return Ok(Unmapped::Skipped);
        };
        // Only an exclusively mapped page nobody pins (the mapping and our
        // reference): KSM pages are shared and stay.
        let unpinned = pt
            .folio(pfn)
            .is_some_and(|m| !m.is_large() && !m.ksm && m.mapcount() == 1 && m.refcount == 2);
        if !unpinned {
            return Ok(Unmapped::Skipped);
        }
        if self.age_pte_locked(&mut pt, hva, &mut p, true, true) {
            return Ok(Unmapped::Young);
        }
        let Some(Pte::Present(p)) = pt.unmap(hva) else {
            return Err(MmError::BadFrame(pfn));
        };
        let (dirty, cached) = match pt.folio_mut(pfn) {
            Some(m) => (m.dirty || p.dirty, m.swap),
            None => (p.dirty, None),
        };
        let swapped = if dirty {
            // pageout: write the page to a fresh slot; a stale swap cache
            // slot is dropped when the page is freed.
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            use super::memory::FrameAccess;
            self.memory().read_frame(pfn, 0, &mut buf)?;
            let slot = pt.swap.alloc(&buf);
            pt.ptes.insert(vpn(hva), Pte::Swap(slot));
            inc(&self.stats.pswpout);
            crate::trace::emit!(SwapOut { hva, frame: pfn });
            true
        } else {
            if let Some(slot) = cached {
                // Clean and identical to its swap copy: the PTE takes a
                // reference to the slot.
                pt.swap.dup(slot)?;
                pt.ptes.insert(vpn(hva), Pte::Swap(slot));
            }
            // else: never written since it was a zero page; the PTE stays
            // empty and the next touch gets a new zero page.
            false
        };
        // ptep_clear_flush + set_pte_at(swp_pte): "invalidate as we
        // cleared the pte".
        self.mn_invalidate_range(hva, hva + PAGE_SIZE);
        Ok(Unmapped::Evicted { swapped })
    }
}
