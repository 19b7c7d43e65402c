//! Machine memory: the real 4 KiB frames every layer reads and writes.
//!
//! In a test or the library alone it is an anonymous mmap ([`AnonMemory`]);
//! under the VMM it is the memory registered with KVM, so a frame number is a
//! KVM guest-physical page number and the CPU reads the same bytes.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use std::sync::Arc;

use super::error::MachineError;
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

    /// Makes frames `[pfn, pfn + n)`, which have never been written since
    /// the memory was mapped (so they read zero), present for writing in
    /// the real host (`MADV_POPULATE_WRITE`): the real kernel zeroes them
    /// once, a huge page at a time where the memory is THP-backed, and no
    /// second pass writes them again. `Ok(false)` when the host cannot
    /// (the caller zeroes them instead, which faults them in too).
    fn populate_fresh(&self, _pfn: Pfn, _n: u64) -> Result<bool, MmError> {
        Ok(false)
    }
}

/// Byte-level access to frames, provided for every [`MachineMemory`].
///
/// Frames may be written concurrently by a vCPU (or a DMA device), so no
/// Rust reference (`&[u8]`, `&mut [u8]`) is ever formed over them: byte
/// copies go through vm-memory's [`VolatileSlice`], whole-frame work
/// (fill, copy, compare, checksum) and page-table words through
/// [`AtomicU64`]. A racing writer can make a copy or a comparison see a mix
/// of old and new words, never undefined behaviour; callers that need a
/// stable page (KSM, swap-out) write-protect it first.
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
    /// The 512 words of a frame.
    fn frame_words(&self, pfn: Pfn) -> Result<&[AtomicU64; WORDS], MmError>;
}

/// 64-bit words in a frame.
pub const WORDS: usize = PAGE_SIZE as usize / 8;

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
        // SAFETY: `p..p+len` is inside machine memory (checked above), which
        // lives as long as `self`, and every access to it is volatile or
        // atomic.
        let v = unsafe { VolatileSlice::new(p, buf.len()) };
        v.copy_to(buf);
        Ok(())
    }

    fn write_frame(&self, pfn: Pfn, offset: usize, buf: &[u8]) -> Result<(), MmError> {
        let p = self.frame_ptr(pfn, offset, buf.len())?;
        // SAFETY: as in read_frame.
        let v = unsafe { VolatileSlice::new(p, buf.len()) };
        v.copy_from(buf);
        Ok(())
    }

    fn fill_frame(&self, pfn: Pfn, byte: u8) -> Result<(), MmError> {
        let pattern = u64::from_ne_bytes([byte; 8]);
        for w in self.frame_words(pfn)? {
            w.store(pattern, Ordering::Relaxed);
        }
        Ok(())
    }

    fn copy_frame(&self, src: Pfn, dst: Pfn) -> Result<(), MmError> {
        let (s, d) = (self.frame_words(src)?, self.frame_words(dst)?);
        if src != dst {
            for (s, d) in s.iter().zip(d) {
                d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn frames_identical(&self, a: Pfn, b: Pfn) -> Result<bool, MmError> {
        let (a, b) = (self.frame_words(a)?, self.frame_words(b)?);
        // A concurrent writer can only make this say "different", which
        // callers treat as "do not merge".
        Ok(a.iter()
            .zip(b)
            .all(|(x, y)| x.load(Ordering::Relaxed) == y.load(Ordering::Relaxed)))
    }

    fn frame_checksum(&self, pfn: Pfn) -> Result<u64, MmError> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in self.frame_words(pfn)? {
            h = (h ^ w.load(Ordering::Relaxed))
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29);
        }
        Ok(h)
    }

    fn frame_word(&self, pfn: Pfn, index: usize) -> Result<&AtomicU64, MmError> {
        self.frame_words(pfn)?
            .get(index)
            .ok_or(MmError::BadFrame(pfn))
    }

    fn frame_words(&self, pfn: Pfn) -> Result<&[AtomicU64; WORDS], MmError> {
        let p = self.frame_ptr(pfn, 0, PAGE_SIZE as usize)?;
        // SAFETY: `p` is 4 KiB aligned (frames are), the whole frame is
        // inside machine memory, valid for the lifetime of `self`, and
        // `AtomicU64` has the layout of `u64` and may alias memory others
        // access atomically or volatilely: no plain reference to machine
        // memory exists anywhere.
        Ok(unsafe { &*(p as *const [AtomicU64; WORDS]) })
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
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).map_err(|e| {
                MachineError {
                    what: "mapping it",
                    source: Arc::new(e),
                }
            })?;
        let base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MachineError {
                what: "finding its host address",
                source: Arc::new(e),
            })?;
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

    /// Asks the real host kernel to back machine memory with huge pages
    /// (`madvise(MADV_HUGEPAGE)`), as a VMM does for the memory its guests
    /// run on: a 2 MiB spte over a 2 MiB-aligned run of frames can then be
    /// one large mapping in the host's KVM too. Only worth it, and only
    /// done, when the mapping starts on a 2 MiB boundary (KVM maps a large
    /// page only where hva and gpa share their alignment; Linux aligns
    /// anonymous mappings of 2 MiB multiples so, since 6.7): returns
    /// whether it did.
    pub fn advise_hugepage(&self) -> Result<bool, MmError> {
        const PMD: usize = 2 << 20;
        if !(self.base as usize).is_multiple_of(PMD) {
            return Ok(false);
        }
        // SAFETY: the whole of our own mapping; MADV_HUGEPAGE only changes
        // how the kernel backs it, never its contents.
        let ret = unsafe {
            libc::madvise(
                self.base.cast(),
                (self.nr_frames * PAGE_SIZE) as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            return Err(MachineError {
                what: "madvise(MADV_HUGEPAGE)",
                source: Arc::new(std::io::Error::last_os_error()),
            }
            .into());
        }
        Ok(true)
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
    fn populate_fresh(&self, pfn: Pfn, n: u64) -> Result<bool, MmError> {
        if n == 0 || pfn.checked_add(n).is_none_or(|end| end > self.nr_frames) {
            return Err(MmError::BadFrame(pfn));
        }
        let len = (n * PAGE_SIZE) as usize;
        // SAFETY: the `n` frames from `pfn` lie inside our own mapping
        // (checked above); MADV_POPULATE_WRITE only faults the pages in
        // (they are fresh, so zero-filled), changing no byte anyone reads.
        let ret = unsafe {
            libc::madvise(
                self.base.add(pfn as usize * PAGE_SIZE as usize).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        Ok(ret == 0)
    }
}
