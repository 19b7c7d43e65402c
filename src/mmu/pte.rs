//! x86-64 page-table entry format for 4-level paging (Intel SDM vol. 3,
//! §4.5, tables 4-14 to 4-20), shared by the guest page-table walker
//! ([`super::walk`]) and the shadow PTE code.
//!
//! Names follow KVM (`arch/x86/kvm/mmu/mmu_internal.h`, `spte.h`, `mmu.c`):
//! `PT_*_MASK` for entry bits, `ACC_*` access bits ([`PteAccess`]) and the
//! reserved-bit tables of `__reset_rsvds_bits_mask` ([`RsvdBitsMask`]).
//!
//! Levels are numbered like KVM's `PG_LEVEL_*`: 1 = PTE (4 KiB), 2 = PDE
//! (2 MiB), 3 = PDPTE (1 GiB), 4 = PML4E.
//!
//! Every helper here takes guest-controlled values and is total: no panics,
//! no overflowing arithmetic, out-of-range levels handled explicitly.

use bitflags::bitflags;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// Base page size (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Index bits per paging level (512 entries of 8 bytes per table).
pub const PT_LEVEL_BITS: u32 = 9;
/// Entries per page table.
pub const PT_ENTRIES: usize = 1 << PT_LEVEL_BITS;

/// Level of a 4 KiB PTE.
pub const PG_LEVEL_4K: u8 = 1;
/// Level of a PDE (maps 2 MiB when PS is set).
pub const PG_LEVEL_2M: u8 = 2;
/// Level of a PDPTE (maps 1 GiB when PS is set).
pub const PG_LEVEL_1G: u8 = 3;
/// Root level of 4-level paging (the PML4). 5-level paging (CR4.LA57) is not
/// supported.
pub const PT64_ROOT_4LEVEL: u8 = 4;

/// P: the entry is present.
pub const PT_PRESENT_MASK: u64 = 1 << 0;
/// R/W: writes allowed (subject to CR0.WP for supervisor accesses).
pub const PT_WRITABLE_MASK: u64 = 1 << 1;
/// U/S: user-mode (CPL3) accesses allowed.
pub const PT_USER_MASK: u64 = 1 << 2;
/// PWT: page-level write-through.
pub const PT_PWT_MASK: u64 = 1 << 3;
/// PCD: page-level cache disable.
pub const PT_PCD_MASK: u64 = 1 << 4;
/// A: accessed, set by the walker on every level of a successful walk.
pub const PT_ACCESSED_MASK: u64 = 1 << 5;
/// D: dirty, set by the walker on the leaf of a successful write.
pub const PT_DIRTY_MASK: u64 = 1 << 6;
/// PS: page size, on PDPTEs (1 GiB) and PDEs (2 MiB); reserved in PML4Es.
pub const PT_PAGE_SIZE_MASK: u64 = 1 << 7;
/// PAT bit of a 4 KiB PTE (same position as PS in the upper levels).
pub const PT_PAT_MASK: u64 = 1 << 7;
/// G: global translation (leaf entries only).
pub const PT_GLOBAL_MASK: u64 = 1 << 8;
/// PAT bit of a 2 MiB / 1 GiB leaf (bit 12, below the large-page address).
pub const PT_PAT_LARGE_MASK: u64 = 1 << 12;
/// Bit position of XD/NX.
pub const PT64_NX_SHIFT: u32 = 63;
/// XD/NX: execute disable (reserved when EFER.NX is clear).
pub const PT64_NX_MASK: u64 = 1 << PT64_NX_SHIFT;

/// Physical-address bits 51:12 of an entry (`__PT_BASE_ADDR_MASK`). Bits
/// above MAXPHYADDR are reserved, see [`RsvdBitsMask`].
pub const PT_BASE_ADDR_MASK: u64 = rsvd_bits(PAGE_SHIFT, 51);

/// The architectural upper bound of MAXPHYADDR for 4-level paging.
pub const MAX_MAXPHYADDR: u8 = 52;

/// Mask of bits `s..=e` (KVM's `rsvd_bits`). Empty when `e < s`; bits above
/// 63 are dropped, so it is total for any input.
pub const fn rsvd_bits(s: u32, e: u32) -> u64 {
    if e < s || s > 63 {
        return 0;
    }
    let e = if e > 63 { 63 } else { e };
    let width = e - s + 1;
    let ones = if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ones << s
}

/// Bytes mapped by one entry at `level` (4 KiB, 2 MiB, 1 GiB, 512 GiB).
/// Levels outside 1..=4 are clamped into that range.
pub const fn level_size(level: u8) -> u64 {
    1u64 << level_shift(level)
}

/// log2 of [`level_size`].
pub const fn level_shift(level: u8) -> u32 {
    let level = clamp_level(level);
    PAGE_SHIFT + (level as u32 - 1) * PT_LEVEL_BITS
}

const fn clamp_level(level: u8) -> u8 {
    if level < PG_LEVEL_4K {
        PG_LEVEL_4K
    } else if level > PT64_ROOT_4LEVEL {
        PT64_ROOT_4LEVEL
    } else {
        level
    }
}

/// Address bits of a leaf at `level` (`PT_LVL_ADDR_MASK`): bits 51:12 for a
/// PTE, 51:21 for a 2 MiB PDE (leaving out PAT bit 12), 51:30 for 1 GiB.
pub const fn lvl_addr_mask(level: u8) -> u64 {
    PT_BASE_ADDR_MASK & !(level_size(level) - 1)
}

/// Offset bits within a page at `level`, above the 4 KiB offset
/// (`PT_LVL_OFFSET_MASK`): 0 for 4 KiB, bits 20:12 for 2 MiB, 29:12 for 1 GiB.
pub const fn lvl_offset_mask(level: u8) -> u64 {
    PT_BASE_ADDR_MASK & (level_size(level) - 1)
}

/// Index of `addr` in the table at `level` (`PT_INDEX`).
pub const fn pt_index(addr: u64, level: u8) -> usize {
    ((addr >> level_shift(level)) & (PT_ENTRIES as u64 - 1)) as usize
}

/// Guest frame number a leaf at `level` points to (`gpte_to_gfn_lvl`),
/// i.e. the first 4 KiB frame of the (large) page.
pub const fn gpte_to_gfn_lvl(gpte: u64, level: u8) -> u64 {
    (gpte & lvl_addr_mask(level)) >> PAGE_SHIFT
}

/// Frame of the next-level table a non-leaf entry (or CR3) points to
/// (`gpte_to_gfn`).
pub const fn gpte_to_gfn(gpte: u64) -> u64 {
    gpte_to_gfn_lvl(gpte, PG_LEVEL_4K)
}

/// `FNAME(is_present_gpte)`.
pub const fn is_present_gpte(gpte: u64) -> bool {
    gpte & PT_PRESENT_MASK != 0
}

/// `FNAME(is_last_gpte)` for 4-level paging: a PTE always ends the walk; a
/// PDE or PDPTE ends it when PS is set. (PS in a PML4E is reserved and is
/// caught by [`RsvdBitsMask`] before this is asked.)
pub const fn is_last_gpte(level: u8, gpte: u64) -> bool {
    level <= PG_LEVEL_4K || gpte & PT_PAGE_SIZE_MASK != 0
}

bitflags! {
    /// Access rights a translation grants (KVM's `ACC_*_MASK`, same bit
    /// values: the permission bitmap of [`super::walk`] is indexed by them).
    ///
    /// A present entry is always readable, so "read" is implicit.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PteAccess: u8 {
        /// Instruction fetches allowed (`ACC_EXEC_MASK`): XD clear.
        const EXEC = 1 << 0;
        /// Writes allowed (`ACC_WRITE_MASK`): R/W set.
        const WRITE = 1 << 1;
        /// User-mode accesses allowed (`ACC_USER_MASK`): U/S set.
        const USER = 1 << 2;
    }
}

impl PteAccess {
    /// `ACC_ALL`: what an empty accumulation over zero levels allows.
    pub const ALL: PteAccess = PteAccess::all();
}

/// Access rights one guest entry grants on its own (`FNAME(gpte_access)`).
/// XD is read even when EFER.NX is clear: then it is a reserved bit and the
/// walk faults before the permissions matter, and the permission check
/// ignores EXEC anyway.
pub const fn gpte_access(gpte: u64) -> PteAccess {
    let mut bits = 0u8;
    if gpte & PT64_NX_MASK == 0 {
        bits |= PteAccess::EXEC.bits();
    }
    if gpte & PT_WRITABLE_MASK != 0 {
        bits |= PteAccess::WRITE.bits();
    }
    if gpte & PT_USER_MASK != 0 {
        bits |= PteAccess::USER.bits();
    }
    PteAccess::from_bits_truncate(bits)
}

/// Reserved-bit masks of guest entries for 4-level paging, indexed by
/// `[PS bit][level - 1]` like KVM's `struct rsvd_bits_validate`, computed as
/// `__reset_rsvds_bits_mask` does for `PT64_ROOT_4LEVEL`:
///
/// * every level: bits 51:MAXPHYADDR, and XD (bit 63) when EFER.NX is clear;
/// * PML4E: PS (bit 7), and bit 8 when the guest CPU is AMD-compatible;
/// * PDPTE with PS: bits 29:13 (bit 12 is PAT); PS itself when the guest has
///   no 1 GiB pages (CPUID.80000001H:EDX.Page1GB);
/// * PDE with PS: bits 20:13 (bit 12 is PAT);
/// * PTE: nothing more (bit 7 is PAT).
///
/// Bits 62:52 are ignored by the CPU (protection keys, CR4.PKE, are not
/// supported) and never reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsvdBitsMask {
    mask: [[u64; 4]; 2],
}

impl RsvdBitsMask {
    /// `__reset_rsvds_bits_mask(.., level = PT64_ROOT_4LEVEL, nx, gbpages,
    /// pse, amd)`. `maxphyaddr` above 52 is treated as 52 (no address bit
    /// reserved), below 12 as 12.
    pub const fn new(maxphyaddr: u8, efer_nx: bool, gbpages: bool, amd: bool) -> Self {
        let maxphyaddr = if maxphyaddr > MAX_MAXPHYADDR {
            MAX_MAXPHYADDR
        } else if maxphyaddr < PAGE_SHIFT as u8 {
            PAGE_SHIFT as u8
        } else {
            maxphyaddr
        };
        let mut high_bits_rsvd = rsvd_bits(maxphyaddr as u32, 51);
        if !efer_nx {
            high_bits_rsvd |= rsvd_bits(PT64_NX_SHIFT, PT64_NX_SHIFT);
        }
        // Bit 8 (G in a leaf) of a PML4E is reserved on AMD only.
        let nonleaf_bit8_rsvd = if amd { rsvd_bits(8, 8) } else { 0 };
        let gbpages_bit_rsvd = if gbpages { 0 } else { rsvd_bits(7, 7) };

        let pml4e = high_bits_rsvd | nonleaf_bit8_rsvd | rsvd_bits(7, 7);
        let mask = [
            // PS (bit 7) clear: non-leaf entries, and the 4 KiB PTE.
            [
                high_bits_rsvd,
                high_bits_rsvd,
                high_bits_rsvd | gbpages_bit_rsvd,
                pml4e,
            ],
            // PS (bit 7) set: large leaves; for a PTE bit 7 is PAT.
            [
                high_bits_rsvd,
                high_bits_rsvd | rsvd_bits(13, 20),
                high_bits_rsvd | gbpages_bit_rsvd | rsvd_bits(13, 29),
                pml4e,
            ],
        ];
        RsvdBitsMask { mask }
    }

    /// The reserved bits of an entry at `level` whose PS bit is `ps`. Every
    /// bit counts as reserved for a level outside 1..=4, so a caller bug can
    /// only make a walk fault, never accept an entry.
    pub const fn mask(&self, level: u8, ps: bool) -> u64 {
        if level < PG_LEVEL_4K || level > PT64_ROOT_4LEVEL {
            return u64::MAX;
        }
        self.mask[ps as usize][level as usize - 1]
    }

    /// `__is_rsvd_bits_set`: does `gpte`, read at `level`, set a reserved bit?
    pub const fn is_rsvd_bits_set(&self, gpte: u64, level: u8) -> bool {
        gpte & self.mask(level, gpte & PT_PAGE_SIZE_MASK != 0) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(rsvd_bits(0, 63), u64::MAX);
        assert_eq!(rsvd_bits(52, 51), 0);
        assert_eq!(rsvd_bits(13, 20), 0x1f_e000);
        assert_eq!(rsvd_bits(70, 80), 0);
        assert_eq!(PT_BASE_ADDR_MASK, 0x000f_ffff_ffff_f000);
        assert_eq!(lvl_addr_mask(2), 0x000f_ffff_ffe0_0000);
        assert_eq!(lvl_offset_mask(2), 0x1f_f000);
        assert_eq!(lvl_offset_mask(1), 0);
        assert_eq!(lvl_offset_mask(3), 0x3fff_f000);
        assert_eq!(pt_index(0x0000_7fff_ffff_ffff, 4), 255);
        assert_eq!(pt_index(u64::MAX, 1), 511);
        assert_eq!(level_size(0), PAGE_SIZE);
        assert_eq!(level_size(200), 1 << 39);
        // PAT bit 12 of a large leaf is not part of its address.
        assert_eq!(gpte_to_gfn_lvl(0x20_1000 | PT_PAGE_SIZE_MASK, 2), 0x200);
    }

    #[test]
    fn rsvd_masks_follow_the_sdm_tables() {
        let r = RsvdBitsMask::new(36, true, true, false);
        assert!(r.is_rsvd_bits_set(1 << 36, 1));
        assert!(r.is_rsvd_bits_set(1 << 51, 4));
        assert!(!r.is_rsvd_bits_set(1 << 35, 3));
        assert!(!r.is_rsvd_bits_set(1 << 52 | 1 << 62 | PT64_NX_MASK, 1));
        assert!(r.is_rsvd_bits_set(PT_PAGE_SIZE_MASK, 4));
        assert!(!r.is_rsvd_bits_set(PT_GLOBAL_MASK, 4));
        assert!(!r.is_rsvd_bits_set(PT_PAT_MASK | PT_PAT_LARGE_MASK, 1));
        assert!(!r.is_rsvd_bits_set(PT_PAGE_SIZE_MASK | PT_PAT_LARGE_MASK, 2));
        assert!(r.is_rsvd_bits_set(PT_PAGE_SIZE_MASK | 1 << 13, 2));
        assert!(!r.is_rsvd_bits_set(1 << 13, 2));
        assert!(r.is_rsvd_bits_set(PT_PAGE_SIZE_MASK | 1 << 29, 3));
        assert!(!r.is_rsvd_bits_set(PT_PAGE_SIZE_MASK | 1 << 30, 3));
        assert!(r.is_rsvd_bits_set(PT_PRESENT_MASK, 0));
        assert!(r.is_rsvd_bits_set(PT_PRESENT_MASK, 5));

        let no_nx = RsvdBitsMask::new(52, false, false, true);
        assert!(no_nx.is_rsvd_bits_set(PT64_NX_MASK, 2));
        assert!(!no_nx.is_rsvd_bits_set(1 << 51, 1));
        assert!(no_nx.is_rsvd_bits_set(PT_PAGE_SIZE_MASK, 3));
        assert!(!no_nx.is_rsvd_bits_set(0, 3));
        assert!(no_nx.is_rsvd_bits_set(PT_GLOBAL_MASK, 4));
        assert!(!no_nx.is_rsvd_bits_set(PT_GLOBAL_MASK, 3));

        // Out-of-range MAXPHYADDR values are clamped, never shifted past 63.
        assert_eq!(RsvdBitsMask::new(255, true, true, false).mask(1, false), 0);
        assert_eq!(
            RsvdBitsMask::new(0, true, true, false).mask(1, false),
            rsvd_bits(12, 51)
        );
    }

    #[test]
    fn access_of_one_entry() {
        assert_eq!(gpte_access(0), PteAccess::EXEC);
        assert_eq!(gpte_access(PT_WRITABLE_MASK | PT_USER_MASK), PteAccess::ALL);
        assert_eq!(gpte_access(PT64_NX_MASK | PT_USER_MASK), PteAccess::USER);
    }
}
