//! The shadow fault path (`FNAME(page_fault)` + `FNAME(fetch)`), with KVM's
//! invalidation-sequence retry (`mmu_invalidate_retry`).
//!
//! Ordering, as in KVM: read `mmu_invalidate_seq` *before* translating
//! gva → gpa → hva → frame; translate without the MMU lock (the walk and the
//! host fault may sleep); take the MMU lock; if an invalidation is in
//! progress or the sequence moved, the frame may already be on its way out:
//! drop everything and retry. Otherwise no invalidation of this hva can have
//! started since the frame was looked up, and any later one will find the
//! spte in the rmap and zap it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::mm::{Access as HostAccess, FrameAccess, MmError};

use super::guest_mem::GuestMem;
use super::invalidate::SeqRead;
use super::pte::{PAGE_SHIFT, PT64_ROOT_4LEVEL, level_size, pt_index};
use super::shadow_page::Role;
use super::spte;
use super::stats::{add_ns, inc, max};
use super::tlb::FlushReason;
use super::walk::{Access, GuestMmu, PageFault, PfErrorCode, WalkError};
use super::{MmuError, ShadowMmu};

/// Bound on retries of one fault; each means an invalidation raced it.
const MAX_FAULT_RETRIES: u32 = 1000;

/// What the guest's "resolve this page fault" request gets back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// An spte was installed: retry the access.
    Fixed,
    /// Nothing to do but retry (a guest page table kept changing under the
    /// walk).
    Retry,
    /// The guest's own fault: deliver this #PF to the guest.
    Guest(PageFault),
    /// The guest PTE points at a gpa outside every memslot: MMIO or no
    /// memory. Nothing is mapped.
    Mmio { gpa: u64 },
    /// The host has no page the guest may use there (guest RAM munmapped or
    /// mprotected by the host): the VMM decides what the guest sees.
    HostFault { gpa: u64, error: MmError },
}

impl ShadowMmu {
    /// Resolves a guest page fault at `gva` with hardware error code
    /// `error_code` on `vcpu`.
    pub fn page_fault(
        &self,
        vcpu: usize,
        gva: u64,
        error_code: PfErrorCode,
    ) -> Result<FaultOutcome, MmuError> {
        let access = Access::from_error_code(error_code & !PfErrorCode::RSVD);
        self.page_fault_access(vcpu, gva, access)
    }

    /// [`ShadowMmu::page_fault`] for an access described in full (EFLAGS.AC
    /// too, which SMAP needs: KVM reads it from the vCPU in
    /// `permission_fault`).
    pub fn page_fault_access(
        &self,
        vcpu: usize,
        gva: u64,
        access: Access,
    ) -> Result<FaultOutcome, MmuError> {
        self.check_vcpu(vcpu)?;
        if self.inner.cfg.reserved.is_some_and(|r| r.contains(gva)) {
            // The VMM's slot: never walk the guest's tables there, so no
            // guest mapping can ever be built over it.
            let mode = self.inner.paging.lock()[vcpu];
            inc(&self.inner.stats.pf_guest);
            return Ok(FaultOutcome::Guest(
                GuestMmu::new(mode).reserved_fault(gva, access),
            ));
        }
        for retries in 0..MAX_FAULT_RETRIES {
            match self.try_fault(vcpu, gva, access)? {
                Some(outcome) => {
                    max(&self.inner.stats.pf_retry_max, u64::from(retries));
                    return Ok(outcome);
                }
                None => inc(&self.inner.stats.pf_retry),
            }
        }
        Err(MmuError::TooManyRetries(MAX_FAULT_RETRIES))
    }

    /// `mmu_invalidate_retry` for an outcome that installs nothing (a guest
    /// #PF, MMIO, a host fault). The walk reads each guest table from the
    /// frame `hva_to_pfn` returned, after the host's locks are dropped, so an
    /// invalidation running meanwhile may have freed that frame (poisoned or
    /// handed to someone else) under the read: the outcome would then come
    /// from bytes that were never the guest's, e.g. a reserved-bit #PF out of
    /// the free poison. Frames are freed only after `invalidate_range_end`,
    /// so if no invalidation of a page the walk touched was in progress or
    /// ended since `seq`, every read was of a live table.
    /// If so, waits for the invalidations of those pages in progress to end
    /// before the retry.
    fn invalidation_raced(&self, seq: &SeqRead<'_>, pages: &[u64]) -> Result<bool, MmuError> {
        let raced = {
            let st = self.inner.state.lock();
            if st.released {
                return Err(MmuError::Released);
            }
            seq.retry(pages)
        };
        if raced {
            let stats = &self.inner.stats;
            self.inner
                .inv
                .wait_for(pages, || inc(&stats.pf_invalidate_wait));
        }
        Ok(raced)
    }

    /// One attempt; `None` means "raced an invalidation, retry".
    fn try_fault(
        &self,
        vcpu: usize,
        gva: u64,
        access: Access,
    ) -> Result<Option<FaultOutcome>, MmuError> {
        let inner = &self.inner;
        inner.fatal.check()?;
        if inner.state.lock().released {
            return Err(MmuError::Released);
        }
        // smp_rmb() in KVM: the sequence is read before anything it guards.
        let seq = inner.inv.begin_read();
        let paging = inner.paging.lock()[vcpu];
        let gm = GuestMem::new(&inner.mm, &inner.slots);
        let t = Instant::now();
        let walked = GuestMmu::new(paging).walk_addr(&gm, gva, access);
        add_ns(&inner.stats.pf_walk_ns, t);
        let walk = match walked {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                if let Some(e) = gm.host_error.borrow_mut().take() {
                    return Err(MmuError::Memory(e));
                }
                if self.invalidation_raced(&seq, &gm.touched.borrow())? {
                    return Ok(None);
                }
                inc(&inner.stats.pf_guest);
                return Ok(Some(FaultOutcome::Guest(pf)));
            }
            Err(WalkError::AdRetriesExhausted { .. }) => return Ok(Some(FaultOutcome::Retry)),
        };
        let gpa = walk.gpa();
        let Some(hva) = inner.slots.gfn_to_hva(walk.gfn) else {
            if self.invalidation_raced(&seq, &gm.touched.borrow())? {
                return Ok(None);
            }
            inc(&inner.stats.pf_mmio);
            return Ok(Some(FaultOutcome::Mmio { gpa }));
        };
        gm.touched.borrow_mut().push(hva);
        let host_access = if access.write {
            HostAccess::Write
        } else {
            HostAccess::Read
        };
        let t = Instant::now();
        let host = inner.mm.hva_to_pfn(hva, host_access);
        add_ns(&inner.stats.pf_host_ns, t);
        let host = match host {
            Ok(h) => h,
            Err(MmError::OutOfFrames) => return Err(MmuError::Memory(MmError::OutOfFrames)),
            Err(error) => {
                if self.invalidation_raced(&seq, &gm.touched.borrow())? {
                    return Ok(None);
                }
                inc(&inner.stats.pf_host_error);
                return Ok(Some(FaultOutcome::HostFault { gpa, error }));
            }
        };
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = inner.race_hook.lock().clone() {
            hook(hva);
        }
        let reads = gm.reads.take();
        let touched = gm.touched.take();

        let t_install = Instant::now();
        let mut st = inner.state.lock();
        if st.released {
            return Err(MmuError::Released);
        }
        // mmu_invalidate_retry_gfn: under the lock, after the translation,
        // for the pages this translation relied on.
        if seq.retry(&touched) {
            drop(st);
            drop(seq);
            inner
                .inv
                .wait_for(&touched, || inc(&inner.stats.pf_invalidate_wait));
            return Ok(None);
        }
        let Some(root) = st.vcpu_roots[vcpu] else {
            return Err(MmuError::NoRoot(vcpu));
        };
        // FNAME(gpte_changed): the guest entries must still be what the walk
        // used; they are re-read from the frames the walk read them from
        // (the sequence check above guarantees those frames are current).
        let mem = inner.mm.memory();
        for l in walk.level..=PT64_ROOT_4LEVEL {
            let i = usize::from(l - 1);
            let pte_gpa = walk.pte_gpa[i];
            let Some(&(_, pfn)) = reads.iter().rev().find(|(g, _)| *g == pte_gpa) else {
                return Ok(None);
            };
            let now = mem
                .frame_word(pfn, ((pte_gpa % 4096) / 8) as usize)
                .map_err(MmuError::Memory)?
                .load(Ordering::Acquire);
            if now != walk.ptes[i] {
                return Ok(Some(FaultOutcome::Retry));
            }
        }

        let mut ctx = inner.ctx(&mut st);
        let path_tables = &walk.table_gfn[usize::from(walk.level - 1)..];
        let writes_own_table = access.write && path_tables.contains(&walk.gfn);
        if access.write && ctx.is_protected(walk.gfn) {
            // The guest writes one of its page tables: drop what we derived
            // from it so the write may land (kvm_mmu_unprotect_page).
            inc(&inner.stats.mmu_unsync);
            ctx.unprotect_gfn(walk.gfn, FlushReason::Zapped)?;
        }

        // FNAME(fetch): build the path of shadow tables down to level 1.
        let mut sp = root;
        for level in (2..=PT64_ROOT_4LEVEL).rev() {
            let idx = pt_index(gva, level);
            let child_level = level - 1;
            let (gfn, role, protect) = if child_level >= walk.level {
                let gfn = walk.table_gfn[usize::from(child_level - 1)];
                let role = Role::new(
                    child_level,
                    walk.pt_access[usize::from(child_level - 1)].bits(),
                    false,
                    &paging,
                );
                (gfn, role, !(writes_own_table && gfn == walk.gfn))
            } else {
                // Below a guest large page: a direct page for the 4 KiB
                // split of the range the child covers.
                let span = level_size(level) >> PAGE_SHIFT;
                let role = Role::new(child_level, walk.pte_access.bits(), true, &paging);
                (walk.gfn & !(span - 1), role, true)
            };
            let e = ctx.word(sp, idx)?.load(Ordering::Acquire);
            if spte::is_present(e) {
                let child = spte::pfn(e);
                if ctx
                    .st
                    .pages
                    .get(&child)
                    .is_some_and(|c| c.gfn == gfn && c.role == role && (c.unsync || protect))
                {
                    sp = child;
                    continue;
                }
                // A stale link (an unsync parent, or a changed role).
                ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
            }
            let child = ctx.get_page(gfn, role, protect)?;
            ctx.link(sp, idx, child)?;
            sp = child;
        }

        // The leaf: guest rights ∧ host rights, writable only if the guest
        // PTE is dirty and the gfn is not a write-protected guest table.
        let idx = pt_index(gva, 1);
        let acc = walk.shadow_pte_access(&paging);
        let writable = acc.contains(super::pte::PteAccess::WRITE)
            && host.writable
            && !ctx.is_protected(walk.gfn);
        let new = spte::make_leaf(host.pfn, acc, writable, paging.efer_nx, access.write);
        let same = ctx
            .st
            .pages
            .get(&sp)
            .is_some_and(|p| p.leaf_gfns[idx] == walk.gfn);
        let old = ctx.word(sp, idx)?.swap(new, Ordering::AcqRel);
        if spte::is_present(old) && !(same && spte::pfn(old) == host.pfn) {
            // Replacing a different translation: forget it and flush it.
            ctx.word(sp, idx)?.store(old, Ordering::Release);
            ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
            ctx.word(sp, idx)?.store(new, Ordering::Release);
            ctx.rmap_add(walk.gfn, (sp, idx as u16));
        } else if !spte::is_present(old) {
            ctx.rmap_add(walk.gfn, (sp, idx as u16));
        } else if spte::is_writable(old) && !writable {
            ctx.flush.push(super::tlb::FlushFrame {
                pfn: host.pfn,
                reason: FlushReason::WriteProtected,
            });
        }
        inc(&inner.stats.pf_fixed);
        ctx.flush_now(inner.tlb.as_ref())?;
        add_ns(&inner.stats.pf_install_ns, t_install);
        Ok(Some(FaultOutcome::Fixed))
    }
}
