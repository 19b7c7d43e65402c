//! Prefetch: on a fault that installs a 4 KiB spte, also install sptes for
//! its neighbours whose host pages are present now (KVM's
//! `FNAME(pte_prefetch)` for a shadow of a guest page table, and
//! `direct_pte_prefetch` for the 4 KiB split of a guest large page): the
//! aligned group of [`ShadowMmuConfig::pte_prefetch`] entries around it
//! (`PTE_PREFETCH_NUM`, 8 in KVM).
//!
//! The rules keep every prefetched spte one the coherence rules allow
//! without a fault:
//! * only a guest PTE that is present, has no reserved bit and is already
//!   Accessed (`FNAME(prefetch_invalid_gpte)`): we never set guest A bits
//!   the guest did not cause;
//! * read-only unless the guest PTE is dirty (`FNAME(protect_clean_gpte)`)
//!   and the host PTE writable; never for a gfn we write-protect as a
//!   guest page table; no Accessed bit in the spte (`prefetch`);
//! * only a host page present now: read without faulting
//!   (`gfn_to_pfn_memslot_atomic`) before the MMU lock, since the mm calls
//!   into us under its page-table lock;
//! * each candidate relies on its own host page: installed only if no
//!   invalidation of that page is in progress or ended since the fault read
//!   the sequence, and (for a guest table) only if its guest PTE still
//!   holds the value read. The fault's own check already covers the guest
//!   table holding the neighbours.

use std::sync::atomic::Ordering;

use crate::mm::{FrameAccess, HostPfn, Hva, Pfn};

use super::invalidate::{SeqRead, page_range};
use super::pte::{
    PG_LEVEL_4K, PT_DIRTY_MASK, PteAccess, gpte_access, gpte_to_gfn, is_present_gpte, pt_index,
};
use super::shadow_page::Ctx;
use super::spte;
use super::stats::inc;
use super::walk::{GuestMmu, GuestWalk, PagingState};
use super::{MmuError, ShadowMmu};

/// `PTE_PREFETCH_NUM`.
pub const PTE_PREFETCH_NUM: usize = 8;

/// A neighbour the guest maps, before its host page is looked up.
#[derive(Clone, Copy, Debug)]
struct Neighbour {
    /// Index in the leaf shadow page.
    idx: usize,
    gfn: u64,
    hva: Hva,
    /// Rights of the spte (the shadow page's role access, the guest PTE's,
    /// write only over a dirty guest PTE).
    acc: PteAccess,
    /// The guest PTE it came from, for a shadow of a guest table: its
    /// frame, word index and value, re-read under the lock.
    gpte: Option<(Pfn, usize, u64)>,
}

/// A neighbour to prefetch, found before the MMU lock, with its host page.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    n: Neighbour,
    host: HostPfn,
}

impl ShadowMmu {
    /// The neighbours of the fault's 4 KiB leaf worth prefetching, with
    /// their host pages looked up without faulting.
    pub(super) fn prefetch_candidates(
        &self,
        walk: &GuestWalk,
        reads: &[(u64, Pfn)],
        paging: &PagingState,
    ) -> Vec<Candidate> {
        let inner = &self.inner;
        let n = inner.cfg.pte_prefetch;
        if n <= 1 {
            return Vec::new();
        }
        let own = pt_index(walk.gva, PG_LEVEL_4K);
        let first = own & !(n - 1);
        let mut found: Vec<Neighbour> = Vec::new();
        if walk.level == PG_LEVEL_4K {
            // FNAME(pte_prefetch): the guest PTEs beside ours in its table.
            let pte_gpa = walk.pte_gpa[0];
            let Some(&(_, table)) = reads.iter().rev().find(|(g, _)| *g == pte_gpa) else {
                return Vec::new();
            };
            let mem = inner.mm.memory();
            let rsvd = *GuestMmu::new(*paging).rsvd_check();
            let role_access = walk.pt_access[0];
            for idx in (first..first + n).filter(|&i| i != own) {
                let Ok(word) = mem.frame_word(table, idx) else {
                    continue;
                };
                let gpte = word.load(Ordering::Acquire);
                if !is_present_gpte(gpte)
                    || gpte & super::pte::PT_ACCESSED_MASK == 0
                    || rsvd.is_rsvd_bits_set(gpte, PG_LEVEL_4K)
                {
                    continue;
                }
                let gfn = gpte_to_gfn(gpte);
                let Some(hva) = inner.slots.gfn_to_hva(gfn) else {
                    continue;
                };
                let mut acc = role_access & gpte_access(gpte);
                if !paging.efer_nx {
                    acc.insert(PteAccess::EXEC);
                }
                if gpte & PT_DIRTY_MASK == 0 {
                    acc.remove(PteAccess::WRITE);
                }
                found.push(Neighbour {
                    idx,
                    gfn,
                    hva,
                    acc,
                    gpte: Some((table, idx, gpte)),
                });
            }
        } else {
            // direct_pte_prefetch: the neighbouring 4 KiB of the guest's
            // large page, whose one PDE the walk found accessed.
            let mut acc = walk.pte_access;
            if !walk.is_dirty() {
                acc.remove(PteAccess::WRITE);
            }
            let base = walk.gfn - own as u64;
            for idx in (first..first + n).filter(|&i| i != own) {
                let gfn = base + idx as u64;
                if let Some(hva) = inner.slots.gfn_to_hva(gfn) {
                    found.push(Neighbour {
                        idx,
                        gfn,
                        hva,
                        acc,
                        gpte: None,
                    });
                }
            }
        }
        let hvas: Vec<Hva> = found.iter().map(|f| f.hva).collect();
        let hosts = inner.mm.lookup_present(&hvas);
        found
            .into_iter()
            .zip(hosts)
            .filter_map(|(n, host)| host.map(|host| Candidate { n, host }))
            .collect()
    }

    /// Installs the candidates in the leaf shadow page `sp`, under the MMU
    /// lock, each only if its own host page was not invalidated since the
    /// fault's sequence read and its guest PTE is unchanged.
    pub(super) fn prefetch_locked(
        &self,
        ctx: &mut Ctx<'_>,
        seq: &SeqRead<'_>,
        sp: Pfn,
        candidates: Vec<Candidate>,
        paging: &PagingState,
    ) -> Result<(), MmuError> {
        let inner = &self.inner;
        for Candidate { n: c, host } in candidates {
            if ctx.word(sp, c.idx)?.load(Ordering::Acquire) != 0 {
                continue; // is_shadow_present_pte: already there
            }
            if seq.retry(&[page_range(c.hva)]) {
                inc(&inner.stats.pf_prefetch_raced);
                continue;
            }
            if let Some((table, w, v)) = c.gpte {
                let now = inner
                    .mm
                    .memory()
                    .frame_word(table, w)
                    .map_err(MmuError::Memory)?
                    .load(Ordering::Acquire);
                if now != v {
                    inc(&inner.stats.pf_prefetch_raced);
                    continue;
                }
            }
            if ctx.is_protected(c.gfn) {
                continue; // a guest table: leave it to a fault
            }
            let writable = c.acc.contains(PteAccess::WRITE) && host.writable;
            let new = spte::make_spte(host.pfn, c.acc, writable, paging.efer_nx, false);
            ctx.word(sp, c.idx)?.store(new, Ordering::Release);
            ctx.rmap_add(c.gfn, (sp, c.idx as u16));
            inc(&inner.stats.pf_prefetch);
            crate::trace::emit!(SptePrefetched {
                sp,
                idx: c.idx as u64,
                gfn: c.gfn,
                frame: host.pfn,
            });
        }
        Ok(())
    }
}
