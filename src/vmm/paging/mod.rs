//! Paging: what differs between kvm mode (the guest's own tables, KVM does
//! the second level) and shadow mode (the VMM's shadow tables), behind the
//! [`PagingOps`] trait the hypercalls call.

pub mod kvm;
pub mod shadow;

use crate::mmu::{MemslotError, MmuError, PfErrorCode, PrefaultResult};
use crate::vmm::abi::PAGE_SIZE;
use crate::vmm::config::Paging;
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::kick::VcpuRequest;
use crate::vmm::kvm::memory::MemoryError;
use crate::vmm::units::format_size;
use crate::vmm::x86::{RFLAGS_AC, pte};

pub use kvm::KvmPaging;
pub use shadow::ShadowPaging;

/// What a paging operation returns.
pub type PagingResult<T> = Result<T, PagingError>;

/// Errors that stop the VM in a paging operation (never the guest's
/// arguments: those become errno results).
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// A vCPU register ioctl failed.
    #[error("{op} failed during a hypercall: {source}", op = .0.op, source = .0.source)]
    Cpu(#[from] CpuError),
    /// A host memory operation failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Machine memory ran out (shadow mode): no frame for guest RAM or for a
    /// shadow page table.
    #[error(
        "out of machine memory: all {frames} frames ({}) of --machine-mem are in use by guest RAM \
         and shadow page tables; give the VM more with --machine-mem",
        format_size(*.frames * PAGE_SIZE)
    )]
    OutOfMachineMemory {
        /// Frames of machine memory.
        frames: u64,
    },
    /// The shadow MMU failed (shadow mode).
    #[error("shadow MMU: {0}")]
    Mmu(#[from] MmuError),
    /// Guest RAM's memslot could not be set up (shadow mode).
    #[error("the guest RAM memslot: {0}")]
    Memslot(#[from] MemslotError),
    /// RESOLVE_PF would answer RETRY again for a fault it already fixed,
    /// with no invalidation in between (shadow mode): the VMM's view of
    /// the translation and the hardware's disagree, and the guest would
    /// loop for ever.
    #[error(
        "RESOLVE_PF livelock on vCPU {vcpu}: the {access} at gva {gva:#x} faulted again after \
         the VMM answered RETRY, with nothing invalidated since; the VMM's view: {vmm} allows it; \
         the hardware's: it faults with error code {error_code:#x}",
        access = FaultAccess { error_code: *.error_code, rflags: *.rflags },
        vmm = SpteView(*.spte),
    )]
    Livelock {
        /// The vCPU.
        vcpu: u32,
        /// The faulting address (CR2).
        gva: u64,
        /// The error code the guest passed.
        error_code: u64,
        /// The RFLAGS the guest passed.
        rflags: u64,
        /// The leaf spte the shadow tables hold for `gva`, if any.
        spte: Option<u64>,
    },
}

/// A #PF's access in words ("supervisor write", "user fetch", with
/// "EFLAGS.AC=1" when it waives SMAP).
pub struct FaultAccess {
    /// #PF error code.
    pub error_code: u64,
    /// RFLAGS of the access.
    pub rflags: u64,
}

impl std::fmt::Display for FaultAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ec = PfErrorCode::from_bits_truncate(self.error_code as u32);
        let who = if ec.contains(PfErrorCode::USER) {
            "user"
        } else {
            "supervisor"
        };
        let what = if ec.contains(PfErrorCode::FETCH) {
            "fetch"
        } else if ec.contains(PfErrorCode::WRITE) {
            "write"
        } else {
            "read"
        };
        write!(f, "{who} {what}")?;
        if self.rflags & RFLAGS_AC != 0 && !ec.contains(PfErrorCode::USER) {
            write!(f, " with EFLAGS.AC=1")?;
        }
        Ok(())
    }
}

/// A leaf spte in words.
pub struct SpteView(pub Option<u64>);

impl std::fmt::Display for SpteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(e) = self.0 else {
            return write!(f, "no spte");
        };
        let bit = |b: u64, c: char| if e & b != 0 { c } else { '-' };
        write!(
            f,
            "spte {e:#x} ({}{}{}{})",
            bit(pte::P, 'P'),
            bit(pte::W, 'W'),
            bit(pte::U, 'U'),
            if e & (1 << 63) != 0 { "NX" } else { "X" }
        )
    }
}

/// The guest's paging mode bits that SET_PAGING sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPagingMode {
    /// CR0.WP.
    pub wp: bool,
    /// EFER.NXE.
    pub nx: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
}

/// What the VMM needs to know about the guest's CPU to walk its tables.
#[derive(Clone, Copy, Debug)]
pub struct GuestCpu {
    /// CPUID's physical-address width.
    pub maxphyaddr: u8,
    /// 1 GiB pages.
    pub gbpages: bool,
    /// AMD-compatible vendor.
    pub amd: bool,
}

/// POPULATE's answer: 4 KiB pages of the range populated (`rax`) and
/// skipped (`rdx`), or an errno the guest gets instead (`rax`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populated {
    /// Done: `mapped + skipped` is the range's length in pages.
    Pages(PrefaultResult),
    /// Refused, nothing done.
    Errno(i64),
}

/// A guest page fault as RESOLVE_PF reports it: CR2 (which ring 1 cannot
/// read, so the VMM does), and the error code and RFLAGS (EFLAGS.AC: SMAP)
/// of the faulting access from the guest's trap frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPf {
    /// The faulting address.
    pub cr2: u64,
    /// The #PF error code the hardware pushed.
    pub error_code: u64,
    /// RFLAGS of the faulting access.
    pub rflags: u64,
}

/// RESOLVE_PF's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfResolution {
    /// The VMM fixed its tables: retry the access.
    Retry,
    /// The guest's own fault, with the architectural error code.
    GuestFault {
        /// #PF error code for the guest's handler.
        error_code: u64,
    },
}

/// The paging side of the hypercall ABI: what differs between kvm mode
/// (do what hardware does) and shadow mode (maintain shadow tables).
pub trait PagingOps: Send + Sync {
    /// The mode this implements.
    fn mode(&self) -> Paging;
    /// The real CR3 vCPU `vcpu` starts with when the guest's is
    /// `guest_cr3` (shadow mode: the shadow root for it).
    fn boot_cr3(&self, _vcpu: u32, guest_cr3: u64) -> u64 {
        guest_cr3
    }
    /// Requests other threads posted with a kick (`VcpuRequest`, minus
    /// STOP), handled on the vCPU thread before it re-enters the guest.
    /// kvm mode: nothing to do, KVM keeps its translations coherent with
    /// the guest's tables and being out of guest mode is all a shootdown
    /// needs.
    fn handle_requests(
        &self,
        _cpu: &mut dyn CpuAccess,
        _requests: VcpuRequest,
    ) -> PagingResult<()> {
        Ok(())
    }
    /// LOAD_CR3 (validated).
    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> PagingResult<i64>;
    /// INVLPG (validated).
    fn invlpg(&self, cpu: &mut dyn CpuAccess, gva: u64) -> PagingResult<i64>;
    /// FLUSH_TLB.
    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, global: bool) -> PagingResult<i64>;
    /// RESOLVE_PF for the fault `pf`.
    fn resolve_pf(&self, cpu: &mut dyn CpuAccess, pf: GuestPf) -> PagingResult<PfResolution>;
    /// BALLOON (validated): give the pages back to the host.
    fn balloon(&self, cpu: &mut dyn CpuAccess, gpa: u64, nr_pages: u64) -> PagingResult<i64>;
    /// SET_PAGING (validated): the guest's CR0.WP, EFER.NXE, CR4.SMEP and
    /// CR4.SMAP. `EOPNOTSUPP` if the host's KVM refuses the CR4 bits.
    fn set_paging(&self, cpu: &mut dyn CpuAccess, mode: GuestPagingMode) -> PagingResult<i64>;
    /// POPULATE (validated) of `[gva, gva + len)` on `cpu`'s current
    /// tables: the pages whose guest mapping is accessed at every level get
    /// their host memory populated for writing (`MADV_POPULATE_WRITE`) and,
    /// in shadow mode, their sptes (`KVM_PRE_FAULT_MEMORY`).
    fn populate(&self, cpu: &mut dyn CpuAccess, gva: u64, len: u64) -> PagingResult<Populated>;
    /// HOST_OP operations other than PING.
    fn host_op(&self, cpu: &mut dyn CpuAccess, op: u64, arg0: u64, arg1: u64) -> PagingResult<i64>;
}
