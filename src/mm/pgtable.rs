//! The host page table and per-page metadata, all under the page-table lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::SwapSlot;
use super::swap::SwapStore;
use super::{Hva, PAGE_SHIFT, PAGE_SIZE, Pfn};

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

impl PresentPte {
    /// The entry of a page a fault just put in: `mk_pte` + `pte_mkyoung`,
    /// and on a write fault `pte_mkwrite(pte_mkdirty())`.
    pub fn fresh(pfn: Pfn, write: bool) -> Self {
        PresentPte {
            pfn,
            writable: write,
            young: true,
            dirty: write,
        }
    }
}

/// `HPAGE_PMD_ORDER`: a huge PMD maps a folio of 2^9 pages (2 MiB).
pub const HPAGE_PMD_ORDER: u8 = 9;
/// Pages a huge PMD maps.
pub const HPAGE_PMD_NR: u64 = 1 << HPAGE_PMD_ORDER;
/// Bytes a huge PMD maps.
pub const HPAGE_PMD_SIZE: u64 = PAGE_SIZE << HPAGE_PMD_ORDER;

/// `struct folio` of an anonymous folio of this mm: 2^`order` frames from
/// its head frame, physically contiguous and aligned to their size, mapped
/// (where mapped at all) at one linear range of addresses from `hva`, since
/// anonymous memory here is never forked or mremapped. A large folio is
/// never KSM and never in the swap cache (both split it first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folio {
    pub order: u8,
    /// Where page 0 is mapped (`folio->index` of an anonymous folio). For a
    /// KSM page, which many addresses map, the first of them.
    pub hva: Hva,
    /// `folio_ref_count`: one per PTE mapping one of its pages, one for the
    /// PMD mapping it whole, one per pin or gathered reference.
    pub refcount: u32,
    /// Per page: every hva whose PTE maps it (the reverse map, `anon_vma`
    /// walk); its length is the page's own mapcount (`page->_mapcount`).
    pub rmap: Vec<Vec<Hva>>,
    /// Mapped whole by the huge PMD at `hva` (`folio_entire_mapcount` 1).
    pub pmd: bool,
    /// `PageKsm`: a stable KSM page shared read-only.
    pub ksm: bool,
    /// `PageSwapCache`: the page is identical to this slot.
    pub swap: Option<SwapSlot>,
    /// `PG_dirty`, moved here from PTEs that were write-protected or
    /// unmapped.
    pub dirty: bool,
    /// `PG_locked` (on the head page for a large folio): held across
    /// decisions that read `ksm`, the mapcount, the swap cache or the
    /// folio's size and then act on them with the page-table lock dropped
    /// (KSM's merge, `do_wp_page`'s reuse, swap-in, reclaim, splits). Only
    /// a holder of a reference may lock a folio, so a locked folio is never
    /// freed.
    pub locked: bool,
}

impl Folio {
    fn new(order: u8, hva: Hva) -> Self {
        Self {
            order,
            hva,
            refcount: 0,
            rmap: vec![Vec::new(); 1 << order],
            pmd: false,
            ksm: false,
            swap: None,
            dirty: false,
            locked: false,
        }
    }

    /// Pages in the folio (`folio_nr_pages`).
    pub fn nr(&self) -> u64 {
        1 << self.order
    }

    pub fn is_large(&self) -> bool {
        self.order > 0
    }

    /// `folio_mapcount`: PTE mappings of its pages plus, for a PMD
    /// mapping, one per page.
    pub fn mapcount(&self) -> u32 {
        let ptes: usize = self.rmap.iter().map(Vec::len).sum();
        ptes as u32 + if self.pmd { self.nr() as u32 } else { 0 }
    }

    /// The mapcount of page `i` (`page_mapcount`: its PTEs and the PMD).
    pub fn page_mapcount(&self, i: usize) -> u32 {
        self.rmap.get(i).map_or(0, |r| r.len() as u32) + u32::from(self.pmd)
    }

    /// `folio_large_mapcount` as the split check counts references: one
    /// per PTE, one for the PMD.
    pub fn mapping_refs(&self) -> u32 {
        let ptes: usize = self.rmap.iter().map(Vec::len).sum();
        ptes as u32 + u32::from(self.pmd)
    }

    /// Some pages mapped and some not: what `deferred_split_folio` queues.
    pub fn partially_mapped(&self) -> bool {
        self.is_large()
            && !self.pmd
            && self.rmap.iter().any(Vec::is_empty)
            && self.rmap.iter().any(|r| !r.is_empty())
    }
}

/// One page of a folio as [`super::Mm::page_meta`] shows it: the page's
/// own mapping and its folio's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMeta {
    /// The folio's `folio_ref_count`.
    pub refcount: u32,
    /// This page's mapcount (`page_mapcount`).
    pub mapcount: u32,
    /// The references the folio's mappings hold (one per PTE, one per
    /// PMD): `refcount - mapping_refs` are pins and gathered references.
    pub mapping_refs: u32,
    /// Every hva that maps this page.
    pub rmap: Vec<Hva>,
    pub ksm: bool,
    pub swap: Option<SwapSlot>,
    pub dirty: bool,
    pub locked: bool,
    /// The folio's head frame and order.
    pub head: Pfn,
    pub order: u8,
    /// Mapped through the folio's huge PMD.
    pub pmd: bool,
}

/// Everything the page-table lock protects.
#[derive(Default)]
pub struct PageTables {
    pub ptes: PteMap,
    /// Every folio of the mm, by head frame.
    pub folios: BTreeMap<Pfn, Folio>,
    pub swap: SwapStore,
    /// Large folios partially unmapped, waiting to be split
    /// (`deferred_split_queue`), by head frame.
    pub deferred: BTreeSet<Pfn>,
    /// Head and order of the folios queued since the mm last looked.
    pub deferred_new: Vec<(Pfn, u8)>,
}

pub fn vpn(hva: Hva) -> u64 {
    hva >> PAGE_SHIFT
}

/// The first address of the 2 MiB range `hva` is in (`HPAGE_PMD_MASK`).
pub fn pmd_base(hva: Hva) -> Hva {
    hva & !(HPAGE_PMD_SIZE - 1)
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

    /// Whether `hva` is mapped by a huge PMD (`pmd_trans_huge`).
    pub fn is_huge(&self, hva: Hva) -> bool {
        self.ptes.is_huge(vpn(hva))
    }

    /// The head frame of the folio `pfn` belongs to.
    pub fn folio_head(&self, pfn: Pfn) -> Option<Pfn> {
        let (&head, f) = self.folios.range(..=pfn).next_back()?;
        (pfn < head + f.nr()).then_some(head)
    }

    /// The folio `pfn` belongs to (`page_folio`).
    pub fn folio(&self, pfn: Pfn) -> Option<&Folio> {
        self.folio_head(pfn).and_then(|h| self.folios.get(&h))
    }

    pub fn folio_mut(&mut self, pfn: Pfn) -> Option<&mut Folio> {
        let head = self.folio_head(pfn)?;
        self.folios.get_mut(&head)
    }

    /// The view of page `pfn`.
    pub fn page_meta(&self, pfn: Pfn) -> Option<PageMeta> {
        let head = self.folio_head(pfn)?;
        let f = &self.folios[&head];
        let i = (pfn - head) as usize;
        let mut rmap = f.rmap[i].clone();
        if f.pmd {
            rmap.push(f.hva + i as u64 * PAGE_SIZE);
        }
        Some(PageMeta {
            refcount: f.refcount,
            mapcount: f.page_mapcount(i),
            mapping_refs: f.mapping_refs(),
            rmap,
            ksm: f.ksm,
            swap: f.swap,
            dirty: f.dirty,
            locked: f.locked,
            head,
            order: f.order,
            pmd: f.pmd,
        })
    }

    /// A freshly allocated folio of 2^`order` frames from `head`, to be
    /// mapped at `hva`: no reference yet, each mapping adds its own.
    pub fn new_folio(&mut self, head: Pfn, order: u8, hva: Hva) {
        let old = self.folios.insert(head, Folio::new(order, hva));
        debug_assert!(old.is_none(), "frame {head} already in use");
    }

    /// A freshly allocated small page.
    pub fn new_page(&mut self, pfn: Pfn, hva: Hva) {
        self.new_folio(pfn, 0, hva);
    }

    /// `set_pte_at` + `folio_add_anon_rmap_pte` + `folio_get`.
    pub fn map(&mut self, hva: Hva, pte: PresentPte) {
        debug_assert!(!pte.writable || pte.dirty);
        debug_assert!(!self.is_huge(hva), "PTE map inside a huge PMD at {hva:#x}");
        if let Some(head) = self.folio_head(pte.pfn)
            && let Some(f) = self.folios.get_mut(&head)
        {
            f.refcount += 1;
            f.rmap[(pte.pfn - head) as usize].push(hva);
        }
        self.ptes.insert(vpn(hva), Pte::Present(pte));
    }

    /// `set_pmd_at` of a huge PMD mapping the PMD-size folio whose head is
    /// `pte.pfn` at `haddr`, with `pte`'s bits (`folio_add_new_anon_rmap`
    /// with `RMAP_ENTIRE`, one reference). The host table keeps a PTE view
    /// of every page under it, all with the PMD's bits.
    pub fn map_pmd(&mut self, haddr: Hva, pte: PresentPte) {
        debug_assert!(haddr.is_multiple_of(HPAGE_PMD_SIZE));
        debug_assert!(!pte.writable || pte.dirty);
        debug_assert!(self.ptes.leaf_is_none(vpn(haddr)));
        if let Some(f) = self.folios.get_mut(&pte.pfn) {
            debug_assert_eq!(f.order, HPAGE_PMD_ORDER);
            f.refcount += 1;
            f.pmd = true;
            f.hva = haddr;
        }
        for i in 0..HPAGE_PMD_NR {
            let p = PresentPte {
                pfn: pte.pfn + i,
                ..pte
            };
            self.ptes.insert(vpn(haddr) + i, Pte::Present(p));
        }
        self.ptes.set_huge(vpn(haddr), true);
    }

    /// Replaces the flags of a present PTE in place (same frame). Under a
    /// huge PMD the flags are the PMD's: every page under it gets them.
    pub fn update(&mut self, hva: Hva, pte: PresentPte) {
        debug_assert!(!pte.writable || pte.dirty);
        debug_assert_eq!(self.present(hva).map(|p| p.pfn), Some(pte.pfn));
        if self.present(hva) == Some(pte) {
            return; // nothing changes (under a huge PMD: 512 entries)
        }
        if self.is_huge(hva) {
            let base = vpn(pmd_base(hva));
            let head = pte.pfn - (vpn(hva) - base);
            for i in 0..HPAGE_PMD_NR {
                let p = PresentPte {
                    pfn: head + i,
                    ..pte
                };
                self.ptes.insert(base + i, Pte::Present(p));
            }
            return;
        }
        self.ptes.insert(vpn(hva), Pte::Present(pte));
    }

    /// `ptep_get_and_clear` + `folio_remove_rmap_pte`. The reference is
    /// returned to the caller, who drops it with [`Self::put_page`] once
    /// the secondary MMUs have let go (the `mmu_gather` of Linux). Never
    /// under a huge PMD: split it first.
    pub fn unmap(&mut self, hva: Hva) -> Option<Pte> {
        debug_assert!(
            !self.is_huge(hva),
            "PTE unmap inside a huge PMD at {hva:#x}"
        );
        let pte = self.ptes.remove(&vpn(hva))?;
        if let Pte::Present(p) = pte
            && let Some(head) = self.folio_head(p.pfn)
            && let Some(f) = self.folios.get_mut(&head)
        {
            let r = &mut f.rmap[(p.pfn - head) as usize];
            if let Some(i) = r.iter().position(|&a| a == hva) {
                r.swap_remove(i);
            }
            if p.dirty {
                f.dirty = true;
            }
            if f.partially_mapped() {
                if self.deferred.insert(head) {
                    self.deferred_new.push((head, f.order));
                }
            } else if f.is_large() && f.mapcount() == 0 {
                self.deferred.remove(&head);
            }
        }
        Some(pte)
    }

    /// `zap_huge_pmd`: clears the huge PMD at `haddr` and removes the
    /// folio's entire mapping. Returns the head's PTE view; its reference
    /// goes to the caller, as with [`Self::unmap`].
    pub fn unmap_pmd(&mut self, haddr: Hva) -> Option<PresentPte> {
        debug_assert!(haddr.is_multiple_of(HPAGE_PMD_SIZE));
        if !self.is_huge(haddr) {
            return None;
        }
        let head = self.present(haddr)?;
        self.ptes.set_huge(vpn(haddr), false);
        for i in 0..HPAGE_PMD_NR {
            self.ptes.remove(&(vpn(haddr) + i));
        }
        if let Some(f) = self.folios.get_mut(&head.pfn) {
            f.pmd = false;
            if head.dirty {
                f.dirty = true;
            }
        }
        Some(head)
    }

    /// `__split_huge_pmd_locked`: the huge PMD at `haddr` becomes a table
    /// of PTEs mapping the same pages with the same bits; each PTE takes a
    /// reference (`folio_ref_add(folio, HPAGE_PMD_NR - 1)`).
    pub fn split_pmd(&mut self, haddr: Hva) {
        if !self.is_huge(haddr) {
            return;
        }
        let Some(head) = self.present(haddr) else {
            return;
        };
        self.ptes.set_huge(vpn(haddr), false);
        if let Some(f) = self.folios.get_mut(&head.pfn) {
            f.pmd = false;
            f.refcount += HPAGE_PMD_NR as u32 - 1;
            for (i, r) in f.rmap.iter_mut().enumerate() {
                r.push(haddr + i as u64 * PAGE_SIZE);
            }
        }
    }

    /// `can_split_folio`: the only references are the mappings and the
    /// caller's `pins`.
    pub fn can_split_folio(&self, pfn: Pfn, pins: u32) -> bool {
        self.folio(pfn)
            .is_some_and(|f| f.is_large() && f.refcount == f.mapping_refs() + pins)
    }

    /// `__split_folio_to_order(0)` after the checks: the folio of `pfn`
    /// becomes 2^order small folios, each holding the references of its
    /// own mappings and the caller's `pins` (one reference per entry, on
    /// the page named); the lock stays with page `pfn` (the other pages
    /// come out unlocked, `__split_huge_page`). Pages nobody maps or pins
    /// are freed: returned to the caller for the allocator. Requires
    /// [`Self::can_split_folio`] and no huge PMD.
    pub fn split_folio(&mut self, pfn: Pfn, pins: &[Pfn]) -> Vec<Pfn> {
        let Some(head) = self.folio_head(pfn) else {
            return Vec::new();
        };
        let Some(f) = self.folios.remove(&head) else {
            return Vec::new();
        };
        debug_assert!(!f.pmd && f.refcount == f.mapping_refs() + pins.len() as u32);
        self.deferred.remove(&head);
        let mut freed = Vec::new();
        for (i, rmap) in f.rmap.into_iter().enumerate() {
            let p = head + i as u64;
            let mine = p == pfn;
            let refcount = rmap.len() as u32 + pins.iter().filter(|&&q| q == p).count() as u32;
            if refcount == 0 {
                freed.push(p);
                continue;
            }
            self.folios.insert(
                p,
                Folio {
                    order: 0,
                    hva: f.hva + i as u64 * PAGE_SIZE,
                    refcount,
                    rmap: vec![rmap],
                    pmd: false,
                    ksm: false,
                    swap: None,
                    dirty: f.dirty,
                    locked: f.locked && mine,
                },
            );
        }
        freed
    }

    /// `trylock_page`: takes the folio lock if it is free. The caller holds
    /// a reference to the folio.
    pub fn trylock_page(&mut self, pfn: Pfn) -> bool {
        match self.folio_mut(pfn) {
            Some(f) if !f.locked => {
                debug_assert!(f.refcount > 0);
                f.locked = true;
                true
            }
            _ => false,
        }
    }

    /// Clears `PG_locked`; [`super::Mm::unlock_page`] also wakes waiters.
    pub(super) fn clear_page_locked(&mut self, pfn: Pfn) {
        let f = self.folio_mut(pfn);
        debug_assert!(
            f.as_ref().is_some_and(|f| f.locked),
            "unlocking unlocked page {pfn}"
        );
        if let Some(f) = f {
            f.locked = false;
        }
    }

    /// `get_page` (a reference on the folio).
    pub fn get_page(&mut self, pfn: Pfn) {
        if let Some(f) = self.folio_mut(pfn) {
            f.refcount += 1;
        }
    }

    /// `put_page`: drops one reference to the folio of `pfn`. Returns the
    /// folio's head and order when it became free; the caller hands its
    /// frames back to the frame allocator.
    pub fn put_page(&mut self, pfn: Pfn) -> Option<(Pfn, u8)> {
        let head = self.folio_head(pfn)?;
        let f = self.folios.get_mut(&head)?;
        debug_assert!(f.refcount > 0);
        f.refcount -= 1;
        if f.refcount > 0 {
            return None;
        }
        let f = self.folios.remove(&head)?;
        debug_assert_eq!(f.mapcount(), 0);
        debug_assert!(!f.locked, "freeing locked folio {head}");
        self.deferred.remove(&head);
        if let Some(slot) = f.swap {
            // Leaving the swap cache drops its slot reference; the swap
            // cache always holds one (`check_consistency` counts them).
            let put = self.swap.put(slot);
            debug_assert!(put.is_ok(), "folio {head} left swap slot {slot}: {put:?}");
        }
        Some((head, f.order))
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

    /// The huge PMDs overlapping `[start, end)`, by their first address.
    pub fn huge_pmds_in(&self, start: Hva, end: Hva) -> Vec<Hva> {
        self.ptes
            .huge_leaves(vpn(start), vpn(end))
            .map(|v| v << PAGE_SHIFT)
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
    /// A huge PMD (`pmd_trans_huge`): the 512 entries are the PTE view of
    /// one PMD-size folio, all with the PMD's bits.
    huge: bool,
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
                huge: false,
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

    /// Whether the leaf holding `vpn` is a huge PMD.
    pub fn is_huge(&self, vpn: u64) -> bool {
        self.leaves.get(&split(vpn).0).is_some_and(|l| l.huge)
    }

    /// Marks the leaf holding `vpn` as a huge PMD or a table of PTEs.
    pub fn set_huge(&mut self, vpn: u64, huge: bool) {
        if let Some(l) = self.leaves.get_mut(&split(vpn).0) {
            l.huge = huge;
        }
    }

    /// `pmd_none`: no leaf for the 2 MiB range holding `vpn`.
    pub fn leaf_is_none(&self, vpn: u64) -> bool {
        !self.leaves.contains_key(&split(vpn).0)
    }

    /// The first vpn of every huge leaf overlapping the vpns `[start, end)`.
    pub fn huge_leaves(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let leaves = if start < end {
            Some(self.order.range(split(start).0..=split(end - 1).0))
        } else {
            None
        };
        leaves
            .into_iter()
            .flatten()
            .filter(|l| self.leaves[l].huge)
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
