//! madvise(MADV_DONTNEED) and madvise(MADV_MERGEABLE / UNMERGEABLE).

use crate::notifier::MmuNotifyEvent;

use super::vma::MmapFlags;
use super::{Hva, Mm, MmError, checked_range};

impl Mm {
    /// `madvise(addr, len, MADV_DONTNEED)`: drops the pages of the range;
    /// private anonymous memory reads back as zero afterwards. Fails with
    /// `Locked` on a VM_LOCKED area (`madvise_dontneed_free_valid_vma`) and
    /// with `NoMemory` if part of the range is unmapped (after dropping the
    /// mapped parts, as Linux does).
    pub fn madvise_dontneed(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        crate::trace::emit!(HostOp(crate::trace::HostOp::MadviseDontneed {
            start: addr,
            len
        }));
        self.check_alive()?;
        let Some((start, end)) = checked_range(addr, len)? else {
            return Ok(());
        };
        let vmas = self.mmap_lock.read();
        let overlapping = vmas.overlapping(start, end);
        if let Some(v) = overlapping
            .iter()
            .find(|v| v.flags.contains(MmapFlags::LOCKED))
        {
            return Err(MmError::Locked(v.start.max(start)));
        }
        for v in &overlapping {
            self.zap_page_range(
                v.start.max(start),
                v.end.min(end),
                MmuNotifyEvent::Clear,
                true,
            )?;
        }
        if vmas.covers(start, end) {
            Ok(())
        } else {
            Err(MmError::NoMemory)
        }
    }

    /// `madvise(addr, len, MADV_MERGEABLE)`: lets KSM merge the range.
    pub fn madvise_mergeable(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        crate::trace::emit!(HostOp(crate::trace::HostOp::MadviseMergeable {
            start: addr,
            len
        }));
        self.set_vma_flag(addr, len, MmapFlags::MERGEABLE, true)
    }

    /// `mlock(addr, len)`: marks the range VM_LOCKED (never reclaimed,
    /// dropped or merged) and faults every page in.
    pub fn mlock(&self, addr: Hva, len: u64) -> Result<(), MmError> {
        self.set_vma_flag(addr, len, MmapFlags::LOCKED, true)?;
        if let Some((start, end)) = checked_range(addr, len)? {
            // Pages of a merged KSM frame stay shared until written; mlock
            // only guarantees presence.
            for page in (start..end).step_by(super::PAGE_SIZE as usize) {
                self.handle_mm_fault(page, super::Access::Read)?;
            }
        }
        Ok(())
    }

    fn set_vma_flag(&self, addr: Hva, len: u64, flag: MmapFlags, on: bool) -> Result<(), MmError> {
        self.check_alive()?;
        let Some((start, end)) = checked_range(addr, len)? else {
            return Ok(());
        };
        let mut vmas = self.mmap_lock.write();
        if !vmas.covers(start, end) {
            return Err(MmError::NoMemory);
        }
        vmas.modify_range(start, end, |v| v.flags.set(flag, on));
        Ok(())
    }
}
