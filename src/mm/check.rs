//! A full consistency check of the mm, for tests: the page table, the huge
//! PMDs, the folios (aligned, contiguous, every page accounted), the reverse
//! maps, the swap counts and the frame allocator must all agree.

use std::collections::HashMap;

use super::frame::FrameOwner;
use super::memory::FrameAccess;
use super::pgtable::{HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PresentPte, Pte};
use super::vma::Prot;
use super::{Hva, Mm, MmError, PAGE_SHIFT, PAGE_SIZE, Pfn};

/// What the checker found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmCheckError {
    /// An invariant does not hold: which, and where, as a sentence.
    #[error("mm inconsistency: {0}")]
    Inconsistent(String),
    /// A frame the page table maps has no owner record.
    #[error("mm inconsistency: the frame of the PTE at {hva:#x} has no owner record")]
    Frame {
        /// The PTE's address.
        hva: Hva,
        /// Why the frame could not be looked up.
        #[source]
        source: MmError,
    },
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(MmCheckError::Inconsistent(format!($($fmt)*)));
        }
    };
}

impl Mm {
    /// Checks every invariant of the host mm. Takes every lock, so call it at
    /// a quiescent point.
    pub fn check_consistency(&self) -> Result<(), MmCheckError> {
        let _ksm = self.ksm.lock();
        let vmas = self.mmap_lock.read();
        let pt = self.pt.lock();
        let mut mapped: HashMap<Pfn, Vec<Hva>> = HashMap::new();
        let mut swap_refs: HashMap<u32, u32> = HashMap::new();
        for (v, pte) in pt.ptes.iter() {
            let hva = v << PAGE_SHIFT;
            let vma = vmas.find(hva);
            ensure!(vma.is_some(), "PTE at {hva:#x} outside every VMA");
            match pte {
                Pte::Present(p) => {
                    ensure!(!p.writable || p.dirty, "writable but clean PTE at {hva:#x}");
                    ensure!(
                        !p.writable || vma.is_some_and(|v| v.prot.contains(Prot::WRITE)),
                        "writable PTE at {hva:#x} in a read-only VMA"
                    );
                    let owner = self
                        .frames
                        .owner(p.pfn)
                        .map_err(|source| MmCheckError::Frame { hva, source })?;
                    ensure!(
                        owner == FrameOwner::Mm(self.id),
                        "PTE at {hva:#x} maps frame {} owned by {owner:?}",
                        p.pfn
                    );
                    if !pt.is_huge(hva) {
                        mapped.entry(p.pfn).or_default().push(hva);
                    }
                }
                Pte::Swap(slot) => {
                    ensure!(!pt.is_huge(hva), "swap entry at {hva:#x} under a huge PMD");
                    *swap_refs.entry(*slot).or_default() += 1;
                }
            }
        }
        ensure!(
            pt.ptes.len() == pt.ptes.iter().count(),
            "page table counts {} entries but holds {}",
            pt.ptes.len(),
            pt.ptes.iter().count()
        );
        // Huge PMDs: aligned, inside one VMA, one PMD-size folio, one set of
        // bits, recorded on the folio.
        let mut pmd_mapped: HashMap<Pfn, Hva> = HashMap::new();
        for haddr in pt.huge_pmds_in(0, u64::MAX) {
            ensure!(
                haddr.is_multiple_of(HPAGE_PMD_SIZE),
                "huge PMD at unaligned {haddr:#x}"
            );
            let vma = vmas.find(haddr);
            ensure!(
                vma.is_some_and(|v| v.start <= haddr && haddr + HPAGE_PMD_SIZE <= v.end),
                "huge PMD at {haddr:#x} not inside one VMA ({vma:?})"
            );
            let head = pt.present(haddr);
            ensure!(
                head.is_some(),
                "huge PMD at {haddr:#x} without a head entry"
            );
            let head = head.unwrap_or(PresentPte {
                pfn: 0,
                writable: false,
                young: false,
                dirty: false,
            });
            for i in 0..HPAGE_PMD_NR {
                let want = PresentPte {
                    pfn: head.pfn + i,
                    ..head
                };
                let got = pt.present(haddr + i * PAGE_SIZE);
                ensure!(
                    got == Some(want),
                    "huge PMD at {haddr:#x}: page {i} is {got:?}, want {want:?}"
                );
            }
            pmd_mapped.insert(head.pfn, haddr);
        }
        // Folios: aligned, disjoint, every page accounted.
        let mut next_free: Pfn = 0;
        let mut frames_in_folios = 0u64;
        for (&head, f) in &pt.folios {
            let nr = f.nr();
            ensure!(
                head.is_multiple_of(nr),
                "folio {head} of order {} unaligned",
                f.order
            );
            ensure!(
                head >= next_free,
                "folio {head} overlaps the folio before it"
            );
            next_free = head + nr;
            frames_in_folios += nr;
            ensure!(
                f.rmap.len() as u64 == nr,
                "folio {head}: {} rmaps for {nr} pages",
                f.rmap.len()
            );
            for pfn in head..head + nr {
                let owner = self.frames.owner(pfn).ok();
                ensure!(
                    owner == Some(FrameOwner::Mm(self.id)),
                    "folio {head}: frame {pfn} owned by {owner:?}"
                );
            }
            ensure!(
                f.pmd == pmd_mapped.contains_key(&head),
                "folio {head}: pmd flag {} but huge PMD {:?}",
                f.pmd,
                pmd_mapped.get(&head)
            );
            if f.pmd {
                ensure!(
                    f.order == HPAGE_PMD_ORDER && pmd_mapped.get(&head) == Some(&f.hva),
                    "folio {head} of order {} PMD-mapped at {:?}, folio hva {:#x}",
                    f.order,
                    pmd_mapped.get(&head),
                    f.hva
                );
            }
            if f.is_large() {
                ensure!(!f.ksm, "large folio {head} is KSM");
                ensure!(f.swap.is_none(), "large folio {head} is in the swap cache");
                ensure!(
                    !f.partially_mapped() || pt.deferred.contains(&head),
                    "folio {head} is partly mapped but not queued for a split"
                );
            }
            for (i, r) in f.rmap.iter().enumerate() {
                let pfn = head + i as u64;
                let maps = mapped.remove(&pfn).unwrap_or_default();
                let mut r = r.clone();
                let mut m = maps.clone();
                r.sort_unstable();
                m.sort_unstable();
                ensure!(r == m, "frame {pfn}: rmap {r:x?} but PTEs at {m:x?}");
                if f.is_large() {
                    for h in &m {
                        ensure!(
                            *h == f.hva + i as u64 * PAGE_SIZE,
                            "page {i} of folio {head} (at {:#x}) mapped at {h:#x}",
                            f.hva
                        );
                    }
                }
                if f.ksm {
                    for hva in &maps {
                        let writable = matches!(pt.pte(*hva), Some(Pte::Present(p)) if p.writable);
                        ensure!(!writable, "KSM frame {pfn} mapped writable at {hva:#x}");
                    }
                }
                let pmd_dirty = f.pmd && pt.present(f.hva).is_some_and(|p| p.dirty);
                let dirty = f.dirty
                    || pmd_dirty
                    || maps
                        .iter()
                        .any(|h| matches!(pt.pte(*h), Some(Pte::Present(p)) if p.dirty));
                if !dirty && !f.ksm && f.swap.is_none() {
                    // A clean page with no copy anywhere must be a zero page,
                    // or reclaim would lose data by dropping it.
                    let zero = (0..512).all(|w| {
                        self.memory()
                            .frame_word(pfn, w)
                            .map(|w| w.load(std::sync::atomic::Ordering::Relaxed) == 0)
                            .unwrap_or(false)
                    });
                    ensure!(
                        zero,
                        "frame {pfn} is clean with no swap copy but holds data"
                    );
                }
            }
            ensure!(
                f.refcount >= f.mapping_refs() && f.refcount > 0,
                "folio {head}: refcount {} with {} mapping references",
                f.refcount,
                f.mapping_refs()
            );
            ensure!(!f.locked, "folio {head} is still locked");
            if let Some(slot) = f.swap {
                *swap_refs.entry(slot).or_default() += 1;
            }
        }
        ensure!(
            mapped.is_empty(),
            "PTEs map frames without a folio: {:?}",
            mapped.keys()
        );
        for head in &pt.deferred {
            ensure!(
                pt.folios.get(head).is_some_and(|f| f.is_large()),
                "deferred split queue holds {head}, not a large folio"
            );
        }
        for (slot, refs) in &swap_refs {
            ensure!(
                pt.swap.count(*slot) == *refs,
                "swap slot {slot}: count {} but {refs} references",
                pt.swap.count(*slot)
            );
        }
        ensure!(
            pt.swap.used() == swap_refs.len(),
            "{} swap slots in use but {} referenced",
            pt.swap.used(),
            swap_refs.len()
        );
        let owned = self.frames.count(FrameOwner::Mm(self.id));
        ensure!(
            owned == frames_in_folios,
            "{owned} frames owned by the mm but {frames_in_folios} in folios"
        );
        Ok(())
    }
}
