//! The coherence checker: docs/design.md rules 1 (coherence) and 5 (isolation)
//! over the host mm and the shadow MMU together.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::mm::{FrameAccess, FrameOwner, MmError, PAGE_SIZE, Pfn, Pte};

use super::pte::{
    PT_ENTRIES, PT_USER_MASK, PT64_NX_MASK, PT64_ROOT_4LEVEL, PteAccess, level_shift,
};
use super::shadow_page::{MmuState, NO_GFN, SpteLoc};
use super::spte;
use super::walk::{Access, GuestMmu, GuestPtMemory, WalkError};
use super::{Inner, ShadowMmu};

/// What the checker found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoherenceError {
    /// An invariant does not hold: which, and where, as a sentence.
    #[error("shadow MMU incoherent: {0}")]
    Incoherent(String),
    /// A shadow page's frame could not be read.
    #[error("shadow MMU incoherent: shadow page {pfn:#x} unreadable")]
    Frame {
        /// The shadow page.
        pfn: Pfn,
        /// Why.
        #[source]
        source: MmError,
    },
    /// The guest walk behind an spte failed other than by a page fault.
    #[error("shadow MMU incoherent: vCPU {vcpu}: the walk of gva {gva:#x} behind an spte failed")]
    Walk {
        /// The vCPU whose tables were walked.
        vcpu: usize,
        /// The address.
        gva: u64,
        /// Why.
        #[source]
        source: WalkError,
    },
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(CoherenceError::Incoherent(format!($($fmt)*)));
        }
    };
}

/// Guest memory read without side effects and without faulting (the checker
/// holds the MMU lock, so it must not call into anything that could run a
/// notifier).
struct PeekMem<'a>(&'a Inner);

impl GuestPtMemory for PeekMem<'_> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        let hva = self.0.slots.gfn_to_hva(gpa / PAGE_SIZE)?;
        let Some(Pte::Present(p)) = self.0.mm.pte(hva) else {
            return None;
        };
        let w = self
            .0
            .mm
            .memory()
            .frame_word(p.pfn, ((gpa % PAGE_SIZE) / 8) as usize)
            .ok()?;
        Some(w.load(Ordering::Acquire))
    }
    fn cmpxchg_gpte(&self, _gpa: u64, _old: u64, _new: u64) -> Option<Result<(), u64>> {
        Some(Ok(())) // pretend, write nothing
    }
    fn is_ram(&self, gpa: u64) -> bool {
        self.0.slots.gfn_to_hva(gpa / PAGE_SIZE).is_some()
    }
}

impl ShadowMmu {
    /// Checks rules 1 and 5. Call it at a quiescent point (no fault or mm
    /// operation running); it takes the MMU lock and reads the host page
    /// table.
    pub fn check_coherence(&self) -> Result<(), CoherenceError> {
        let inner = &self.inner;
        let st = inner.state.lock();
        let quiet = inner.inv.in_progress() == 0;
        let mm_owner = inner.mm.frame_owner();
        let mut seen: HashMap<SpteLoc, u64> = HashMap::new();

        // Tables: every shadow page is a Shadow frame, every non-leaf entry
        // points at a known child that lists it as a parent.
        for (&p, page) in &st.pages {
            ensure!(page.pfn == p, "shadow page {p} records frame {}", page.pfn);
            ensure!(
                inner.mm.frames().owner(p).ok() == Some(FrameOwner::External),
                "shadow page {p} is not a shadow frame"
            );
            for &(pp, idx) in &page.parents {
                let e = word(inner, pp, idx as usize)?;
                ensure!(
                    spte::is_present(e) && spte::pfn(e) == p,
                    "shadow page {p} lists parent {pp}[{idx}] which does not point at it"
                );
            }
            for idx in 0..PT_ENTRIES {
                let e = word(inner, p, idx)?;
                if page.role.level == PT64_ROOT_4LEVEL
                    && let Some(r) = inner.cfg.reserved.filter(|r| r.index == idx)
                {
                    // Rule 5: the VMM's slot links its own tables, in every
                    // root, and nothing else.
                    ensure!(
                        e == r.entry,
                        "root {p}[{idx}] is {e:#x}, not the VMM's reserved entry {:#x}",
                        r.entry
                    );
                    continue;
                }
                if !spte::is_present(e) {
                    continue;
                }
                if page.role.level > 1 && !spte::is_large(e) {
                    let c = spte::pfn(e);
                    let child = st.pages.get(&c);
                    ensure!(
                        child.is_some(),
                        "entry {p}[{idx}] points at {c}, not a shadow page"
                    );
                    ensure!(
                        child.is_some_and(|c| c.parents.contains(&(p, idx as u16))),
                        "child {c} does not list parent {p}[{idx}]"
                    );
                    continue;
                }
                // A leaf (4 KiB, or 2 MiB at level 2): rule 5 first, for
                // every frame it maps.
                let large = spte::is_large(e);
                ensure!(
                    page.role.level == 1 || (large && page.role.level == 2),
                    "leaf {p}[{idx}] at level {} (large: {large})",
                    page.role.level
                );
                let n = if large { 512 } else { 1 };
                let gfn0 = page.leaf_gfns.get(idx).copied().unwrap_or(NO_GFN);
                ensure!(gfn0 != NO_GFN, "leaf {p}[{idx}] has no gfn");
                seen.insert((p, idx as u16), gfn0);
                if large {
                    ensure!(
                        spte::pfn(e).is_multiple_of(512) && gfn0.is_multiple_of(512),
                        "2 MiB leaf {p}[{idx}] at frame {} for gfn {gfn0:#x} is unaligned",
                        spte::pfn(e)
                    );
                    ensure!(
                        !st.lpage_disallow.contains_key(&(gfn0 >> 9)),
                        "2 MiB leaf {p}[{idx}] covers a shadowed guest table near gfn {gfn0:#x}"
                    );
                }
                for i in 0..n {
                    let f = spte::pfn(e) + i;
                    let gfn = gfn0 + i;
                    let owner = inner.mm.frames().owner(f).ok();
                    ensure!(
                        owner == Some(mm_owner),
                        "leaf {p}[{idx}] maps frame {f} owned by {owner:?}, not guest memory"
                    );
                    let hva = inner.slots.gfn_to_hva(gfn);
                    ensure!(
                        hva.is_some(),
                        "leaf {p}[{idx}] maps gfn {gfn:#x} outside every memslot"
                    );
                    if quiet && let Some(hva) = hva {
                        let host = inner.mm.pte(hva);
                        let Some(Pte::Present(hp)) = host else {
                            return Err(CoherenceError::Incoherent(format!(
                                "leaf {p}[{idx}] maps gfn {gfn:#x} (hva {hva:#x}) whose host PTE is {host:?}"
                            )));
                        };
                        ensure!(
                            hp.pfn == f,
                            "leaf {p}[{idx}] maps frame {f} but the host maps hva {hva:#x} to {}",
                            hp.pfn
                        );
                        if spte::is_writable(e) {
                            ensure!(
                                hp.writable,
                                "leaf {p}[{idx}] writable over a read-only host PTE at {hva:#x}"
                            );
                            ensure!(
                                !st.protected.contains_key(&gfn),
                                "leaf {p}[{idx}] writable over write-protected guest table gfn {gfn:#x}"
                            );
                        }
                    }
                }
            }
        }

        // The rmap and the tables agree both ways.
        let mut rmap_count = 0;
        for (&gfn, locs) in st.rmap.iter().chain(&st.rmap_large) {
            for loc in locs {
                rmap_count += 1;
                ensure!(
                    seen.get(loc) == Some(&gfn),
                    "rmap says {loc:?} maps gfn {gfn:#x}, tables say {:?}",
                    seen.get(loc)
                );
            }
        }
        ensure!(
            rmap_count == seen.len(),
            "{} leaf sptes but {rmap_count} rmap entries",
            seen.len()
        );

        // Write protection matches the synced pages.
        let mut prot: HashMap<u64, u32> = HashMap::new();
        for page in st.pages.values().filter(|p| !p.role.direct && !p.unsync) {
            *prot.entry(page.gfn).or_default() += 1;
        }
        ensure!(
            prot == st.protected,
            "write-protection counts {:?} but synced pages {prot:?}",
            st.protected
        );

        // Rule 1 against the guest: on fully synced paths, every leaf is
        // the translation the guest's tables give now, with no more rights.
        if quiet {
            for (vcpu, root) in st.vcpu_roots.iter().enumerate() {
                if let Some(r) = root {
                    self.check_guest_paths(&st, vcpu, *r)?;
                }
            }
        }
        Ok(())
    }

    fn check_guest_paths(
        &self,
        st: &MmuState,
        vcpu: usize,
        root: Pfn,
    ) -> Result<(), CoherenceError> {
        let inner = &self.inner;
        let paging = inner.paging.lock()[vcpu];
        let gmmu = GuestMmu::new(paging);
        let mut stack = vec![(root, PT64_ROOT_4LEVEL, 0u64, true)];
        while let Some((p, level, base, synced)) = stack.pop() {
            let Some(page) = st.pages.get(&p) else {
                continue;
            };
            let synced = synced && !page.unsync;
            for idx in 0..PT_ENTRIES {
                if level == PT64_ROOT_4LEVEL && inner.cfg.reserved.is_some_and(|r| r.index == idx) {
                    continue;
                }
                let e = word(inner, p, idx)?;
                if !spte::is_present(e) {
                    continue;
                }
                let mut gva = base | ((idx as u64) << level_shift(level));
                if gva & (1 << 47) != 0 {
                    gva |= 0xffff_0000_0000_0000;
                }
                if level > 1 && !spte::is_large(e) {
                    stack.push((spte::pfn(e), level - 1, gva, synced));
                    continue;
                }
                if !synced {
                    continue;
                }
                let walk = match gmmu.walk_addr(&PeekMem(inner), gva, Access::read(false)) {
                    Ok(w) => w,
                    Err(WalkError::PageFault(pf)) => {
                        return Err(CoherenceError::Incoherent(format!(
                            "vCPU {vcpu}: spte for gva {gva:#x} but the guest tables fault: {pf}"
                        )));
                    }
                    Err(source) => return Err(CoherenceError::Walk { vcpu, gva, source }),
                };
                ensure!(
                    walk.gfn == page.leaf_gfns[idx],
                    "vCPU {vcpu}: gva {gva:#x} shadowed to gfn {:#x}, guest maps gfn {:#x}",
                    page.leaf_gfns[idx],
                    walk.gfn
                );
                ensure!(
                    level == 1 || walk.level >= level,
                    "vCPU {vcpu}: gva {gva:#x} mapped by a level-{level} spte over a level-{} guest page",
                    walk.level
                );
                let acc = walk.pte_access;
                if spte::is_writable(e) {
                    ensure!(
                        acc.contains(PteAccess::WRITE) || !paging.cr0_wp,
                        "vCPU {vcpu}: gva {gva:#x} writable, guest says read-only"
                    );
                    ensure!(
                        walk.is_dirty(),
                        "vCPU {vcpu}: gva {gva:#x} writable while the guest PTE is clean"
                    );
                }
                ensure!(
                    e & PT_USER_MASK == 0 || acc.contains(PteAccess::USER),
                    "vCPU {vcpu}: gva {gva:#x} user-accessible, guest says supervisor"
                );
                ensure!(
                    !paging.efer_nx || e & PT64_NX_MASK != 0 || acc.contains(PteAccess::EXEC),
                    "vCPU {vcpu}: gva {gva:#x} executable, guest says NX"
                );
            }
        }
        Ok(())
    }
}

fn word(inner: &Inner, p: Pfn, idx: usize) -> Result<u64, CoherenceError> {
    inner
        .mm
        .memory()
        .frame_word(p, idx)
        .map(|w| w.load(Ordering::Acquire))
        .map_err(|source| CoherenceError::Frame { pfn: p, source })
}
