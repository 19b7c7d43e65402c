//! mprotect: changing the protection of a range (4.19 `mm/mprotect.c`).

use crate::notifier::{MmuNotifierRange, MmuNotifyEvent};

use super::madvise::contiguous_prefix;
use super::pgtable::vpn;
use super::vma::{Prot, Vma};
use super::{Hva, Mm, MmError, PAGE_SIZE, page_align};

/// What one PUD entry maps (`PUD_SIZE`).
const PUD_SIZE: u64 = 1 << 30;

impl Mm {
    /// `mprotect(addr, len, prot)` (`do_mprotect_pkey`): applies `prot` VMA
    /// by VMA from `addr` up to the first hole (`ENOMEM` there, the VMAs
    /// before it changed). A VMA whose protection does not change is left
    /// alone (`mprotect_fixup`); otherwise `change_protection` runs, which
    /// calls the notifier only over populated page tables, once per PUD
    /// (`change_pmd_range`: from the first populated PMD to the end of the
    /// PUD's part of the range), write-protecting the present PTEs when
    /// write permission goes. An upgrade leaves the PTEs as they are in a
    /// private mapping: the next write faults and upgrades the PTE. A huge
    /// PMD across either end of a VMA piece is split first (`__split_vma`
    /// → `vma_adjust_trans_huge`); one inside is write-protected whole
    /// (`change_huge_pmd`).
    pub fn mprotect(&self, addr: Hva, len: u64, prot: Prot) -> Result<(), MmError> {
        let _slice = crate::trace::slice!(HostOp(crate::trace::HostOp::Mprotect {
            start: addr,
            len,
            prot: &prot,
        }));
        self.check_alive()?;
        if !super::is_page_aligned(addr) {
            return Err(MmError::InvalidArgument("address is not page aligned"));
        }
        if len == 0 {
            return Ok(());
        }
        // PAGE_ALIGN wrapping to 0, or the end wrapping: `end <= start`.
        let end = page_align(len)
            .and_then(|l| addr.checked_add(l))
            .filter(|&e| e > addr)
            .ok_or(MmError::NoMemory)?;
        let mut vmas = self.mmap_lock.write();
        let all: Vec<Vma> = vmas.iter().copied().collect();
        let pieces = contiguous_prefix(&all, addr, end)?;
        let reached = pieces.last().map_or(addr, |p| p.2);
        for (v, s, e) in pieces {
            if v.prot == prot {
                continue; // newflags == oldflags
            }
            self.vma_adjust_trans_huge(s, e)?;
            self.change_protection(s, e, prot)?;
            vmas.modify_range(s, e, |v| v.prot = prot);
        }
        if reached == end {
            Ok(())
        } else {
            Err(MmError::NoMemory)
        }
    }

    /// `change_protection` over `[start, end)` of one VMA.
    fn change_protection(&self, start: Hva, end: Hva, prot: Prot) -> Result<(), MmError> {
        for (s, e) in self.populated_pud_ranges(start, end) {
            let range = MmuNotifierRange::new(MmuNotifyEvent::ProtectionVma, s, e);
            self.mn_invalidate_range_start(&range);
            // change_pmd_range: a huge PMD the range covers in part is
            // split (never, after vma_adjust_trans_huge, for a whole VMA).
            let split = self.split_partial_pmds(s, e);
            if split.is_ok() && !prot.contains(Prot::WRITE) {
                let mut pt = self.pt.lock();
                let mut done_pmd = None;
                for (hva, mut p) in pt.present_in(s, e) {
                    if pt.is_huge(hva) {
                        // One update per huge PMD: its bits are shared.
                        let base = super::pgtable::pmd_base(hva);
                        if done_pmd == Some(base) {
                            continue;
                        }
                        done_pmd = Some(base);
                    }
                    if p.writable {
                        p.writable = false;
                        pt.update(hva, p);
                    }
                }
            }
            // flush_tlb_range, then the end (which calls invalidate_range).
            self.mn_invalidate_range_end(&range, false);
            split?;
        }
        Ok(())
    }

    /// For each PUD-sized piece of `[start, end)` that has a populated PTE
    /// page: from the first such page (or `start`) to the piece's end, the
    /// range `change_pmd_range` gives the notifier. The host page table here
    /// frees a PTE page when its last entry goes (Linux keeps it until
    /// munmap), so "populated" means "holds an entry".
    fn populated_pud_ranges(&self, start: Hva, end: Hva) -> Vec<(Hva, Hva)> {
        let pt = self.pt.lock();
        let mut out = Vec::new();
        let mut a = start;
        while a < end {
            let next = ((a | (PUD_SIZE - 1)) + 1).min(end);
            if let Some(leaf) = pt.ptes.first_populated_leaf(vpn(a), vpn(next)) {
                out.push(((leaf << super::PAGE_SHIFT).max(a), next));
            }
            a = next;
        }
        debug_assert!(out.iter().all(|r| r.0 % PAGE_SIZE == 0));
        out
    }
}
