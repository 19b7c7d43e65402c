//! The switcher (lguest's name for it): the GDT, every vCPU's IDT and its
//! TSS with the I/O permission bitmap, in VMM-owned pages outside guest RAM,
//! mapped read-only and supervisor-only at the reserved gva range
//! `[abi::SWITCHER_GVA, 2^64)` (docs/guest-abi.md §3).
//!
//! ```text
//! page 0        GDT: null, ring-1 code/data (DPL 1), user data/code (DPL 3), busy TSSes
//! page 1 + 2n   vCPU n's IDT: 256 gates, not present until SET_TRAP_TABLE
//! page 2 + 2n   vCPU n's TSS (stacks set by SET_STACK) and I/O bitmap
//! page D..D+2   the range's PDPT, PD and PT (D = 1 + 2 * nr_vcpus)
//! ```
//!
//! kvm mode backs it with its own memory, a read-only memslot just above
//! guest RAM; shadow mode with frames of machine memory the frame
//! allocator keeps for the VMM (`FrameOwner::Reserved`), which no memslot
//! of the shadow MMU reaches. Either way the guest can read it (exception
//! delivery must) but never write it: its pages are read-only and
//! supervisor-only, the PML4 entry too, and in shadow mode the MMU keeps
//! the link in every root and refuses guest mappings over the range.
//!
//! Only the VMM writes it, on a hypercall of the vCPU whose IDT or TSS it
//! is (that vCPU is out of guest mode meanwhile), through volatile copies.
//! A copy of every byte written is kept so that `--check` can prove the
//! pages never changed behind the VMM's back.

pub mod descriptors;

use std::sync::Arc;

use parking_lot::Mutex;

use crate::mm::{FrameAccess, MachineMemory, MmError, Pfn};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::x86::pte;

use descriptors::{TSS_RSP1, interrupt_gate, tss_stack_offset};

/// Errors of the switcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitcherError {
    /// Its backing frames could not be read or written.
    #[error("the switcher's page {page} is not backed: {source}")]
    Memory {
        /// Switcher page.
        page: u64,
        /// Why.
        source: MmError,
    },
    /// A byte differs from what the VMM wrote (`--check`).
    #[error(
        "switcher page {page} byte {offset:#x} is {found:#04x}, but the VMM wrote {wrote:#04x}: \
         something other than the VMM wrote the switcher"
    )]
    Changed {
        /// Switcher page.
        page: u64,
        /// Offset in it.
        offset: usize,
        /// What is there.
        found: u8,
        /// What the VMM wrote.
        wrote: u8,
    },
}

/// Pages holding the GDT, the IDTs and the TSSes for `nr_vcpus`.
pub const fn data_pages(nr_vcpus: u32) -> u64 {
    1 + 2 * nr_vcpus as u64
}

/// Every page of the switcher for `nr_vcpus`: the data pages and the
/// three page tables that map them.
pub const fn pages(nr_vcpus: u32) -> u64 {
    data_pages(nr_vcpus) + 3
}

/// The PML4 entry that maps the switcher range when page 0 of the switcher
/// lies at physical address `base` (a gpa in kvm mode, a machine address
/// in shadow mode): present, read-only, supervisor-only, Accessed preset.
pub fn pml4e(base: u64, nr_vcpus: u32) -> u64 {
    (base + data_pages(nr_vcpus) * PAGE_SIZE) | pte::P | pte::A
}

/// The switcher of one VM.
pub struct Switcher {
    mem: Arc<dyn MachineMemory>,
    /// The frame of `mem` holding switcher page 0.
    first: Pfn,
    /// Physical address of switcher page 0 as the CPU sees it.
    base: u64,
    nr_vcpus: u32,
    /// Every byte the VMM wrote, page after page; also serializes writers.
    wrote: Mutex<Vec<u8>>,
}

impl Switcher {
    /// Builds the switcher for `nr_vcpus` in frames `first..` of `mem`,
    /// whose first frame the CPU sees at physical address `base`: the GDT,
    /// IDTs with no gate present, TSSes with no stack and the I/O bitmap,
    /// and the page tables of the range.
    pub fn new(
        mem: Arc<dyn MachineMemory>,
        first: Pfn,
        base: u64,
        nr_vcpus: u32,
    ) -> Result<Self, SwitcherError> {
        let s = Switcher {
            mem,
            first,
            base,
            nr_vcpus,
            wrote: Mutex::new(vec![0; (pages(nr_vcpus) * PAGE_SIZE) as usize]),
        };
        for page in 0..pages(nr_vcpus) {
            s.write(page * PAGE_SIZE, &[0; PAGE_SIZE as usize])?;
        }
        let gdt: Vec<u8> = descriptors::gdt(nr_vcpus)
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        s.write(0, &gdt)?;
        for cpu in 0..nr_vcpus {
            s.write(Self::tss_offset(cpu), &descriptors::tss())?;
        }
        // The tables: PDPT[0] -> PD, PD[0] -> PT, PT[i] -> data page i, all
        // read-only and supervisor-only, Accessed (and Dirty) preset so the
        // CPU never writes them. No NX: a guest may clear EFER.NXE (kvm
        // mode), which would make bit 63 reserved.
        let d = data_pages(nr_vcpus);
        let table = |i: u64| base + (d + i) * PAGE_SIZE;
        s.write(d * PAGE_SIZE, &(table(1) | pte::P | pte::A).to_le_bytes())?;
        s.write(
            (d + 1) * PAGE_SIZE,
            &(table(2) | pte::P | pte::A).to_le_bytes(),
        )?;
        let pt: Vec<u8> = (0..d)
            .flat_map(|i| ((base + i * PAGE_SIZE) | pte::P | pte::A | pte::D).to_le_bytes())
            .collect();
        s.write((d + 2) * PAGE_SIZE, &pt)?;
        Ok(s)
    }

    fn idt_offset(cpu: u32) -> u64 {
        abi::switcher_idt(cpu) - abi::SWITCHER_GVA
    }

    fn tss_offset(cpu: u32) -> u64 {
        abi::switcher_tss(cpu) - abi::SWITCHER_GVA
    }

    /// Writes `bytes` at byte `offset` of the switcher (inside one page).
    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), SwitcherError> {
        let page = offset / PAGE_SIZE;
        let in_page = (offset % PAGE_SIZE) as usize;
        let mut wrote = self.wrote.lock();
        let at = offset as usize;
        wrote[at..at + bytes.len()].copy_from_slice(bytes);
        self.mem
            .write_frame(self.first + page, in_page, bytes)
            .map_err(|source| SwitcherError::Memory { page, source })
    }

    /// vCPUs it was built for.
    pub fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    /// Physical address of switcher page 0 as the CPU sees it.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The PML4 entry mapping the range (slot `abi::SWITCHER_PML4_INDEX`).
    pub fn pml4e(&self) -> u64 {
        pml4e(self.base, self.nr_vcpus)
    }

    /// Whether physical address `pa` lies in the switcher.
    pub fn contains(&self, pa: u64) -> bool {
        pa.checked_sub(self.base)
            .is_some_and(|off| off < pages(self.nr_vcpus) * PAGE_SIZE)
    }

    /// Sets gate `vector` of vCPU `cpu`'s IDT: `Some((handler, ist))` an
    /// interrupt gate to a ring-1 handler, `None` not present (an exception
    /// there becomes #NP, then #DF, then a triple fault: the VM stops).
    /// The caller validated the arguments.
    pub fn set_gate(
        &self,
        cpu: u32,
        vector: u8,
        gate: Option<(u64, u8)>,
    ) -> Result<(), SwitcherError> {
        let words = gate.map_or([0, 0], |(handler, ist)| interrupt_gate(handler, ist));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.write(Self::idt_offset(cpu) + u64::from(vector) * 16, &bytes)
    }

    /// Sets stack `index` of vCPU `cpu`'s TSS to `rsp` (validated by the
    /// caller). Index 0, the kernel stack, goes to RSP0 and RSP1: an
    /// architectural CPU switches to RSP1 on an exception from ring 3 to
    /// ring 1, the `kvm_pvm` backend to RSP0 (docs/design.md).
    pub fn set_stack(&self, cpu: u32, index: u64, rsp: u64) -> Result<(), SwitcherError> {
        let Some(off) = tss_stack_offset(index) else {
            return Ok(());
        };
        let tss = Self::tss_offset(cpu);
        self.write(tss + off as u64, &rsp.to_le_bytes())?;
        if index == 0 {
            self.write(tss + TSS_RSP1 as u64, &rsp.to_le_bytes())?;
        }
        Ok(())
    }

    /// `--check`: every byte of the switcher is what the VMM wrote.
    pub fn check(&self) -> Result<(), SwitcherError> {
        let wrote = self.wrote.lock();
        let mut buf = [0u8; PAGE_SIZE as usize];
        for page in 0..pages(self.nr_vcpus) {
            self.mem
                .read_frame(self.first + page, 0, &mut buf)
                .map_err(|source| SwitcherError::Memory { page, source })?;
            let want = &wrote[(page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize];
            if let Some(offset) = (0..buf.len()).find(|&i| buf[i] != want[i]) {
                return Err(SwitcherError::Changed {
                    page,
                    offset,
                    found: buf[offset],
                    wrote: want[offset],
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::AnonMemory;

    /// (physical address, writable, user) of `gva` under `pml4e`.
    fn walk(mem: &dyn MachineMemory, pml4e: u64, gva: u64) -> Option<(u64, bool, bool)> {
        let (mut e, mut w, mut u) = (pml4e, true, true);
        for level in (0..4).rev() {
            if e & pte::P == 0 {
                return None;
            }
            w &= e & pte::W != 0;
            u &= e & pte::U != 0;
            if level == 0 {
                break;
            }
            let table = (e & pte::ADDR_MASK) / PAGE_SIZE;
            let idx = ((gva >> (12 + 9 * (level - 1))) & 511) as usize;
            e = mem
                .frame_word(table, idx)
                .ok()?
                .load(std::sync::atomic::Ordering::Relaxed);
        }
        Some((e & pte::ADDR_MASK, w, u))
    }

    #[test]
    fn the_range_maps_the_data_pages_read_only_supervisor() {
        let nr = 3;
        let mem = Arc::new(AnonMemory::new(pages(nr) + 2).unwrap());
        // Frames 2.. hold it; the CPU sees frame 0 at physical address 0.
        let s = Switcher::new(mem.clone(), 2, 2 * PAGE_SIZE, nr).unwrap();
        for page in 0..data_pages(nr) {
            let gva = abi::SWITCHER_GVA + page * PAGE_SIZE;
            let (pa, w, u) = walk(mem.as_ref(), s.pml4e(), gva).unwrap();
            assert_eq!(pa, (2 + page) * PAGE_SIZE, "page {page}");
            assert!(!w && !u, "page {page}: read-only, supervisor");
        }
        assert!(
            walk(
                mem.as_ref(),
                s.pml4e(),
                abi::SWITCHER_GVA + data_pages(nr) * PAGE_SIZE
            )
            .is_none()
        );
        assert_eq!(s.pml4e() & (pte::W | pte::U), 0);
        assert!(s.contains(2 * PAGE_SIZE) && !s.contains(PAGE_SIZE));
        s.check().unwrap();
    }

    #[test]
    fn gates_and_stacks_land_in_the_right_vcpu() {
        let mem = Arc::new(AnonMemory::new(pages(2)).unwrap());
        let s = Switcher::new(mem.clone(), 0, 0, 2).unwrap();
        s.set_gate(1, 14, Some((0x20_1000, 0))).unwrap();
        s.set_stack(1, 0, 0x10_c000).unwrap();
        s.set_stack(1, 2, 0x10_a000).unwrap();
        let word = |off: u64| {
            let mut b = [0u8; 8];
            mem.read_frame(off / PAGE_SIZE, (off % PAGE_SIZE) as usize, &mut b)
                .unwrap();
            u64::from_le_bytes(b)
        };
        let idt1 = abi::switcher_idt(1) - abi::SWITCHER_GVA;
        let tss1 = abi::switcher_tss(1) - abi::SWITCHER_GVA;
        assert_eq!(word(idt1 + 14 * 16), interrupt_gate(0x20_1000, 0)[0]);
        assert_eq!(word(abi::switcher_idt(0) - abi::SWITCHER_GVA + 14 * 16), 0);
        assert_eq!(word(tss1 + 4), 0x10_c000, "RSP0");
        assert_eq!(word(tss1 + 12), 0x10_c000, "RSP1");
        assert_eq!(word(tss1 + 44), 0x10_a000, "IST2");
        s.check().unwrap();
        s.set_gate(1, 14, None).unwrap();
        assert_eq!(word(idt1 + 14 * 16), 0);
        // A write behind the VMM's back is caught.
        mem.write_frame(0, 3, &[0xff]).unwrap();
        assert!(matches!(
            s.check(),
            Err(SwitcherError::Changed {
                page: 0,
                offset: 3,
                ..
            })
        ));
    }
}
