//! KSM: merging identical anonymous pages of mergeable VMAs (`mm/ksm.c`).
//!
//! The scanner walks mergeable pages in address order. A page whose content
//! matches a stable (already merged) page is merged into it; a page whose
//! checksum did not change since the previous pass goes into the unstable
//! tree, and two identical unstable pages are merged into a new stable page.
//! Merging write-protects the page inside `invalidate_range_start/end`, then
//! replaces it with the shared page inside another start/end pair, with
//! `change_pte` pointing secondary MMUs at the shared frame. A later write
//! breaks the sharing by copy-on-write (`fault.rs`). Only small pages are
//! merged: a page of a large folio is split out of it first, under its lock,
//! when a merge is tried (`try_to_merge_one_page`'s `split_huge_page`).

use std::collections::HashMap;

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent, NotifierPte};

use super::memory::FrameAccess;
use super::pgtable::{PresentPte, Pte};
use super::vma::{MmapFlags, VmaTree};
use super::{Hva, Mm, MmError, PAGE_SIZE, Pfn};

/// The tunables of `/sys/kernel/mm/ksm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KsmConfig {
    /// Pages scanned per wake-up of ksmd.
    pub pages_to_scan: u64,
    /// Sleep between wake-ups.
    pub sleep_millisecs: u64,
}

impl Default for KsmConfig {
    fn default() -> Self {
        // Linux's defaults.
        Self {
            pages_to_scan: 100,
            sleep_millisecs: 20,
        }
    }
}

/// KSM's counters, as `/sys/kernel/mm/ksm` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmStats {
    /// Shared KSM pages in use.
    pub pages_shared: u64,
    /// Additional mappings of shared pages (the memory saved, in pages).
    pub pages_sharing: u64,
    /// Pages in the unstable tree: unchanged, not yet matched.
    pub pages_unshared: u64,
    /// Scanned pages that change too fast to be considered.
    pub pages_volatile: u64,
    /// Completed passes over all mergeable memory.
    pub full_scans: u64,
    /// Merges done (a page mapped to a shared page).
    pub merges: u64,
}

/// What one call of [`Mm::ksm_scan`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmScanResult {
    pub scanned: u64,
    pub merged: u64,
}

/// Per-page scanner state (`struct rmap_item`).
#[derive(Clone, Copy, Debug)]
struct RmapItem {
    /// Checksum seen on the previous pass (`None`: never, or merged).
    oldchecksum: Option<u64>,
}

/// ksmd's private state, under `Mm::ksm`.
#[derive(Default)]
pub(super) struct KsmState {
    cursor: Hva,
    rmap_items: HashMap<Hva, RmapItem>,
    /// Checksum → pages of this pass waiting for a twin.
    unstable: HashMap<u64, Vec<Hva>>,
    /// Checksum → shared KSM frames.
    stable: HashMap<u64, Vec<Pfn>>,
    full_scans: u64,
    merges: u64,
}

impl Mm {
    /// One wake-up of ksmd (`ksm_do_scan`): scans up to `pages_to_scan`
    /// mergeable pages, merging what it can.
    pub fn ksm_scan(&self, pages_to_scan: u64) -> Result<KsmScanResult, MmError> {
        let _slice = crate::trace::slice!(HostOp(crate::trace::HostOp::KsmScan { pages_to_scan }));
        self.check_alive()?;
        let mut ksm = self.ksm.lock();
        let mut res = KsmScanResult::default();
        let mut wrapped = 0;
        while res.scanned < pages_to_scan {
            let Some(hva) = self.next_mergeable(ksm.cursor) else {
                // End of a full pass: the unstable tree is rebuilt each pass.
                ksm.cursor = 0;
                ksm.full_scans += 1;
                ksm.unstable.clear();
                wrapped += 1;
                if wrapped > 1 {
                    break; // nothing mergeable at all
                }
                continue;
            };
            ksm.cursor = hva + PAGE_SIZE;
            res.scanned += 1;
            if self.cmp_and_merge_page(&mut ksm, hva)? {
                res.merged += 1;
            }
        }
        ksm.merges += res.merged;
        Ok(res)
    }

    /// KSM's counters now.
    pub fn ksm_stats(&self) -> KsmStats {
        let ksm = self.ksm.lock();
        let pt = self.pt.lock();
        let (mut shared, mut mapped) = (0, 0);
        for m in pt.folios.values().filter(|m| m.ksm && m.mapcount() > 0) {
            shared += 1;
            mapped += m.mapcount() as u64;
        }
        let unshared: u64 = ksm.unstable.values().map(|v| v.len() as u64).sum();
        let items = ksm.rmap_items.len() as u64;
        KsmStats {
            pages_shared: shared,
            pages_sharing: mapped - shared,
            pages_unshared: unshared,
            pages_volatile: items.saturating_sub(mapped).saturating_sub(unshared),
            full_scans: ksm.full_scans,
            merges: ksm.merges,
        }
    }

    /// The first page at or after `from` in a mergeable, unlocked VMA.
    fn next_mergeable(&self, from: Hva) -> Option<Hva> {
        let vmas = self.mmap_lock.read();
        vmas.iter()
            .filter(|v| {
                v.flags.contains(MmapFlags::MERGEABLE) && !v.flags.contains(MmapFlags::LOCKED)
            })
            .find(|v| v.end > from)
            .map(|v| v.start.max(from))
    }

    /// `cmp_and_merge_page`. Returns whether `hva` was merged.
    fn cmp_and_merge_page(&self, ksm: &mut KsmState, hva: Hva) -> Result<bool, MmError> {
        // Hold the mmap lock for reading across the merge, as
        // try_to_merge_with_ksm_page does, so the VMA cannot be unmapped,
        // locked or made unmergeable under us.
        let vmas = self.mmap_lock.read();
        let mergeable = |h: Hva| {
            vmas.find(h).is_some_and(|v| {
                v.flags.contains(MmapFlags::MERGEABLE) && !v.flags.contains(MmapFlags::LOCKED)
            })
        };
        if !mergeable(hva) {
            ksm.rmap_items.remove(&hva);
            return Ok(false);
        }
        // follow_page(FOLL_GET): the page, with a reference so it can be
        // locked and cannot be freed while we look at it.
        let (pfn, is_ksm) = {
            let mut pt = self.pt.lock();
            match pt.present(hva) {
                Some(p) => {
                    pt.get_page(p.pfn);
                    (p.pfn, pt.folio(p.pfn).is_some_and(|m| m.ksm))
                }
                None => {
                    ksm.rmap_items.remove(&hva);
                    return Ok(false);
                }
            }
        };
        let merged = if is_ksm {
            ksm.rmap_items.insert(hva, RmapItem { oldchecksum: None });
            Ok(false) // already merged
        } else {
            self.cmp_and_merge_ref(ksm, &vmas, &mergeable, hva, pfn)
        };
        self.put_pages(vec![pfn]);
        merged
    }

    /// The body of `cmp_and_merge_page`, with a reference to `pfn` held.
    fn cmp_and_merge_ref(
        &self,
        ksm: &mut KsmState,
        vmas: &VmaTree,
        mergeable: &dyn Fn(Hva) -> bool,
        hva: Hva,
        pfn: Pfn,
    ) -> Result<bool, MmError> {
        let mem = self.memory();
        let checksum = mem.frame_checksum(pfn)?;

        // Is there a stable page with this content? (stable_tree_search)
        if let Some(kpfn) = self.stable_search(ksm, checksum, pfn)? {
            // get_ksm_page: a reference, so the stable page cannot be freed
            // (and its frame reused) before replace_page maps it.
            let merged = self.try_to_merge_one_page(vmas, hva, pfn, Some(kpfn), &[pfn]);
            self.put_pages(vec![kpfn]);
            if merged?.is_some() {
                ksm.rmap_items.insert(hva, RmapItem { oldchecksum: None });
                return Ok(true);
            }
        }

        // Only pages unchanged since the last pass may enter the unstable
        // tree: a changing page would only be merged to be broken again.
        let item = ksm
            .rmap_items
            .entry(hva)
            .or_insert(RmapItem { oldchecksum: None });
        if item.oldchecksum != Some(checksum) {
            item.oldchecksum = Some(checksum);
            return Ok(false);
        }

        // unstable_tree_search_insert: a twin with a reference taken
        // (get_mergeable_page).
        let mut twin = None;
        if let Some(list) = ksm.unstable.get(&checksum) {
            for &t in list {
                if t == hva || !mergeable(t) {
                    continue;
                }
                let tp = {
                    let mut pt = self.pt.lock();
                    match pt.present(t) {
                        Some(p) if p.pfn != pfn => {
                            pt.get_page(p.pfn);
                            p.pfn
                        }
                        _ => continue,
                    }
                };
                if mem.frames_identical(tp, pfn)? {
                    twin = Some((t, tp));
                    break;
                }
                self.put_pages(vec![tp]);
            }
        }
        let Some((tree_hva, tree_pfn)) = twin else {
            ksm.unstable.entry(checksum).or_default().push(hva);
            return Ok(false);
        };
        let merged = self.try_to_merge_two_pages(vmas, hva, pfn, tree_hva, tree_pfn);
        self.put_pages(vec![tree_pfn]);
        if let Some(list) = ksm.unstable.get_mut(&checksum) {
            list.retain(|&t| t != tree_hva);
        }
        let Some((kpfn, tree_merged)) = merged? else {
            return Ok(false);
        };
        // stable_tree_insert, under the page lock of the new KSM page (we
        // hold a reference to it, so lock_page cannot fail); if the tree
        // page was not merged after all, break_cow: the lone page stops being
        // a KSM page, and as its bytes exist nowhere else reclaim must write
        // them out.
        let mut pt = self.pt.lock();
        self.lock_page(&mut pt, kpfn)?;
        if !tree_merged
            && let Some(m) = pt.folio_mut(kpfn)
            && m.mapcount() <= 1
        {
            m.ksm = false;
            m.dirty = true;
        }
        self.unlock_page(&mut pt, kpfn);
        drop(pt);
        if tree_merged {
            ksm.stable
                .entry(mem.frame_checksum(kpfn)?)
                .or_default()
                .push(kpfn);
        }
        Ok(tree_merged)
    }

    /// `try_to_merge_two_pages`: our page becomes the KSM page, then the
    /// tree page is replaced by it. Returns the KSM frame if the first step
    /// succeeded, and whether the second did.
    /// Our references to both pages count as pins if they are pages of
    /// one large folio (cmp_and_merge_page's `split` case).
    fn try_to_merge_two_pages(
        &self,
        vmas: &VmaTree,
        hva: Hva,
        pfn: Pfn,
        tree_hva: Hva,
        tree_pfn: Pfn,
    ) -> Result<Option<(Pfn, bool)>, MmError> {
        let same = {
            let pt = self.pt.lock();
            pt.folio_head(pfn).is_some() && pt.folio_head(pfn) == pt.folio_head(tree_pfn)
        };
        let pins: &[Pfn] = if same { &[pfn, tree_pfn] } else { &[pfn] };
        let Some(kpfn) = self.try_to_merge_one_page(vmas, hva, pfn, None, pins)? else {
            return Ok(None);
        };
        let tree = self.try_to_merge_one_page(vmas, tree_hva, tree_pfn, Some(kpfn), &[tree_pfn])?;
        Ok(Some((kpfn, tree.is_some())))
    }

    /// `stable_tree_search`: a live KSM frame with the same bytes as `pfn`,
    /// returned with a reference taken (`get_ksm_page`).
    fn stable_search(
        &self,
        ksm: &mut KsmState,
        checksum: u64,
        pfn: Pfn,
    ) -> Result<Option<Pfn>, MmError> {
        let Some(list) = ksm.stable.get_mut(&checksum) else {
            return Ok(None);
        };
        let mut pt = self.pt.lock();
        // Drop stable nodes whose page went away.
        list.retain(|k| pt.folio(*k).is_some_and(|m| m.ksm && m.mapcount() > 0));
        for &k in list.iter() {
            if k != pfn && self.memory().frames_identical(k, pfn)? {
                pt.get_page(k);
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// `try_to_merge_one_page`: under the page lock of `pfn` (the caller
    /// holds a reference), write-protects `hva`'s page, then either makes it
    /// a KSM page (`kpfn == None`) or, if its bytes still equal `kpfn`'s,
    /// replaces it with `kpfn`. Returns the KSM frame now mapped at `hva`,
    /// or `None` if the page is locked, changed or pinned.
    ///
    /// The page lock closes the window between the write-protect and the
    /// KSM marking: a write fault that finds the page not yet KSM must lock
    /// it to reuse it in place (`do_wp_page`), so it waits here and then
    /// sees a KSM page, which it copies instead.
    ///
    /// A page of a large folio is split out of it first (KSM merges small
    /// pages only); `pins` are our references to that folio, page by page.
    fn try_to_merge_one_page(
        &self,
        vmas: &VmaTree,
        hva: Hva,
        pfn: Pfn,
        kpfn: Option<Pfn>,
        pins: &[Pfn],
    ) -> Result<Option<Pfn>, MmError> {
        if kpfn == Some(pfn) {
            return Ok(None); // ksm page forked
        }
        // trylock_page: rather than wait, go on scanning and come back.
        if !self.pt.lock().trylock_page(pfn) {
            return Ok(None);
        }
        let large = self.pt.lock().folio(pfn).is_some_and(|f| f.is_large());
        let merged = match large {
            true => match self.split_folio(vmas, pfn, pins) {
                Ok(true) => self.merge_locked_page(hva, pfn, kpfn),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            },
            false => self.merge_locked_page(hva, pfn, kpfn),
        };
        let mut pt = self.pt.lock();
        self.unlock_page(&mut pt, pfn);
        merged
    }

    /// `try_to_merge_one_page` with the page locked.
    fn merge_locked_page(
        &self,
        hva: Hva,
        pfn: Pfn,
        kpfn: Option<Pfn>,
    ) -> Result<Option<Pfn>, MmError> {
        let Some(orig) = self.write_protect_page(hva, pfn)? else {
            return Ok(None);
        };
        mm_hook!(self, KsmWriteProtected, hva);
        match kpfn {
            None => {
                let mut pt = self.pt.lock();
                // Still exclusively ours and unchanged since the write-protect
                // (an unmap may have raced: zap does not take page locks).
                if pt.pte(hva) != Some(Pte::Present(orig)) {
                    return Ok(None);
                }
                match pt.folio_mut(pfn) {
                    Some(m) if !m.is_large() && m.mapcount() == 1 => {
                        // set_page_stable_node(page, NULL): PageKsm from now.
                        m.ksm = true;
                        m.dirty = false; // now content-addressed, never written in place
                        if let Some(slot) = m.swap.take() {
                            pt.swap.put(slot)?;
                        }
                        Ok(Some(pfn))
                    }
                    _ => Ok(None),
                }
            }
            Some(k) => {
                if !self.memory().frames_identical(pfn, k)? {
                    return Ok(None);
                }
                Ok(self.replace_page(hva, pfn, k, orig)?.then_some(k))
            }
        }
    }

    /// `write_protect_page`: inside `invalidate_range_start/end`, makes the
    /// PTE read-only and clean (moving its dirty bit to the page) so the
    /// content can no longer change under a comparison, telling secondary
    /// MMUs with `change_pte` (`set_pte_at_notify`). Returns the PTE as it
    /// now is (`orig_pte`), or `None` if the page is not mapped there
    /// exclusively, or is pinned (a reference beyond its mapping and ours).
    fn write_protect_page(&self, hva: Hva, pfn: Pfn) -> Result<Option<PresentPte>, MmError> {
        let range = MmuNotifierRange::new(MmuNotifyEvent::ProtectionPage, hva, hva + PAGE_SIZE);
        self.mn_invalidate_range_start(&range);
        let orig = {
            let mut pt = self.pt.lock();
            match (pt.present(hva), pt.folio(pfn)) {
                (Some(p), Some(m)) if p.pfn == pfn && !m.is_large() && m.mapcount() == 1 => {
                    if p.writable || p.dirty {
                        // ptep_clear_flush (no notify: a downgrade), then the
                        // pin check: the mapping and our reference, no more.
                        if m.refcount != m.mapcount() + 1 {
                            None
                        } else {
                            if p.dirty
                                && let Some(m) = pt.folio_mut(pfn)
                            {
                                m.dirty = true;
                            }
                            let entry = PresentPte {
                                writable: false,
                                dirty: false,
                                ..p
                            };
                            if self.notifiers.has_notifiers() {
                                self.notifiers.change_pte(
                                    hva,
                                    NotifierPte {
                                        frame: pfn,
                                        writable: false,
                                    },
                                );
                            }
                            pt.update(hva, entry);
                            Some(entry)
                        }
                    } else {
                        Some(p)
                    }
                }
                _ => None,
            }
        };
        self.mn_invalidate_range_end(&range, false);
        Ok(orig)
    }

    /// `replace_page`: inside `invalidate_range_start/end`, points the PTE of
    /// `hva` at the KSM frame `kpfn`, read-only, telling secondary MMUs with
    /// `change_pte`, if the PTE is still `orig` (`pte_same`); the old page
    /// is released afterwards.
    fn replace_page(
        &self,
        hva: Hva,
        pfn: Pfn,
        kpfn: Pfn,
        orig: PresentPte,
    ) -> Result<bool, MmError> {
        let range = MmuNotifierRange::new(MmuNotifyEvent::KsmMerge, hva, hva + PAGE_SIZE);
        self.mn_invalidate_range_start(&range);
        let ok = {
            let mut pt = self.pt.lock();
            let live = pt.folio(kpfn).is_some_and(|m| m.ksm);
            if pt.pte(hva) == Some(Pte::Present(orig)) && live {
                // ptep_clear_flush (no notify: read-only to read-only of the
                // same content), then set_pte_at_notify.
                pt.unmap(hva);
                if self.notifiers.has_notifiers() {
                    self.notifiers.change_pte(
                        hva,
                        NotifierPte {
                            frame: kpfn,
                            writable: false,
                        },
                    );
                }
                pt.map(
                    hva,
                    PresentPte {
                        pfn: kpfn,
                        writable: false,
                        young: orig.young,
                        dirty: false,
                    },
                );
                true
            } else {
                false
            }
        };
        self.mn_invalidate_range_end(&range, false);
        if ok {
            self.put_pages(vec![pfn]);
        }
        Ok(ok)
    }
}
