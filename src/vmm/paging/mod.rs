//! Paging: what differs between kvm mode (the guest's own tables, KVM does
//! the second level) and shadow mode (the VMM's shadow tables), behind the
//! [`PagingOps`] trait the hypercalls call.

pub mod kvm;
pub mod shadow;

use crate::mmu::{MemslotError, MmuError};
use crate::vmm::abi::PAGE_SIZE;
use crate::vmm::config::Paging;
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::kick::VcpuRequest;
use crate::vmm::kvm::memory::MemoryError;
use crate::vmm::units::format_size;

pub use kvm::KvmPaging;
pub use shadow::ShadowPaging;

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
    ) -> Result<(), PagingError> {
        Ok(())
    }
    /// LOAD_CR3 (validated).
    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> Result<i64, PagingError>;
    /// INVLPG (validated).
    fn invlpg(&self, cpu: &mut dyn CpuAccess, gva: u64) -> Result<i64, PagingError>;
    /// FLUSH_TLB.
    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, global: bool) -> Result<i64, PagingError>;
    /// RESOLVE_PF.
    fn resolve_pf(
        &self,
        cpu: &mut dyn CpuAccess,
        cr2: u64,
        error_code: u64,
        rip: u64,
    ) -> Result<PfResolution, PagingError>;
    /// BALLOON (validated): give the pages back to the host.
    fn balloon(&self, cpu: &mut dyn CpuAccess, gpa: u64, nr_pages: u64)
    -> Result<i64, PagingError>;
    /// SET_PAGING (validated): the guest's CR0.WP and EFER.NXE.
    fn set_paging(&self, cpu: &mut dyn CpuAccess, wp: bool, nx: bool) -> Result<i64, PagingError>;
    /// HOST_OP operations other than PING.
    fn host_op(
        &self,
        cpu: &mut dyn CpuAccess,
        op: u64,
        arg0: u64,
        arg1: u64,
    ) -> Result<i64, PagingError>;
}
