//! The host page table and per-page metadata, all under the page-table lock.

use std::collections::{BTreeSet, HashMap};

use super::SwapSlot;
use super::swap::SwapStore;
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
    /// `PG_locked`: held across decisions that read `ksm`, the mapcount or
    /// the swap cache and then act on them with the page-table lock dropped
    /// (KSM's merge, `do_wp_page`'s reuse, swap-in, reclaim). Only a holder
    /// of a reference may lock a page, so a locked page is never freed.
    pub locked: bool,
}

/// Everything the page-table lock protects.
#[derive(Default)]
pub struct PageTables {
    pub ptes: PteMap,
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

    /// `trylock_page`: takes the page lock if it is free. The caller holds
    /// a reference to the page.
    pub fn trylock_page(&mut self, pfn: Pfn) -> bool {
        match self.pages.get_mut(&pfn) {
            Some(m) if !m.locked => {
                debug_assert!(m.refcount > 0);
                m.locked = true;
                true
            }
            _ => false,
        }
    }

    /// Clears `PG_locked`; [`super::Mm::unlock_page`] also wakes waiters.
    pub(super) fn clear_page_locked(&mut self, pfn: Pfn) {
        let m = self.pages.get_mut(&pfn);
        debug_assert!(
            m.as_ref().is_some_and(|m| m.locked),
            "unlocking unlocked page {pfn}"
        );
        if let Some(m) = m {
            m.locked = false;
        }
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
        debug_assert!(!meta.locked, "freeing locked page {pfn}");
        if let Some(slot) = meta.swap {
            // Leaving the swap cache drops its slot reference.
            let _ = self.swap.put(slot);
        }
        Some(pfn)
    }

    /// Present PTEs in `[start, end)`.
    pub fn present_in(&self, start: Hva, end: Hva) -> Vec<(Hva, PresentPte)> {
        self.ptes
            .range(vpn(start), vpn(end))
            .filter_map(|(v, pte)| match pte {
                Pte::Present(p) => Some((v << PAGE_SHIFT, *p)),
                Pte::Swap(_) => None,
            })
            .collect()
    }

    /// Every PTE (present or swap) in `[start, end)`.
    pub fn entries_in(&self, start: Hva, end: Hva) -> Vec<(Hva, Pte)> {
        self.ptes
            .range(vpn(start), vpn(end))
            .map(|(v, pte)| (v << PAGE_SHIFT, *pte))
            .collect()
    }
}

/// Entries per leaf of [`PteMap`]: one x86 page table's worth.
const LEAF_ENTRIES: usize = 512;
const LEAF_SHIFT: u32 = 9;

/// One leaf: the PTEs of 2 MiB of address space.
struct Leaf {
    entries: [Option<Pte>; LEAF_ENTRIES],
    used: u16,
}

/// The host page table, keyed by virtual page number: a hash of 512-entry
/// leaves (what a PTE page is to Linux), so a lookup costs the same however
/// much is mapped, plus an ordered index of the leaves for range walks.
#[derive(Default)]
pub struct PteMap {
    leaves: HashMap<u64, Box<Leaf>>,
    order: BTreeSet<u64>,
    len: usize,
}

fn split(vpn: u64) -> (u64, usize) {
    (
        vpn >> LEAF_SHIFT,
        (vpn & (LEAF_ENTRIES as u64 - 1)) as usize,
    )
}

impl PteMap {
    pub fn get(&self, vpn: &u64) -> Option<&Pte> {
        let (leaf, i) = split(*vpn);
        self.leaves.get(&leaf)?.entries[i].as_ref()
    }

    pub fn insert(&mut self, vpn: u64, pte: Pte) -> Option<Pte> {
        let (leaf, i) = split(vpn);
        let l = self.leaves.entry(leaf).or_insert_with(|| {
            self.order.insert(leaf);
            Box::new(Leaf {
                entries: [None; LEAF_ENTRIES],
                used: 0,
            })
        });
        let old = l.entries[i].replace(pte);
        if old.is_none() {
            l.used += 1;
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, vpn: &u64) -> Option<Pte> {
        let (leaf, i) = split(*vpn);
        let l = self.leaves.get_mut(&leaf)?;
        let old = l.entries[i].take()?;
        l.used -= 1;
        self.len -= 1;
        if l.used == 0 {
            // free_pte_range: an empty PTE page goes away.
            self.leaves.remove(&leaf);
            self.order.remove(&leaf);
        }
        Some(old)
    }

    /// Entries with `start <= vpn < end`, in order.
    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Pte)> + '_ {
        let (first, _) = split(start);
        let last = if end == 0 { 0 } else { split(end - 1).0 };
        let leaves = if start < end {
            Some(self.order.range(first..=last))
        } else {
            None
        };
        leaves.into_iter().flatten().flat_map(move |&leaf| {
            let l = &self.leaves[&leaf];
            l.entries.iter().enumerate().filter_map(move |(i, e)| {
                let v = (leaf << LEAF_SHIFT) | i as u64;
                match e {
                    Some(p) if v >= start && v < end => Some((v, p)),
                    _ => None,
                }
            })
        })
    }

    /// The first vpn of the first populated leaf (PTE page) overlapping
    /// the vpns `[start, end)`: the leaf holds an entry, maybe outside the
    /// range.
    pub fn first_populated_leaf(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        let (first, last) = (split(start).0, split(end - 1).0);
        self.order
            .range(first..=last)
            .next()
            .map(|l| l << LEAF_SHIFT)
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Pte)> + '_ {
        self.range(0, u64::MAX)
    }

    pub fn values(&self) -> impl Iterator<Item = &Pte> + '_ {
        self.iter().map(|(_, p)| p)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pte_map_inserts_removes_and_walks_in_order() {
        let mut m = PteMap::default();
        let vpns = [5u64, 511, 512, 1 << 30, 513, 0];
        for (i, &v) in vpns.iter().enumerate() {
            assert_eq!(m.insert(v, Pte::Swap(i as u32)), None);
        }
        assert_eq!(m.len(), 6);
        assert_eq!(m.get(&512), Some(&Pte::Swap(2)));
        let walked: Vec<u64> = m.iter().map(|(v, _)| v).collect();
        assert_eq!(walked, vec![0, 5, 511, 512, 513, 1 << 30]);
        let r: Vec<u64> = m.range(5, 513).map(|(v, _)| v).collect();
        assert_eq!(r, vec![5, 511, 512]);
        assert_eq!(m.range(600, 600).count(), 0);
        assert_eq!(m.remove(&512), Some(Pte::Swap(2)));
        assert_eq!(m.remove(&512), None);
        for v in [0u64, 5, 511, 513, 1 << 30] {
            m.remove(&v);
        }
        assert_eq!(m.len(), 0);
        assert!(m.leaves.is_empty() && m.order.is_empty());
    }
}
