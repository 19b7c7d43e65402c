//! Machine memory: the real 4 KiB frames every layer reads and writes.
//!
//! In a test or the library alone it is an anonymous mmap ([`AnonMemory`]);
//! under the VMM it is the memory registered with KVM, so a frame number is a
//! KVM guest-physical page number and the CPU reads the same bytes.

use std::sync::atomic::AtomicU64;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{MmError, PAGE_SIZE, Pfn};

/// A contiguous run of frames backed by host memory.
///
/// # Safety
///
/// `host_base()` must point at `nr_frames() * PAGE_SIZE` bytes, 4 KiB
/// aligned, readable and writable for as long as the object lives.
pub unsafe trait MachineMemory: Send + Sync {
    /// Host address of frame 0.
    fn host_base(&self) -> *mut u8;
    /// Number of 4 KiB frames.
    fn nr_frames(&self) -> u64;
}

/// Byte-level access to frames, provided for every [`MachineMemory`].
///
/// Frames may be written concurrently by a vCPU, so copies are plain memcpy
/// of memory nobody in this process holds a Rust reference to (the same
/// stance as vm-memory's volatile slices), and page-table words go through
/// [`AtomicU64`].
pub trait FrameAccess {
    /// Host pointer to byte `offset` of `pfn`, checked.
    fn frame_ptr(&self, pfn: Pfn, offset: usize, len: usize) -> Result<*mut u8, MmError>;
    /// Copies bytes out of a frame.
    fn read_frame(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) -> Result<(), MmError>;
    /// Copies bytes into a frame.
    fn write_frame(&self, pfn: Pfn, offset: usize, buf: &[u8]) -> Result<(), MmError>;
    /// Fills a whole frame with `byte`.
    fn fill_frame(&self, pfn: Pfn, byte: u8) -> Result<(), MmError>;
    /// Copies frame `src` to frame `dst` (copy-on-write, swap).
    fn copy_frame(&self, src: Pfn, dst: Pfn) -> Result<(), MmError>;
    /// Whether two frames hold the same bytes (`pages_identical`).
    fn frames_identical(&self, a: Pfn, b: Pfn) -> Result<bool, MmError>;
    /// A checksum of a frame's bytes (`calc_checksum` in KSM).
    fn frame_checksum(&self, pfn: Pfn) -> Result<u64, MmError>;
    /// The 64-bit word `index` (0..512) of a frame, for page-table entries
    /// the CPU updates concurrently.
    fn frame_word(&self, pfn: Pfn, index: usize) -> Result<&AtomicU64, MmError>;
}

impl<M: MachineMemory + ?Sized> FrameAccess for M {
    fn frame_ptr(&self, pfn: Pfn, offset: usize, len: usize) -> Result<*mut u8, MmError> {
        if pfn >= self.nr_frames()
            || offset
                .checked_add(len)
                .is_none_or(|e| e > PAGE_SIZE as usize)
        {
            return Err(MmError::BadFrame(pfn));
        }
        // SAFETY: pfn < nr_frames and offset + len <= PAGE_SIZE, so the
        // result stays inside the region the trait contract guarantees.
        Ok(unsafe {
            self.host_base()
                .add(pfn as usize * PAGE_SIZE as usize + offset)
        })
    }

    fn read_frame(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) -> Result<(), MmError> {
        let p = self.frame_ptr(pfn, offset, buf.len())?;
        // SAFETY: `p..p+len` is inside machine memory (checked above) and
        // cannot overlap `buf`, which is ordinary Rust memory.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write_frame(&self, pfn: Pfn, offset: usize, buf: &[u8]) -> Result<(), MmError> {
        let p = self.frame_ptr(pfn, offset, buf.len())?;
        // SAFETY: as in read_frame, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
        Ok(())
    }

    fn fill_frame(&self, pfn: Pfn, byte: u8) -> Result<(), MmError> {
        let p = self.frame_ptr(pfn, 0, PAGE_SIZE as usize)?;
        // SAFETY: the whole frame is inside machine memory (checked above).
        unsafe { std::ptr::write_bytes(p, byte, PAGE_SIZE as usize) };
        Ok(())
    }

    fn copy_frame(&self, src: Pfn, dst: Pfn) -> Result<(), MmError> {
        let s = self.frame_ptr(src, 0, PAGE_SIZE as usize)?;
        let d = self.frame_ptr(dst, 0, PAGE_SIZE as usize)?;
        if src == dst {
            return Ok(());
        }
        // SAFETY: both frames are inside machine memory and distinct frames
        // do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(s, d, PAGE_SIZE as usize) };
        Ok(())
    }

    fn frames_identical(&self, a: Pfn, b: Pfn) -> Result<bool, MmError> {
        let pa = self.frame_ptr(a, 0, PAGE_SIZE as usize)?;
        let pb = self.frame_ptr(b, 0, PAGE_SIZE as usize)?;
        // SAFETY: both frames lie inside machine memory; the slices live only
        // for the comparison (a concurrent writer can only make it report
        // "different", which callers treat as "do not merge").
        let (sa, sb) = unsafe {
            (
                std::slice::from_raw_parts(pa, PAGE_SIZE as usize),
                std::slice::from_raw_parts(pb, PAGE_SIZE as usize),
            )
        };
        Ok(sa == sb)
    }

    fn frame_checksum(&self, pfn: Pfn) -> Result<u64, MmError> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for i in 0..(PAGE_SIZE as usize / 8) {
            let w = self
                .frame_word(pfn, i)?
                .load(std::sync::atomic::Ordering::Relaxed);
            h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        Ok(h)
    }

    fn frame_word(&self, pfn: Pfn, index: usize) -> Result<&AtomicU64, MmError> {
        if index >= PAGE_SIZE as usize / 8 {
            return Err(MmError::BadFrame(pfn));
        }
        let p = self.frame_ptr(pfn, index * 8, 8)?;
        // SAFETY: `p` is 8-byte aligned (frames are 4 KiB aligned), inside
        // machine memory, valid for the lifetime of `self`, and every access
        // to page-table words goes through atomics.
        Ok(unsafe { &*(p as *const AtomicU64) })
    }
}

/// Machine memory as one anonymous private mapping, made by vm-memory.
pub struct AnonMemory {
    mem: GuestMemoryMmap,
    base: *mut u8,
    nr_frames: u64,
}

// SAFETY: the mapping is owned by `mem` and lives as long as `self`; the raw
// base pointer is only an address into it, and all access goes through the
// checked `FrameAccess` helpers.
unsafe impl Send for AnonMemory {}
// SAFETY: see `Send`; concurrent access is the nature of guest memory.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// Maps `nr_frames` zeroed frames.
    pub fn new(nr_frames: u64) -> Result<Self, MmError> {
        let bytes = nr_frames
            .checked_mul(PAGE_SIZE)
            .filter(|&b| b > 0 && b <= isize::MAX as u64)
            .ok_or(MmError::InvalidArgument("machine memory size"))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)])
            .map_err(|e| MmError::Machine(e.to_string()))?;
        let base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MmError::Machine(e.to_string()))?;
        Ok(Self {
            mem,
            base,
            nr_frames,
        })
    }

    /// The vm-memory object, for registering it with KVM.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

// SAFETY: `base` is the start of a `nr_frames * PAGE_SIZE` mapping owned by
// `mem`; mmap returns page-aligned memory.
unsafe impl MachineMemory for AnonMemory {
    fn host_base(&self) -> *mut u8 {
        self.base
    }
    fn nr_frames(&self) -> u64 {
        self.nr_frames
    }
}
