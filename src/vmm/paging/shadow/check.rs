//! `--check`: the host mm's consistency and the shadow MMU's coherence
//! after a run, at a quiescent point.

use super::ShadowPaging;
use crate::mm::MmCheckError;
use crate::mmu::CoherenceError;
use crate::vmm::abi::PAGE_SIZE;
use crate::vmm::switcher::SwitcherError;

/// What `--check` found violated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The host mm is inconsistent.
    #[error(transparent)]
    Mm(#[from] MmCheckError),
    /// A memslot reaches outside guest RAM (docs/design.md rule 5).
    #[error(
        "memslot at gfn {gfn:#x} maps hva {start:#x}..{end:#x}, outside guest RAM {lo:#x}..{hi:#x}"
    )]
    MemslotOutsideRam {
        /// The memslot's first gfn.
        gfn: u64,
        /// Its first hva.
        start: u64,
        /// Its end hva.
        end: u64,
        /// Guest RAM's first hva.
        lo: u64,
        /// Guest RAM's end hva.
        hi: u64,
    },
    /// The shadow tables disagree with the host mm (rules 1 and 5).
    #[error(transparent)]
    Coherence(#[from] CoherenceError),
    /// The switcher is not what the VMM wrote (rule 5).
    #[error(transparent)]
    Switcher(#[from] SwitcherError),
}

impl ShadowPaging {
    /// `--check`, at a quiescent point (every vCPU stopped): the host mm's
    /// consistency, the shadow MMU's coherence (docs/design.md rules 1 and
    /// 5: every leaf spte maps a frame of guest memory that the host maps
    /// at the spte's gfn), that every memslot lies inside the guest RAM VMA,
    /// so no leaf can reach a frame outside guest RAM, and that the switcher
    /// holds exactly what the VMM wrote (rule 5).
    pub fn check(&self) -> Result<(), CheckError> {
        self.ram.mm().check_consistency()?;
        let (lo, hi) = (self.ram.base(), self.ram.base() + self.ram.size_bytes());
        for s in self.mmu.memslots().iter() {
            let end = s.userspace_addr + s.npages * PAGE_SIZE;
            if s.userspace_addr < lo || end > hi {
                return Err(CheckError::MemslotOutsideRam {
                    gfn: s.base_gfn,
                    start: s.userspace_addr,
                    end,
                    lo,
                    hi,
                });
            }
        }
        self.switcher.check()?;
        Ok(self.mmu.check_coherence()?)
    }
}
