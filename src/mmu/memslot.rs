//! Memslots: which host virtual range backs which guest-physical range
//! (`struct kvm_memory_slot`).

use crate::mm::{Hva, PAGE_SHIFT, PAGE_SIZE};

/// One memslot: guest frames `base_gfn..base_gfn + npages` live at
/// `userspace_addr..` in the host mm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memslot {
    pub base_gfn: u64,
    pub npages: u64,
    pub userspace_addr: Hva,
}

impl Memslot {
    fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
    fn hva_end(&self) -> Hva {
        self.userspace_addr + self.npages * PAGE_SIZE
    }
}

/// The memslots of a VM, non-overlapping in gpa.
#[derive(Clone, Debug, Default)]
pub struct Memslots {
    slots: Vec<Memslot>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemslotError {
    #[error("memslot at gfn {0:#x} overlaps an existing one or overflows")]
    Overlap(u64),
    #[error("memslot host address {0:#x} is not page aligned")]
    Unaligned(u64),
}

impl Memslots {
    /// `KVM_SET_USER_MEMORY_REGION` (add only).
    pub fn add(&mut self, slot: Memslot) -> Result<(), MemslotError> {
        if !slot.userspace_addr.is_multiple_of(PAGE_SIZE) {
            return Err(MemslotError::Unaligned(slot.userspace_addr));
        }
        let end = slot.base_gfn.checked_add(slot.npages);
        let hva_end = slot
            .npages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| slot.userspace_addr.checked_add(b));
        if slot.npages == 0
            || end.is_none()
            || hva_end.is_none()
            || self
                .slots
                .iter()
                .any(|s| slot.base_gfn < s.end_gfn() && s.base_gfn < slot.base_gfn + slot.npages)
        {
            return Err(MemslotError::Overlap(slot.base_gfn));
        }
        self.slots.push(slot);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    /// `gfn_to_hva`: `None` outside every memslot (MMIO, or nothing).
    pub fn gfn_to_hva(&self, gfn: u64) -> Option<Hva> {
        self.slots
            .iter()
            .find(|s| gfn >= s.base_gfn && gfn < s.end_gfn())
            .map(|s| s.userspace_addr + ((gfn - s.base_gfn) << PAGE_SHIFT))
    }

    /// The hva of `gfn` if the `n` gfns from it lie in one memslot (so
    /// their hvas are contiguous), as a large mapping needs
    /// (`kvm_mmu_max_mapping_level`'s memslot check).
    pub fn gfn_range_to_hva(&self, gfn: u64, n: u64) -> Option<Hva> {
        let last = gfn.checked_add(n.checked_sub(1)?)?;
        self.slots
            .iter()
            .find(|s| gfn >= s.base_gfn && last < s.end_gfn())
            .map(|s| s.userspace_addr + ((gfn - s.base_gfn) << PAGE_SHIFT))
    }

    /// The gfn ranges backed by `[start, end)` of the host mm
    /// (`kvm_handle_hva_range`).
    pub fn hva_range_to_gfns(&self, start: Hva, end: Hva) -> Vec<(u64, u64)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let (s0, s1) = (start.max(s.userspace_addr), end.min(s.hva_end()));
                (s0 < s1).then(|| {
                    let first = s.base_gfn + ((s0 - s.userspace_addr) >> PAGE_SHIFT);
                    let last = s.base_gfn + ((s1 - s.userspace_addr + PAGE_SIZE - 1) >> PAGE_SHIFT);
                    (first, last)
                })
            })
            .collect()
    }
}
