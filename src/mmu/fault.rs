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

use crate::mm::{
    Access as HostAccess, FrameAccess, HPAGE_PMD_NR, HPAGE_PMD_SIZE, HostPfn, Hva, MmError, Pfn,
};

use super::guest_mem::GuestMem;
use super::invalidate::{HostRange, SeqRead, page_range};
use super::pte::{
    PAGE_SHIFT, PG_LEVEL_2M, PG_LEVEL_4K, PT64_ROOT_4LEVEL, PteAccess, level_size, pt_index,
};
use super::shadow_page::{Ctx, Role};
use super::spte;
use super::stats::{add_ns, inc, max};
use super::tlb::{FlushFrame, FlushReason};
use super::walk::{Access, GuestMmu, GuestWalk, PageFault, PagingState, PfErrorCode, WalkError};
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
    pub(super) fn invalidation_raced(
        &self,
        seq: &SeqRead<'_>,
        pages: &[HostRange],
    ) -> Result<bool, MmuError> {
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
        let a = self.begin_attempt(vcpu)?;
        let t = Instant::now();
        let walked = GuestMmu::new(a.paging).walk_addr(&a.gm, gva, access);
        add_ns(&inner.stats.pf_walk_ns, t);
        let walk = match walked {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                if let Some(e) = a.gm.host_error.borrow_mut().take() {
                    return Err(MmuError::Memory(e));
                }
                if self.attempt_raced(&a)? {
                    return Ok(None);
                }
                inc(&inner.stats.pf_guest);
                return Ok(Some(FaultOutcome::Guest(pf)));
            }
            Err(WalkError::AdRetriesExhausted { .. }) => return Ok(Some(FaultOutcome::Retry)),
        };
        let gpa = walk.gpa();
        let Some(hva) = inner.slots.gfn_to_hva(walk.gfn) else {
            if self.attempt_raced(&a)? {
                return Ok(None);
            }
            inc(&inner.stats.pf_mmio);
            return Ok(Some(FaultOutcome::Mmio { gpa }));
        };
        a.gm.touched.borrow_mut().push(page_range(hva));
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
                if self.attempt_raced(&a)? {
                    return Ok(None);
                }
                inc(&inner.stats.pf_host_error);
                return Ok(Some(FaultOutcome::HostFault { gpa, error }));
            }
        };
        self.install(a.install(&walk, hva, host, Origin::Fault))
    }

    /// What a fault or pre-fault attempt reads before its walk, in KVM's
    /// order: the invalidation sequence first (`smp_rmb()`: it is read
    /// before anything it guards), then the vCPU's paging mode.
    pub(super) fn begin_attempt(&self, vcpu: usize) -> Result<Attempt<'_>, MmuError> {
        let inner = &self.inner;
        inner.fatal.check()?;
        if inner.state.lock().released {
            return Err(MmuError::Released);
        }
        let seq = inner.inv.begin_read();
        let paging = inner.paging.lock()[vcpu];
        Ok(Attempt {
            vcpu,
            seq,
            paging,
            gm: GuestMem::new(&inner.mm, &inner.slots),
        })
    }

    /// [`Self::invalidation_raced`] over every page the attempt's walk
    /// relied on so far.
    pub(super) fn attempt_raced(&self, a: &Attempt<'_>) -> Result<bool, MmuError> {
        self.invalidation_raced(&a.seq, &a.gm.touched.borrow())
    }

    /// `kvm_mmu_hugepage_adjust` before the MMU lock: a 2 MiB spte is
    /// possible when the guest maps a 2 MiB (or 1 GiB) page, its 512 gfns
    /// lie in one memslot at a 2 MiB-aligned hva, and the host maps that
    /// hva range with a huge PMD whose frames are the ones `hva_to_pfn`
    /// gave (`host_pfn_mapping_level`). Whether a shadowed guest table
    /// lives in the range (`disallow_lpage`) is checked under the lock.
    pub(super) fn host_large(
        &self,
        walk: &GuestWalk,
        hva: Hva,
        host: &HostPfn,
    ) -> Option<LargeMap> {
        if walk.level < PG_LEVEL_2M {
            return None;
        }
        let inner = &self.inner;
        let base_gfn = walk.gfn & !(HPAGE_PMD_NR - 1);
        let haddr = inner.slots.gfn_range_to_hva(base_gfn, HPAGE_PMD_NR)?;
        if !haddr.is_multiple_of(HPAGE_PMD_SIZE) {
            return None;
        }
        let pmd = inner.mm.huge_pmd(hva)?;
        (pmd.haddr == haddr && pmd.pfn + (walk.gfn - base_gfn) == host.pfn).then_some(LargeMap {
            base_gfn,
            haddr,
            pfn: pmd.pfn,
            writable: pmd.writable && host.writable,
        })
    }

    /// The install half of the fault (`FNAME(fetch)` under the MMU lock),
    /// shared with the pre-fault: the sequence check for every host range
    /// the translation relied on, `FNAME(gpte_changed)`, the path of
    /// shadow tables, the leaf (4 KiB, or 2 MiB where `large` allows and
    /// no shadowed guest table lives in the range), then the prefetch.
    pub(super) fn install(&self, req: Install<'_, '_>) -> Result<Option<FaultOutcome>, MmuError> {
        let inner = &self.inner;
        let Install {
            vcpu,
            seq,
            walk,
            gm,
            hva,
            host,
            paging,
            origin,
        } = req;
        let large = self.host_large(walk, hva, &host);
        let reads = gm.reads.take();
        let reads = &reads[..];
        let prefetch = match (origin, large) {
            (Origin::Fault, None) => self.prefetch_candidates(walk, reads, &paging),
            _ => Vec::new(),
        };
        #[cfg(feature = "test-hooks")]
        if origin == Origin::Fault {
            // Cloned out first: the hook may park or run host operations,
            // and other faults must not wait on the hook's own lock.
            let hook = inner.race_hook.lock().clone();
            if let Some(hook) = hook {
                hook(hva);
            }
        }
        let mut touched = gm.touched.take();
        let gva = walk.gva;
        let access = walk.access;
        if let Some(l) = &large {
            // A 2 MiB spte relies on every page of the huge PMD.
            touched.push((l.haddr, l.haddr + HPAGE_PMD_SIZE));
        }
        let t_install = Instant::now();
        let mut st = inner.state.lock();
        if st.released {
            return Err(MmuError::Released);
        }
        // mmu_invalidate_retry_gfn: under the lock, after the translation,
        // for the pages this translation relied on.
        if seq.retry(&touched) {
            drop(st);
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

        // FNAME(fetch): build the path of shadow tables down to level 2,
        // then down to level 1 unless a 2 MiB leaf goes at level 2.
        let mut sp = root;
        for level in (PG_LEVEL_2M + 1..=PT64_ROOT_4LEVEL).rev() {
            sp = descend(&mut ctx, walk, &paging, writes_own_table, sp, level)?;
        }
        let large = large.filter(|l| !ctx.lpage_disallowed(l.base_gfn));
        let leaf_level = if large.is_some() {
            PG_LEVEL_2M
        } else {
            sp = descend(&mut ctx, walk, &paging, writes_own_table, sp, PG_LEVEL_2M)?;
            PG_LEVEL_4K
        };

        // The leaf: guest rights ∧ host rights, writable only if the guest
        // PTE is dirty and no gfn it maps is a write-protected guest table
        // (a 2 MiB leaf covers none: lpage_disallowed).
        let idx = pt_index(gva, leaf_level);
        let acc = walk.shadow_pte_access(&paging);
        let (pfn, gfn, host_writable) = match &large {
            Some(l) => (l.pfn, l.base_gfn, l.writable),
            None => (
                host.pfn,
                walk.gfn,
                host.writable && !ctx.is_protected(walk.gfn),
            ),
        };
        let writable = acc.contains(PteAccess::WRITE) && host_writable;
        let mut new = match origin {
            Origin::Fault => spte::make_leaf(pfn, acc, writable, paging.efer_nx, access.write),
            // Not an access: no Accessed bit, as KVM's prefetched sptes.
            Origin::PreFault => spte::make_spte(pfn, acc, writable, paging.efer_nx, false),
            // The guest declared the access (its PTE is A, and D where the
            // spte is writable): made as a write fault would make it.
            Origin::Populate => spte::make_leaf(pfn, acc, writable, paging.efer_nx, writable),
        };
        if large.is_some() {
            new = spte::make_large(new);
        }
        let same = ctx
            .st
            .pages
            .get(&sp)
            .is_some_and(|p| p.leaf_gfns.get(idx) == Some(&gfn));
        let old = ctx.word(sp, idx)?.swap(new, Ordering::AcqRel);
        let same = same && spte::pfn(old) == pfn && spte::is_large(old) == spte::is_large(new);
        if origin != Origin::Fault && spte::is_present(old) && same {
            // Already mapped: keep the spte, with the A/D bits the CPU set.
            ctx.word(sp, idx)?.store(old, Ordering::Release);
        } else if spte::is_present(old) && !same {
            // Replacing a different translation, or a link to a table of
            // 4 KiB sptes (`drop_parent_pte`): forget it and flush it.
            ctx.word(sp, idx)?.store(old, Ordering::Release);
            ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
            ctx.word(sp, idx)?.store(new, Ordering::Release);
            ctx.rmap_add(gfn, (sp, idx as u16));
        } else if !spte::is_present(old) {
            ctx.rmap_add(gfn, (sp, idx as u16));
        } else if spte::is_writable(old) && !writable {
            let n = if large.is_some() { HPAGE_PMD_NR } else { 1 };
            for f in pfn..pfn + n {
                ctx.flush.push(FlushFrame {
                    pfn: f,
                    reason: FlushReason::WriteProtected,
                });
            }
        }
        if origin == Origin::Fault {
            inc(&inner.stats.pf_fixed);
            if large.is_some() {
                inc(&inner.stats.pf_fixed_2m);
            }
        }
        if large.is_none() {
            self.prefetch_locked(&mut ctx, seq, sp, prefetch, &paging)?;
        }
        ctx.flush_now(inner.tlb.as_ref())?;
        add_ns(&inner.stats.pf_install_ns, t_install);
        Ok(Some(FaultOutcome::Fixed))
    }
}

/// How a translation is being installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// A guest access faulted: the spte starts Accessed (and Dirty for a
    /// write).
    Fault,
    /// `pre_fault`: no access happened; the spte starts with neither.
    PreFault,
    /// `populate`: an access the guest asked for in advance; the spte
    /// starts Accessed, and Dirty where it is writable (which needs a dirty
    /// guest PTE, rule 1).
    Populate,
}

/// A 2 MiB mapping the host allows for a fault (before the MMU lock).
#[derive(Clone, Copy, Debug)]
pub(super) struct LargeMap {
    /// First gfn of the range.
    pub base_gfn: u64,
    /// First hva of the huge PMD.
    pub haddr: Hva,
    /// Its first frame.
    pub pfn: Pfn,
    pub writable: bool,
}

/// Everything the install needs from the translation.
/// One fault or pre-fault attempt ([`ShadowMmu::begin_attempt`]).
pub(super) struct Attempt<'a> {
    pub vcpu: usize,
    pub seq: SeqRead<'a>,
    pub paging: PagingState,
    /// Every guest entry the walk reads and every host range the
    /// translation relies on.
    pub gm: GuestMem<'a>,
}

impl<'a> Attempt<'a> {
    /// The install of `walk`'s leaf at `hva`, backed by `host`.
    pub fn install<'w>(
        &'w self,
        walk: &'w GuestWalk,
        hva: Hva,
        host: HostPfn,
        origin: Origin,
    ) -> Install<'w, 'a> {
        Install {
            vcpu: self.vcpu,
            seq: &self.seq,
            walk,
            gm: &self.gm,
            hva,
            host,
            paging: self.paging,
            origin,
        }
    }
}

pub(super) struct Install<'w, 's> {
    pub vcpu: usize,
    pub seq: &'w SeqRead<'s>,
    pub walk: &'w GuestWalk,
    /// The walk's guest memory: every guest entry it read and every host
    /// range the translation relied on.
    pub gm: &'w GuestMem<'w>,
    /// The leaf's hva and what the host gave for it.
    pub hva: Hva,
    pub host: HostPfn,
    pub paging: PagingState,
    pub origin: Origin,
}

/// One step of `FNAME(fetch)`'s descent: the shadow page the entry
/// `pt_index(gva, level)` of `sp` must link to (a shadow of the guest table
/// at `level - 1`, or below a guest large page a direct page for its
/// 4 KiB split), reused when already linked, made and linked otherwise.
fn descend(
    ctx: &mut Ctx<'_>,
    walk: &GuestWalk,
    paging: &PagingState,
    writes_own_table: bool,
    sp: Pfn,
    level: u8,
) -> Result<Pfn, MmuError> {
    let idx = pt_index(walk.gva, level);
    let child_level = level - 1;
    let (gfn, role, protect) = if child_level >= walk.level {
        let gfn = walk.table_gfn[usize::from(child_level - 1)];
        let role = Role::new(
            child_level,
            walk.pt_access[usize::from(child_level - 1)].bits(),
            false,
            paging,
        );
        (gfn, role, !(writes_own_table && gfn == walk.gfn))
    } else {
        // Below a guest large page: a direct page for the 4 KiB
        // split of the range the child covers.
        let span = level_size(level) >> PAGE_SHIFT;
        let role = Role::new(child_level, walk.pte_access.bits(), true, paging);
        (walk.gfn & !(span - 1), role, true)
    };
    let e = ctx.word(sp, idx)?.load(Ordering::Acquire);
    if spte::is_present(e) {
        let child = spte::pfn(e);
        if !spte::is_large(e)
            && ctx
                .st
                .pages
                .get(&child)
                .is_some_and(|c| c.gfn == gfn && c.role == role && (c.unsync || protect))
        {
            return Ok(child);
        }
        // A stale link (an unsync parent, or a changed role), or a 2 MiB
        // leaf where 4 KiB sptes must go now (`drop_large_spte`).
        ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
    }
    let child = ctx.get_page(gfn, role, protect)?;
    ctx.link(sp, idx, child)?;
    Ok(child)
}
