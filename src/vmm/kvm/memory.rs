//! Guest memory: the small writer trait everything that builds
//! guest-visible structures writes through, and kvm mode's guest RAM, one
//! anonymous mapping (vm-memory's `GuestMemoryMmap`) that is also KVM
//! memslot 0.
//!
//! In shadow mode guest frames come from the host mm instead
//! (`host::ram::ShadowRam`), so boot structures and images go through
//! [`GuestMemWriter`], never through raw pointers.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::vmm::abi::PAGE_SIZE;
use crate::vmm::units::format_size;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The anonymous mapping failed.
    #[error("cannot allocate {} of guest RAM: {source}", format_size(*.size))]
    Allocate {
        /// Requested size in bytes.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
    /// vm-memory refused the mapping as guest memory.
    #[error("cannot use {} of guest RAM: {source}", format_size(*.size))]
    Region {
        /// Requested size in bytes.
        size: u64,
        /// Why.
        source: vm_memory::GuestRegionCollectionError,
    },
    /// `madvise(MADV_HUGEPAGE)` failed.
    #[error("madvise(MADV_HUGEPAGE) of guest RAM failed: {source}")]
    Hugepage {
        /// Why.
        source: std::io::Error,
    },
    /// `madvise(MADV_POPULATE_WRITE)` failed.
    #[error("madvise(MADV_POPULATE_WRITE) of guest range {gpa:#x}..+{len:#x} failed: {source}")]
    Populate {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A range outside guest RAM.
    #[error("guest range {gpa:#x}..+{len:#x} lies outside the {size:#x} bytes of guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// RAM size.
        size: u64,
    },
    /// vm-memory refused an access.
    #[error("guest memory access at {gpa:#x} failed: {source}")]
    Access {
        /// Start.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The host mm refused an access to guest RAM (shadow mode).
    #[error("guest range {gpa:#x}..+{len:#x}: {source}")]
    Host {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        source: crate::mm::MmError,
    },
    /// `madvise` failed.
    #[error("madvise(MADV_DONTNEED) of guest range {gpa:#x}..+{len:#x} failed: {source}")]
    Discard {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// Byte access to guest-physical memory, for code that builds guest
/// structures (boot tables, GDT, boot info) and for the ELF loader's checks.
pub trait GuestMemWriter {
    /// Bytes of guest RAM, gpa `[0, size)`.
    fn size(&self) -> u64;
    /// Writes `bytes` at `gpa`.
    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError>;
    /// Reads `buf.len()` bytes at `gpa`.
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Writes a little-endian u64.
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write_bytes(gpa, &value.to_le_bytes())
    }

    /// Reads a little-endian u64.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read_bytes(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Guest RAM as code outside the boot path reads it (the hypercalls):
/// `GuestRam` in kvm mode, the host mm's guest-RAM VMA in shadow mode.
pub type SharedGuestMem = std::sync::Arc<dyn GuestMemWriter + Send + Sync>;

/// Checks that `[gpa, gpa + len)` lies inside `[0, size)`.
pub fn check_range(gpa: u64, len: u64, size: u64) -> Result<(), MemoryError> {
    match gpa.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MemoryError::OutOfRange { gpa, len, size }),
    }
}

/// Guest RAM backed by an anonymous private mapping, 2 MiB aligned so that
/// a huge page of the host can back a huge page of the guest (KVM maps a
/// large page only where the gfn and the hva share their alignment).
#[derive(Debug)]
pub struct GuestRam {
    // Declared first: dropped before the mapping it points into.
    mem: GuestMemoryMmap,
    size: u64,
    _mapping: AlignedMapping,
}

/// `PMD_SIZE`: the alignment of guest RAM in the host.
const RAM_ALIGN: usize = 2 << 20;

/// An anonymous private mapping at an aligned address, unmapped when
/// dropped (vm-memory does not own a region built from a raw pointer).
#[derive(Debug)]
struct AlignedMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this object; the pointer is
// only an address (every access goes through vm-memory's volatile copies).
unsafe impl Send for AlignedMapping {}
// SAFETY: as above.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    /// `len` zeroed bytes at a multiple of `align` (MAP_NORESERVE: pages
    /// are only allocated when touched).
    fn new(len: usize, align: usize) -> std::io::Result<Self> {
        let total = len
            .checked_add(align)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let (head, tail) = (aligned - start, start + total - (aligned + len));
        // SAFETY: both pieces lie inside the mapping just made and outside
        // the part kept; unmapping them cannot fail for valid ranges.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        Ok(AlignedMapping {
            addr: aligned as *mut u8,
            len,
        })
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the guest memory object
        // pointing into it is dropped first).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

impl GuestRam {
    /// Maps `size` bytes of zeroed RAM at gpa 0, 2 MiB aligned.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::OutOfRange {
            gpa: 0,
            len: size,
            size: 0,
        })?;
        let mapping = AlignedMapping::new(len, RAM_ALIGN)
            .map_err(|source| MemoryError::Allocate { size, source })?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: `mapping` is a live mapping of exactly `len` bytes with
        // these protection and flags, and outlives `mem` (field order).
        let region = unsafe {
            vm_memory::MmapRegion::build_raw(
                mapping.addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
        }
        .map_err(|e| MemoryError::Allocate {
            size,
            source: std::io::Error::other(e),
        })?;
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| {
            MemoryError::Allocate {
                size,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            }
        })?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|source| MemoryError::Region { size, source })?;
        Ok(GuestRam {
            mem,
            size,
            _mapping: mapping,
        })
    }

    /// `madvise(MADV_HUGEPAGE)` on all of guest RAM: the host kernel backs
    /// it with transparent huge pages where its THP settings allow.
    pub fn advise_hugepage(&self) -> Result<(), MemoryError> {
        // SAFETY: the whole of our own mapping; MADV_HUGEPAGE only changes
        // how the kernel backs it, never its contents.
        let ret = unsafe {
            libc::madvise(
                self.host_base().cast(),
                self.size as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            return Err(MemoryError::Hugepage {
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The vm-memory object, for linux-loader.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The host address of gpa 0; RAM is one contiguous mapping.
    pub fn host_base(&self) -> *mut u8 {
        // Cannot fail: gpa 0 is the start of the only region.
        self.mem
            .get_host_address(GuestAddress(0))
            .unwrap_or(std::ptr::null_mut())
    }

    /// Gives `[gpa, gpa + len)` back to the host (MADV_DONTNEED): the next
    /// access reads zeros. Both must be page aligned.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        // MADV_DONTNEED on private anonymous memory only replaces the pages
        // with zero pages; no Rust reference into guest memory exists (all
        // accesses go through vm-memory's volatile copies). KVM sees the
        // change through the host's MMU notifier.
        self.madvise(gpa, len, libc::MADV_DONTNEED)?
            .map_err(|source| MemoryError::Discard { gpa, len, source })
    }

    /// Populates `[gpa, gpa + len)` for writing (`MADV_POPULATE_WRITE`,
    /// Linux 5.14): the host faults every page in writable, as a write
    /// would, without writing. Both must be page aligned. `Ok(false)` when
    /// the host kernel does not know the advice (`EINVAL`), nothing done.
    pub fn populate_write(&self, gpa: u64, len: u64) -> Result<bool, MemoryError> {
        // It changes no byte (pages absent are zero-filled), so no access to
        // guest memory races it.
        match self.madvise(gpa, len, libc::MADV_POPULATE_WRITE)? {
            Ok(()) => Ok(true),
            Err(source) if source.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(source) => Err(MemoryError::Populate { gpa, len, source }),
        }
    }

    /// `madvise(advice)` over `[gpa, gpa + len)`, checked to lie in RAM and
    /// be page aligned; the outer error is the range's, the inner the
    /// host's.
    fn madvise(
        &self,
        gpa: u64,
        len: u64,
        advice: libc::c_int,
    ) -> Result<std::io::Result<()>, MemoryError> {
        check_range(gpa, len, self.size)?;
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfRange {
                gpa,
                len,
                size: self.size,
            });
        }
        let host = self.host_base();
        // SAFETY: the range was checked to lie inside our own mapping of
        // `self.size` bytes at `host`, page aligned at both ends; the callers
        // say why their advice cannot race a guest-memory access.
        let ret = unsafe { libc::madvise(host.add(gpa as usize).cast(), len as usize, advice) };
        Ok(if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        })
    }
}

impl GuestMemWriter for GuestRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        write_ram(self, gpa, bytes)
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(gpa, buf.len() as u64, self.size)?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })
    }
}

/// Writing through a shared reference is fine: vm-memory's copies are
/// volatile and guest RAM has no Rust references into it.
impl GuestMemWriter for &GuestRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        write_ram(self, gpa, bytes)
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read_bytes(gpa, buf)
    }
}

/// Writes through a shared reference (vm-memory copies are volatile).
pub fn write_ram(ram: &GuestRam, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
    check_range(gpa, bytes.len() as u64, ram.size)?;
    ram.mem
        .write_slice(bytes, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access { gpa, source })
}

/// Guest memory as a plain byte buffer, for unit tests.
#[derive(Debug, Clone)]
pub struct BufferMemory(pub Vec<u8>);

impl BufferMemory {
    /// `size` zero bytes.
    pub fn new(size: usize) -> Self {
        BufferMemory(vec![0; size])
    }
}

impl GuestMemWriter for BufferMemory {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        check_range(gpa, bytes.len() as u64, self.size())?;
        self.0[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(gpa, buf.len() as u64, self.size())?;
        buf.copy_from_slice(&self.0[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }

    #[test]
    fn buffer_memory() {
        let mut m = BufferMemory::new(64);
        m.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.read_u64(8).unwrap(), 0x1122_3344_5566_7788);
        assert!(m.write_u64(60, 1).is_err());
    }

    #[test]
    fn ram_discard_reads_zero() {
        let mut ram = GuestRam::new(4 << 20).unwrap();
        ram.write_u64(0x3000, 42).unwrap();
        assert_eq!(ram.read_u64(0x3000).unwrap(), 42);
        ram.discard(0x3000, PAGE_SIZE).unwrap();
        assert_eq!(ram.read_u64(0x3000).unwrap(), 0);
        assert!(ram.discard(0x3001, PAGE_SIZE).is_err());
        assert!(ram.discard(4 << 20, PAGE_SIZE).is_err());
    }
}
