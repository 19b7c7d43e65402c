//! The frame allocator: who owns each frame of machine memory.
//!
//! The host mm allocates frames for anonymous pages, the shadow MMU for its
//! shadow pages, the VMM for pages it reserves. Ownership is recorded per
//! frame so checkers can prove that no spte points at a free frame or at a
//! shadow page. Free frames are filled with [`POISON_FREE`] so that a stale
//! mapping shows up as corruption instead of silently reading old data.

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
    /// A shadow page-table page of the shadow MMU.
    Shadow,
    /// Set aside by the VMM (never handed out).
    Reserved,
}

struct Inner {
    owner: Vec<FrameOwner>,
    free: Vec<Pfn>,
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
        // Hand out low frames first: pop() takes from the end.
        let free: Vec<Pfn> = (reserved..n).rev().collect();
        Arc::new(Self {
            mem,
            inner: Mutex::new(Inner { owner, free }),
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
        self.inner.lock().free.len() as u64
    }

    /// Allocates one zeroed frame for `owner`.
    pub fn alloc(&self, owner: FrameOwner) -> Result<Pfn, MmError> {
        debug_assert!(owner != FrameOwner::Free);
        let pfn = {
            let mut inner = self.inner.lock();
            let pfn = inner.free.pop().ok_or(MmError::OutOfFrames)?;
            inner.owner[pfn as usize] = owner;
            pfn
        };
        self.mem.fill_frame(pfn, 0)?;
        Ok(pfn)
    }

    /// Returns a frame; it must be owned by `owner`.
    pub fn free(&self, pfn: Pfn, owner: FrameOwner) -> Result<(), MmError> {
        {
            let inner = self.inner.lock();
            match inner.owner.get(pfn as usize) {
                Some(o) if *o == owner => {}
                _ => return Err(MmError::BadFrame(pfn)),
            }
        }
        // Poison before the frame becomes visible as free, so no new owner
        // sees poison and no stale reader sees the old data.
        if self.poison {
            self.mem.fill_frame(pfn, POISON_FREE)?;
        }
        let mut inner = self.inner.lock();
        inner.owner[pfn as usize] = FrameOwner::Free;
        inner.free.push(pfn);
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
