//! The shadow MMU as an MMU notifier (`kvm_mmu_notifier_*` in
//! `virt/kvm/kvm_main.c`, `kvm_unmap_hva_range` / `kvm_set_spte_hva` /
//! `kvm_age_hva` in `arch/x86/kvm/mmu/mmu.c`).
//!
//! Every callback finds sptes through the rmap by gfn (hva → gfn through the
//! memslots), never by scanning the tables, and sends the TLB flush for
//! what it changed before it returns.

use std::sync::atomic::Ordering;

use crate::mm::PAGE_SIZE;
use crate::notifier::{
    MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent, NotifierError, NotifierPte,
};

use super::pte::PT_ACCESSED_MASK;
use super::shadow_page::Ctx;
use super::spte;
use super::stats::inc;
use super::tlb::{FlushFrame, FlushReason};
use super::{Inner, MmuError};

impl Inner {
    /// The gfn ranges `[start, end)` of the host mm backs.
    fn gfn_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.slots.hva_range_to_gfns(start, end)
    }

    /// `kvm_unmap_hva_range`: zaps every leaf spte of the range, and the
    /// shadow pages of guest tables living there (their content came from
    /// the frames going away).
    fn unmap_range(
        &self,
        ctx: &mut Ctx<'_>,
        start: u64,
        end: u64,
        reason: FlushReason,
    ) -> Result<(), MmuError> {
        for (g0, g1) in self.gfn_ranges(start, end) {
            for (_, (sp, idx)) in ctx.rmap_range(g0, g1) {
                ctx.zap_entry(sp, idx as usize, reason)?;
            }
            let tables: Vec<u64> = ctx.st.by_gfn.range_keys(g0, g1);
            for gfn in tables {
                ctx.unprotect_gfn(gfn, reason)?;
            }
        }
        Ok(())
    }

    /// The end of a callback's work: the flush is sent, and any error on the
    /// way (the MMU cannot return it to the mm) stops the MMU and, through
    /// the fatal handler, the VM.
    fn finish(&self, mut ctx: Ctx<'_>, work: Result<(), MmuError>) {
        let flushed = ctx.flush_now(self.tlb.as_ref());
        if let Err(e) = work.and(flushed) {
            self.fatal.raise(e);
        }
    }

    /// Clears Accessed bits of the range's sptes; returns whether any was set
    /// (`kvm_age_rmapp`). `test_only` leaves them set (`kvm_test_age_rmapp`).
    fn age_range(&self, ctx: &mut Ctx<'_>, start: u64, end: u64, test_only: bool) -> bool {
        let mut young = false;
        for (g0, g1) in self.gfn_ranges(start, end) {
            for (_, (sp, idx)) in ctx.rmap_range(g0, g1) {
                let Ok(w) = ctx.word(sp, idx as usize) else {
                    continue;
                };
                if test_only {
                    young |= spte::is_accessed(w.load(Ordering::Acquire));
                    continue;
                }
                let old = w.fetch_and(!PT_ACCESSED_MASK, Ordering::AcqRel);
                if spte::is_present(old) && spte::is_accessed(old) {
                    young = true;
                    crate::trace::emit!(AccessedCleared {
                        sp,
                        idx: idx.into(),
                        frame: spte::pfn(old),
                    });
                    // A 2 MiB spte's one Accessed bit covers 512 frames.
                    let n = if spte::is_large(old) { 512 } else { 1 };
                    for pfn in spte::pfn(old)..spte::pfn(old) + n {
                        ctx.flush.push(FlushFrame {
                            pfn,
                            reason: FlushReason::AccessedCleared,
                        });
                    }
                }
            }
        }
        young
    }
}

impl MmuNotifierOps for Inner {
    fn release(&self) {
        inc(&self.stats.mn_release);
        let mut st = self.state.lock();
        st.released = true;
        for r in st.vcpu_roots.iter_mut() {
            *r = None;
        }
        let roots = std::mem::take(&mut st.roots);
        let mut ctx = self.ctx(&mut st);
        let work = roots
            .into_iter()
            .try_for_each(|r| ctx.drop_root(r.sp))
            .and_then(|()| {
                let rest: Vec<u64> = ctx.st.pages.keys().copied().collect();
                rest.into_iter()
                    .try_for_each(|p| ctx.zap_page(p, FlushReason::Freed))
            });
        self.finish(ctx, work);
    }

    fn invalidate_range_start(&self, range: &MmuNotifierRange) -> Result<(), NotifierError> {
        inc(&self.stats.mn_invalidate_range_start);
        // Recorded before the MMU lock is taken, so a fault that checks after
        // our zap sees it, and `end` always balances it (also when a
        // non-blockable start below fails).
        self.inv.begin(range.start, range.end);
        let mut st = if range.blockable() {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(g) => g,
                None => return Err(NotifierError::Again),
            }
        };
        // Only exit frees every frame for sure: a KSM frame outlives the
        // unmap of one of its mappings, so a range zap must keep contents.
        let reason = match range.event {
            MmuNotifyEvent::Release => FlushReason::Freed,
            _ => FlushReason::Zapped,
        };
        let mut ctx = self.ctx(&mut st);
        let work = self.unmap_range(&mut ctx, range.start, range.end, reason);
        // Returns only once no vCPU can reach the old frames, or with the
        // MMU (and the VM) stopped.
        self.finish(ctx, work);
        Ok(())
    }

    fn invalidate_range_end(&self, range: &MmuNotifierRange) {
        inc(&self.stats.mn_invalidate_range_end);
        self.inv.end(range.start, range.end);
    }

    fn invalidate_range(&self, _start: u64, _end: u64) {
        // Our sptes were dropped in invalidate_range_start; nothing shares
        // the host page table.
        inc(&self.stats.mn_invalidate_range);
    }

    fn change_pte(&self, address: u64, pte: NotifierPte) {
        inc(&self.stats.mn_change_pte);
        let mut st = self.state.lock();
        let mut ctx = self.ctx(&mut st);
        let mut work = Ok(());
        for (g0, g1) in self.gfn_ranges(address, address + PAGE_SIZE) {
            for (_, (sp, idx)) in ctx.rmap_range(g0, g1) {
                let w = match ctx.word(sp, idx as usize) {
                    Ok(w) => w,
                    Err(e) => {
                        work = Err(e);
                        continue;
                    }
                };
                let mut old = w.load(Ordering::Acquire);
                // One page of a 2 MiB spte cannot be repointed: zap it
                // (it is gone already: change_pte runs inside a range
                // whose start zapped it).
                if pte.writable || spte::is_large(old) {
                    work = work.and(ctx.zap_entry(sp, idx as usize, FlushReason::Zapped));
                    continue;
                }
                // The CPU may set A/D concurrently: compare-and-exchange.
                loop {
                    let new = spte::repoint_readonly(old, pte.frame);
                    match w.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => break,
                        Err(cur) => old = cur,
                    }
                }
                crate::trace::emit!(SpteRepointed {
                    sp,
                    idx: idx.into(),
                    old_frame: spte::pfn(old),
                    new_frame: pte.frame,
                });
                ctx.flush.push(FlushFrame {
                    pfn: spte::pfn(old),
                    reason: FlushReason::Repointed,
                });
            }
        }
        self.finish(ctx, work);
    }

    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        inc(&self.stats.mn_clear_flush_young);
        let mut st = self.state.lock();
        let mut ctx = self.ctx(&mut st);
        let young = self.age_range(&mut ctx, start, end, false);
        self.finish(ctx, Ok(()));
        young
    }

    fn clear_young(&self, start: u64, end: u64) -> bool {
        inc(&self.stats.mn_clear_young);
        let mut st = self.state.lock();
        let mut ctx = self.ctx(&mut st);
        let young = self.age_range(&mut ctx, start, end, false);
        // No flush: a stale Accessed bit only delays aging (Linux's
        // clear_young contract).
        ctx.flush.clear();
        young
    }

    fn test_young(&self, address: u64) -> bool {
        inc(&self.stats.mn_test_young);
        let mut st = self.state.lock();
        let mut ctx = self.ctx(&mut st);
        self.age_range(&mut ctx, address, address + PAGE_SIZE, true)
    }
}

/// Keys of a map in a range, for the gfn index.
trait RangeKeys {
    fn range_keys(&self, g0: u64, g1: u64) -> Vec<u64>;
}

impl<V> RangeKeys for std::collections::HashMap<u64, V> {
    fn range_keys(&self, g0: u64, g1: u64) -> Vec<u64> {
        if g1.saturating_sub(g0) <= self.len() as u64 {
            (g0..g1).filter(|g| self.contains_key(g)).collect()
        } else {
            self.keys()
                .copied()
                .filter(|g| (g0..g1).contains(g))
                .collect()
        }
    }
}
