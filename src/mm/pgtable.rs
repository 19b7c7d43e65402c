//! The host page table and per-page metadata, all under the page-table lock.

use std::collections::{BTreeMap, HashMap};

use super::swap::{SwapSlot, SwapStore};
use super::{Hva, PAGE_SHIFT, Pfn};

/// A host page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte {
    Present(PresentPte),
    /// A swap entry: the page lives in this swap slot.
    Swap(SwapSlot),
}

/// A present host PTE. `writable` implies `dirty`: the host only grants
/// write access on a write fault, which dirties the page, so a secondary MMU
/// that maps a page writable never hides a dirty page from reclaim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresentPte {
    pub pfn: Pfn,
    pub writable: bool,
    /// `_PAGE_ACCESSED`.
    pub young: bool,
    /// `_PAGE_DIRTY`.
    pub dirty: bool,
}

/// `struct page` for an anonymous page of this mm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMeta {
    /// `page_count`: mappings plus pins.
    pub refcount: u32,
    /// `page_mapcount`.
    pub mapcount: u32,
    /// Reverse map: every hva whose PTE maps this page (`anon_vma` walk).
    pub rmap: Vec<Hva>,
    /// `PageKsm`: a stable KSM page shared read-only.
    pub ksm: bool,
    /// `PageSwapCache`: the page is identical to this slot.
    pub swap: Option<SwapSlot>,
    /// `PG_dirty`, moved here from a PTE that was write-protected.
    pub dirty: bool,
}

/// Everything the page-table lock protects.
#[derive(Default)]
pub struct PageTables {
    pub ptes: BTreeMap<u64, Pte>,
    pub pages: HashMap<Pfn, PageMeta>,
    pub swap: SwapStore,
}

pub fn vpn(hva: Hva) -> u64 {
    hva >> PAGE_SHIFT
}

impl PageTables {
    pub fn pte(&self, hva: Hva) -> Option<Pte> {
        self.ptes.get(&vpn(hva)).copied()
    }

    pub fn present(&self, hva: Hva) -> Option<PresentPte> {
        match self.pte(hva) {
            Some(Pte::Present(p)) => Some(p),
            _ => None,
        }
    }

    /// A freshly allocated page: refcount 1 for the mapping about to be set.
    pub fn new_page(&mut self, pfn: Pfn) {
        let old = self.pages.insert(pfn, PageMeta::default());
        debug_assert!(old.is_none(), "frame {pfn} already in use");
    }

    /// `set_pte_at` + `page_add_anon_rmap` + `get_page`.
    pub fn map(&mut self, hva: Hva, pte: PresentPte) {
        debug_assert!(!pte.writable || pte.dirty);
        let meta = self.pages.entry(pte.pfn).or_default();
        meta.refcount += 1;
        meta.mapcount += 1;
        meta.rmap.push(hva);
        self.ptes.insert(vpn(hva), Pte::Present(pte));
    }

    /// Replaces the flags of a present PTE in place (same frame).
    pub fn update(&mut self, hva: Hva, pte: PresentPte) {
        debug_assert!(!pte.writable || pte.dirty);
        debug_assert_eq!(self.present(hva).map(|p| p.pfn), Some(pte.pfn));
        self.ptes.insert(vpn(hva), Pte::Present(pte));
    }

    /// `ptep_get_and_clear` + `page_remove_rmap`. The page reference is
    /// returned to the caller, who drops it with [`Self::put_page`] once
    /// the secondary MMUs have let go (the `mmu_gather` of Linux).
    pub fn unmap(&mut self, hva: Hva) -> Option<Pte> {
        let pte = self.ptes.remove(&vpn(hva))?;
        if let Pte::Present(p) = pte
            && let Some(meta) = self.pages.get_mut(&p.pfn)
        {
            meta.mapcount -= 1;
            if let Some(i) = meta.rmap.iter().position(|&a| a == hva) {
                meta.rmap.swap_remove(i);
            }
            if p.dirty {
                meta.dirty = true;
            }
        }
        Some(pte)
    }

    /// `get_page`.
    pub fn get_page(&mut self, pfn: Pfn) {
        if let Some(meta) = self.pages.get_mut(&pfn) {
            meta.refcount += 1;
        }
    }

    /// `put_page`: drops one reference. Returns the frame when it became
    /// free; the caller hands it back to the frame allocator.
    pub fn put_page(&mut self, pfn: Pfn) -> Option<Pfn> {
        let meta = self.pages.get_mut(&pfn)?;
        debug_assert!(meta.refcount > 0);
        meta.refcount -= 1;
        if meta.refcount > 0 {
            return None;
        }
        let meta = self.pages.remove(&pfn)?;
        debug_assert_eq!(meta.mapcount, 0);
        if let Some(slot) = meta.swap {
            // Leaving the swap cache drops its slot reference.
            let _ = self.swap.put(slot);
        }
        Some(pfn)
    }

    /// Present PTEs in `[start, end)`.
    pub fn present_in(&self, start: Hva, end: Hva) -> Vec<(Hva, PresentPte)> {
        self.ptes
            .range(vpn(start)..vpn(end))
            .filter_map(|(&v, pte)| match pte {
                Pte::Present(p) => Some((v << PAGE_SHIFT, *p)),
                Pte::Swap(_) => None,
            })
            .collect()
    }

    /// Every PTE (present or swap) in `[start, end)`.
    pub fn entries_in(&self, start: Hva, end: Hva) -> Vec<(Hva, Pte)> {
        self.ptes
            .range(vpn(start)..vpn(end))
            .map(|(&v, pte)| (v << PAGE_SHIFT, *pte))
            .collect()
    }
}
