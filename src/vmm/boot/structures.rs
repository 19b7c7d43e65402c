//! What a boot loader writes into guest memory: identity-mapped boot page
//! tables (with the switcher's PML4 entry), the boot-info page and the
//! per-vCPU pages. The GDT, IDTs and TSSes are not in guest memory: they
//! are the switcher's (`vmm/switcher/`).
//!
//! Everything is written through [`GuestMemWriter`], so the same code can
//! build the boot structures into a test buffer, into `GuestRam`, or (in
//! shadow mode) into frames of the host mm.

use vm_memory::ByteValued;

use super::loader::ImageLayout;
use crate::vmm::abi::{self, BootInfo, PAGE_SIZE, percpu_gpa};
use crate::vmm::kvm::memory::{GuestMemWriter, MemoryError};
use crate::vmm::x86::pte;

/// Errors while building the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing guest memory failed.
    #[error("cannot write the boot structures: {0}")]
    Memory(#[from] MemoryError),
    /// More vCPUs than the layout has room for.
    #[error("{0} vCPUs do not fit the boot layout (at most {max})", max = abi::MAX_VCPUS)]
    TooManyVcpus(u32),
    /// The command line does not fit.
    #[error("the command line is {0} bytes; at most {max} fit", max = abi::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// RAM too small or too large for the boot tables.
    #[error("{0:#x} bytes of RAM cannot be mapped by the boot tables")]
    BadMemSize(u64),
}

/// The boot PDPT.
pub const BOOT_PDPT_GPA: u64 = abi::BOOT_PML4_GPA + PAGE_SIZE;
/// The 4 KiB page table that maps the first 2 MiB (the VMM area).
pub const BOOT_PT0_GPA: u64 = abi::BOOT_PML4_GPA + 2 * PAGE_SIZE;
/// The first boot page directory; one per GiB of RAM follows.
pub const BOOT_PD_GPA: u64 = abi::BOOT_PML4_GPA + 3 * PAGE_SIZE;

/// Inputs of [`write_boot_structures`].
#[derive(Clone, Debug)]
pub struct BootParams<'a> {
    /// vCPU count.
    pub nr_vcpus: u32,
    /// `PAGING_MODE_*`.
    pub paging_mode: u32,
    /// Guest command line.
    pub cmdline: &'a str,
    /// The loaded image.
    pub image: ImageLayout,
    /// The PML4 entry of the switcher range (slot
    /// `abi::SWITCHER_PML4_INDEX`), copied into the boot PML4.
    pub switcher_pml4e: u64,
}

/// Builds the identity-mapped boot page tables for `[0, mem_size)` and
/// returns the CR3 value.
///
/// The first 2 MiB (the VMM area) is mapped with 4 KiB pages, supervisor
/// only, except that page 0 is not present and the boot-info page is
/// user-readable and read-only. The rest of RAM is mapped with writable,
/// user-accessible 2 MiB pages. PML4 slot `abi::SWITCHER_PML4_INDEX` holds
/// `switcher_pml4e`.
///
/// Every entry is Accessed and every writable leaf Dirty from the start,
/// as Linux's kernel mappings (`PAGE_KERNEL`): nothing ever has to write
/// the boot tables to mark them, and POPULATE, which maps only accessed
/// guest entries, works on the boot map as it is. In shadow mode a guest
/// store into a shadowed upper-level table zaps its shadow pages and
/// bounces the memslot (milliseconds), so a runtime that set the bits
/// itself before a POPULATE would pay that once per table.
pub fn build_boot_page_tables<M: GuestMemWriter>(
    mem: &mut M,
    mem_size: u64,
    switcher_pml4e: u64,
) -> Result<u64, BootError> {
    const GIB: u64 = 1 << 30;
    const PDE_SPAN: u64 = 2 << 20;
    if mem_size < PDE_SPAN || !mem_size.is_multiple_of(PDE_SPAN) || mem_size > 512 * GIB {
        return Err(BootError::BadMemSize(mem_size));
    }
    let nr_pds = mem_size.div_ceil(GIB);
    if BOOT_PD_GPA + nr_pds * PAGE_SIZE > abi::PERCPU_GPA {
        return Err(BootError::BadMemSize(mem_size));
    }
    let table =
        |entries: &[u64]| -> Vec<u8> { entries.iter().flat_map(|e| e.to_le_bytes()).collect() };

    let mut pml4 = [0u64; 512];
    // Non-leaf entries: Accessed; leaves: Accessed, and Dirty if writable.
    const TABLE: u64 = pte::P | pte::W | pte::U | pte::A;
    const RW: u64 = pte::P | pte::W | pte::A | pte::D;
    pml4[0] = BOOT_PDPT_GPA | TABLE;
    pml4[abi::SWITCHER_PML4_INDEX] = switcher_pml4e;
    mem.write_bytes(abi::BOOT_PML4_GPA, &table(&pml4))?;

    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().enumerate().take(nr_pds as usize) {
        *e = (BOOT_PD_GPA + i as u64 * PAGE_SIZE) | TABLE;
    }
    mem.write_bytes(BOOT_PDPT_GPA, &table(&pdpt))?;

    let mut pt0 = [0u64; 512];
    for (i, e) in pt0.iter_mut().enumerate().skip(1) {
        let gpa = i as u64 * PAGE_SIZE;
        *e = if gpa == abi::BOOT_INFO_GPA {
            gpa | pte::P | pte::U | pte::A
        } else {
            gpa | RW
        };
    }
    mem.write_bytes(BOOT_PT0_GPA, &table(&pt0))?;

    for pd_index in 0..nr_pds {
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            let gpa = pd_index * GIB + i as u64 * PDE_SPAN;
            if gpa >= mem_size {
                break;
            }
            *e = if gpa == 0 {
                BOOT_PT0_GPA | TABLE
            } else {
                gpa | RW | pte::U | pte::PS
            };
        }
        mem.write_bytes(BOOT_PD_GPA + pd_index * PAGE_SIZE, &table(&pd))?;
    }
    Ok(abi::BOOT_PML4_GPA)
}

/// Writes everything the guest finds in its memory at entry: page tables,
/// per-vCPU pages, the command line and the boot info. Returns the boot info.
pub fn write_boot_structures<M: GuestMemWriter>(
    mem: &mut M,
    p: &BootParams<'_>,
) -> Result<BootInfo, BootError> {
    if p.nr_vcpus == 0 || p.nr_vcpus > abi::MAX_VCPUS {
        return Err(BootError::TooManyVcpus(p.nr_vcpus));
    }
    if p.cmdline.len() >= abi::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(p.cmdline.len()));
    }
    let mem_size = mem.size();
    let cr3 = build_boot_page_tables(mem, mem_size, p.switcher_pml4e)?;
    for cpu in 0..p.nr_vcpus {
        let area = percpu_gpa(cpu);
        mem.write_u64(area, area)?; // self pointer
        mem.write_u64(area + 8, u64::from(cpu))?;
    }
    let mut cmdline = p.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_bytes(abi::CMDLINE_GPA, &cmdline)?;

    let image_end = p.image.end.next_multiple_of(PAGE_SIZE);
    let info = BootInfo {
        magic: abi::BOOT_INFO_MAGIC,
        version: abi::BOOT_INFO_VERSION,
        mem_size,
        paging_mode: p.paging_mode,
        nr_vcpus: p.nr_vcpus,
        cmdline_gpa: abi::CMDLINE_GPA,
        cmdline_len: p.cmdline.len() as u32,
        reserved0: 0,
        image_start: p.image.start,
        image_end,
        free_start: image_end,
        free_end: mem_size,
        boot_cr3: cr3,
        percpu_base: abi::PERCPU_GPA,
        percpu_stride: abi::PERCPU_STRIDE,
        user_start: abi::IMAGE_MIN_GPA,
        user_end: mem_size,
    };
    mem.write_bytes(abi::BOOT_INFO_GPA, info.as_slice())?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::kvm::memory::BufferMemory;

    /// A 4-level walk over the buffer: (gpa, writable, user) or None.
    fn walk(mem: &BufferMemory, cr3: u64, va: u64) -> Option<(u64, bool, bool)> {
        let mut table = cr3;
        let (mut w, mut u) = (true, true);
        for level in (0..4).rev() {
            let idx = (va >> (12 + 9 * level)) & 511;
            let e = mem.read_u64(table + idx * 8).ok()?;
            if e & pte::P == 0 {
                return None;
            }
            w &= e & pte::W != 0;
            u &= e & pte::U != 0;
            if level == 1 && e & pte::PS != 0 {
                return Some(((e & pte::ADDR_MASK & !0x1f_ffff) | (va & 0x1f_ffff), w, u));
            }
            table = e & pte::ADDR_MASK;
            if level == 0 {
                return Some((table | (va & 0xfff), w, u));
            }
        }
        None
    }

    fn params(cmdline: &str) -> BootParams<'_> {
        BootParams {
            nr_vcpus: 2,
            paging_mode: abi::PAGING_MODE_KVM,
            cmdline,
            image: ImageLayout {
                start: 0x20_0000,
                end: 0x20_4321,
                entry: 0x20_0000,
            },
            switcher_pml4e: 0xabc_d021,
        }
    }

    #[test]
    fn identity_map_and_permissions() {
        let size = 8 << 20;
        let mut mem = BufferMemory::new(size);
        let info = write_boot_structures(&mut mem, &params("a=1")).unwrap();
        let cr3 = info.boot_cr3;
        assert_eq!(walk(&mem, cr3, 0), None, "page 0 is a guard");
        assert_eq!(
            mem.read_u64(cr3 + 8 * abi::SWITCHER_PML4_INDEX as u64)
                .unwrap(),
            0xabc_d021,
            "the switcher's PML4 entry"
        );
        assert_eq!(
            walk(&mem, cr3, abi::BOOT_INFO_GPA),
            Some((abi::BOOT_INFO_GPA, false, true))
        );
        assert_eq!(
            walk(&mem, cr3, percpu_gpa(1) + 5),
            Some((percpu_gpa(1) + 5, true, false))
        );
        for va in [abi::IMAGE_MIN_GPA, 0x30_1234, size as u64 - 8] {
            assert_eq!(walk(&mem, cr3, va), Some((va, true, true)), "{va:#x}");
        }
        assert_eq!(walk(&mem, cr3, size as u64), None);
        assert_eq!(walk(&mem, cr3, 1 << 39), None);
        // Every present entry of the boot tables is Accessed, every
        // writable leaf Dirty (the switcher's entry is the VMM's).
        let tables = [abi::BOOT_PML4_GPA, BOOT_PDPT_GPA, BOOT_PT0_GPA, BOOT_PD_GPA];
        for (t, table) in tables.into_iter().enumerate() {
            for i in 0..512u64 {
                let e = mem.read_u64(table + 8 * i).unwrap();
                if e & pte::P == 0 || (t == 0 && i == abi::SWITCHER_PML4_INDEX as u64) {
                    continue;
                }
                assert_ne!(e & pte::A, 0, "table {table:#x} entry {i}: {e:#x}");
                let leaf = t == 2 || (t == 3 && e & pte::PS != 0);
                let want_d = leaf && e & pte::W != 0;
                assert_eq!(
                    e & pte::D != 0,
                    want_d,
                    "table {table:#x} entry {i}: {e:#x}"
                );
            }
        }
    }

    #[test]
    fn large_memory_tables() {
        // 3 GiB: three page directories. Only the tables are written, so a
        // sparse writer would do; the buffer must still cover them.
        struct Sparse(std::collections::HashMap<u64, u8>, u64);
        impl GuestMemWriter for Sparse {
            fn size(&self) -> u64 {
                self.1
            }
            fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
                for (i, b) in bytes.iter().enumerate() {
                    self.0.insert(gpa + i as u64, *b);
                }
                Ok(())
            }
            fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = self.0.get(&(gpa + i as u64)).copied().unwrap_or(0);
                }
                Ok(())
            }
        }
        let mut mem = Sparse(Default::default(), 3 << 30);
        let cr3 = build_boot_page_tables(&mut mem, 3 << 30, 0).unwrap();
        let pdpt2 = mem.read_u64(BOOT_PDPT_GPA + 16).unwrap();
        assert_eq!(pdpt2 & pte::ADDR_MASK, BOOT_PD_GPA + 2 * PAGE_SIZE);
        let last_pde = mem.read_u64(BOOT_PD_GPA + 2 * PAGE_SIZE + 511 * 8).unwrap();
        assert_eq!(last_pde & pte::ADDR_MASK, (3 << 30) - (2 << 20));
        assert_eq!(mem.read_u64(BOOT_PDPT_GPA + 24).unwrap(), 0);
        assert_eq!(cr3, abi::BOOT_PML4_GPA);
        assert!(
            build_boot_page_tables(&mut mem, 3 << 20, 0).is_err(),
            "not a multiple of 2 MiB"
        );
    }

    #[test]
    fn percpu_pages() {
        let mut mem = BufferMemory::new(4 << 20);
        write_boot_structures(&mut mem, &params("")).unwrap();
        assert_eq!(mem.read_u64(percpu_gpa(1)).unwrap(), percpu_gpa(1));
        assert_eq!(mem.read_u64(percpu_gpa(1) + 8).unwrap(), 1);
    }

    #[test]
    fn boot_info_and_cmdline() {
        let mut mem = BufferMemory::new(4 << 20);
        let info = write_boot_structures(&mut mem, &params("size=16M x")).unwrap();
        let mut raw = BootInfo::default();
        mem.read_bytes(abi::BOOT_INFO_GPA, raw.as_mut_slice())
            .unwrap();
        assert_eq!(raw, info);
        assert_eq!(info.free_start, 0x20_5000);
        assert_eq!(info.free_end, 4 << 20);
        assert_eq!(info.cmdline_len, 10);
        let mut cmd = [0u8; 11];
        mem.read_bytes(abi::CMDLINE_GPA, &mut cmd).unwrap();
        assert_eq!(&cmd, b"size=16M x\0");
        let long = "x".repeat(abi::CMDLINE_MAX);
        assert!(matches!(
            write_boot_structures(&mut mem, &params(&long)),
            Err(BootError::CmdlineTooLong(_))
        ));
        let mut p = params("");
        p.nr_vcpus = abi::MAX_VCPUS + 1;
        assert!(matches!(
            write_boot_structures(&mut mem, &p),
            Err(BootError::TooManyVcpus(_))
        ));
    }
}
