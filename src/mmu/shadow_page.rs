//! Shadow pages and the state the MMU lock protects: the page hash, the
//! rmap, write protection of guest page tables, linking and zapping
//! (`kvm_mmu_get_page`, `link_shadow_page`, `kvm_mmu_zap_page`,
//! `account_shadowed`, `mmu_page_zap_pte` in `arch/x86/kvm/mmu/mmu.c`).
//!
//! A shadow page shadows one guest page table (its `gfn`) for one role, or,
//! when `direct`, a range of a guest large page split into 4 KiB sptes.
//! Synced shadow pages write-protect their guest table: every leaf spte
//! mapping that gfn is read-only, so a guest write to its own page table
//! faults and we drop the shadow pages derived from it before it lands
//! (`kvm_mmu_unprotect_page`). A root that must be dropped while a vCPU runs
//! on it is emptied and marked unsync instead: its entries are rebuilt by
//! faults, and it is resynced at the next CR3 load or flush, which is when a
//! real TLB would have to drop stale entries too.
//!
//! A leaf may also sit at level 2: a 2 MiB spte (`PT_PAGE_SIZE_MASK`),
//! recorded in the large rmap by the first gfn of its range, so a gfn
//! anywhere in the range finds it. None covers a guest table we shadow:
//! every gfn with an indirect shadow page counts against its 2 MiB range
//! (`kvm_mmu_gfn_disallow_lpage`), and the first one drops any large spte
//! already there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mm::{FrameAccess, FrameAllocator, FrameOwner, MachineMemory, Pfn};

use super::pte::{PT_ENTRIES, PT_WRITABLE_MASK, PT64_ROOT_4LEVEL};
use super::spte;
use super::stats::{MmuStats, add, inc};
use super::tlb::{FlushFrame, FlushReason, TlbFlush};
use super::walk::PagingState;
use super::{Fatal, MmuError, ReservedSlot};

/// Where an spte lives: the shadow page (by frame) and the index in it.
pub type SpteLoc = (Pfn, u16);

/// No gfn recorded for a leaf slot.
pub const NO_GFN: u64 = u64::MAX;

/// `union kvm_mmu_page_role`: everything besides the guest table's bytes
/// that decides what a shadow page's entries say. Pages (roots included)
/// are shared only between identical roles, so vCPUs in different paging
/// modes never use each other's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Role {
    /// 4 for a root (PML4), 1 for a table of 4 KiB sptes.
    pub level: u8,
    /// Access allowed by the guest entries above (`pt_access`), as
    /// `PteAccess` bits.
    pub access: u8,
    /// Shadows part of a guest large page rather than a guest table.
    pub direct: bool,
    /// CR0.WP: with WP clear a supervisor write to a read-only guest PTE
    /// gets a writable, supervisor-only spte, which a WP=1 vCPU must not
    /// use.
    pub cr0_wp: bool,
    /// EFER.NXE: sptes carry NX, and bit 63 of a guest PTE is a permission
    /// rather than a reserved bit.
    pub efer_nx: bool,
    /// CR4.SMEP without CR0.WP: the WP=0 write spte is also non-executable.
    pub smep_andnot_wp: bool,
    /// CR4.SMAP without CR0.WP.
    pub smap_andnot_wp: bool,
}

impl Role {
    /// The role of a shadow page of `level` under the paging `mode`
    /// (`kvm_calc_shadow_mmu_root_page_role` and `kvm_mmu_child_role`).
    pub fn new(level: u8, access: u8, direct: bool, mode: &PagingState) -> Self {
        Role {
            level,
            access,
            direct,
            cr0_wp: mode.cr0_wp,
            efer_nx: mode.efer_nx,
            smep_andnot_wp: mode.cr4_smep && !mode.cr0_wp,
            smap_andnot_wp: mode.cr4_smap && !mode.cr0_wp,
        }
    }
}

/// `struct kvm_mmu_page`.
#[derive(Debug)]
pub struct ShadowPage {
    /// The frame holding the 512 sptes (the table the CPU walks).
    pub pfn: Pfn,
    /// Guest table shadowed, or first gfn covered when `direct`.
    pub gfn: u64,
    pub role: Role,
    /// Entries of other shadow pages that point here (`parent_ptes`).
    pub parents: Vec<SpteLoc>,
    /// Roots: how many root-cache entries hold it.
    pub root_count: u32,
    /// Not write-protecting its guest table: entries may be stale until
    /// the next invlpg, flush or CR3 load.
    pub unsync: bool,
    /// Levels 1 and 2: the gfn each leaf spte maps (`NO_GFN` when none);
    /// for a 2 MiB leaf, the first gfn of its range.
    pub leaf_gfns: Vec<u64>,
}

/// One entry of the root cache, by guest CR3 and role.
#[derive(Clone, Copy, Debug)]
pub struct RootEntry {
    /// Guest CR3 page (PCD/PWT ignored).
    pub cr3_gfn: u64,
    pub role: Role,
    pub sp: Pfn,
    pub last_used: u64,
}

/// Everything under the MMU lock (`kvm->mmu_lock`).
#[derive(Default)]
pub struct MmuState {
    pub pages: HashMap<Pfn, ShadowPage>,
    /// `mmu_page_hash`: synced and direct pages by (gfn, role).
    pub hash: HashMap<(u64, Role), Pfn>,
    /// Every non-direct page by guest table gfn (synced or not).
    pub by_gfn: HashMap<u64, Vec<Pfn>>,
    /// Guest table gfns write-protected, with the number of synced pages
    /// shadowing each (`kvm_mmu_page_track` write tracking).
    pub protected: HashMap<u64, u32>,
    /// Unsync, non-root pages: dropped at the next sync.
    pub unsync: HashSet<Pfn>,
    /// gfn → 4 KiB leaf sptes mapping it (`rmap`).
    pub rmap: BTreeMap<u64, Vec<SpteLoc>>,
    /// First gfn of a 2 MiB range → the 2 MiB sptes mapping it (KVM's
    /// rmap of `PG_LEVEL_2M`).
    pub rmap_large: BTreeMap<u64, Vec<SpteLoc>>,
    /// `gfn >> 9` → indirect shadow pages of guest tables in that 2 MiB
    /// range (`lpage_info.disallow_lpage`): no 2 MiB spte while non-zero.
    pub lpage_disallow: HashMap<u64, u32>,
    pub roots: Vec<RootEntry>,
    /// The root each vCPU runs on (never recycled).
    pub vcpu_roots: Vec<Option<Pfn>>,
    pub tick: u64,
    /// After `release`: nothing may be installed any more.
    pub released: bool,
}

/// The MMU lock held, with what a modification needs: machine memory to
/// write sptes, the allocator for shadow pages, and the frames to flush
/// before the lock is dropped.
pub struct Ctx<'a> {
    pub st: &'a mut MmuState,
    pub mem: &'a dyn MachineMemory,
    pub frames: &'a FrameAllocator,
    pub stats: &'a MmuStats,
    pub flush: Vec<FlushFrame>,
    /// Where a flush still pending when the context is dropped goes.
    pub tlb: &'a dyn TlbFlush,
    /// Where an error goes that nobody can be told directly.
    pub fatal: &'a Fatal,
    /// The VMM's PML4 slot: held in every root, never zapped.
    pub reserved: Option<ReservedSlot>,
    /// Frames of shadow pages freed by this operation: back to the
    /// allocator only once the flush naming them (`TableChanged`) has
    /// returned, so no cached view of the old table can reach their next
    /// use.
    pub quarantine: Vec<Pfn>,
    /// Every vCPU was kicked out of the guest in this operation (see
    /// [`Ctx::kick_vcpus`]); none runs again before the MMU lock is
    /// released.
    pub kicked: bool,
}

/// An operation that fails half-way (no frame for a shadow page) may already
/// have zapped or write-protected sptes: their flush must still be sent
/// before the MMU lock is released, or a vCPU keeps a translation the
/// tables no longer hold (rule 3). Explicit `flush_now` calls leave nothing
/// for this.
impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        let tlb = self.tlb;
        if let Err(e) = self.flush_now(tlb) {
            self.fatal.raise(e);
        }
    }
}

impl Ctx<'_> {
    /// Whether entry `idx` of a page of `level` is the VMM's reserved slot.
    fn is_reserved(&self, level: u8, idx: usize) -> bool {
        level == PT64_ROOT_4LEVEL && self.reserved.is_some_and(|r| r.index == idx)
    }

    /// The spte word `idx` of shadow page `sp`.
    pub fn word(&self, sp: Pfn, idx: usize) -> Result<&AtomicU64, MmuError> {
        self.mem
            .frame_word(sp, idx)
            .map_err(|_| MmuError::BadShadowPage(sp))
    }

    /// Sends the gathered flush and waits for it (`kvm_flush_remote_tlbs`).
    /// An error means some vCPU may still reach a frame it must not: the
    /// caller stops the VM.
    pub fn flush_now(&mut self, tlb: &dyn TlbFlush) -> Result<(), MmuError> {
        if self.flush.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.flush);
        // One entry per frame. `Freed` (the host may discard the contents)
        // only when every request for the frame says so: a frame also
        // zapped, write-protected or aged elsewhere keeps its contents.
        batch.sort_unstable_by_key(|f| (f.pfn, f.reason == FlushReason::Freed));
        batch.dedup_by_key(|f| f.pfn);
        inc(&self.stats.remote_tlb_flush);
        add(&self.stats.remote_tlb_flush_frames, batch.len() as u64);
        tlb.flush_frames(&batch).map_err(|e| {
            // Whoever gets the error, the VM must stop before a vCPU can
            // use what was not flushed (the quarantined frames stay out of
            // use for good).
            let e = MmuError::from(e);
            self.fatal.raise(e.clone());
            e
        })?;
        for p in std::mem::take(&mut self.quarantine) {
            self.frames
                .free(p, FrameOwner::External)
                .map_err(MmuError::Memory)?;
        }
        Ok(())
    }

    pub fn is_protected(&self, gfn: u64) -> bool {
        self.st.protected.contains_key(&gfn)
    }

    /// `kvm_mmu_get_page`: a shadow page for (gfn, role), reused from the
    /// hash when one exists. `protect == false` makes a fresh unsync page
    /// that does not write-protect its table (used when the access being
    /// fixed writes that very table).
    pub fn get_page(&mut self, gfn: u64, role: Role, protect: bool) -> Result<Pfn, MmuError> {
        if (protect || role.direct)
            && let Some(&p) = self.st.hash.get(&(gfn, role))
        {
            return Ok(p);
        }
        let pfn = self.alloc_shadow_frame()?;
        inc(&self.stats.mmu_cache_miss);
        if let Some(r) = self.reserved.filter(|_| role.level == PT64_ROOT_4LEVEL) {
            self.word(pfn, r.index)?.store(r.entry, Ordering::Release);
        }
        let unsync = !protect && !role.direct;
        self.st.pages.insert(
            pfn,
            ShadowPage {
                pfn,
                gfn,
                role,
                parents: Vec::new(),
                root_count: 0,
                unsync,
                leaf_gfns: if role.level <= 2 {
                    vec![NO_GFN; PT_ENTRIES]
                } else {
                    Vec::new()
                },
            },
        );
        if role.direct {
            self.st.hash.insert((gfn, role), pfn);
        } else {
            self.by_gfn_add(gfn, pfn)?;
            if unsync {
                self.st.unsync.insert(pfn);
            } else {
                self.st.hash.insert((gfn, role), pfn);
                self.account_shadowed(gfn)?;
            }
        }
        Ok(pfn)
    }

    fn alloc_shadow_frame(&mut self) -> Result<Pfn, MmuError> {
        if let Ok(p) = self.frames.alloc(FrameOwner::External) {
            return Ok(p);
        }
        if !self.quarantine.is_empty() {
            // Frames this operation freed: flush, and they are free again.
            let tlb = self.tlb;
            self.flush_now(tlb)?;
        }
        match self.frames.alloc(FrameOwner::External) {
            Ok(p) => Ok(p),
            Err(_) => {
                // Make room by recycling an unused root, as KVM does when it
                // runs out of shadow pages (`make_mmu_pages_available`).
                if self.recycle_root()? {
                    // The recycled root's frames come back only after the
                    // flush that drops every cached view of them.
                    let tlb = self.tlb;
                    self.flush_now(tlb)?;
                    self.frames
                        .alloc(FrameOwner::External)
                        .map_err(MmuError::Memory)
                } else {
                    Err(MmuError::OutOfShadowPages)
                }
            }
        }
    }

    /// `account_shadowed`: the first synced page for `gfn` write-protects
    /// every leaf spte mapping it.
    fn account_shadowed(&mut self, gfn: u64) -> Result<(), MmuError> {
        let c = self.st.protected.entry(gfn).or_insert(0);
        *c += 1;
        if *c > 1 {
            return Ok(());
        }
        let locs = self.st.rmap.get(&gfn).cloned().unwrap_or_default();
        for (sp, idx) in locs {
            let w = self.word(sp, idx as usize)?;
            let old = w.fetch_and(!PT_WRITABLE_MASK, Ordering::AcqRel);
            if spte::is_present(old) && spte::is_writable(old) {
                self.flush.push(FlushFrame {
                    pfn: spte::pfn(old),
                    reason: FlushReason::WriteProtected,
                });
            }
        }
        Ok(())
    }

    fn unaccount_shadowed(&mut self, gfn: u64) {
        if let Some(c) = self.st.protected.get_mut(&gfn) {
            *c -= 1;
            if *c == 0 {
                self.st.protected.remove(&gfn);
            }
        }
    }

    /// `link_shadow_page`.
    pub fn link(&mut self, parent: Pfn, idx: usize, child: Pfn) -> Result<(), MmuError> {
        self.word(parent, idx)?
            .store(spte::make_nonleaf(child), Ordering::Release);
        if let Some(c) = self.st.pages.get_mut(&child) {
            c.parents.push((parent, idx as u16));
        }
        Ok(())
    }

    /// An indirect shadow page for guest table `gfn` now exists: no 2 MiB
    /// spte may cover `gfn` (`account_shadowed` →
    /// `kvm_mmu_gfn_disallow_lpage`); one that does is zapped.
    fn by_gfn_add(&mut self, gfn: u64, sp: Pfn) -> Result<(), MmuError> {
        self.st.by_gfn.entry(gfn).or_default().push(sp);
        *self.st.lpage_disallow.entry(gfn >> 9).or_default() += 1;
        let base = gfn & !511;
        let large = self.st.rmap_large.get(&base).cloned().unwrap_or_default();
        for (p, idx) in large {
            self.zap_entry(p, usize::from(idx), FlushReason::Zapped)?;
        }
        Ok(())
    }

    fn by_gfn_remove(&mut self, gfn: u64, sp: Pfn) {
        if let Some(v) = self.st.by_gfn.get_mut(&gfn) {
            let before = v.len();
            v.retain(|&x| x != sp);
            let removed = before - v.len();
            if v.is_empty() {
                self.st.by_gfn.remove(&gfn);
            }
            if removed > 0
                && let Some(c) = self.st.lpage_disallow.get_mut(&(gfn >> 9))
            {
                *c -= removed as u32;
                if *c == 0 {
                    self.st.lpage_disallow.remove(&(gfn >> 9));
                }
            }
        }
    }

    /// `kvm_mmu_max_mapping_level`'s `disallow_lpage`: a guest table we
    /// shadow lives in the 2 MiB gfn range from `base`.
    pub fn lpage_disallowed(&self, base: u64) -> bool {
        self.st.lpage_disallow.contains_key(&(base >> 9))
    }

    /// Records a leaf spte in the rmap: a 4 KiB one under its gfn, a 2 MiB
    /// one (in a level-2 page) under the first gfn of its range.
    pub fn rmap_add(&mut self, gfn: u64, loc: SpteLoc) {
        let level = self.st.pages.get(&loc.0).map_or(1, |p| p.role.level);
        let map = if level == 1 {
            &mut self.st.rmap
        } else {
            &mut self.st.rmap_large
        };
        map.entry(gfn).or_default().push(loc);
        if let Some(sp) = self.st.pages.get_mut(&loc.0) {
            sp.leaf_gfns[loc.1 as usize] = gfn;
        }
    }

    fn rmap_remove(&mut self, loc: SpteLoc) {
        let Some(sp) = self.st.pages.get_mut(&loc.0) else {
            return;
        };
        if sp.leaf_gfns.is_empty() {
            return;
        }
        let gfn = std::mem::replace(&mut sp.leaf_gfns[loc.1 as usize], NO_GFN);
        let map = if sp.role.level == 1 {
            &mut self.st.rmap
        } else {
            &mut self.st.rmap_large
        };
        if let Some(list) = map.get_mut(&gfn) {
            list.retain(|&l| l != loc);
            if list.is_empty() {
                map.remove(&gfn);
            }
        }
    }

    /// A leaf spte `old` at `sp[idx]` was cleared: it leaves the rmap and
    /// its frames (512 for a 2 MiB one) are flushed with `reason`.
    fn leaf_zapped(&mut self, sp: Pfn, idx: usize, old: u64, reason: FlushReason) {
        self.rmap_remove((sp, idx as u16));
        inc(&self.stats.spte_zapped);
        let (first, n) = if spte::is_large(old) {
            inc(&self.stats.spte_zapped_2m);
            (spte::pfn(old), 512)
        } else {
            (spte::pfn(old), 1)
        };
        crate::trace::emit!(SpteZapped {
            sp,
            idx: idx as u64,
            frame: first,
            large: n > 1,
            reason: &reason,
        });
        for pfn in first..first + n {
            self.flush.push(FlushFrame { pfn, reason });
        }
    }

    /// `mmu_page_zap_pte`: clears entry `idx` of `sp`. A leaf leaves the
    /// rmap and its frame is flushed with `reason`; a child table loses this
    /// parent and is zapped when it has none left.
    pub fn zap_entry(&mut self, sp: Pfn, idx: usize, reason: FlushReason) -> Result<(), MmuError> {
        let level = match self.st.pages.get(&sp) {
            Some(p) => p.role.level,
            None => return Ok(()),
        };
        if self.is_reserved(level, idx) {
            return Ok(());
        }
        if level > 1 {
            // Unlinking a table: see `kick_vcpus`. Only the MMU clears a
            // present entry, under its lock, so the entry read here is
            // still a link when the swap below takes it.
            let cur = self.word(sp, idx)?.load(Ordering::Acquire);
            if spte::is_present(cur) && !spte::is_large(cur) {
                self.kick_vcpus(sp)?;
            }
        }
        let old = self.word(sp, idx)?.swap(0, Ordering::AcqRel);
        if !spte::is_present(old) {
            return Ok(());
        }
        if level == 1 || spte::is_large(old) {
            self.leaf_zapped(sp, idx, old, reason);
        } else {
            self.table_changed(sp);
            let child = spte::pfn(old);
            let orphan = match self.st.pages.get_mut(&child) {
                Some(c) => {
                    c.parents.retain(|&l| l != (sp, idx as u16));
                    c.parents.is_empty() && c.root_count == 0
                }
                None => false,
            };
            if orphan {
                self.zap_page(child, reason)?;
            } else {
                self.flush_subtree(child)?;
            }
        }
        Ok(())
    }

    /// Before the first table a vCPU may reach is unlinked or emptied in
    /// this operation (here `sp`, whose entries or parent links go): flushes
    /// `sp` as a changed table at once, which kicks every vCPU out of guest
    /// mode (`kvm_reload_remote_mmus`). A vCPU's path back into the guest
    /// first puts back what exception delivery needs, and that waits for
    /// the MMU lock held here, so no vCPU runs on the changed tables before
    /// they are usable. Without it, between the unlink and the flush that
    /// follows, the host KVM could walk our tables for a ring-3 vCPU's
    /// exception and find its stacks gone: a triple fault. Once per
    /// operation: the vCPUs stay out until the lock is released.
    fn kick_vcpus(&mut self, sp: Pfn) -> Result<(), MmuError> {
        if self.kicked {
            return Ok(());
        }
        self.kicked = true;
        self.table_changed(sp);
        let tlb = self.tlb;
        self.flush_now(tlb)
    }

    /// Names shadow table `sp` in the flush: a link in it was cleared or it
    /// was freed (`FlushReason::TableChanged`).
    fn table_changed(&mut self, sp: Pfn) {
        inc(&self.stats.mmu_table_changed);
        self.flush.push(FlushFrame {
            pfn: sp,
            reason: FlushReason::TableChanged,
        });
    }

    /// Queues a flush of every leaf frame reachable under `sp`, after an
    /// entry linking `sp` was cleared while `sp` itself survives under other
    /// parents (a table shared by several roots). Its leaves stay present,
    /// so nothing else flushes their frames, yet a vCPU, or the host KVM's
    /// own shadow of our tables (docs/design.md, "TLB shootdown": kept per root
    /// until the frame is invalidated in the host), may still translate
    /// through the link that is gone: after the guest unmaps a PML4 entry
    /// and invlpg's, or after a root is recycled and its frame reused as
    /// another root. Flushes are by frame, so the frames below are what
    /// must be flushed (KVM flushes all TLBs after any zap). Always as
    /// `Zapped`, never `Freed`, whatever freed the link: these frames stay
    /// mapped and keep their contents.
    fn flush_subtree(&mut self, sp: Pfn) -> Result<(), MmuError> {
        let mut stack = vec![sp];
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            if !seen.insert(p) {
                continue;
            }
            let Some(level) = self.st.pages.get(&p).map(|pg| pg.role.level) else {
                continue;
            };
            for idx in 0..PT_ENTRIES {
                if self.is_reserved(level, idx) {
                    continue;
                }
                let e = self.word(p, idx)?.load(Ordering::Acquire);
                if !spte::is_present(e) {
                    continue;
                }
                if level == 1 || spte::is_large(e) {
                    let n = if spte::is_large(e) { 512 } else { 1 };
                    for pfn in spte::pfn(e)..spte::pfn(e) + n {
                        self.flush.push(FlushFrame {
                            pfn,
                            reason: FlushReason::Zapped,
                        });
                    }
                } else {
                    stack.push(spte::pfn(e));
                }
            }
        }
        Ok(())
    }

    /// `kvm_mmu_zap_page`: unlinks `sp` from its parents, zaps its entries
    /// (and the subtrees only it held) and frees it. A root still in the
    /// root cache is emptied and marked unsync instead of freed.
    pub fn zap_page(&mut self, sp: Pfn, reason: FlushReason) -> Result<(), MmuError> {
        let mut stack = vec![sp];
        while let Some(p) = stack.pop() {
            let Some(page) = self.st.pages.get_mut(&p) else {
                continue;
            };
            crate::trace::emit!(ShadowPageZapped {
                sp: p,
                level: page.role.level,
            });
            let in_use = page.root_count > 0;
            if in_use || !page.parents.is_empty() {
                if in_use {
                    // An emptied root is counted as zapped, as KVM counts it.
                    inc(&self.stats.mmu_shadow_zapped);
                }
                self.kick_vcpus(p)?;
            }
            let Some(page) = self.st.pages.get_mut(&p) else {
                continue;
            };
            let parents = std::mem::take(&mut page.parents);
            let level = page.role.level;
            for (pp, idx) in parents {
                if self.st.pages.contains_key(&pp) {
                    self.word(pp, idx as usize)?.store(0, Ordering::Release);
                    self.table_changed(pp);
                }
            }
            for idx in 0..PT_ENTRIES {
                if level == 1 {
                    self.zap_entry(p, idx, reason)?;
                    continue;
                }
                if self.is_reserved(level, idx) {
                    continue;
                }
                let old = self.word(p, idx)?.swap(0, Ordering::AcqRel);
                if !spte::is_present(old) {
                    continue;
                }
                if spte::is_large(old) {
                    self.leaf_zapped(p, idx, old, reason);
                    continue;
                }
                let child = spte::pfn(old);
                let orphan = match self.st.pages.get_mut(&child) {
                    Some(c) => {
                        c.parents.retain(|&l| l != (p, idx as u16));
                        c.parents.is_empty() && c.root_count == 0
                    }
                    None => continue,
                };
                if orphan {
                    stack.push(child);
                } else {
                    // Unlinked but alive elsewhere: see `flush_subtree`.
                    self.flush_subtree(child)?;
                }
            }
            self.unhash(p);
            let keep = self.st.pages.get(&p).is_some_and(|pg| pg.root_count > 0);
            if keep {
                // A root in use stays, emptied (KVM marks it invalid and
                // counts it zapped too); see `kick_vcpus`.
                if let Some(pg) = self.st.pages.get_mut(&p) {
                    pg.unsync = true;
                }
                self.table_changed(p);
                continue;
            }
            self.st.pages.remove(&p);
            self.st.unsync.remove(&p);
            // Its contents no longer hold; the frame is freed after the
            // flush (see `quarantine`).
            self.table_changed(p);
            self.quarantine.push(p);
            inc(&self.stats.mmu_shadow_zapped);
        }
        Ok(())
    }

    /// Takes a page out of the hash, the gfn index and write protection.
    fn unhash(&mut self, p: Pfn) {
        let Some(page) = self.st.pages.get(&p) else {
            return;
        };
        let (gfn, role, unsync) = (page.gfn, page.role, page.unsync);
        if self.st.hash.get(&(gfn, role)) == Some(&p) {
            self.st.hash.remove(&(gfn, role));
        }
        if !role.direct {
            self.by_gfn_remove(gfn, p);
            if !unsync {
                self.unaccount_shadowed(gfn);
            }
        }
    }

    /// `kvm_mmu_unprotect_page`: drops every page shadowing the guest table
    /// `gfn`, so the guest may write it.
    pub fn unprotect_gfn(&mut self, gfn: u64, reason: FlushReason) -> Result<(), MmuError> {
        let pages = self.st.by_gfn.get(&gfn).cloned().unwrap_or_default();
        for p in pages {
            self.zap_page(p, reason)?;
        }
        Ok(())
    }

    /// Resyncs a root: empties it and write-protects its table again.
    pub fn resync_root(&mut self, root: Pfn) -> Result<(), MmuError> {
        let Some(page) = self.st.pages.get(&root) else {
            return Ok(());
        };
        if !page.unsync {
            return Ok(());
        }
        let (gfn, role) = (page.gfn, page.role);
        for idx in 0..PT_ENTRIES {
            self.zap_entry(root, idx, FlushReason::Zapped)?;
        }
        if let Some(pg) = self.st.pages.get_mut(&root) {
            pg.unsync = false;
        }
        self.by_gfn_add(gfn, root)?;
        if let std::collections::hash_map::Entry::Vacant(e) = self.st.hash.entry((gfn, role)) {
            e.insert(root);
        }
        self.account_shadowed(gfn)
    }

    /// `kvm_mmu_sync_roots`, the simple way: drops every unsync page, so no
    /// stale entry survives a CR3 load or a guest flush.
    pub fn sync_unsync(&mut self) -> Result<(), MmuError> {
        let pages: Vec<Pfn> = self.st.unsync.iter().copied().collect();
        for p in pages {
            self.zap_page(p, FlushReason::Zapped)?;
        }
        Ok(())
    }

    /// Drops the least recently used root no vCPU runs on
    /// (`mmu_recycled`). Returns whether one was dropped.
    pub fn recycle_root(&mut self) -> Result<bool, MmuError> {
        let in_use = &self.st.vcpu_roots;
        let victim = self
            .st
            .roots
            .iter()
            .enumerate()
            .filter(|(_, r)| !in_use.contains(&Some(r.sp)))
            .min_by_key(|(_, r)| r.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else { return Ok(false) };
        let r = self.st.roots.remove(i);
        inc(&self.stats.mmu_recycled);
        self.drop_root(r.sp)?;
        Ok(true)
    }

    /// Releases a root-cache reference and zaps the root.
    pub fn drop_root(&mut self, sp: Pfn) -> Result<(), MmuError> {
        if let Some(p) = self.st.pages.get_mut(&sp) {
            p.root_count = p.root_count.saturating_sub(1);
        }
        self.zap_page(sp, FlushReason::Zapped)
    }

    /// Leaf sptes mapping gfns in `[g0, g1)`: the 4 KiB ones, and the
    /// 2 MiB ones whose range meets it (by their first gfn).
    pub fn rmap_range(&self, g0: u64, g1: u64) -> Vec<(u64, SpteLoc)> {
        let mut out: Vec<(u64, SpteLoc)> = self
            .st
            .rmap
            .range(g0..g1)
            .flat_map(|(&g, locs)| locs.iter().map(move |&l| (g, l)))
            .collect();
        if !self.st.rmap_large.is_empty() && g0 < g1 {
            out.extend(
                self.st
                    .rmap_large
                    .range(g0 & !511..g1)
                    .flat_map(|(&g, locs)| locs.iter().map(move |&l| (g, l))),
            );
        }
        out
    }
}
