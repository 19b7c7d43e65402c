//! Which guest-physical memory a guest-virtual range maps, read from the
//! guest's own tables without an access: the first half of a populate
//! request (the VMM populates the host memory behind the runs, as
//! `madvise(MADV_POPULATE_WRITE)` on the hva range a real VMM would pass,
//! then [`ShadowMmu::pre_fault`] installs the sptes).
//!
//! The rule is [`ShadowMmu::pre_fault`]'s: a page counts only if every
//! entry on its walk, leaf included, already has Accessed set (the walk may
//! not set it: a populate is not an access), the leaf lies in guest RAM and
//! the address is not under the VMM's reserved slot. The same function
//! serves kvm mode over its own guest RAM, so both modes count the same
//! pages for the same tables.

use crate::mm::PAGE_SIZE;

use super::guest_mem::GuestMem;
use super::pte::level_size;
use super::walk::{Access, FaultKind, GuestMmu, GuestPtMemory, NoAdMem, PagingState, WalkError};
use super::{MmuError, ReservedSlot, ShadowMmu};

/// One stretch of a guest-virtual range that maps contiguous guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRun {
    /// First guest-virtual address.
    pub gva: u64,
    /// The guest-physical address it maps.
    pub gpa: u64,
    /// Bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// A range translated: the runs it maps, and the 4 KiB pages it does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// Mapped stretches, in address order, merged where both the gva and
    /// the gpa continue.
    pub runs: Vec<GpaRun>,
    /// 4 KiB pages not mapped, not yet accessed, not RAM, or reserved.
    pub skipped: u64,
}

impl Translated {
    /// 4 KiB pages the runs cover.
    pub fn mapped(&self) -> u64 {
        self.runs.iter().map(|r| r.len / PAGE_SIZE).sum()
    }

    fn push(&mut self, gva: u64, gpa: u64, len: u64) {
        if let Some(last) = self.runs.last_mut()
            && last.gva + last.len == gva
            && last.gpa + last.len == gpa
        {
            last.len += len;
            return;
        }
        self.runs.push(GpaRun { gva, gpa, len });
    }
}

/// The pages of `[gva, gva + len)` (4 KiB aligned; `gva + len` must not
/// wrap) that `mode`'s tables in `mem` map to guest RAM through entries
/// that all have Accessed set, outside `reserved`. `mem_for` gives the
/// memory for each walk (a fresh one, so per-walk bookkeeping stays
/// small). A not-present or not-accessed upper entry skips everything it
/// would map in one step, so a sparse range costs a walk per hole, not per
/// page.
pub fn accessed_runs<M: GuestPtMemory>(
    mode: &PagingState,
    mem_for: impl Fn() -> M,
    gva: u64,
    len: u64,
    reserved: Option<ReservedSlot>,
) -> Translated {
    let mmu = GuestMmu::new(*mode);
    // A supervisor read with EFLAGS.AC: no permission check can refuse it,
    // so the walk answers "mapped and accessed, or not" only.
    let probe = Access {
        eflags_ac: true,
        ..Access::read(false)
    };
    let end = gva.saturating_add(len);
    let mut out = Translated::default();
    let mut at = gva & !(PAGE_SIZE - 1);
    while at < end {
        // The first address after the level-`level` entry mapping `at`.
        let next = |level: u8| (at | (level_size(level) - 1)).saturating_add(1).min(end);
        let until = if reserved.is_some_and(|r| r.contains(at)) {
            let until = next(4);
            out.skipped += (until - at) / PAGE_SIZE;
            until
        } else {
            match mmu.walk_addr(&NoAdMem(mem_for()), at, probe) {
                Ok(w) if w.leaf_in_ram => {
                    let until = next(w.level);
                    out.push(at, w.gfn * PAGE_SIZE, until - at);
                    until
                }
                Ok(_) => {
                    out.skipped += 1;
                    at + PAGE_SIZE
                }
                Err(WalkError::PageFault(pf)) => {
                    // Nothing below a not-present, not-accessed or unreadable
                    // entry is mapped: skip all it covers.
                    let level = match pf.kind {
                        FaultKind::NotPresent
                        | FaultKind::AdUpdateFailed { .. }
                        | FaultKind::TableNotRam { .. } => pf.level,
                        _ => 1,
                    };
                    let until = next(level);
                    out.skipped += (until - at) / PAGE_SIZE;
                    until
                }
                // Cannot happen without a writer; count the page as skipped.
                Err(WalkError::AdRetriesExhausted { .. }) => {
                    out.skipped += 1;
                    at + PAGE_SIZE
                }
            }
        };
        at = until;
    }
    out
}

impl ShadowMmu {
    /// [`accessed_runs`] on `vcpu`'s current tables, read through the host
    /// mm (which may fault the guest's table pages in). The answer is
    /// advice for populating host memory: it takes no part in the
    /// invalidation protocol, and [`ShadowMmu::pre_fault`] re-walks under
    /// it before installing anything.
    pub fn accessed_runs(&self, vcpu: usize, gva: u64, len: u64) -> Result<Translated, MmuError> {
        self.check_vcpu(vcpu)?;
        self.inner.fatal.check()?;
        if gva.checked_add(len).is_none() {
            return Err(MmuError::InvalidRange { gva, len });
        }
        let inner = &self.inner;
        let mode = inner.paging.lock()[vcpu];
        let out = accessed_runs(
            &mode,
            || GuestMem::new(&inner.mm, &inner.slots),
            gva,
            len,
            inner.cfg.reserved,
        );
        Ok(out)
    }
}
