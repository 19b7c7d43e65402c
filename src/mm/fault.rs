//! Page faults (`handle_mm_fault`): demand-zero, copy-on-write, swap-in;
//! and the process's own reads and writes of its memory, which go through
//! them.

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent, NotifierPte};

use super::memory::FrameAccess;
use super::pgtable::{PresentPte, Pte};
use super::stats::inc;
use super::vma::{Prot, Vma, VmaTree};
use super::{Access, Hva, Mm, MmError, PAGE_SIZE, Pfn};

/// What a secondary MMU gets from the host for an hva (`hva_to_pfn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPfn {
    pub pfn: Pfn,
    /// The host PTE is writable (so a secondary mapping may be).
    pub writable: bool,
    /// The host PTE is dirty (a secondary mapping may be made writable
    /// only over a dirty host PTE; writable implies dirty).
    pub dirty: bool,
}

/// What one attempt at a fault found; `Retry` means the page table changed
/// while the lock was dropped (`pte_same` failed).
pub(super) enum Step {
    Done(PresentPte),
    Retry,
}

/// Bound on `pte_same` retries of one fault; each retry means another thread
/// changed this very PTE, so hitting the bound means livelock, not bad luck.
pub(super) const MAX_FAULT_RETRIES: u32 = 10_000;

impl Mm {
    /// `handle_mm_fault` for `hva` with `access`: makes the page present (and
    /// writable for a write). Returns the PTE as installed.
    pub fn handle_mm_fault(&self, hva: Hva, access: Access) -> Result<PresentPte, MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        self.fault_locked(&vmas, hva, access)
    }

    /// `hva_to_pfn` as KVM calls it (get_user_pages with write intent only
    /// for writes): faults the page in and returns its frame and whether the
    /// host PTE is writable.
    pub fn hva_to_pfn(&self, hva: Hva, access: Access) -> Result<HostPfn, MmError> {
        let p = self.handle_mm_fault(hva, access)?;
        Ok(HostPfn {
            pfn: p.pfn,
            writable: p.writable,
            dirty: p.dirty,
        })
    }

    /// `hva_to_pfn_fast` / `get_user_page_fast_only` for each of `hvas`:
    /// the frame only where the page is present now, never faulting
    /// (KVM's prefetch and `host_pfn_mapping_level` read the host table
    /// this way). Takes the page-table lock once; call it with no lock of
    /// a secondary MMU held.
    pub fn lookup_present(&self, hvas: &[Hva]) -> Vec<Option<HostPfn>> {
        let pt = self.pt.lock();
        hvas.iter()
            .map(|&h| {
                pt.present(h & !(PAGE_SIZE - 1)).map(|p| HostPfn {
                    pfn: p.pfn,
                    writable: p.writable,
                    dirty: p.dirty,
                })
            })
            .collect()
    }

    /// The fault proper, under the mmap read lock.
    pub(super) fn fault_locked(
        &self,
        vmas: &VmaTree,
        hva: Hva,
        access: Access,
    ) -> Result<PresentPte, MmError> {
        let page = hva & !(PAGE_SIZE - 1);
        let vma = vmas.find(page).ok_or(MmError::NoVma(hva))?;
        let allowed = match access {
            // x86: write and exec permission imply read.
            Access::Read => vma.prot.intersects(Prot::READ | Prot::WRITE | Prot::EXEC),
            Access::Write => vma.prot.contains(Prot::WRITE),
        };
        if !allowed {
            return Err(MmError::Access {
                addr: hva,
                access: access.name(),
            });
        }
        inc(&self.stats.pgfault);
        let vma = *vma;
        for _ in 0..MAX_FAULT_RETRIES {
            if let Step::Done(p) = self.fault_once(vmas, &vma, page, access)? {
                return Ok(p);
            }
        }
        Err(MmError::InvalidArgument("fault retried too often"))
    }

    fn fault_once(
        &self,
        vmas: &VmaTree,
        vma: &Vma,
        page: Hva,
        access: Access,
    ) -> Result<Step, MmError> {
        let write = access.is_write();
        let mut pt = self.pt.lock();
        match pt.pte(page) {
            None => {
                drop(pt);
                self.do_anonymous_page(vmas, vma, page, write)
            }
            Some(Pte::Swap(slot)) => {
                drop(pt);
                self.do_swap_page(vmas, page, slot, write)
            }
            Some(Pte::Present(mut p)) => {
                if !write || p.writable {
                    // Hardware sets A (and D) on the access.
                    p.young = true;
                    p.dirty |= write;
                    pt.update(page, p);
                    return Ok(Step::Done(p));
                }
                // do_wp_page (do_huge_pmd_wp_page under a huge PMD): a write
                // to a read-only entry in a writable VMA.
                let folio = pt.folio(p.pfn).ok_or(MmError::BadFrame(p.pfn))?;
                if !folio.ksm {
                    // None: shared or KSM after all, so copy.
                    if let Some(step) = self.reuse_locked_page(&mut pt, page, p)? {
                        return Ok(step);
                    }
                }
                // wp_page_copy works on the old page with the page-table lock
                // dropped: hold a reference so its frame cannot be freed and
                // reused under the copy.
                pt.get_page(p.pfn);
                drop(pt);
                let step = self.wp_page_copy(vmas, page, p);
                self.put_pages(vec![p.pfn]);
                step
            }
        }
    }

    /// The reuse half of `do_wp_page` for an anonymous page that was not KSM
    /// under the page-table lock: takes the page lock (`trylock_page`, or
    /// `lock_page` with the page-table lock dropped and `pte_same` after),
    /// and reuses the page in place only if, under the lock, it is still
    /// not KSM and mapped once (`reuse_swap_page`). KSM holds the page lock
    /// from write-protecting a page until it is marked KSM, so a fault in
    /// that window waits here and then copies. `None`: copy instead.
    fn reuse_locked_page(
        &self,
        pt: &mut parking_lot::MutexGuard<'_, super::pgtable::PageTables>,
        page: Hva,
        mut p: PresentPte,
    ) -> Result<Option<Step>, MmError> {
        if !pt.trylock_page(p.pfn) {
            pt.get_page(p.pfn);
            self.lock_page(pt, p.pfn)?;
            if pt.pte(page) != Some(Pte::Present(p)) {
                // Unmapped or changed while we slept: our reference may be
                // the last one now.
                self.unlock_page(pt, p.pfn);
                if let Some(freed) = pt.put_page(p.pfn) {
                    parking_lot::MutexGuard::unlocked(pt, || self.free_folios([freed]));
                }
                return Ok(Some(Step::Retry));
            }
            // Still mapped here: the mapping holds a reference besides ours.
            let freed = pt.put_page(p.pfn);
            debug_assert!(freed.is_none(), "a mapped page is referenced");
        }
        // Under a huge PMD the page is mapped once, by the PMD: the whole
        // PMD is reused (do_huge_pmd_wp_page), `update` writes its bits.
        let reuse = pt
            .page_meta(p.pfn)
            .is_some_and(|m| !m.ksm && m.mapcount == 1);
        if reuse {
            // wp_page_reuse: we are the only user; the swap copy (if any)
            // is about to become stale.
            if let Some(slot) = pt.folio_mut(p.pfn).and_then(|m| m.swap.take()) {
                pt.swap.put(slot)?;
            }
            p.writable = true;
            p.young = true;
            p.dirty = true;
            pt.update(page, p);
            inc(&self.stats.pgreuse);
        }
        self.unlock_page(pt, p.pfn);
        Ok(reuse.then_some(Step::Done(p)))
    }

    /// `do_anonymous_page`: a zeroed page. A read fault maps it read-only
    /// and clean (Linux maps the zero page); the first write upgrades it in
    /// place. A write fault first tries the large folio sizes the THP
    /// settings allow here, largest first (`do_huge_pmd_anonymous_page`,
    /// then `alloc_anon_folio`); reads never get one, as Linux maps the
    /// (huge) zero page for them.
    fn do_anonymous_page(
        &self,
        vmas: &VmaTree,
        vma: &Vma,
        page: Hva,
        write: bool,
    ) -> Result<Step, MmError> {
        if write {
            let cfg = *self.thp.read();
            if cfg.any_enabled() {
                for order in cfg.allowable_orders(vma, page) {
                    if let Some(step) = self.do_anonymous_folio(page, order)? {
                        return Ok(step);
                    }
                }
            }
        }
        let pfn = self.alloc_page(vmas)?;
        let mut pt = self.pt.lock();
        if pt.pte(page).is_some() {
            drop(pt);
            self.free_frames([pfn]);
            return Ok(Step::Retry);
        }
        pt.new_page(pfn, page);
        let p = PresentPte::fresh(pfn, write);
        pt.map(page, p);
        inc(&self.stats.pgfault_zero);
        Ok(Step::Done(p))
    }

    /// `do_swap_page`: reads the page back. It stays in the swap cache (clean,
    /// read-only) unless the fault is a write.
    fn do_swap_page(
        &self,
        vmas: &VmaTree,
        page: Hva,
        slot: super::SwapSlot,
        write: bool,
    ) -> Result<Step, MmError> {
        crate::trace::emit!(SwapIn { hva: page, write });
        let pfn = self.alloc_page(vmas)?;
        let mut pt = self.pt.lock();
        if pt.pte(page) != Some(Pte::Swap(slot)) {
            drop(pt);
            self.free_frames([pfn]);
            return Ok(Step::Retry);
        }
        let data = pt.swap.read(slot)?;
        self.memory().write_frame(pfn, 0, data)?;
        pt.ptes.remove(&super::pgtable::vpn(page));
        pt.new_page(pfn, page);
        // The new page is locked while it joins the swap cache and is
        // mapped, and the write-reuse decision is taken under that lock.
        let locked = pt.trylock_page(pfn);
        debug_assert!(locked, "a page nobody else can see yet");
        if write {
            pt.swap.put(slot)?; // the PTE's reference; no swap cache
        } else if let Some(m) = pt.folio_mut(pfn) {
            m.swap = Some(slot); // the PTE's reference moves to the swap cache
        }
        let p = PresentPte::fresh(pfn, write);
        pt.map(page, p);
        if locked {
            self.unlock_page(&mut pt, pfn);
        }
        inc(&self.stats.pswpin);
        Ok(Step::Done(p))
    }

    /// `wp_page_copy`: copy-on-write of a shared page (a KSM page): the copy
    /// replaces the PTE between `invalidate_range_start` and
    /// `invalidate_range_only_end`, with `change_pte` telling secondary MMUs
    /// the new frame.
    fn wp_page_copy(&self, vmas: &VmaTree, page: Hva, old: PresentPte) -> Result<Step, MmError> {
        let new_pfn = self.alloc_page(vmas)?;
        self.memory().copy_frame(old.pfn, new_pfn)?;
        let range = MmuNotifierRange::new(MmuNotifyEvent::CowBreak, page, page + PAGE_SIZE);
        self.mn_invalidate_range_start(&range);
        let installed = {
            let mut pt = self.pt.lock();
            if pt.present(page).map(|p| p.pfn) != Some(old.pfn) {
                None
            } else {
                // ptep_clear_flush_notify, then set_pte_at_notify.
                pt.unmap(page);
                self.mn_invalidate_range(page, page + PAGE_SIZE);
                pt.new_page(new_pfn, page);
                let p = PresentPte::fresh(new_pfn, true);
                if self.notifiers.has_notifiers() {
                    self.notifiers.change_pte(
                        page,
                        NotifierPte {
                            frame: new_pfn,
                            writable: true,
                        },
                    );
                }
                pt.map(page, p);
                Some(p)
            }
        };
        self.mn_invalidate_range_end(&range, true);
        match installed {
            Some(p) => {
                self.put_pages(vec![old.pfn]);
                inc(&self.stats.pgcow);
                crate::trace::emit!(Cow {
                    hva: page,
                    old_frame: old.pfn,
                    new_frame: p.pfn,
                });
                Ok(Step::Done(p))
            }
            None => {
                self.free_frames([new_pfn]);
                Ok(Step::Retry)
            }
        }
    }

    /// A frame for a new anonymous page; on exhaustion, reclaim a few cold
    /// pages once and try again (direct reclaim).
    fn alloc_page(&self, vmas: &VmaTree) -> Result<Pfn, MmError> {
        match self.frames.alloc(self.frame_owner()) {
            Err(MmError::OutOfFrames) => {
                self.direct_reclaim(vmas, 32)?;
                self.frames.alloc(self.frame_owner())
            }
            r => r,
        }
    }

    /// Runs `f` on the frame behind `hva` with the page present (and
    /// writable for a write) and the page-table lock held, so the page
    /// cannot be unmapped while `f` touches it (`access_process_vm`).
    fn with_page<R>(
        &self,
        vmas: &VmaTree,
        hva: Hva,
        access: Access,
        f: impl FnOnce(Pfn) -> Result<R, MmError>,
    ) -> Result<R, MmError> {
        let page = hva & !(PAGE_SIZE - 1);
        let mut f = Some(f);
        for _ in 0..MAX_FAULT_RETRIES {
            let p = self.fault_locked(vmas, hva, access)?;
            let mut pt = self.pt.lock();
            match pt.present(page) {
                Some(mut cur) if cur.pfn == p.pfn && (cur.writable || !access.is_write()) => {
                    cur.young = true;
                    cur.dirty |= access.is_write();
                    pt.update(page, cur);
                    let f = f.take().ok_or(MmError::InvalidArgument("page access"))?;
                    return f(cur.pfn);
                }
                _ => continue, // raced with an unmap: fault again
            }
        }
        Err(MmError::InvalidArgument("page access retried too often"))
    }

    /// Reads `buf.len()` bytes at `hva`, faulting pages in as a process
    /// reading its own memory would.
    pub fn read(&self, hva: Hva, buf: &mut [u8]) -> Result<(), MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        for_each_page_piece(hva, buf.len(), |addr, off, range| {
            self.with_page(&vmas, addr, Access::Read, |pfn| {
                self.memory().read_frame(pfn, off, &mut buf[range])
            })
        })
    }

    /// Writes `buf` at `hva`, faulting pages in for writing (copy-on-write
    /// of shared pages, swap-in) as a process writing its memory would.
    pub fn write(&self, hva: Hva, buf: &[u8]) -> Result<(), MmError> {
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        for_each_page_piece(hva, buf.len(), |addr, off, range| {
            self.with_page(&vmas, addr, Access::Write, |pfn| {
                self.memory().write_frame(pfn, off, &buf[range])
            })
        })
    }

    /// Atomically replaces the 8-byte word at `hva` (8-byte aligned) with
    /// `new` if it equals `old`, as a CPU setting Accessed/Dirty bits in a
    /// page table held in this memory would. Returns the value found.
    pub fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<u64, MmError> {
        if !hva.is_multiple_of(8) {
            return Err(MmError::InvalidArgument("address is not 8-byte aligned"));
        }
        self.check_alive()?;
        let vmas = self.mmap_lock.read();
        self.with_page(&vmas, hva, Access::Write, |pfn| {
            let word = self
                .memory()
                .frame_word(pfn, ((hva & (PAGE_SIZE - 1)) / 8) as usize)?;
            Ok(
                match word.compare_exchange(
                    old,
                    new,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                ) {
                    Ok(v) | Err(v) => v,
                },
            )
        })
    }

    /// Reads the 8-byte word at `hva` (8-byte aligned).
    pub fn read_u64(&self, hva: Hva) -> Result<u64, MmError> {
        let mut b = [0u8; 8];
        if !hva.is_multiple_of(8) {
            return Err(MmError::InvalidArgument("address is not 8-byte aligned"));
        }
        self.read(hva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Calls `f(addr, offset in page, range of the buffer)` for each piece of
/// a `len`-byte access at `hva` that stays within one page.
fn for_each_page_piece(
    hva: Hva,
    len: usize,
    mut f: impl FnMut(Hva, usize, std::ops::Range<usize>) -> Result<(), MmError>,
) -> Result<(), MmError> {
    let mut done = 0usize;
    while done < len {
        let addr = hva
            .checked_add(done as u64)
            .ok_or(MmError::InvalidArgument("address overflows"))?;
        let off = (addr & (PAGE_SIZE - 1)) as usize;
        let n = (PAGE_SIZE as usize - off).min(len - done);
        f(addr, off, done..done + n)?;
        done += n;
    }
    Ok(())
}
