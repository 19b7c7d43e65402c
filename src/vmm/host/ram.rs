//! Guest RAM in shadow mode: one VMA of the host mm, bound to gpa 0 by the
//! shadow MMU's memslot, so gpa `g` is hva `base + g`. The VMM writes it as
//! a process writes its own memory, through the mm.

use std::sync::Arc;

use crate::mm::{Hva, Mm, MmError};
use crate::vmm::kvm::memory::{GuestMemWriter, MemoryError, check_range};

/// Guest RAM seen through the host mm.
pub struct ShadowRam {
    mm: Arc<Mm>,
    base: Hva,
    size: u64,
}

impl ShadowRam {
    /// The `size` bytes at `base` in `mm` (a VMA the caller mapped).
    pub fn new(mm: Arc<Mm>, base: Hva, size: u64) -> Self {
        ShadowRam { mm, base, size }
    }

    /// The host mm.
    pub fn mm(&self) -> &Arc<Mm> {
        &self.mm
    }

    /// The hva of gpa 0.
    pub fn base(&self) -> Hva {
        self.base
    }

    /// Bytes of guest RAM.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// `mlock`s `[gpa, gpa + len)`: reclaim, KSM and `MADV_DONTNEED` never
    /// take it; it is faulted in now.
    pub fn mlock(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        check_range(gpa, len, self.size)?;
        self.mm
            .mlock(self.base + gpa, len)
            .map_err(host_err(gpa, len))
    }
}

/// An mm error on the guest range `[gpa, gpa + len)`.
pub fn host_err(gpa: u64, len: u64) -> impl FnOnce(MmError) -> MemoryError {
    move |source| MemoryError::Host { gpa, len, source }
}

impl GuestMemWriter for ShadowRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        (&*self).write_bytes(gpa, bytes)
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(gpa, buf.len() as u64, self.size)?;
        self.mm
            .read(self.base + gpa, buf)
            .map_err(host_err(gpa, buf.len() as u64))
    }
}

/// Writing through a shared reference: the host mm serializes itself.
impl GuestMemWriter for &ShadowRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        check_range(gpa, bytes.len() as u64, self.size)?;
        self.mm
            .write(self.base + gpa, bytes)
            .map_err(host_err(gpa, bytes.len() as u64))
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read_bytes(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MmapFlags, Prot};

    #[test]
    fn reads_back_through_the_host_mm_and_locks() {
        let mm = Mm::new_anonymous(2048).unwrap();
        let size = 4 << 20;
        let base = mm
            .mmap(None, size, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .unwrap();
        let ram = ShadowRam::new(mm.clone(), base, size);
        let mut w = &ram;
        w.write_u64(0x20_0008, 0x1234).unwrap();
        assert_eq!(ram.read_u64(0x20_0008).unwrap(), 0x1234);
        assert!(w.write_u64(size, 1).is_err());
        ram.mlock(0x20_0000, 0x1000).unwrap();
        assert!(mm.madvise_dontneed(base + 0x20_0000, 4096).is_err());
        assert!(ram.mlock(size, 0x1000).is_err());
    }
}
