//! ELF64 guest images: our own checks first (the errors a user can act on),
//! then linux-loader copies the segments into guest RAM.
//!
//! A guest image is a static x86-64 executable linked at its physical
//! address (`p_vaddr == p_paddr`), with every `PT_LOAD` segment inside
//! `[IMAGE_MIN_GPA, mem_size)` and the entry point in an executable one.

use std::io::Cursor;

use linux_loader::loader::{KernelLoader, elf::Elf};
use vm_memory::GuestAddress;

use crate::vmm::abi;
use crate::vmm::kvm::memory::{GuestMemWriter as _, GuestRam};
use crate::vmm::units::{MIN_MEM_SIZE, format_size};

/// Where the ELF image lands in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    /// Lowest gpa of a loadable segment.
    pub start: u64,
    /// End of the highest one (not yet page aligned).
    pub end: u64,
    /// Entry point.
    pub entry: u64,
}

/// Errors of guest image loading.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    /// Not an ELF file at all.
    #[error("not an ELF file (no ELF magic)")]
    NotElf,
    /// An ELF file of the wrong kind.
    #[error("unsupported ELF: {0}")]
    Unsupported(&'static str),
    /// Headers point outside the file.
    #[error("malformed ELF: {0}")]
    Malformed(&'static str),
    /// No loadable segment.
    #[error("the ELF has no loadable (PT_LOAD) segment")]
    NoSegments,
    /// A segment below the image area.
    #[error(
        "the ELF loads a segment at {gpa:#x}, below {min:#x}: guests must be linked at or above 2 MiB (the VMM owns the memory below)",
        min = abi::IMAGE_MIN_GPA
    )]
    BelowImageArea {
        /// Segment start.
        gpa: u64,
    },
    /// The image does not fit in RAM.
    #[error(
        "the ELF needs memory up to {end:#x} ({}) but --mem is {}",
        format_size(*.need),
        format_size(*.have)
    )]
    TooBig {
        /// End of the highest segment.
        end: u64,
        /// That, rounded up to a valid `--mem` value.
        need: u64,
        /// The configured RAM size.
        have: u64,
    },
    /// Entry point not in an executable segment.
    #[error("the ELF entry point {0:#x} is not inside an executable loadable segment")]
    BadEntry(u64),
    /// linux-loader failed after our checks passed.
    #[error("loading the ELF into guest memory failed: {0}")]
    Load(#[source] linux_loader::loader::Error),
    /// linux-loader disagrees with our checks about the entry point.
    #[error(
        "loading the ELF into guest memory failed: linux-loader reports entry {reported:#x}, not {expected:#x}"
    )]
    EntryMismatch {
        /// What linux-loader read.
        reported: u64,
        /// What our checks read.
        expected: u64,
    },
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

#[derive(Clone, Copy, Debug)]
struct Segment {
    paddr: u64,
    vaddr: u64,
    memsz: u64,
    filesz: u64,
    offset: u64,
    flags: u32,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, LoaderError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(LoaderError::Malformed("truncated header"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, LoaderError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(LoaderError::Malformed("truncated header"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, LoaderError> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(LoaderError::Malformed("truncated header"))
}

/// Checks `image` against the rules above and `mem_size`; returns where it
/// will land. Pure: needs no KVM and no guest memory.
pub fn check_elf(image: &[u8], mem_size: u64) -> Result<ImageLayout, LoaderError> {
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf);
    }
    if image.len() < 64 {
        return Err(LoaderError::Malformed("file shorter than an ELF64 header"));
    }
    if image[4] != 2 {
        return Err(LoaderError::Unsupported("not a 64-bit ELF"));
    }
    if image[5] != 1 {
        return Err(LoaderError::Unsupported("not little-endian"));
    }
    if u16_at(image, 18)? != EM_X86_64 {
        return Err(LoaderError::Unsupported("not an x86-64 ELF"));
    }
    if u16_at(image, 16)? != ET_EXEC {
        return Err(LoaderError::Unsupported(
            "not a static executable (ET_EXEC)",
        ));
    }
    let entry = u64_at(image, 24)?;
    let phoff = u64_at(image, 32)?;
    let phentsize = u16_at(image, 54)?;
    let phnum = u16_at(image, 56)?;
    if phentsize != 56 {
        return Err(LoaderError::Malformed("program header size is not 56"));
    }
    let mut segments = Vec::new();
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * 56)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o.checked_add(56).is_some_and(|end| end <= image.len()))
            .ok_or(LoaderError::Malformed(
                "program headers lie outside the file",
            ))?;
        if u32_at(image, off)? != PT_LOAD {
            continue;
        }
        let seg = Segment {
            flags: u32_at(image, off + 4)?,
            offset: u64_at(image, off + 8)?,
            vaddr: u64_at(image, off + 16)?,
            paddr: u64_at(image, off + 24)?,
            filesz: u64_at(image, off + 32)?,
            memsz: u64_at(image, off + 40)?,
        };
        if seg.filesz == 0 && seg.memsz == 0 {
            continue;
        }
        if seg.filesz > seg.memsz {
            return Err(LoaderError::Malformed(
                "a segment's file size exceeds its memory size",
            ));
        }
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(LoaderError::Malformed(
                "a segment's data lies outside the file",
            ));
        }
        if seg.vaddr != seg.paddr {
            return Err(LoaderError::Unsupported(
                "a segment's virtual and physical addresses differ (guests are identity-linked)",
            ));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(LoaderError::NoSegments);
    }
    let mut start = u64::MAX;
    let mut end = 0u64;
    for s in &segments {
        if s.paddr < abi::IMAGE_MIN_GPA {
            return Err(LoaderError::BelowImageArea { gpa: s.paddr });
        }
        let seg_end = s
            .paddr
            .checked_add(s.memsz)
            .ok_or(LoaderError::Malformed("a segment wraps around"))?;
        start = start.min(s.paddr);
        end = end.max(seg_end);
    }
    if end > mem_size {
        let need = end
            .checked_next_multiple_of(2 << 20)
            .unwrap_or(end)
            .max(MIN_MEM_SIZE);
        return Err(LoaderError::TooBig {
            end,
            need,
            have: mem_size,
        });
    }
    let entry_ok = segments
        .iter()
        .any(|s| s.flags & PF_X != 0 && (s.paddr..s.paddr + s.memsz).contains(&entry));
    if !entry_ok {
        return Err(LoaderError::BadEntry(entry));
    }
    Ok(ImageLayout { start, end, entry })
}

/// Checks `image` and copies its segments into `ram` with linux-loader.
/// The rest of RAM (including `.bss`) is still zero: RAM is freshly mapped.
pub fn load_elf(ram: &GuestRam, image: &[u8]) -> Result<ImageLayout, LoaderError> {
    let layout = check_elf(image, ram.size())?;
    let mut cursor = Cursor::new(image);
    let result = Elf::load(
        ram.mmap(),
        None,
        &mut cursor,
        Some(GuestAddress(abi::IMAGE_MIN_GPA)),
    )
    .map_err(LoaderError::Load)?;
    if result.kernel_load.0 != layout.entry {
        return Err(LoaderError::EntryMismatch {
            reported: result.kernel_load.0,
            expected: layout.entry,
        });
    }
    Ok(layout)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 executable: one RX segment at `paddr` with
    /// `code`, `extra_bss` bytes of memory beyond it.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8], extra_bss: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + extra_bss).to_le_bytes());
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn accepts_a_good_image() {
        let elf = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        let l = check_elf(&elf, 4 << 20).unwrap();
        assert_eq!(
            l,
            ImageLayout {
                start: 0x20_0000,
                end: 0x20_1001,
                entry: 0x20_0000
            }
        );
    }

    #[test]
    fn rejects_bad_images() {
        assert_eq!(check_elf(b"hello world", 4 << 20), Err(LoaderError::NotElf));
        assert_eq!(check_elf(b"", 4 << 20), Err(LoaderError::NotElf));
        assert!(matches!(
            check_elf(b"\x7fELF\x02\x01", 4 << 20),
            Err(LoaderError::Malformed(_))
        ));

        let mut e32 = tiny_elf(0x20_0000, &[0xf4], 0);
        e32[4] = 1;
        assert!(matches!(
            check_elf(&e32, 4 << 20),
            Err(LoaderError::Unsupported(_))
        ));

        let mut arm = tiny_elf(0x20_0000, &[0xf4], 0);
        arm[18] = 183;
        assert_eq!(
            check_elf(&arm, 4 << 20),
            Err(LoaderError::Unsupported("not an x86-64 ELF"))
        );

        let low = tiny_elf(0x10_0000, &[0xf4], 0);
        assert_eq!(
            check_elf(&low, 4 << 20),
            Err(LoaderError::BelowImageArea { gpa: 0x10_0000 })
        );

        let big = tiny_elf(0x20_0000, &[0xf4], 8 << 20);
        assert_eq!(
            check_elf(&big, 4 << 20),
            Err(LoaderError::TooBig {
                end: 0xa0_0001,
                need: 12 << 20,
                have: 4 << 20
            })
        );

        let mut bad_entry = tiny_elf(0x20_0000, &[0xf4], 0);
        bad_entry[24..32].copy_from_slice(&0x30_0000u64.to_le_bytes());
        assert_eq!(
            check_elf(&bad_entry, 4 << 20),
            Err(LoaderError::BadEntry(0x30_0000))
        );

        let mut truncated = tiny_elf(0x20_0000, &[0xf4; 16], 0);
        truncated.truncate(130);
        assert!(matches!(
            check_elf(&truncated, 4 << 20),
            Err(LoaderError::Malformed(_))
        ));

        let mut huge_phnum = tiny_elf(0x20_0000, &[0xf4], 0);
        huge_phnum[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            check_elf(&huge_phnum, 4 << 20),
            Err(LoaderError::Malformed(_))
        ));

        let mut wrap = tiny_elf(u64::MAX - 4, &[0xf4], 0);
        wrap[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        assert!(check_elf(&wrap, 4 << 20).is_err());
    }

    #[test]
    fn loads_into_ram() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let elf = tiny_elf(0x20_0000, &[0x90, 0xf4], 0);
        load_elf(&ram, &elf).unwrap();
        let mut b = [0u8; 2];
        ram.read_bytes(0x20_0000, &mut b).unwrap();
        assert_eq!(b, [0x90, 0xf4]);
    }
}
