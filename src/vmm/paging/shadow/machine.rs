//! A shadow-mode VM's memory:
//!
//! ```text
//! machine memory (AnonMemory) ══ KVM memslot 0 at KVM gpa 0: frame n = KVM page n
//!   ├─ frames 0..S: the switcher (FrameOwner::Reserved, never handed out)
//!   └─ FrameAllocator ─┬─ host mm (Mm): guest RAM is one VMA, bound to gpa 0.. by our memslot
//!                      └─ shadow MMU: shadow page-table pages
//! ```

use std::sync::Arc;

use crate::mm::{AnonMemory, FrameAllocator, MachineMemory, Mm, MmapFlags, Prot};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::boot::loader::ImageLayout;
use crate::vmm::host::ram::ShadowRam;
use crate::vmm::host::tlb::HostTlbFlush;
use crate::vmm::kvm::memory::MemoryError;
use crate::vmm::kvm::memslot::MemslotBounce;
use crate::vmm::switcher::{self, Switcher, SwitcherError};

/// Machine memory beyond guest RAM by default: shadow pages and slack.
pub const DEFAULT_OVERHEAD: u64 = 4 << 20;

/// The default `--machine-mem` for `mem_size` bytes of guest RAM: all of
/// guest RAM, plus 1/16 of it and 4 MiB for shadow page tables, rounded up
/// to 2 MiB.
pub fn default_machine_mem(mem_size: u64) -> u64 {
    (mem_size + mem_size / 16 + DEFAULT_OVERHEAD).next_multiple_of(2 << 20)
}

/// Machine memory, the host mm over it, and guest RAM in that mm.
pub struct ShadowMachine {
    /// Machine memory (registered with KVM as memslot 0).
    pub machine: Arc<AnonMemory>,
    /// The simulated host mm of the VMM process.
    pub mm: Arc<Mm>,
    /// Guest RAM, a VMA of `mm`.
    pub ram: Arc<ShadowRam>,
    /// The flush the shadow MMU uses.
    pub flush: Arc<HostTlbFlush>,
    /// The switcher, in the first frames of machine memory.
    pub switcher: Arc<Switcher>,
}

/// Why machine memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Guest RAM or machine memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The switcher could not be written.
    #[error(transparent)]
    Switcher(#[from] SwitcherError),
}

impl ShadowMachine {
    /// `machine_mem` bytes of machine memory, the switcher for `nr_vcpus`
    /// in its first frames, and a `mem_size`-byte guest RAM VMA in a fresh
    /// host mm (frames are allocated on first touch). With `bounce`, large
    /// flushes bounce the memslot instead.
    pub fn new(
        mem_size: u64,
        machine_mem: u64,
        nr_vcpus: u32,
        host_flush: bool,
        bounce: Option<Arc<MemslotBounce>>,
    ) -> Result<Self, MachineError> {
        let nr_frames = machine_mem / PAGE_SIZE;
        let machine = Arc::new(
            AnonMemory::new(nr_frames).map_err(|source| MemoryError::Host {
                gpa: 0,
                len: machine_mem,
                source,
            })?,
        );
        let mem: Arc<dyn MachineMemory> = machine.clone();
        // The switcher's frames are the VMM's: no memslot of the shadow MMU
        // reaches them, the allocator never hands them out, and frame n is
        // KVM gpa n * 4 KiB, the address the CPU walks.
        let reserved = switcher::pages(nr_vcpus);
        let switcher = Arc::new(Switcher::new(mem.clone(), 0, 0, nr_vcpus)?);
        let frames = FrameAllocator::with_reserved(mem, reserved, true);
        let mm = Mm::new(frames);
        let base = mm
            .mmap(None, mem_size, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .map_err(|source| MemoryError::Host {
                gpa: 0,
                len: mem_size,
                source,
            })?;
        let flush = if host_flush {
            HostTlbFlush::new(machine.host_base(), nr_frames)
        } else {
            HostTlbFlush::disabled(machine.host_base(), nr_frames)
        };
        let flush = Arc::new(match bounce {
            Some(b) => flush.with_memslot_bounce(b),
            None => flush,
        });
        Ok(ShadowMachine {
            machine,
            ram: Arc::new(ShadowRam::new(mm.clone(), base, mem_size)),
            mm,
            flush,
            switcher,
        })
    }

    /// Applies the host mm's THP settings; with any size on, guest RAM is
    /// given `MADV_HUGEPAGE`, as a VMM asking for huge pages does (QEMU's
    /// `hugepages` backing of guest RAM). With 2 MiB folios on, machine
    /// memory gets `MADV_HUGEPAGE` from the real host too, as kvm mode's
    /// guest RAM does: a 2 MiB spte over a PMD-size folio (a 2 MiB-aligned
    /// run of frames) can then be one large mapping in the host's KVM
    /// instead of 512 small ones it builds touch by touch.
    pub fn set_thp(&self, thp: crate::mm::ThpConfig) -> Result<(), MemoryError> {
        self.mm.set_thp_config(thp);
        if thp.pmd_enabled() {
            let len = self.machine.nr_frames() * PAGE_SIZE;
            self.machine
                .advise_hugepage()
                .map_err(|source| MemoryError::Host {
                    gpa: 0,
                    len,
                    source,
                })?;
        }
        if thp.any_enabled() {
            self.mm
                .madvise_hugepage(self.ram.base(), self.ram.size_bytes())
                .map_err(|source| MemoryError::Host {
                    gpa: 0,
                    len: self.ram.size_bytes(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Locks the pages exception delivery needs (the VMM area below the
    /// image: GDT, boot info, TSSes, boot tables, per-vCPU stacks; and the
    /// image: IDT and handler code) so reclaim, KSM and `MADV_DONTNEED`
    /// never take them; `mlock` also faults them in.
    pub fn lock_boot_pages(&self, image: &ImageLayout) -> Result<(), MemoryError> {
        self.ram.mlock(0, abi::IMAGE_MIN_GPA)?;
        let start = image.start & !(PAGE_SIZE - 1);
        let end = image.end.next_multiple_of(PAGE_SIZE);
        if end > start {
            self.ram.mlock(start, end - start)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::kvm::memory::GuestMemWriter as _;

    #[test]
    fn default_machine_mem_covers_ram_and_overhead() {
        assert_eq!(default_machine_mem(64 << 20), 72 << 20);
        assert!(default_machine_mem(4 << 20) >= 8 << 20);
        assert_eq!(default_machine_mem(64 << 20) % (2 << 20), 0);
    }

    #[test]
    fn shadow_ram_reads_back_through_the_host_mm() {
        let m = ShadowMachine::new(4 << 20, 8 << 20, 2, true, None).unwrap();
        assert_eq!(
            m.mm.frames().count(crate::mm::FrameOwner::Reserved),
            switcher::pages(2),
            "the switcher's frames are kept for the VMM"
        );
        m.switcher.check().unwrap();
        let mut ram = &*m.ram;
        ram.write_u64(0x20_0008, 0x1234).unwrap();
        assert_eq!(ram.read_u64(0x20_0008).unwrap(), 0x1234);
        assert!(ram.write_u64(4 << 20, 1).is_err());
        m.lock_boot_pages(&ImageLayout {
            start: 0x20_0000,
            end: 0x20_1000,
            entry: 0x20_0000,
        })
        .unwrap();
        assert!(
            m.mm.madvise_dontneed(m.ram.base() + 0x20_0000, 4096)
                .is_err()
        );
    }
}
