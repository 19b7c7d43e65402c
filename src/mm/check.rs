//! A full consistency check of the mm, for tests: the page table, the page
//! metadata, the reverse maps, the swap counts and the frame allocator must
//! all agree.

use std::collections::HashMap;

use super::frame::FrameOwner;
use super::memory::FrameAccess;
use super::pgtable::Pte;
use super::vma::Prot;
use super::{Hva, Mm, PAGE_SHIFT, Pfn};

/// What the checker found wrong, as a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mm inconsistency: {0}")]
pub struct MmCheckError(pub String);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(MmCheckError(format!($($fmt)*)));
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
                        .map_err(|e| MmCheckError(e.to_string()))?;
                    ensure!(
                        owner == FrameOwner::Mm(self.id),
                        "PTE at {hva:#x} maps frame {} owned by {owner:?}",
                        p.pfn
                    );
                    mapped.entry(p.pfn).or_default().push(hva);
                }
                Pte::Swap(slot) => *swap_refs.entry(*slot).or_default() += 1,
            }
        }
        ensure!(
            pt.ptes.len() == pt.ptes.iter().count(),
            "page table counts {} entries but holds {}",
            pt.ptes.len(),
            pt.ptes.iter().count()
        );
        for (pfn, meta) in &pt.pages {
            let maps = mapped.remove(pfn).unwrap_or_default();
            ensure!(
                meta.mapcount as usize == maps.len(),
                "frame {pfn}: mapcount {} but {} PTEs map it",
                meta.mapcount,
                maps.len()
            );
            let mut r = meta.rmap.clone();
            let mut m = maps.clone();
            r.sort_unstable();
            m.sort_unstable();
            ensure!(r == m, "frame {pfn}: rmap {r:x?} but PTEs at {m:x?}");
            ensure!(
                meta.refcount >= meta.mapcount && meta.refcount > 0,
                "frame {pfn}: refcount {} with mapcount {}",
                meta.refcount,
                meta.mapcount
            );
            ensure!(!meta.locked, "frame {pfn} is still page-locked");
            if meta.ksm {
                for hva in &maps {
                    let writable = matches!(pt.pte(*hva), Some(Pte::Present(p)) if p.writable);
                    ensure!(!writable, "KSM frame {pfn} mapped writable at {hva:#x}");
                }
            }
            if let Some(slot) = meta.swap {
                *swap_refs.entry(slot).or_default() += 1;
            }
            let dirty = meta.dirty
                || maps
                    .iter()
                    .any(|h| matches!(pt.pte(*h), Some(Pte::Present(p)) if p.dirty));
            if !dirty && !meta.ksm && meta.swap.is_none() {
                // A clean page with no copy anywhere must be a zero page, or
                // reclaim would lose data by dropping it.
                let zero = (0..512).all(|i| {
                    self.memory()
                        .frame_word(*pfn, i)
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
            mapped.is_empty(),
            "PTEs map frames without metadata: {:?}",
            mapped.keys()
        );
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
            owned == pt.pages.len() as u64,
            "{owned} frames owned by the mm but {} pages tracked",
            pt.pages.len()
        );
        Ok(())
    }
}
