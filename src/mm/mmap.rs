//! mmap, munmap, exit_mmap and the OOM reaper: creating and destroying
//! mappings, and `zap_page_range`, which they share with madvise.

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::pgtable::{HPAGE_PMD_SIZE, Pte};
use super::stats::add;
use super::vma::{MmapFlags, Prot, Vma, VmaTree};
use super::{Hva, MMAP_BASE, Mm, MmError, PAGE_SIZE, Pfn, TASK_SIZE, is_page_aligned, page_align};

impl Mm {
    /// `mmap(addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS [| MAP_FIXED])`.
    /// With `Some(addr)` the mapping is placed exactly there, replacing what
    /// was mapped (MAP_FIXED); otherwise the lowest free gap at or above
    /// [`MMAP_BASE`] is used. Pages are allocated on first touch.
    pub fn mmap(
        &self,
        addr: Option<Hva>,
        len: u64,
        prot: Prot,
        flags: MmapFlags,
    ) -> Result<Hva, MmError> {
        self.check_alive()?;
        if len == 0 {
            return Err(MmError::InvalidArgument("length is zero"));
        }
        let len = page_align(len).ok_or(MmError::NoMemory)?;
        let mut vmas = self.mmap_lock.write();
        let start = match addr {
            Some(a) => {
                if !is_page_aligned(a) {
                    return Err(MmError::InvalidArgument(
                        "MAP_FIXED address is not page aligned",
                    ));
                }
                let end = a
                    .checked_add(len)
                    .filter(|&e| e <= TASK_SIZE)
                    .ok_or(MmError::NoMemory)?;
                // MAP_FIXED silently unmaps what was there.
                self.do_munmap(&mut vmas, a, end)?;
                a
            }
            None => vmas.unmapped_area(MMAP_BASE, len, TASK_SIZE)?,
        };
        vmas.insert(Vma {
            start,
            end: start + len,
            prot,
            flags,
        });
        vmas.modify_range(start, start + len, |_| {}); // vma_merge
        Ok(start)
    }

    /// `munmap(addr, len)`.
    pub fn munmap(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        let _slice =
            crate::trace::slice!(HostOp(crate::trace::HostOp::Munmap { start: addr, len }));
        self.check_alive()?;
        if !is_page_aligned(addr) {
            return Err(MmError::InvalidArgument("address is not page aligned"));
        }
        if len == 0 {
            return Err(MmError::InvalidArgument("length is zero"));
        }
        let len = page_align(len).ok_or(MmError::InvalidArgument("length overflows"))?;
        let end =
            addr.checked_add(len)
                .filter(|&e| e <= TASK_SIZE)
                .ok_or(MmError::InvalidArgument(
                    "range overflows the address space",
                ))?;
        let mut vmas = self.mmap_lock.write();
        self.do_munmap(&mut vmas, addr, end)
    }

    /// `do_munmap`: unmaps `[start, end)` under the mmap write lock. As in
    /// 4.19's `unmap_region` → `unmap_vmas`, the notifier range is the whole
    /// `[start, end)` asked for (holes included), not clipped to the VMAs;
    /// nothing is called when no VMA overlaps it. A huge PMD across either
    /// end is split first (`__split_vma` → `vma_adjust_trans_huge`), and a
    /// large folio left partly mapped is split after (its deferred split).
    fn do_munmap(&self, vmas: &mut VmaTree, start: Hva, end: Hva) -> Result<(), MmError> {
        if vmas.overlapping(start, end).is_empty() {
            return Ok(()); // nothing mapped: munmap succeeds
        }
        self.vma_adjust_trans_huge(start, end)?;
        self.zap_page_range(start, end, MmuNotifyEvent::Unmap)?;
        vmas.remove_range(start, end);
        self.split_queued_by_unmap(vmas)?;
        Ok(())
    }

    /// `zap_page_range` (4.19 `mm/memory.c`): clears every PTE in
    /// `[start, end)` between `invalidate_range_start` and
    /// `invalidate_range_end`, then `tlb_finish_mmu` flushes the range of
    /// the PTEs it cleared (`mmu_notifier_invalidate_range`) and drops the
    /// page references, so every secondary MMU has let go of a frame before
    /// it can be freed. Swap entries are freed too. Returns the pages
    /// unmapped. A huge PMD the range covers only in part is split inside
    /// the range (`zap_pmd_range` → `__split_huge_pmd`, its own
    /// start/only_end nested in ours); one it covers whole is zapped whole
    /// (`zap_huge_pmd`).
    pub(super) fn zap_page_range(
        &self,
        start: Hva,
        end: Hva,
        event: MmuNotifyEvent,
    ) -> Result<u64, MmError> {
        let range = MmuNotifierRange::new(event, start, end);
        self.mn_invalidate_range_start(&range);
        let mut gather = Ok(Vec::new());
        for _ in 0..super::fault::MAX_FAULT_RETRIES {
            if let Err(e) = self.split_partial_pmds(start, end) {
                gather = Err(e);
                break;
            }
            match self.unmap_page_range(start, end) {
                Some(g) => {
                    gather = Ok(g);
                    break;
                }
                // A fault made a huge PMD across an end meanwhile.
                None => continue,
            }
        }
        self.mn_invalidate_range_end(&range, false);
        let gather = gather?;
        Ok(self.tlb_finish_mmu(gather))
    }

    /// `unmap_page_range` under the page-table lock: clears the PTEs and
    /// the huge PMDs wholly inside the range, and gathers the pages
    /// (`mmu_gather`): `(first address, bytes, frame)`. `None` if a huge
    /// PMD sticks out of the range (split it first).
    fn unmap_page_range(&self, start: Hva, end: Hva) -> Option<Vec<(Hva, u64, Pfn)>> {
        let mut gather = Vec::new();
        let mut pt = self.pt.lock();
        let huge = pt.huge_pmds_in(start, end);
        if huge.iter().any(|&h| h < start || h + HPAGE_PMD_SIZE > end) {
            return None;
        }
        for haddr in huge {
            if let Some(head) = pt.unmap_pmd(haddr) {
                gather.push((haddr, HPAGE_PMD_SIZE, head.pfn));
            }
        }
        for (hva, pte) in pt.entries_in(start, end) {
            pt.unmap(hva);
            match pte {
                Pte::Present(p) => gather.push((hva, PAGE_SIZE, p.pfn)),
                Pte::Swap(slot) => {
                    let freed = pt.swap.put(slot);
                    debug_assert!(freed.is_ok(), "swap entry at {hva:#x}: {freed:?}");
                }
            }
        }
        Some(gather)
    }

    /// `tlb_finish_mmu`: `tlb_flush_mmu_tlbonly` tells the notifiers the
    /// range of the entries actually cleared (`__tlb_adjust_range`), then
    /// the gathered pages are released. Returns the pages unmapped.
    fn tlb_finish_mmu(&self, gather: Vec<(Hva, u64, Pfn)>) -> u64 {
        let (Some(first), Some(last)) = (
            gather.iter().map(|g| g.0).min(),
            gather.iter().map(|g| g.0 + g.1).max(),
        ) else {
            return 0;
        };
        self.mn_invalidate_range(first, last);
        let n = gather.iter().map(|g| g.1 / PAGE_SIZE).sum();
        add(&self.stats.pgzap, n);
        self.put_pages(gather.into_iter().map(|g| g.2).collect());
        n
    }

    /// `exit_mmap`: `mmu_notifier_release` first (every notifier drops its
    /// translations, exactly once), then every mapping is torn down and every
    /// frame and swap slot returned. Later calls on the mm fail with
    /// `Exited`; a second exit does nothing.
    pub fn exit_mmap(&self) {
        let _slice = crate::trace::slice!(HostOp(crate::trace::HostOp::ExitMmap));
        let mut ksm = self.ksm.lock();
        let mut vmas = self.mmap_lock.write();
        if self.exited.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        self.notifiers.release();
        // unmap_vmas(&tlb, vma, 0, -1): every notifier is gone from the list
        // by now, so this range reaches nobody.
        if vmas.iter().next().is_some() {
            // Covers every huge PMD whole: nothing to split, nothing fails.
            let zapped = self.zap_page_range(0, u64::MAX, MmuNotifyEvent::Unmap);
            debug_assert!(zapped.is_ok(), "exit zap: {zapped:?}");
            self.count_deferred();
        }
        vmas.remove_range(0, TASK_SIZE);
        *ksm = Default::default();
    }

    /// `__oom_reap_task_mm`: zaps every anonymous, unlocked VMA without
    /// blocking (`mmu_notifier_invalidate_range_start_nonblock`). A VMA whose
    /// notifiers refuse is skipped, and the result is `Err(Again)` if any
    /// was, so the reaper can try again later. Returns the pages zapped.
    ///
    /// Deviation: 4.19 ends no notifier of a refused range; here every
    /// notifier gets its `invalidate_range_end`, so one that did start (a
    /// secondary MMU counting invalidations in progress) is balanced.
    pub fn oom_reap(&self) -> Result<u64, MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        let mut zapped = 0;
        let mut result = Ok(());
        for v in vmas.iter().filter(|v| !v.flags.contains(MmapFlags::LOCKED)) {
            let range = MmuNotifierRange::new(MmuNotifyEvent::Unmap, v.start, v.end).nonblocking();
            if let Err(e) = self.mn_invalidate_range_start_nonblock(&range) {
                self.mn_invalidate_range_end(&range, false);
                result = Err(e);
                continue;
            }
            // No huge PMD spans two VMAs (`vma_adjust_trans_huge`), so a
            // VMA's range never needs a split, which could block.
            let gather = self.unmap_page_range(v.start, v.end);
            debug_assert!(gather.is_some(), "a huge PMD across a VMA boundary");
            self.mn_invalidate_range_end(&range, false);
            zapped += self.tlb_finish_mmu(gather.unwrap_or_default());
        }
        self.count_deferred();
        result.map(|()| zapped)
    }
}

impl Vma {
    /// Pages of the VMA, for iteration.
    pub fn pages(&self) -> impl Iterator<Item = Hva> {
        (self.start..self.end).step_by(PAGE_SIZE as usize)
    }
}
