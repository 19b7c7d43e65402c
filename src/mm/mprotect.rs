//! mprotect: changing the protection of a range.

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::vma::Prot;
use super::{Hva, Mm, MmError, checked_range};

impl Mm {
    /// `mprotect(addr, len, prot)`. A downgrade (a right removed) write-
    /// protects the present PTEs between `invalidate_range_start` and
    /// `invalidate_range_end` (`change_protection`), so secondary MMUs drop
    /// mappings the new protection forbids; an upgrade only changes the VMA
    /// (the next write faults and upgrades the PTE).
    pub fn mprotect(&self, addr: Hva, len: u64, prot: Prot) -> Result<(), MmError> {
        crate::trace::emit!(HostOp(crate::trace::HostOp::Mprotect {
            start: addr,
            len,
            prot: &prot,
        }));
        self.check_alive()?;
        let Some((start, end)) = checked_range(addr, len)? else {
            return Ok(());
        };
        let mut vmas = self.mmap_lock.write();
        if !vmas.covers(start, end) {
            return Err(MmError::NoMemory);
        }
        for v in vmas.overlapping(start, end) {
            if v.prot.difference(prot).is_empty() {
                continue; // no right removed
            }
            let (s, e) = (v.start.max(start), v.end.min(end));
            let range = MmuNotifierRange::new(MmuNotifyEvent::ProtectionVma, s, e);
            let _ = self.mn_invalidate_range_start(&range);
            {
                let mut pt = self.pt.lock();
                if !prot.contains(Prot::WRITE) {
                    for (hva, mut p) in pt.present_in(s, e) {
                        if p.writable {
                            p.writable = false;
                            pt.update(hva, p);
                        }
                    }
                }
            }
            // flush_tlb_range → invalidate_range, then end.
            self.mn_invalidate_range_end(&range, false);
        }
        vmas.modify_range(start, end, |v| v.prot = prot);
        Ok(())
    }
}
