//! x86-64 architectural bits the VMM sets, toggles or checks (SDM vol. 3,
//! 2.5 control registers, 4.5 4-level paging).

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.PGE, toggled to flush the TLB including global entries.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.SMEP: supervisor fetches from user pages fault.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor data accesses to user pages fault unless EFLAGS.AC.
pub const CR4_SMAP: u64 = 1 << 21;
/// EFLAGS.AC: alignment check, and the SMAP override for supervisor code.
pub const RFLAGS_AC: u64 = 1 << 18;
/// EFER.NXE: bit 63 of a paging entry is execute-disable.
pub const EFER_NXE: u64 = 1 << 11;

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const W: u64 = 1 << 1;
    /// User-accessible.
    pub const U: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty.
    pub const D: u64 = 1 << 6;
    /// Large page (2 MiB in a PDE).
    pub const PS: u64 = 1 << 7;
    /// Physical-address bits of an entry.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}
