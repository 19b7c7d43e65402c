//! Pre-faulting a guest-virtual range on request (KVM's
//! `KVM_PRE_FAULT_MEMORY`, through the guest's own page tables since the
//! guest runs on shadow paging): for every page the guest maps, populate
//! the host page as `MADV_POPULATE_WRITE` would (write intent where the
//! guest may write) and install the spte a fault would, so later first
//! touches take no fault at all. A 2 MiB guest page over a host huge PMD
//! gets one 2 MiB spte.
//!
//! The guest's tables are not changed: the walk may not set an Accessed or
//! Dirty bit (a pre-fault is not an access), so only pages whose guest PTE
//! (and every entry above it) is already Accessed are mapped, as KVM
//! prefetches only accessed guest PTEs; the spte is writable only over a
//! dirty guest PTE and carries no Accessed bit. A guest that wants its
//! memory pre-faulted sets A (and D) when it builds the mappings.
//!
//! [`ShadowMmu::populate`] is the same for a guest that asked for the
//! range (the POPULATE hypercall): its sptes start Accessed (and Dirty
//! where writable), as after the access the guest announced.
//!
//! Counted apart from the fault path (`prefault_*`, never `pf_fixed`).

use crate::mm::{Access as HostAccess, MmError, PAGE_SIZE};

use super::fault::{FaultOutcome, Origin};
use super::invalidate::page_range;
use super::pte::{PteAccess, level_size};
use super::stats::{add, inc};
use super::walk::{Access, FaultKind, GuestMmu, NoAdMem, WalkError};
use super::{MmuError, ShadowMmu};

/// Bound on the retries of one page against concurrent invalidations.
const MAX_PREFAULT_RETRIES: u32 = 1000;

/// What a pre-fault did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefaultResult {
    /// 4 KiB pages of the range now mapped by an spte.
    pub mapped: u64,
    /// 4 KiB pages left alone: not mapped by the guest, not yet accessed
    /// by it, outside guest RAM, or refused by the host.
    pub skipped: u64,
}

/// One page's outcome.
enum Step {
    /// Mapped; the spte covers the range up to this address.
    Mapped { until: u64 },
    /// Nothing to map up to this address.
    Skipped { until: u64 },
    /// An invalidation raced: try the page again.
    Retry,
}

impl ShadowMmu {
    /// Pre-faults the guest-virtual range `[gva, gva + len)` on `vcpu`'s
    /// current page tables (see the module comment). Fails only for the
    /// VMM's own problems (no root, a stopped MMU); what the guest does not
    /// map, addresses under the reserved slot, a page whose host memory
    /// invalidations keep taking away, and, once machine memory runs out,
    /// the rest of the range are skipped and counted.
    pub fn pre_fault(&self, vcpu: usize, gva: u64, len: u64) -> Result<PrefaultResult, MmuError> {
        self.pre_fault_as(vcpu, gva, len, Origin::PreFault)
    }

    /// [`ShadowMmu::pre_fault`] for a guest that asked for the range
    /// (the POPULATE hypercall): the same pages, but each spte starts
    /// Accessed, and Dirty where writable, as after the access the guest
    /// announced. `MADV_POPULATE_WRITE` leaves the host PTE young and dirty
    /// the same way. Where the CPU's A/D updates of sptes are expensive (a
    /// host KVM that shadows our tables must emulate each one), this is
    /// what makes the first touch after a populate cheap; the price is that
    /// page aging sees the range young once before the guest touches it.
    pub fn populate(&self, vcpu: usize, gva: u64, len: u64) -> Result<PrefaultResult, MmuError> {
        self.pre_fault_as(vcpu, gva, len, Origin::Populate)
    }

    fn pre_fault_as(
        &self,
        vcpu: usize,
        gva: u64,
        len: u64,
        origin: Origin,
    ) -> Result<PrefaultResult, MmuError> {
        self.check_vcpu(vcpu)?;
        inc(&self.inner.stats.prefault_calls);
        let mut res = PrefaultResult::default();
        let Some(end) = gva.checked_add(len) else {
            return Err(MmuError::InvalidRange { gva, len });
        };
        let mut at = gva & !(PAGE_SIZE - 1);
        while at < end {
            let mut tries = 0;
            let step = loop {
                if self.inner.cfg.reserved.is_some_and(|r| r.contains(at)) {
                    // The VMM's slot: never a guest mapping, whatever the
                    // guest's tables say (as in the fault path).
                    break Step::Skipped {
                        until: (at | (level_size(4) - 1)).wrapping_add(1),
                    };
                }
                let one = match self.prefault_one(vcpu, at, origin) {
                    Ok(one) => one,
                    // Out of memory: a pre-fault is advice, so it ends here
                    // and the rest of the range counts as skipped (a fault
                    // that needs the frame reports it itself), as
                    // `MADV_POPULATE_WRITE` would stop with ENOMEM.
                    Err(MmuError::Memory(MmError::OutOfFrames) | MmuError::OutOfShadowPages) => {
                        break Step::Skipped { until: end };
                    }
                    Err(e) => return Err(e),
                };
                match one {
                    Step::Retry if tries < MAX_PREFAULT_RETRIES => tries += 1,
                    // Invalidations of this page kept racing: a pre-fault is
                    // advice, so leave the page to the fault path.
                    Step::Retry => {
                        break Step::Skipped {
                            until: at + PAGE_SIZE,
                        };
                    }
                    s => break s,
                }
            };
            let (until, mapped) = match step {
                Step::Mapped { until } => (until, true),
                Step::Skipped { until } => (until, false),
                Step::Retry => unreachable!("handled above"),
            };
            // `until` may wrap to 0 at the top of the address space.
            let until = if until == 0 { end } else { until };
            let until = until.clamp(at + PAGE_SIZE, end.next_multiple_of(PAGE_SIZE));
            let pages = (until - at) / PAGE_SIZE;
            if mapped {
                res.mapped += pages;
            } else {
                res.skipped += pages;
            }
            at = until;
        }
        add(&self.inner.stats.prefault_pages, res.mapped);
        add(&self.inner.stats.prefault_skipped, res.skipped);
        Ok(res)
    }

    fn prefault_one(&self, vcpu: usize, gva: u64, origin: Origin) -> Result<Step, MmuError> {
        let inner = &self.inner;
        let a = self.begin_attempt(vcpu)?;
        // A supervisor read with EFLAGS.AC: no permission check can refuse
        // it, so the walk answers "mapped or not" only.
        let probe = Access {
            eflags_ac: true,
            ..Access::read(false)
        };
        let next = |level: u8| (gva | (level_size(level) - 1)).wrapping_add(1);
        let walk = match GuestMmu::new(a.paging).walk_addr(&NoAdMem(&a.gm), gva, probe) {
            Ok(w) => w,
            Err(WalkError::PageFault(pf)) => {
                if let Some(e) = a.gm.host_error.borrow_mut().take() {
                    return Err(MmuError::Memory(e));
                }
                if self.attempt_raced(&a)? {
                    return Ok(Step::Retry);
                }
                // Nothing mapped below a not-present upper entry: skip all
                // it would map.
                let until = match pf.kind {
                    FaultKind::NotPresent => next(pf.level),
                    _ => next(1),
                };
                return Ok(Step::Skipped { until });
            }
            Err(WalkError::AdRetriesExhausted { .. }) => return Ok(Step::Retry),
        };
        let Some(hva) = inner.slots.gfn_to_hva(walk.gfn) else {
            return Ok(Step::Skipped { until: next(1) });
        };
        a.gm.touched.borrow_mut().push(page_range(hva));
        // MADV_POPULATE_WRITE where the guest may write; a read fault where
        // the host refuses writes.
        let host = if walk.pte_access.contains(PteAccess::WRITE) {
            match inner.mm.hva_to_pfn(hva, HostAccess::Write) {
                Err(MmError::Access { .. }) => inner.mm.hva_to_pfn(hva, HostAccess::Read),
                r => r,
            }
        } else {
            inner.mm.hva_to_pfn(hva, HostAccess::Read)
        };
        let host = match host {
            Ok(h) => h,
            Err(MmError::OutOfFrames) => return Err(MmuError::Memory(MmError::OutOfFrames)),
            Err(_) => {
                if self.attempt_raced(&a)? {
                    return Ok(Step::Retry);
                }
                return Ok(Step::Skipped { until: next(1) });
            }
        };
        let outcome = self.install(a.install(&walk, hva, host, origin))?;
        Ok(match outcome {
            None | Some(FaultOutcome::Retry) => Step::Retry,
            Some(_) if self.leaf_at(vcpu, gva)?.is_some_and(|l| l.1 == 2) => {
                Step::Mapped { until: next(2) }
            }
            Some(_) => Step::Mapped { until: next(1) },
        })
    }
}
