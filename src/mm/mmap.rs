//! mmap, munmap, exit_mmap and the OOM reaper: creating and destroying
//! mappings, and `zap_page_range`, which they share with madvise.

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::pgtable::Pte;
use super::stats::add;
use super::vma::{MmapFlags, Prot, Vma, VmaTree};
use super::{Hva, MMAP_BASE, Mm, MmError, PAGE_SIZE, TASK_SIZE, is_page_aligned, page_align};

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
                self.do_munmap(&mut vmas, a, end);
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
        crate::trace::emit!(HostOp(crate::trace::HostOp::Munmap { start: addr, len }));
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
        self.do_munmap(&mut vmas, addr, end);
        Ok(())
    }

    /// `do_munmap`: unmaps `[start, end)` under the mmap write lock.
    fn do_munmap(&self, vmas: &mut VmaTree, start: Hva, end: Hva) {
        let overlapping = vmas.overlapping(start, end);
        let (Some(first), Some(last)) = (overlapping.first(), overlapping.last()) else {
            return; // nothing mapped: munmap succeeds
        };
        // unmap_region: one notifier range over the VMAs being removed.
        let (zs, ze) = (start.max(first.start), end.min(last.end));
        let _ = self.zap_page_range(zs, ze, MmuNotifyEvent::Unmap, true);
        vmas.remove_range(start, end);
    }

    /// `zap_page_range`: clears every PTE in `[start, end)` between
    /// `invalidate_range_start` and `invalidate_range_end`, then drops the
    /// page references (`tlb_finish_mmu`), so a secondary MMU has let go of a
    /// frame before it can be freed. Swap entries are freed too.
    ///
    /// With `blockable == false` (the OOM reaper) a notifier may refuse;
    /// then nothing is zapped and `Again` is returned.
    pub(super) fn zap_page_range(
        &self,
        start: Hva,
        end: Hva,
        event: MmuNotifyEvent,
        blockable: bool,
    ) -> Result<u64, MmError> {
        let mut range = MmuNotifierRange::new(event, start, end);
        if !blockable {
            range = range.nonblocking();
        }
        let started = self.mn_invalidate_range_start(&range);
        if !blockable && let Err(e) = started {
            // __oom_reap_task_mm: skip this range, the caller retries later.
            // Every notifier was called, so end the range for those that
            // started it.
            self.mn_invalidate_range_end(&range, false);
            return Err(e);
        }
        let mut gather = Vec::new();
        {
            let mut pt = self.pt.lock();
            for (hva, pte) in pt.entries_in(start, end) {
                pt.unmap(hva);
                match pte {
                    Pte::Present(p) => gather.push(p.pfn),
                    Pte::Swap(slot) => {
                        let _ = pt.swap.put(slot);
                    }
                }
            }
            // ptep_clear_flush_notify: the TLB flush under the PTE lock.
            if !gather.is_empty() {
                self.mn_invalidate_range(start, end);
            }
        }
        self.mn_invalidate_range_end(&range, true);
        let n = gather.len() as u64;
        add(&self.stats.pgzap, n);
        self.put_pages(gather);
        Ok(n)
    }

    /// `exit_mmap`: `mmu_notifier_release` first (every notifier drops its
    /// translations, exactly once), then every mapping is torn down and every
    /// frame and swap slot returned. Later calls on the mm fail with
    /// `Exited`; a second exit does nothing.
    pub fn exit_mmap(&self) {
        crate::trace::emit!(HostOp(crate::trace::HostOp::ExitMmap));
        let mut ksm = self.ksm.lock();
        let mut vmas = self.mmap_lock.write();
        if self.exited.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        self.notifiers.release();
        let all: Vec<Vma> = vmas.iter().copied().collect();
        for v in &all {
            let _ = self.zap_page_range(v.start, v.end, MmuNotifyEvent::Release, true);
        }
        vmas.remove_range(0, TASK_SIZE);
        *ksm = Default::default();
    }

    /// `__oom_reap_task_mm`: zaps every anonymous, unlocked VMA without
    /// blocking. A VMA whose notifiers refuse a non-blockable invalidation is
    /// skipped; the result is `Err(Again)` if any was, so the reaper can try
    /// again later. Returns the number of pages zapped.
    pub fn oom_reap(&self) -> Result<u64, MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        let mut zapped = 0;
        let mut result = Ok(());
        for v in vmas.iter().filter(|v| !v.flags.contains(MmapFlags::LOCKED)) {
            match self.zap_page_range(v.start, v.end, MmuNotifyEvent::Clear, false) {
                Ok(n) => zapped += n,
                Err(e) => result = Err(e),
            }
        }
        result.map(|()| zapped)
    }
}

impl Vma {
    /// Pages of the VMA, for iteration.
    pub fn pages(&self) -> impl Iterator<Item = Hva> {
        (self.start..self.end).step_by(PAGE_SIZE as usize)
    }
}
