//! `--check`: the host mm's consistency and the shadow MMU's coherence
//! after a run, at a quiescent point.

use super::ShadowPaging;
use crate::dma::DmaCheckError;
use crate::mm::{MmCheckError, MmapFlags, Pte};
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
    /// The guest's DMA device maps a frame the host does not map there
    /// (rule 1, for the second secondary MMU).
    #[error("DMA device: {0}")]
    Dma(#[from] DmaCheckError),
    /// A page exception delivery needs shares a host folio with memory
    /// that is not locked: reclaim may split that folio, and the split
    /// unmaps the whole folio under a running vCPU.
    #[error(
        "the page at gpa {gpa:#x} that exception delivery needs lies in a host folio \
         {start:#x}..{end:#x} (hva) that is not all locked"
    )]
    CriticalFolioUnlocked {
        /// The critical page.
        gpa: u64,
        /// The folio's first hva.
        start: u64,
        /// Its end hva.
        end: u64,
    },
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
        self.check_critical_folios()?;
        Ok(self.mmu.check_coherence()?)
    }

    /// Every host folio holding a critical page lies inside locked VMAs
    /// (`ShadowMachine::lock_boot_pages` locks before the first write).
    fn check_critical_folios(&self) -> Result<(), CheckError> {
        let mm = self.ram.mm();
        let vmas = mm.vmas();
        let locked = |start: u64, end: u64| {
            let mut at = start;
            for v in vmas.iter().filter(|v| v.end > start && v.start < end) {
                if v.start > at || !v.flags.contains(MmapFlags::LOCKED) {
                    return false;
                }
                at = v.end;
            }
            at >= end
        };
        let mut seen = std::collections::BTreeSet::new();
        for p in self.critical.iter().flatten() {
            let hva = self.ram.base() + p.gpa();
            let Some(Pte::Present(pte)) = mm.pte(hva) else {
                continue;
            };
            let Some((head, folio)) = mm.folio(pte.pfn) else {
                continue;
            };
            if !folio.is_large() || !seen.insert(head) {
                continue;
            }
            let (start, end) = (folio.hva, folio.hva + folio.nr() * PAGE_SIZE);
            if !locked(start, end) {
                return Err(CheckError::CriticalFolioUnlocked {
                    gpa: p.gpa(),
                    start,
                    end,
                });
            }
        }
        Ok(())
    }
}
