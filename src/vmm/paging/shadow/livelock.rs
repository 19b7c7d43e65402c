//! No silent livelock (docs/design.md rule 6's safety net): if RESOLVE_PF
//! answered RETRY after fixing a fault, and the same vCPU asks again for
//! the same page and the same access with no spte having lost a right and
//! no host invalidation in between, the fix it made cannot have been
//! undone: the hardware faults on a translation the VMM's tables allow.
//! Answering RETRY again would loop for ever (the symptom of a VMM that
//! does not know the guest's real paging mode, such as CR4.SMEP set behind
//! its back), so the VM stops with both views instead.

use super::ShadowPaging;
use crate::mmu::PfErrorCode;
use crate::vmm::paging::{GuestPf, PagingError};
use crate::vmm::x86::RFLAGS_AC;

/// The fault RESOLVE_PF last answered RETRY for, after fixing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LastRetry {
    /// The shadow root the fix went into (a LOAD_CR3 or SET_PAGING since
    /// makes the same fault a new one).
    root: Option<u64>,
    /// The page of CR2.
    page: u64,
    /// The access: W, U and I of the error code, and EFLAGS.AC where it
    /// waives SMAP.
    access: u64,
    /// [`ShadowPaging::invalidation_gen`] sampled before the fix, as KVM
    /// samples `mmu_invalidate_seq` before a fault: an invalidation racing
    /// the fix (ksmd write-protecting the page just mapped) moves it, so
    /// only a fault nothing touched since its fix can match.
    generation: (u64, u64),
}

impl LastRetry {
    fn key(pf: GuestPf) -> (u64, u64) {
        let bits = (PfErrorCode::WRITE | PfErrorCode::USER | PfErrorCode::FETCH).bits();
        let mut access = pf.error_code & u64::from(bits);
        if access & u64::from(PfErrorCode::USER.bits()) == 0 {
            access |= pf.rflags & RFLAGS_AC;
        }
        (pf.cr2 >> 12, access)
    }
}

impl ShadowPaging {
    /// Moves whenever an spte loses a right (every zap, write protection or
    /// repointing is flushed) or the host invalidates guest memory.
    fn invalidation_gen(&self) -> (u64, u64) {
        (self.mmu.remote_tlb_flushes(), self.mmu.invalidate_seq())
    }

    /// Before resolving a fault: is it the one last answered RETRY, with
    /// nothing changed since? Returns the generation the fix starts from.
    pub(super) fn check_livelock(&self, vcpu: u32, pf: GuestPf) -> Result<(u64, u64), PagingError> {
        let generation = self.invalidation_gen();
        let Some(slot) = self.last_retry.get(vcpu as usize) else {
            return Ok(generation);
        };
        let (page, access) = LastRetry::key(pf);
        let same = *slot.lock()
            == Some(LastRetry {
                root: self.mmu.root(vcpu as usize).ok(),
                page,
                access,
                generation,
            });
        if !same {
            return Ok(generation);
        }
        let spte = self
            .mmu
            .lookup_spte(vcpu as usize, pf.cr2)
            .map_err(|e| self.mmu_err(e))?;
        if spte.is_none() {
            // Both views agree the page is not mapped: the fix did not
            // stick (something dropped it without a flush this generation
            // can see), and fixing it again is progress, not a loop.
            return Ok(generation);
        }
        Err(PagingError::Livelock {
            vcpu,
            gva: pf.cr2,
            error_code: pf.error_code,
            rflags: pf.rflags,
            spte,
        })
    }

    /// After resolving: `fixed` holds the generation from
    /// [`Self::check_livelock`] when the answer is RETRY because an spte was
    /// installed (not a race that installed nothing).
    pub(super) fn note_resolution(&self, vcpu: u32, pf: GuestPf, fixed: Option<(u64, u64)>) {
        let Some(slot) = self.last_retry.get(vcpu as usize) else {
            return;
        };
        *slot.lock() = fixed.map(|generation| {
            let (page, access) = LastRetry::key(pf);
            LastRetry {
                root: self.mmu.root(vcpu as usize).ok(),
                page,
                access,
                generation,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_ignores_p_and_rsvd_and_ac_in_user_mode() {
        let k = |error_code, rflags| {
            LastRetry::key(GuestPf {
                cr2: 0x1234_5678,
                error_code,
                rflags,
            })
        };
        assert_eq!(k(0b00010, 0), k(0b00011, 0), "P does not matter");
        assert_eq!(k(0b01010, 0), k(0b00010, 0), "RSVD does not matter");
        assert_ne!(k(0b00010, 0), k(0b00000, 0), "W does");
        assert_ne!(k(0, RFLAGS_AC), k(0, 0), "AC does for supervisor accesses");
        assert_eq!(
            k(0b00100, RFLAGS_AC),
            k(0b00100, 0),
            "but not for user ones"
        );
        assert_eq!(k(0, 0).0, 0x12345);
    }
}
