//! The frame allocator: who owns each frame of machine memory.
//!
//! The host mm allocates frames for anonymous pages, users outside it (a
//! secondary MMU's page tables) borrow frames as `External`, and the owner
//! of machine memory reserves some. Ownership is recorded per frame so
//! checkers can prove that no secondary mapping points at a free frame or
//! at someone else's page. Free frames are filled with [`POISON_FREE`] so that a stale
//! mapping shows up as corruption instead of silently reading old data.
//!
//! Free frames are kept by a buddy allocator (Linux's per-order free lists,
//! `__rmqueue_smallest` / `__free_one_page`), so a large folio gets 2^order
//! physically contiguous frames aligned to their size, and freed frames
//! merge back with their buddies into the runs large folios need. The
//! `buddy_system_allocator` crate implements exactly that over frame
//! numbers; this file adds ownership, zeroing and poisoning around it.

use std::sync::Arc;

use parking_lot::Mutex;

use super::memory::{FrameAccess, MachineMemory};
use super::{MmError, Pfn};

/// The byte freed frames are filled with (Linux's `POISON_FREE`).
pub const POISON_FREE: u8 = 0x6b;

/// Who owns a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameOwner {
    Free,
    /// An anonymous page of the host mm with this id.
    Mm(u64),
    /// Lent to a user of the allocator outside the mm (a secondary MMU's
    /// own page tables): the mm never maps, reclaims or frees it.
    External,
    /// Set aside by the VMM (never handed out).
    Reserved,
}

/// Largest order handed out (`MAX_PAGE_ORDER` would be 10; a PMD-size
/// folio is order 9).
pub const MAX_ORDER: u8 = 9;

struct Inner {
    owner: Vec<FrameOwner>,
    /// Frames never handed out since machine memory was mapped: still the
    /// zeros of a fresh anonymous mapping, so allocating them needs no
    /// zeroing pass, only the real host's populate (the real kernel zeroes
    /// them, a huge page at a time where the memory is THP-backed; a
    /// zeroing pass of ours would touch every byte twice). Cleared for
    /// good at the first allocation.
    pristine: Vec<bool>,
    /// The free frames, by power-of-two aligned blocks.
    buddy: buddy_system_allocator::FrameAllocator,
    nr_free: u64,
}

/// Hands out frames of one machine memory.
pub struct FrameAllocator {
    mem: Arc<dyn MachineMemory>,
    inner: Mutex<Inner>,
    poison: bool,
}

impl FrameAllocator {
    /// All frames of `mem` start free (and poisoned).
    pub fn new(mem: Arc<dyn MachineMemory>) -> Arc<Self> {
        Self::with_reserved(mem, 0, true)
    }

    /// Frames below `reserved` are kept for the VMM; `poison` fills every
    /// freed frame with [`POISON_FREE`].
    pub fn with_reserved(mem: Arc<dyn MachineMemory>, reserved: u64, poison: bool) -> Arc<Self> {
        let n = mem.nr_frames();
        let reserved = reserved.min(n);
        let mut owner = vec![FrameOwner::Free; n as usize];
        for o in owner.iter_mut().take(reserved as usize) {
            *o = FrameOwner::Reserved;
        }
        let mut buddy = buddy_system_allocator::FrameAllocator::new();
        buddy.add_frame(reserved as usize, n as usize);
        let mut pristine = vec![true; n as usize];
        pristine[..reserved as usize].fill(false);
        Arc::new(Self {
            mem,
            inner: Mutex::new(Inner {
                owner,
                pristine,
                buddy,
                nr_free: n - reserved,
            }),
            poison,
        })
    }

    pub fn memory(&self) -> &Arc<dyn MachineMemory> {
        &self.mem
    }

    pub fn nr_frames(&self) -> u64 {
        self.mem.nr_frames()
    }

    pub fn nr_free(&self) -> u64 {
        self.inner.lock().nr_free
    }

    /// Allocates one zeroed frame for `owner`.
    pub fn alloc(&self, owner: FrameOwner) -> Result<Pfn, MmError> {
        self.alloc_contig(0, owner)
    }

    /// Allocates 2^`order` zeroed frames for `owner`, physically contiguous
    /// and aligned to their size (`alloc_pages(order)`). `OutOfFrames` when
    /// no such run is free: the caller falls back to a smaller order, as
    /// Linux's THP allocations fall back without reclaiming.
    pub fn alloc_contig(&self, order: u8, owner: FrameOwner) -> Result<Pfn, MmError> {
        debug_assert!(owner != FrameOwner::Free);
        if order > MAX_ORDER {
            return Err(MmError::InvalidArgument("folio order too large"));
        }
        let nr = 1u64 << order;
        let (head, zeroed) = {
            let mut inner = self.inner.lock();
            let head = inner.buddy.alloc(nr as usize).ok_or(MmError::OutOfFrames)? as Pfn;
            debug_assert!(head.is_multiple_of(nr));
            let range = head as usize..(head + nr) as usize;
            for o in &mut inner.owner[range.clone()] {
                debug_assert_eq!(*o, FrameOwner::Free);
                *o = owner;
            }
            // A block is pristine whole or not at all only by chance:
            // remember each frame.
            let zeroed: Vec<bool> = inner.pristine[range.clone()].to_vec();
            inner.pristine[range].fill(false);
            inner.nr_free -= nr;
            (head, zeroed)
        };
        // Fresh frames are made present in the real host in one call (the
        // frames a caller gets are always backed, as zeroing them would
        // leave them); the others, and fresh ones the host cannot
        // populate, are zeroed.
        let fresh = zeroed.iter().all(|&z| z) && self.mem.populate_fresh(head, nr)?;
        if !fresh {
            for (pfn, zero) in (head..head + nr).zip(zeroed) {
                if !zero || !self.mem.populate_fresh(pfn, 1)? {
                    self.mem.fill_frame(pfn, 0)?;
                }
            }
        }
        Ok(head)
    }

    /// Returns a frame; it must be owned by `owner`.
    pub fn free(&self, pfn: Pfn, owner: FrameOwner) -> Result<(), MmError> {
        self.free_contig(pfn, 0, owner)
    }

    /// Returns the 2^`order` frames from `head` (as allocated, or any
    /// aligned part of an allocation); each must be owned by `owner`.
    pub fn free_contig(&self, head: Pfn, order: u8, owner: FrameOwner) -> Result<(), MmError> {
        let nr = 1u64 << order.min(MAX_ORDER);
        {
            let inner = self.inner.lock();
            if !head.is_multiple_of(nr) {
                return Err(MmError::BadFrame(head));
            }
            for pfn in head..head + nr {
                match inner.owner.get(pfn as usize) {
                    Some(o) if *o == owner => {}
                    _ => return Err(MmError::BadFrame(pfn)),
                }
            }
        }
        // Poison before the frames become visible as free, so no new owner
        // sees poison and no stale reader sees the old data.
        if self.poison {
            for pfn in head..head + nr {
                self.mem.fill_frame(pfn, POISON_FREE)?;
            }
        }
        let mut inner = self.inner.lock();
        for o in &mut inner.owner[head as usize..(head + nr) as usize] {
            *o = FrameOwner::Free;
        }
        inner.buddy.dealloc(head as usize, nr as usize);
        inner.nr_free += nr;
        Ok(())
    }

    /// The owner of `pfn` (`Free` for numbers past the end are reported as
    /// an error instead).
    pub fn owner(&self, pfn: Pfn) -> Result<FrameOwner, MmError> {
        self.inner
            .lock()
            .owner
            .get(pfn as usize)
            .copied()
            .ok_or(MmError::BadFrame(pfn))
    }

    /// Number of frames owned by `owner`.
    pub fn count(&self, owner: FrameOwner) -> u64 {
        self.inner
            .lock()
            .owner
            .iter()
            .filter(|o| **o == owner)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::AnonMemory;

    #[test]
    fn runs_are_aligned_and_merge_back_when_freed() {
        let mem: Arc<dyn MachineMemory> = Arc::new(AnonMemory::new(64).unwrap());
        let fa = FrameAllocator::with_reserved(mem, 3, true);
        let o = FrameOwner::External;
        assert_eq!(fa.nr_free(), 61);
        let big = fa.alloc_contig(4, o).unwrap();
        assert!(big.is_multiple_of(16) && big >= 16);
        assert_eq!(fa.count(o), 16);
        // Single frames split the remaining blocks; a second order-4 run
        // and an order-5 one still fit, an order-6 one never does.
        let small: Vec<Pfn> = (0..8).map(|_| fa.alloc(o).unwrap()).collect();
        assert!(small.iter().all(|p| !(big..big + 16).contains(p)));
        assert!(fa.alloc_contig(6, o).is_err());
        assert_eq!(
            fa.alloc_contig(10, o),
            Err(MmError::InvalidArgument("folio order too large"))
        );
        // Freeing page by page merges the run back.
        for p in big..big + 16 {
            fa.free(p, o).unwrap();
        }
        assert_eq!(fa.alloc_contig(4, o), Ok(big));
        assert_eq!(
            fa.free_contig(big + 1, 0, FrameOwner::Reserved),
            Err(MmError::BadFrame(big + 1))
        );
        assert_eq!(
            fa.free_contig(big + 1, 1, o),
            Err(MmError::BadFrame(big + 1))
        );
        fa.free_contig(big, 4, o).unwrap();
        for p in small {
            fa.free(p, o).unwrap();
        }
        assert_eq!(fa.nr_free(), 61);
        assert_eq!(fa.count(FrameOwner::Free), 61);
    }

    /// Every frame handed out reads zero: a pristine one (never handed out
    /// before, not zeroed again) as a reused one (poisoned when freed,
    /// zeroed when handed out again), with or without poisoning.
    #[test]
    fn every_frame_comes_out_zero_pristine_or_reused() {
        for poison in [true, false] {
            let mem: Arc<dyn MachineMemory> = Arc::new(AnonMemory::new(64).unwrap());
            let fa = FrameAllocator::with_reserved(mem.clone(), 3, poison);
            let o = FrameOwner::External;
            let zero = |p: Pfn| {
                mem.frames_identical(p, 0).unwrap()
                    && mem.frame_checksum(p).unwrap() == mem.frame_checksum(0).unwrap()
            };
            // Frame 0 is reserved and never written here: all zeros.
            let first: Vec<Pfn> = (0..61).map(|_| fa.alloc(o).unwrap()).collect();
            assert!(first.iter().all(|&p| zero(p)), "pristine frames");
            for &p in &first {
                mem.fill_frame(p, 0x5a).unwrap();
                fa.free(p, o).unwrap();
            }
            let again = fa.alloc_contig(4, o).unwrap();
            let more: Vec<Pfn> = (0..8).map(|_| fa.alloc(o).unwrap()).collect();
            assert!(
                (again..again + 16).chain(more).all(zero),
                "reused frames, poison {poison}"
            );
        }
    }
}
