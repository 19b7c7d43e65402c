//! Shadow PTEs: architectural x86-64 entries the CPU walks, built by us.
//!
//! Non-leaf sptes grant everything (restrictions live in the leaves, as in
//! KVM). Leaf sptes carry the guest's rights ANDed with the host's, never the
//! Global bit, and start with Accessed set (and Dirty for a write fault):
//! the fault *is* an access. The CPU sets A and D afterwards.

use crate::mm::{PAGE_SHIFT, Pfn};

use super::pte::{
    PT_ACCESSED_MASK, PT_BASE_ADDR_MASK, PT_DIRTY_MASK, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK,
    PT_USER_MASK, PT_WRITABLE_MASK, PT64_NX_MASK, PteAccess,
};

/// An entry pointing at a child shadow table.
pub fn make_nonleaf(child: Pfn) -> u64 {
    (child << PAGE_SHIFT) | PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK
}

/// `make_spte` for a 4 KiB leaf, made by a fault: Accessed set (the fault
/// is an access).
pub fn make_leaf(pfn: Pfn, access: PteAccess, writable: bool, efer_nx: bool, dirty: bool) -> u64 {
    make_spte(pfn, access, writable, efer_nx, dirty) | PT_ACCESSED_MASK
}

/// `make_spte` without the Accessed bit, as KVM makes prefetched sptes
/// (`prefetch`: the page was not accessed; the CPU sets A when it is).
pub fn make_spte(pfn: Pfn, access: PteAccess, writable: bool, efer_nx: bool, dirty: bool) -> u64 {
    let mut spte = (pfn << PAGE_SHIFT) | PT_PRESENT_MASK;
    if access.contains(PteAccess::USER) {
        spte |= PT_USER_MASK;
    }
    if writable {
        spte |= PT_WRITABLE_MASK;
        if dirty {
            spte |= PT_DIRTY_MASK;
        }
    }
    if efer_nx && !access.contains(PteAccess::EXEC) {
        spte |= PT64_NX_MASK;
    }
    spte
}

/// The same leaf as a 2 MiB one (`PT_PAGE_SIZE_MASK`); `pfn` must be
/// 512-frame aligned, so PAT bit 12 stays clear.
pub fn make_large(leaf: u64) -> u64 {
    debug_assert!(pfn(leaf).is_multiple_of(512));
    leaf | PT_PAGE_SIZE_MASK
}

/// A leaf above level 1 (`is_large_pte`).
pub fn is_large(spte: u64) -> bool {
    spte & PT_PAGE_SIZE_MASK != 0
}

pub fn is_present(spte: u64) -> bool {
    spte & PT_PRESENT_MASK != 0
}

pub fn is_writable(spte: u64) -> bool {
    spte & PT_WRITABLE_MASK != 0
}

pub fn is_accessed(spte: u64) -> bool {
    spte & PT_ACCESSED_MASK != 0
}

/// The frame an spte points at.
pub fn pfn(spte: u64) -> Pfn {
    (spte & PT_BASE_ADDR_MASK) >> PAGE_SHIFT
}

/// The same spte pointing at `new` read-only (`kvm_set_pte_rmapp`).
pub fn repoint_readonly(spte: u64, new: Pfn) -> u64 {
    (spte & !PT_BASE_ADDR_MASK & !PT_WRITABLE_MASK & !PT_DIRTY_MASK) | (new << PAGE_SHIFT)
}
