//! How the walker reaches guest page tables: gpa → hva through the memslots,
//! hva → frame through the host mm, as KVM reads guest memory through
//! `gfn_to_hva` + `copy_from_user`.

use std::cell::RefCell;

use crate::mm::{Access, FrameAccess, Hva, Mm, MmError, PAGE_SIZE, Pfn};

use super::invalidate::{HostRange, page_range};
use super::memslot::Memslots;
use super::walk::GuestPtMemory;

/// Guest memory as the walker sees it, remembering which frame each entry
/// was read from so the fault path can re-check it under the MMU lock
/// (`FNAME(gpte_changed)`) without calling into the mm.
pub struct GuestMem<'a> {
    pub mm: &'a Mm,
    pub slots: &'a Memslots,
    /// `(gpa, frame)` of every entry read.
    pub reads: RefCell<Vec<(u64, Pfn)>>,
    /// The host page of every guest table the walk looked at, read or
    /// written, whether it got a frame or not: what an invalidation must
    /// not have touched for the walk's outcome to stand.
    pub touched: RefCell<Vec<HostRange>>,
    /// A host error that is the VMM's problem, not the guest's (no frame
    /// left): the fault fails instead of faulting the guest.
    pub host_error: RefCell<Option<MmError>>,
}

impl<'a> GuestMem<'a> {
    pub fn new(mm: &'a Mm, slots: &'a Memslots) -> Self {
        Self {
            mm,
            slots,
            reads: RefCell::new(Vec::new()),
            touched: RefCell::new(Vec::new()),
            host_error: RefCell::new(None),
        }
    }

    fn touch(&self, hva: Hva) {
        let mut t = self.touched.borrow_mut();
        let r = page_range(hva);
        if !t.contains(&r) {
            t.push(r);
        }
    }

    fn note(&self, e: MmError) {
        if e == MmError::OutOfFrames {
            *self.host_error.borrow_mut() = Some(e);
        }
    }

    /// The frame behind a gpa, faulting it in for reading.
    pub fn gpa_to_pfn(&self, gpa: u64) -> Option<Pfn> {
        let hva = self.slots.gfn_to_hva(gpa / PAGE_SIZE)?;
        self.touch(hva);
        match self.mm.hva_to_pfn(hva, Access::Read) {
            Ok(h) => Some(h.pfn),
            Err(e) => {
                self.note(e);
                None
            }
        }
    }
}

impl GuestPtMemory for GuestMem<'_> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        let pfn = self.gpa_to_pfn(gpa)?;
        let word = self
            .mm
            .memory()
            .frame_word(pfn, ((gpa % PAGE_SIZE) / 8) as usize)
            .ok()?;
        self.reads.borrow_mut().push((gpa, pfn));
        Some(word.load(std::sync::atomic::Ordering::Acquire))
    }

    fn cmpxchg_gpte(&self, gpa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        let hva = self.slots.gfn_to_hva(gpa / PAGE_SIZE)?;
        self.touch(hva);
        match self.mm.cmpxchg_u64(hva + gpa % PAGE_SIZE, old, new) {
            Ok(found) if found == old => Some(Ok(())),
            Ok(found) => Some(Err(found)),
            Err(e) => {
                self.note(e);
                None
            }
        }
    }

    fn is_ram(&self, gpa: u64) -> bool {
        self.slots.gfn_to_hva(gpa / PAGE_SIZE).is_some()
    }
}
