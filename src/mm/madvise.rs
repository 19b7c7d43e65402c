//! madvise(MADV_DONTNEED), madvise(MADV_MERGEABLE), madvise(MADV_HUGEPAGE /
//! MADV_NOHUGEPAGE), madvise(MADV_POPULATE_WRITE) and mlock.

use crate::notifier::MmuNotifyEvent;
use crate::trace::HostOp;

use super::vma::{MmapFlags, Prot, Vma};
use super::{Access, Hva, Mm, MmError, PAGE_SIZE, is_page_aligned};

/// The VMAs `[start, end)` meets, each clipped to the range, in order, and
/// whether the range has a hole: the walk of 4.19's `madvise`,
/// `do_mprotect_pkey` and `apply_vma_lock_flags`.
pub(super) fn clipped(vmas: &[Vma], start: Hva, end: Hva) -> (Vec<(Vma, Hva, Hva)>, bool) {
    let mut pieces = Vec::new();
    let mut at = start;
    let mut hole = false;
    for v in vmas.iter().filter(|v| v.end > start && v.start < end) {
        hole |= v.start > at;
        let (s, e) = (v.start.max(start), v.end.min(end));
        pieces.push((*v, s, e));
        at = e;
    }
    hole |= at < end;
    (pieces, hole)
}

/// What `madvise` is asked to do (the `behavior` of 4.19's `do_madvise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`.
    DontNeed,
    /// `MADV_MERGEABLE`.
    Mergeable,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_POPULATE_WRITE` (Linux 5.14).
    PopulateWrite,
}

impl Advice {
    /// The host operation a trace shows for it (none for `MADV_NOHUGEPAGE`).
    fn host_op(self, start: Hva, len: u64) -> Option<HostOp<'static>> {
        Some(match self {
            Advice::DontNeed => HostOp::MadviseDontneed { start, len },
            Advice::Mergeable => HostOp::MadviseMergeable { start, len },
            Advice::HugePage => HostOp::MadviseHugepage { start, len },
            Advice::PopulateWrite => HostOp::MadvisePopulateWrite { start, len },
            Advice::NoHugePage => return None,
        })
    }
}

impl Mm {
    /// `do_madvise` (4.19 `mm/madvise.c`): the range checks every advice
    /// shares, then the advice over the checked range.
    pub fn madvise(&self, addr: Hva, len: u64, advice: Advice) -> Result<(), MmError> {
        let _slice = advice
            .host_op(addr, len)
            .and_then(|op| crate::trace::slice!(HostOp(op)));
        self.check_alive()?;
        let Some((start, end)) = madvise_range(addr, len)? else {
            return Ok(());
        };
        match advice {
            Advice::DontNeed => self.dontneed_range(start, end),
            Advice::Mergeable => {
                self.madvise_update_vma(start, end, MmapFlags::MERGEABLE, MmapFlags::empty())
            }
            Advice::HugePage => {
                self.madvise_update_vma(start, end, MmapFlags::HUGEPAGE, MmapFlags::NOHUGEPAGE)
            }
            Advice::NoHugePage => {
                self.madvise_update_vma(start, end, MmapFlags::NOHUGEPAGE, MmapFlags::HUGEPAGE)
            }
            Advice::PopulateWrite => self.populate_write_range(start, end),
        }
    }

    /// `madvise(addr, len, MADV_DONTNEED)` (4.19 `mm/madvise.c`): drops the
    /// pages of each VMA in the range in address order, one
    /// `zap_page_range` (one notifier range) per VMA, clipped to it; private
    /// anonymous memory reads back as zero afterwards. Errors as Linux:
    /// `EINVAL` for an unaligned address or a length that wraps; `EINVAL`
    /// (`Locked`) at the first VM_LOCKED VMA, after the VMAs before it were
    /// zapped; `ENOMEM` if part of the range is unmapped, after zapping the
    /// mapped parts. A huge PMD the range covers in part is split (inside
    /// the zap), and a large folio left partly mapped is split after.
    pub fn madvise_dontneed(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.madvise(addr, len, Advice::DontNeed)
    }

    /// `madvise_dontneed_free` over the checked, non-empty `[start, end)`.
    fn dontneed_range(&self, start: Hva, end: Hva) -> Result<(), MmError> {
        let vmas = self.mmap_lock.read();
        let all: Vec<Vma> = vmas.iter().copied().collect();
        let (pieces, hole) = clipped(&all, start, end);
        if pieces.is_empty() {
            return Err(MmError::NoMemory);
        }
        let mut result = if hole { Err(MmError::NoMemory) } else { Ok(()) };
        for (v, s, e) in pieces {
            // madvise_dontneed_free: can_madv_dontneed_vma.
            if v.flags.contains(MmapFlags::LOCKED) {
                result = Err(MmError::Locked(s));
                break;
            }
            if let Err(e) = self.zap_page_range(s, e, MmuNotifyEvent::Clear) {
                result = Err(e);
                break;
            }
        }
        self.split_queued_by_unmap(&vmas)?;
        result
    }

    /// `madvise(addr, len, MADV_MERGEABLE)`: lets KSM merge the range.
    pub fn madvise_mergeable(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.madvise(addr, len, Advice::Mergeable)
    }

    /// `madvise(addr, len, MADV_HUGEPAGE)` (`hugepage_madvise`): THP
    /// policies set to `madvise` apply to the range from now on; clears
    /// `MADV_NOHUGEPAGE`. Errors as `madvise_mergeable`.
    pub fn madvise_hugepage(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.madvise(addr, len, Advice::HugePage)
    }

    /// `madvise(addr, len, MADV_NOHUGEPAGE)`: no new large folio in the
    /// range; folios already there stay.
    pub fn madvise_nohugepage(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.madvise(addr, len, Advice::NoHugePage)
    }

    /// `madvise_update_vma`: sets `set` and clears `clear` on every VMA of
    /// the range (`ENOMEM` for a hole, after the others), splitting a VMA
    /// only where its flags change (`new_flags == vma->vm_flags`: no
    /// split), and a huge PMD across such a split first.
    fn madvise_update_vma(
        &self,
        start: Hva,
        end: Hva,
        set: MmapFlags,
        clear: MmapFlags,
    ) -> Result<(), MmError> {
        let mut vmas = self.mmap_lock.write();
        let all: Vec<Vma> = vmas.iter().copied().collect();
        let (pieces, hole) = clipped(&all, start, end);
        if pieces.is_empty() {
            return Err(MmError::NoMemory);
        }
        for (v, s, e) in pieces {
            if v.flags.contains(set) && !v.flags.intersects(clear) {
                continue;
            }
            self.vma_adjust_trans_huge(s, e)?;
            vmas.modify_range(s, e, |v| {
                v.flags.insert(set);
                v.flags.remove(clear);
            });
        }
        if hole { Err(MmError::NoMemory) } else { Ok(()) }
    }

    /// `madvise(addr, len, MADV_POPULATE_WRITE)` (Linux 5.14,
    /// `madvise_populate`): faults every page of the range in writable, as
    /// a write would (breaking copy-on-write, swapping in, allocating the
    /// large folios the THP settings allow), without writing anything.
    /// Pages already present and writable are left as they are. Errors as
    /// Linux: `EINVAL` (`InvalidArgument`) for an unaligned address, a
    /// wrapping length, or a VMA that is not writable
    /// (`faultin_page_range`'s permission check); `ENOMEM` (`NoMemory`) at
    /// the first hole, after the pages before it were populated;
    /// `OutOfFrames` (Linux's `ENOMEM` from `VM_FAULT_OOM`) when no frame is
    /// left. Nothing here raises Linux's `EFAULT` (no SIGBUS or SIGSEGV
    /// source in anonymous memory).
    pub fn madvise_populate_write(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.madvise(addr, len, Advice::PopulateWrite)
    }

    /// `madvise_populate` over the checked, non-empty `[start, end)`.
    fn populate_write_range(&self, start: Hva, end: Hva) -> Result<(), MmError> {
        let vmas = self.mmap_lock.read();
        let mut at = start;
        while at < end {
            let vma = *vmas.find(at).ok_or(MmError::NoMemory)?;
            if !vma.prot.contains(Prot::WRITE) {
                return Err(MmError::InvalidArgument(
                    "MADV_POPULATE_WRITE of a mapping that is not writable",
                ));
            }
            let stop = vma.end.min(end);
            while at < stop {
                let writable = self.pt.lock().present(at).is_some_and(|p| p.writable);
                if writable {
                    super::stats::inc(&self.stats.populate_present);
                } else {
                    self.fault_locked(&vmas, at, Access::Write)?;
                    super::stats::inc(&self.stats.populate_fault);
                }
                at += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// `mlock(addr, len)` (4.19 `do_mlock`): the address need not be
    /// aligned (the range is widened to pages); marks the VMAs VM_LOCKED
    /// (never reclaimed, dropped or merged) up to the first hole, which is
    /// `ENOMEM`, then populates the range (`__mm_populate`), with write
    /// faults in writable private VMAs so that copy-on-write is broken now
    /// (`populate_vma_page_range`'s FOLL_WRITE).
    pub fn mlock(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.check_alive()?;
        let start = addr & !(PAGE_SIZE - 1);
        let len = len
            .checked_add(addr - start)
            .and_then(super::page_align)
            .ok_or(MmError::InvalidArgument("length overflows"))?;
        let end = start.checked_add(len).ok_or(MmError::InvalidArgument(
            "range overflows the address space",
        ))?;
        if end == start {
            return Ok(());
        }
        let locked = {
            let mut vmas = self.mmap_lock.write();
            let all: Vec<Vma> = vmas.iter().copied().collect();
            let pieces = contiguous_prefix(&all, start, end)?;
            for &(v, s, e) in &pieces {
                if v.flags.contains(MmapFlags::LOCKED) {
                    continue;
                }
                self.vma_adjust_trans_huge(s, e)?;
                vmas.modify_range(s, e, |v| v.flags.insert(MmapFlags::LOCKED));
            }
            pieces
        };
        for (v, s, e) in &locked {
            let access = if v.prot.contains(Prot::WRITE) {
                Access::Write
            } else {
                Access::Read
            };
            for page in (*s..*e).step_by(PAGE_SIZE as usize) {
                self.handle_mm_fault(page, access)?;
            }
        }
        if locked.last().is_some_and(|l| l.2 == end) {
            Ok(())
        } else {
            Err(MmError::NoMemory)
        }
    }
}

/// The pieces of `[start, end)` from `start` up to the first hole: the
/// first VMA must contain `start` (`ENOMEM` otherwise), as in
/// `do_mprotect_pkey` and `apply_vma_lock_flags`, which apply a change up to
/// a hole and then fail with `ENOMEM`.
pub(super) fn contiguous_prefix(
    vmas: &[Vma],
    start: Hva,
    end: Hva,
) -> Result<Vec<(Vma, Hva, Hva)>, MmError> {
    let (pieces, _) = clipped(vmas, start, end);
    let mut out = Vec::new();
    let mut at = start;
    for p in pieces {
        if p.1 != at {
            break;
        }
        at = p.2;
        out.push(p);
    }
    if out.is_empty() {
        return Err(MmError::NoMemory);
    }
    Ok(out)
}

/// The range checks of 4.19's `madvise`: `EINVAL` for an unaligned start, a
/// length whose rounding wraps, or an end that wraps; `None` for an empty
/// range (success, nothing done).
fn madvise_range(addr: Hva, len: u64) -> Result<Option<(Hva, Hva)>, MmError> {
    if !is_page_aligned(addr) {
        return Err(MmError::InvalidArgument("address is not page aligned"));
    }
    let rounded = super::page_align(len).ok_or(MmError::InvalidArgument("length overflows"))?;
    let end = addr.checked_add(rounded).ok_or(MmError::InvalidArgument(
        "range overflows the address space",
    ))?;
    Ok((end != addr).then_some((addr, end)))
}
