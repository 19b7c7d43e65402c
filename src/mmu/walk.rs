//! The guest page-table walker of the shadow MMU: gva → gpa through the
//! guest's own 4-level page tables, with the permission checks, reserved-bit
//! checks, #PF error codes and Accessed/Dirty updates of the hardware walker.
//!
//! It mirrors KVM's `FNAME(walk_addr_generic)` in
//! `arch/x86/kvm/mmu/paging_tmpl.h` (PTTYPE 64, 4-level, no nested paging)
//! step for step, so that shadow mode and kvm mode agree (docs/design.md rule 6):
//! same fault or no fault, same error code, same A/D bits in guest memory.
//! Where KVM differs from bare hardware, this follows KVM, and says so.
//!
//! Not modelled: 5-level paging (CR4.LA57), protection keys (CR4.PKE: bits
//! 62:59 are ignored and the PK error-code bit is never set), 32-bit and PAE
//! paging. Callers must only walk for a guest in IA-32e mode with CR0.PG=1.
//!
//! Everything the walker reads is guest-controlled: the level loop runs at
//! most four times, A/D restarts are bounded by [`MAX_AD_RETRIES`], and no
//! arithmetic on guest values can overflow or panic.

use std::fmt;

use bitflags::bitflags;
use thiserror::Error;

use super::pte::{
    PAGE_SHIFT, PG_LEVEL_4K, PT_ACCESSED_MASK, PT_DIRTY_MASK, PT64_NX_MASK, PT64_ROOT_4LEVEL,
    PteAccess, RsvdBitsMask, gpte_access, gpte_to_gfn, gpte_to_gfn_lvl, is_last_gpte,
    is_present_gpte, lvl_offset_mask, pt_index,
};

/// Levels of 4-level paging; arrays in [`GuestWalk`] are indexed by
/// `level - 1` (`PT_MAX_FULL_LEVELS`).
pub const PT_MAX_FULL_LEVELS: usize = PT64_ROOT_4LEVEL as usize;

/// How many times a walk restarts after losing a cmpxchg race while setting
/// A/D bits before it gives up with [`WalkError::AdRetriesExhausted`].
///
/// KVM's `goto retry_walk` is unbounded; it relies on the race being with a
/// real vCPU that makes progress. Here the other party may be a guest vCPU
/// rewriting the same PTE in a loop, so the walker gives up and lets the
/// caller resume the guest, which re-executes the access and faults again:
/// the same progress guarantee KVM's `RET_PF_RETRY` gives, without spinning
/// in the VMM.
pub const MAX_AD_RETRIES: u32 = 16;

/// Guest memory as the walker sees it: 8-byte guest PTEs by guest-physical
/// address.
///
/// Implementations resolve `gpa` through the memslots; a gpa outside every
/// memslot is not RAM (KVM's `!kvm_is_visible_memslot` /
/// `kvm_is_error_hva`).
pub trait GuestPtMemory {
    /// Reads the 8-byte guest PTE at guest-physical `gpa` (8-byte aligned).
    /// `None` when `gpa` is not guest RAM (outside every memslot).
    fn read_gpte(&self, gpa: u64) -> Option<u64>;

    /// Atomically replaces the guest PTE at `gpa` with `new` if it still
    /// equals `old`, as the CPU does when it sets A/D bits. `None` when `gpa`
    /// is not RAM; `Some(Err(current))` when the PTE changed since it was read
    /// (a lost race).
    ///
    /// For read-only memory (a ROM memslot), return `Some(Ok(()))` without
    /// writing: KVM's `update_accessed_dirty_bits` skips A/D updates in
    /// read-only slots (`!walker->pte_writable`).
    fn cmpxchg_gpte(&self, gpa: u64, old: u64, new: u64) -> Option<Result<(), u64>>;

    /// Whether the 4 KiB page at `gpa` is guest RAM. Used only to mark
    /// translations whose leaf points outside RAM ([`GuestWalk::leaf_in_ram`]).
    fn is_ram(&self, gpa: u64) -> bool {
        self.read_gpte(gpa & !7).is_some()
    }
}

impl<T: GuestPtMemory + ?Sized> GuestPtMemory for &T {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        (**self).read_gpte(gpa)
    }
    fn cmpxchg_gpte(&self, gpa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        (**self).cmpxchg_gpte(gpa, old, new)
    }
    fn is_ram(&self, gpa: u64) -> bool {
        (**self).is_ram(gpa)
    }
}

/// Guest memory for a walk that must not change the guest's tables (the
/// pre-fault path, the DMA translation): reads as `M` does; an Accessed or
/// Dirty bit the walk would have to set makes it fail instead (a
/// not-present fault, `AdUpdateFailed`), so only translations the guest
/// has already used are mapped, as KVM prefetches only accessed guest PTEs.
pub struct NoAdMem<M>(pub M);

impl<M: GuestPtMemory> GuestPtMemory for NoAdMem<M> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        self.0.read_gpte(gpa)
    }
    fn cmpxchg_gpte(&self, _gpa: u64, _old: u64, _new: u64) -> Option<Result<(), u64>> {
        None
    }
    fn is_ram(&self, gpa: u64) -> bool {
        self.0.is_ram(gpa)
    }
}

bitflags! {
    /// The architectural #PF error code (KVM's `PFERR_*_MASK`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PfErrorCode: u32 {
        /// P: 0 for a not-present entry, 1 for a protection or reserved-bit
        /// violation.
        const PRESENT = 1 << 0;
        /// W/R: the access was a write.
        const WRITE = 1 << 1;
        /// U/S: the access was a user-mode (CPL3, not implicit supervisor)
        /// access.
        const USER = 1 << 2;
        /// RSVD: a reserved bit was set in a paging-structure entry.
        const RSVD = 1 << 3;
        /// I/D: the access was an instruction fetch, reported only when
        /// EFER.NX or CR4.SMEP is set.
        const FETCH = 1 << 4;
        /// PK: protection-key violation. Never set (CR4.PKE unsupported).
        const PK = 1 << 5;
    }
}

/// One memory access to translate (KVM's `access` argument: PFERR_WRITE,
/// PFERR_USER, PFERR_FETCH, PFERR_IMPLICIT_ACCESS, plus EFLAGS.AC read in
/// `permission_fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access {
    /// A write (a read otherwise, unless `fetch`).
    pub write: bool,
    /// A user-mode access: CPL 3 and not an implicit supervisor access.
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// An implicit supervisor access (e.g. a descriptor-table read made while
    /// at CPL 3): `user` must be false; SMAP then applies whatever EFLAGS.AC.
    pub implicit: bool,
    /// EFLAGS.AC at the time of the access: disables SMAP for explicit
    /// supervisor data accesses.
    pub eflags_ac: bool,
}

impl Access {
    /// A data read; `user` for CPL 3.
    pub const fn read(user: bool) -> Self {
        Access {
            write: false,
            user,
            fetch: false,
            implicit: false,
            eflags_ac: false,
        }
    }

    /// A data write; `user` for CPL 3.
    pub const fn write(user: bool) -> Self {
        Access {
            write: true,
            ..Access::read(user)
        }
    }

    /// An instruction fetch; `user` for CPL 3.
    pub const fn fetch(user: bool) -> Self {
        Access {
            fetch: true,
            ..Access::read(user)
        }
    }

    /// The access a hardware #PF error code describes, for re-walking a fault
    /// the guest took on a shadow PTE (`FNAME(page_fault)` walks with
    /// `error_code & ~PFERR_RSVD_MASK`). A fetch reported without I/D
    /// (neither EFER.NX nor CR4.SMEP) is walked as a read, which grants
    /// exactly the same rights in that mode.
    pub fn from_error_code(error_code: PfErrorCode) -> Self {
        Access {
            write: error_code.contains(PfErrorCode::WRITE),
            user: error_code.contains(PfErrorCode::USER),
            fetch: error_code.contains(PfErrorCode::FETCH),
            implicit: false,
            eflags_ac: false,
        }
    }

    /// The W/R, U/S and I/D bits this access contributes to a #PF error
    /// code before the EFER.NX/CR4.SMEP rule for I/D.
    pub fn pfec(self) -> PfErrorCode {
        let mut pfec = PfErrorCode::empty();
        pfec.set(PfErrorCode::WRITE, self.write);
        pfec.set(PfErrorCode::USER, self.user);
        pfec.set(PfErrorCode::FETCH, self.fetch);
        pfec
    }
}

/// The guest's paging mode: the registers the walker reads (KVM's
/// `kvm_mmu_role_regs` plus the CPUID bits `reset_guest_rsvds_bits_mask`
/// uses). The guest is in IA-32e mode with 4-level paging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingState {
    /// CR3: bits 51:12 locate the PML4. PCD/PWT and bits 63:52 are ignored.
    /// Bits between MAXPHYADDR and 51 must have been refused when the guest
    /// loaded CR3 (MOV CR3 raises #GP): the walker does not check them, and
    /// a PML4 outside RAM makes every walk fault like a table outside RAM.
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour R/W.
    pub cr0_wp: bool,
    /// CR4.SMEP: supervisor fetches from user pages fault.
    pub cr4_smep: bool,
    /// CR4.SMAP: supervisor data accesses to user pages fault unless
    /// EFLAGS.AC is set and the access is explicit.
    pub cr4_smap: bool,
    /// EFER.NXE: XD is a permission bit; when clear, bit 63 is reserved.
    pub efer_nx: bool,
    /// CPUID.80000008H:EAX bits 7:0. Entry bits 51:MAXPHYADDR are reserved.
    pub maxphyaddr: u8,
    /// CPUID.80000001H:EDX.Page1GB: PS in a PDPTE maps 1 GiB; when clear, it
    /// is reserved (`guest_can_use_gbpages`).
    pub gbpages: bool,
    /// Guest CPUID vendor is AMD-compatible: bit 8 of PML4Es is reserved
    /// (`guest_cpuid_is_amd_or_hygon`).
    pub amd: bool,
}

impl PagingState {
    /// The mode shadowvm guests boot in (docs/design.md): CR0.WP and EFER.NX set,
    /// no SMEP/SMAP, 1 GiB pages available, Intel.
    pub const fn new(cr3: u64, maxphyaddr: u8) -> Self {
        PagingState {
            cr3,
            cr0_wp: true,
            cr4_smep: false,
            cr4_smap: false,
            efer_nx: true,
            maxphyaddr,
            gbpages: true,
            amd: false,
        }
    }
}

/// Why a walk raised a #PF. The error code is what the guest sees; the kind
/// only tells the VMM (statistics, tracing) which check fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// An entry had P clear.
    NotPresent,
    /// An entry set a reserved bit.
    ReservedBits,
    /// The translation exists but denies the access (`permission_fault`).
    Protection,
    /// A table pointer (CR3 or a non-leaf entry) leads outside guest RAM, so
    /// the entry at `gpa` cannot be read. KVM raises a not-present #PF
    /// (`goto error` with `errcode == 0`) rather than reading whatever a
    /// bus would return, and so does the walker: the gpa is never read or
    /// treated as a mapping.
    TableNotRam {
        /// Guest-physical address of the entry that could not be read.
        gpa: u64,
    },
    /// The address lies in a range the VMM reserves for itself (the
    /// switcher): the MMU never maps guest memory there, whatever the
    /// guest's tables say, and reports the protection fault its own
    /// read-only, supervisor-only mapping gives.
    Reserved,
    /// Guest RAM holding an entry vanished between reading it and setting
    /// its A/D bits (KVM: `__try_cmpxchg_user` returned `-EFAULT`, `goto
    /// error` with `errcode == 0`): a not-present #PF.
    AdUpdateFailed {
        /// Guest-physical address of the entry.
        gpa: u64,
    },
}

/// A #PF to inject into the guest (KVM's `walker->fault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageFault {
    /// The faulting guest-virtual address (CR2).
    pub address: u64,
    /// The architectural error code.
    pub error_code: PfErrorCode,
    /// The level whose entry stopped the walk (for a protection fault: the
    /// leaf level).
    pub level: u8,
    /// Which check fired.
    pub kind: FaultKind,
}

impl fmt::Display for PageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest page fault at {:#x}, error code {:#x} ({:?} at level {})",
            self.address,
            self.error_code.bits(),
            self.kind,
            self.level
        )
    }
}

/// Why [`GuestMmu::walk_addr`] produced no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum WalkError {
    /// The guest's own page fault: inject it (shadow mode reports it through
    /// the "resolve this page fault" hypercall).
    #[error("{0}")]
    PageFault(PageFault),
    /// Every attempt to set A/D bits lost a race with a concurrent writer of
    /// the guest page tables. Nothing is injected: resume the guest, which
    /// re-executes the access (KVM's `RET_PF_RETRY`).
    #[error("gave up setting accessed/dirty bits for {gva:#x} after {attempts} walks lost a race")]
    AdRetriesExhausted {
        /// The guest-virtual address being translated.
        gva: u64,
        /// Walks attempted (`MAX_AD_RETRIES + 1`).
        attempts: u32,
    },
}

/// A successful translation (KVM's `struct guest_walker` after
/// `walk_addr_generic` returned 1).
///
/// Arrays are indexed by `level - 1`; only `level..=4` are meaningful.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWalk {
    /// The translated guest-virtual address.
    pub gva: u64,
    /// The access it was walked for.
    pub access: Access,
    /// Level of the guest leaf: 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB).
    pub level: u8,
    /// The 4 KiB guest frame `gva` maps to. For a large guest page this is
    /// the 4 KiB sub-page containing `gva` (`walker->gfn`): the shadow MMU
    /// maps large guest pages with 4 KiB sptes.
    pub gfn: u64,
    /// Frame of the guest table read at each level (`table_gfn`): the pages
    /// the shadow MMU write-protects or marks unsync.
    pub table_gfn: [u64; PT_MAX_FULL_LEVELS],
    /// Guest-physical address of the entry read at each level (`pte_gpa`).
    pub pte_gpa: [u64; PT_MAX_FULL_LEVELS],
    /// Entry values at each level, including the A/D bits this walk set
    /// (`ptes`). Compare with guest memory to detect a later change
    /// (`FNAME(gpte_changed)`).
    pub ptes: [u64; PT_MAX_FULL_LEVELS],
    /// Access accumulated over the entries *above* each level (`pt_access`):
    /// `pt_access[l - 1]` is the `role.access` of the shadow page shadowing
    /// the level-`l` guest table; `ACC_ALL` for the PML4.
    pub pt_access: [PteAccess; PT_MAX_FULL_LEVELS],
    /// Access accumulated over every level down to the leaf, before the
    /// shadow-specific adjustments of [`GuestWalk::shadow_pte_access`]:
    /// WRITE iff R/W at every level, USER iff U/S at every level, EXEC iff XD
    /// clear at every level (always set when EFER.NX is clear).
    pub pte_access: PteAccess,
    /// Whether the leaf points into guest RAM. When false the translation is
    /// still architecturally valid (and A/D bits were set, as KVM does, since
    /// its walker never looks at the leaf's memslot): the shadow MMU must
    /// treat the gfn as MMIO / no memory and never map anything for it.
    pub leaf_in_ram: bool,
    /// Bit `l - 1` set when this walk wrote the level-`l` entry (A/D update):
    /// the guest table pages to mark dirty (`kvm_vcpu_mark_page_dirty`).
    pub ad_written: u8,
    /// How many times the walk restarted after losing an A/D race.
    pub retries: u32,
}

impl GuestWalk {
    /// Guest-physical address `gva` translates to.
    pub const fn gpa(&self) -> u64 {
        (self.gfn << PAGE_SHIFT) | (self.gva & 0xfff)
    }

    /// The leaf entry, after the A/D update.
    pub fn leaf_pte(&self) -> u64 {
        self.ptes[self.leaf_idx()]
    }

    /// Guest-physical address of the leaf entry.
    pub fn leaf_pte_gpa(&self) -> u64 {
        self.pte_gpa[self.leaf_idx()]
    }

    fn leaf_idx(&self) -> usize {
        usize::from(self.level.clamp(PG_LEVEL_4K, PT64_ROOT_4LEVEL) - 1)
    }

    /// Whether the leaf is dirty (always true after a write walk).
    pub fn is_dirty(&self) -> bool {
        self.leaf_pte() & PT_DIRTY_MASK != 0
    }

    /// The access the spte for this translation may grant, as KVM adjusts
    /// `walker.pte_access` before `FNAME(fetch)`:
    ///
    /// * `FNAME(protect_clean_gpte)`: a walk that was not a write withholds
    ///   WRITE while the leaf is clean, so the first write faults and sets D
    ///   (an spte is writable only if the guest PTE is dirty, rule 1).
    /// * `FNAME(page_fault)`: a supervisor write with CR0.WP=0 to a page the
    ///   guest made read-only is legal; the spte becomes writable but
    ///   supervisor-only (so user accesses still fault and come back here)
    ///   and, under SMEP, non-executable (the kernel must not execute a user
    ///   page it was only allowed to write). Not done for a leaf outside RAM,
    ///   which is MMIO and must not cache changed rights.
    ///
    /// `state` must be the paging state the walk ran with.
    pub fn shadow_pte_access(&self, state: &PagingState) -> PteAccess {
        let mut acc = self.pte_access;
        if !self.access.write && !self.is_dirty() {
            acc.remove(PteAccess::WRITE);
        }
        if self.access.write
            && !acc.contains(PteAccess::WRITE)
            && !state.cr0_wp
            && !self.access.user
            && self.leaf_in_ram
        {
            acc.insert(PteAccess::WRITE);
            acc.remove(PteAccess::USER);
            if state.cr4_smep {
                acc.remove(PteAccess::EXEC);
            }
        }
        acc
    }
}

/// The derived per-mode data of KVM's `struct kvm_mmu` for one guest paging
/// mode: reserved-bit masks (`reset_guest_rsvds_bits_mask`) and the
/// permission bitmap (`update_permission_bitmask`). Rebuild it when CR0.WP,
/// CR4.SMEP/SMAP, EFER.NX or the guest CPUID change; [`GuestMmu::set_cr3`]
/// is enough for a CR3 load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMmu {
    state: PagingState,
    rsvd_check: RsvdBitsMask,
    /// `permissions[pfec >> 1]` has bit `a` set when an access with that
    /// error code faults on a translation granting `PteAccess` bits `a`.
    /// PFERR_RSVD's slot (index bit 2) means "SMAP does not apply".
    permissions: [u8; 16],
}

/// Outcome of one attempt of the walk: a restart is internal.
enum Attempt {
    Done(GuestWalk),
    Fault(PageFault),
    Restart,
}

/// Why `update_accessed_dirty_bits` stopped.
enum AdError {
    /// An entry changed since it was read: restart the walk.
    Race,
    /// The entry's memory is no longer RAM.
    NotRam { gpa: u64, level: u8 },
}

impl GuestMmu {
    /// Derives the reserved-bit masks and permission bitmap for `state`.
    pub fn new(state: PagingState) -> Self {
        GuestMmu {
            state,
            rsvd_check: RsvdBitsMask::new(
                state.maxphyaddr,
                state.efer_nx,
                state.gbpages,
                state.amd,
            ),
            permissions: update_permission_bitmask(&state),
        }
    }

    /// The paging state this was built from.
    pub const fn state(&self) -> &PagingState {
        &self.state
    }

    /// The reserved-bit masks of this mode (for the shadow PTE code's
    /// prefetch and sync paths, `FNAME(prefetch_invalid_gpte)`).
    pub const fn rsvd_check(&self) -> &RsvdBitsMask {
        &self.rsvd_check
    }

    /// Loads a new CR3 (`kvm_mmu_new_pgd`): nothing derived depends on it.
    pub fn set_cr3(&mut self, cr3: u64) {
        self.state.cr3 = cr3;
    }

    /// `permission_fault`: does a translation granting `pte_access` deny
    /// `access`? Covers U/S, R/W with CR0.WP, XD with EFER.NX, SMEP and SMAP.
    pub fn permission_fault(&self, pte_access: PteAccess, access: Access) -> bool {
        // SMAP is waived for explicit supervisor accesses with EFLAGS.AC=1;
        // KVM folds that into the index in place of PFERR_RSVD.
        let not_smap = access.eflags_ac && !access.implicit;
        let mut pfec = access.pfec();
        pfec.set(PfErrorCode::RSVD, not_smap);
        let index = (pfec.bits() >> 1) as usize & 0xf;
        (self.permissions[index] >> pte_access.bits()) & 1 != 0
    }

    /// Translates `gva` for `access` through the guest page tables rooted at
    /// CR3, setting A/D bits in guest memory like the CPU does
    /// (`FNAME(walk_addr_generic)`).
    ///
    /// On success every level's entry has A set and, for a write, the leaf
    /// has D set. On a fault nothing was written. Bits 63:48 of `gva` are not
    /// checked: a non-canonical access raises #GP before any walk.
    pub fn walk_addr<M: GuestPtMemory + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
        access: Access,
    ) -> Result<GuestWalk, WalkError> {
        for retries in 0..=MAX_AD_RETRIES {
            match self.walk_once(mem, gva, access, retries) {
                Attempt::Done(walk) => return Ok(walk),
                Attempt::Fault(fault) => return Err(WalkError::PageFault(fault)),
                Attempt::Restart => {}
            }
        }
        Err(WalkError::AdRetriesExhausted {
            gva,
            attempts: MAX_AD_RETRIES + 1,
        })
    }

    /// One pass from `retry_walk:` to `return 1` or `error:`.
    fn walk_once<M: GuestPtMemory + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
        access: Access,
        retries: u32,
    ) -> Attempt {
        let mut walk = GuestWalk {
            gva,
            access,
            level: PT64_ROOT_4LEVEL,
            gfn: 0,
            table_gfn: [0; PT_MAX_FULL_LEVELS],
            pte_gpa: [0; PT_MAX_FULL_LEVELS],
            ptes: [0; PT_MAX_FULL_LEVELS],
            pt_access: [PteAccess::ALL; PT_MAX_FULL_LEVELS],
            pte_access: PteAccess::ALL,
            leaf_in_ram: false,
            ad_written: 0,
            retries,
        };

        // CR3 plays the part of the entry above the PML4.
        let mut pte = self.state.cr3;
        // Raw entry bits ANDed over the levels walked, with XD inverted so it
        // ANDs like a permission bit; A ends up set only if every level has A.
        let mut pte_access: u64 = !0;

        // At most four iterations: a PTE (level 1) always ends the walk.
        for level in (PG_LEVEL_4K..=PT64_ROOT_4LEVEL).rev() {
            let pt_access = pte_access;
            let idx = level as usize - 1;
            let table_gfn = gpte_to_gfn(pte);
            let pte_gpa = (table_gfn << PAGE_SHIFT) | (pt_index(gva, level) as u64 * 8);
            walk.table_gfn[idx] = table_gfn;
            walk.pte_gpa[idx] = pte_gpa;

            // KVM checks the table's memslot before reading: a table outside
            // RAM is a not-present fault, never a read of non-memory.
            let Some(gpte) = mem.read_gpte(pte_gpa) else {
                return Attempt::Fault(self.fault(
                    gva,
                    access,
                    PfErrorCode::empty(),
                    level,
                    FaultKind::TableNotRam { gpa: pte_gpa },
                ));
            };
            pte = gpte;
            pte_access = pt_access & (pte ^ PT64_NX_MASK);

            if !is_present_gpte(pte) {
                return Attempt::Fault(self.fault(
                    gva,
                    access,
                    PfErrorCode::empty(),
                    level,
                    FaultKind::NotPresent,
                ));
            }
            // `is_rsvd_bits_set`: checked level by level, so a reserved bit
            // below a not-present entry is never seen (as on hardware).
            if self.rsvd_check.is_rsvd_bits_set(pte, level) {
                return Attempt::Fault(self.fault(
                    gva,
                    access,
                    PfErrorCode::RSVD | PfErrorCode::PRESENT,
                    level,
                    FaultKind::ReservedBits,
                ));
            }

            walk.ptes[idx] = pte;
            // Undo the XD inversion to convert to ACC_* flags.
            walk.pt_access[idx] = gpte_access(pt_access ^ PT64_NX_MASK);
            walk.level = level;
            if is_last_gpte(level, pte) {
                break;
            }
        }

        let level = walk.level;
        walk.pte_access = gpte_access(pte_access ^ PT64_NX_MASK);
        if self.permission_fault(walk.pte_access, access) {
            return Attempt::Fault(self.fault(
                gva,
                access,
                PfErrorCode::PRESENT,
                level,
                FaultKind::Protection,
            ));
        }

        // For a large leaf, pick the 4 KiB sub-page containing gva. The two
        // masks are disjoint, so OR cannot carry.
        walk.gfn = gpte_to_gfn_lvl(pte, level) | ((gva & lvl_offset_mask(level)) >> PAGE_SHIFT);

        // A/D work is needed unless every level already has A and, for a
        // write, the leaf already has D.
        let mut accessed_dirty = pte_access & PT_ACCESSED_MASK != 0;
        if access.write {
            accessed_dirty &= pte & PT_DIRTY_MASK != 0;
        }
        if !accessed_dirty {
            match update_accessed_dirty_bits(mem, &mut walk) {
                Ok(()) => {}
                Err(AdError::Race) => return Attempt::Restart,
                Err(AdError::NotRam { gpa, level }) => {
                    return Attempt::Fault(self.fault(
                        gva,
                        access,
                        PfErrorCode::empty(),
                        level,
                        FaultKind::AdUpdateFailed { gpa },
                    ));
                }
            }
        }

        walk.leaf_in_ram = mem.is_ram(walk.gfn << PAGE_SHIFT);
        Attempt::Done(walk)
    }

    /// The fault for an access to a gva the VMM reserves (the switcher,
    /// mapped present, read-only and supervisor-only in every root): a
    /// protection fault with the access's bits, never a walk of the guest's
    /// tables.
    pub fn reserved_fault(&self, gva: u64, access: Access) -> PageFault {
        self.fault(
            gva,
            access,
            PfErrorCode::PRESENT,
            PT64_ROOT_4LEVEL,
            FaultKind::Reserved,
        )
    }

    /// The `error:` label: every fault carries the access's W/R and U/S
    /// bits, and I/D for a fetch only when EFER.NX or CR4.SMEP is set (Intel
    /// SDM §4.7; KVM: `fetch_fault && (is_efer_nx || is_cr4_smep)`).
    fn fault(
        &self,
        gva: u64,
        access: Access,
        mut error_code: PfErrorCode,
        level: u8,
        kind: FaultKind,
    ) -> PageFault {
        error_code.set(PfErrorCode::WRITE, access.write);
        error_code.set(PfErrorCode::USER, access.user);
        if access.fetch && (self.state.efer_nx || self.state.cr4_smep) {
            error_code.insert(PfErrorCode::FETCH);
        }
        PageFault {
            address: gva,
            error_code,
            level,
            kind,
        }
    }
}

/// `FNAME(update_accessed_dirty_bits)`: set A on every level, top down, and
/// D on the leaf of a write, each with a cmpxchg against the value the walk
/// read. A lost race means the guest changed an entry under us, possibly
/// making the walk's result stale, so the whole walk restarts (KVM: `goto
/// retry_walk`). Entries already updated keep their new A bit, as on KVM.
fn update_accessed_dirty_bits<M: GuestPtMemory + ?Sized>(
    mem: &M,
    walk: &mut GuestWalk,
) -> Result<(), AdError> {
    let leaf = walk.level;
    for level in (leaf..=PT64_ROOT_4LEVEL).rev() {
        let idx = level as usize - 1;
        let orig = walk.ptes[idx];
        let mut new = orig | PT_ACCESSED_MASK;
        if level == leaf && walk.access.write {
            new |= PT_DIRTY_MASK;
        }
        if new == orig {
            continue;
        }
        match mem.cmpxchg_gpte(walk.pte_gpa[idx], orig, new) {
            Some(Ok(())) => {
                walk.ptes[idx] = new;
                walk.ad_written |= 1 << idx;
            }
            Some(Err(_current)) => return Err(AdError::Race),
            None => {
                return Err(AdError::NotRam {
                    gpa: walk.pte_gpa[idx],
                    level,
                });
            }
        }
    }
    Ok(())
}

/// `update_permission_bitmask(mmu, ept = false)`: for each error-code
/// combination (W, U, SMAP-waived, F), the set of access-right combinations
/// (`PteAccess` bits U/W/X as a 3-bit number) that fault.
fn update_permission_bitmask(state: &PagingState) -> [u8; 16] {
    // Bit `a` of each mask is set when access-right combination `a` includes
    // the right (KVM's BYTE_MASK).
    const fn byte_mask(acc: PteAccess) -> u8 {
        let mut byte = 0u8;
        let mut a = 0;
        while a < 8 {
            if a & acc.bits() != 0 {
                byte |= 1 << a;
            }
            a += 1;
        }
        byte
    }
    let x = byte_mask(PteAccess::EXEC);
    let w = byte_mask(PteAccess::WRITE);
    let u = byte_mask(PteAccess::USER);

    let mut permissions = [0u8; 16];
    for (index, slot) in permissions.iter_mut().enumerate() {
        let pfec = PfErrorCode::from_bits_truncate((index as u32) << 1);
        let write = pfec.contains(PfErrorCode::WRITE);
        let user = pfec.contains(PfErrorCode::USER);
        let fetch = pfec.contains(PfErrorCode::FETCH);
        let smap_waived = pfec.contains(PfErrorCode::RSVD);

        // Writes to non-writable pages; supervisor writes only with CR0.WP.
        let wf = if write && (user || state.cr0_wp) {
            !w
        } else {
            0
        };
        // User accesses to supervisor pages.
        let uf = if user { !u } else { 0 };
        // Fetches from XD pages: XD means nothing without EFER.NX (there it
        // is reserved and the walk faults earlier).
        let ff = if fetch && state.efer_nx { !x } else { 0 };
        // Supervisor accesses to user pages.
        let kf = if user { 0 } else { u };
        // SMEP: supervisor fetches from user pages.
        let smepf = if state.cr4_smep && fetch { kf } else { 0 };
        // SMAP: supervisor data accesses to user pages, unless waived.
        let smapf = if state.cr4_smap && !fetch && !smap_waived {
            kf
        } else {
            0
        };
        *slot = wf | uf | ff | smepf | smapf;
    }
    permissions
}

/// Convenience for one-off walks: builds the [`GuestMmu`] for `state` and
/// walks. Callers that walk repeatedly in one mode should keep a `GuestMmu`.
pub fn walk_addr<M: GuestPtMemory + ?Sized>(
    mem: &M,
    state: &PagingState,
    gva: u64,
    access: Access,
) -> Result<GuestWalk, WalkError> {
    GuestMmu::new(*state).walk_addr(mem, gva, access)
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
