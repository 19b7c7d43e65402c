//! kvm mode's paging operations: the guest's page tables are real, KVM
//! does the second level, and the paging hypercalls do what the native
//! instructions would.

use std::sync::Arc;

use kvm_bindings::kvm_sregs;

use super::{PagingError, PagingOps, PfResolution};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::config::Paging;
use crate::vmm::kvm::cpu::CpuAccess;
use crate::vmm::kvm::memory::GuestRam;
use crate::vmm::x86::{CR0_WP, CR4_PGE, EFER_NXE};

/// kvm mode: the guest's page tables are real, KVM does the second level;
/// the paging hypercalls do what the native instructions would.
pub struct KvmPaging {
    ram: Arc<GuestRam>,
}

impl KvmPaging {
    /// Paging operations over `ram`.
    pub fn new(ram: Arc<GuestRam>) -> Self {
        KvmPaging { ram }
    }

    /// A full TLB flush, global entries included: toggling CR4.PGE makes
    /// KVM reset the vCPU's MMU context (SET_SREGS with a changed CR4).
    fn flush(cpu: &mut dyn CpuAccess, mut sregs: kvm_sregs) -> Result<(), PagingError> {
        sregs.cr4 ^= CR4_PGE;
        cpu.set_sregs(&sregs)?;
        sregs.cr4 ^= CR4_PGE;
        Ok(cpu.set_sregs(&sregs)?)
    }
}

impl PagingOps for KvmPaging {
    fn mode(&self) -> Paging {
        Paging::Kvm
    }

    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> Result<i64, PagingError> {
        let mut sregs = cpu.sregs()?;
        if sregs.cr3 == cr3 {
            // `mov %cr3` with the same value still flushes; SET_SREGS with an
            // unchanged CR3 would not.
            Self::flush(cpu, sregs)?;
        } else {
            // A changed CR3 makes KVM switch roots, as `mov %cr3` would.
            sregs.cr3 = cr3;
            cpu.set_sregs(&sregs)?;
        }
        Ok(0)
    }

    fn invlpg(&self, cpu: &mut dyn CpuAccess, _gva: u64) -> Result<i64, PagingError> {
        // No ioctl drops one translation; flushing more is always allowed.
        let sregs = cpu.sregs()?;
        Self::flush(cpu, sregs)?;
        Ok(0)
    }

    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, _global: bool) -> Result<i64, PagingError> {
        let sregs = cpu.sregs()?;
        Self::flush(cpu, sregs)?;
        Ok(0)
    }

    fn resolve_pf(
        &self,
        _cpu: &mut dyn CpuAccess,
        _cr2: u64,
        error_code: u64,
        _rip: u64,
    ) -> Result<PfResolution, PagingError> {
        // The hardware walked the guest's own tables: the fault is the guest's.
        Ok(PfResolution::GuestFault { error_code })
    }

    fn balloon(
        &self,
        _cpu: &mut dyn CpuAccess,
        gpa: u64,
        nr_pages: u64,
    ) -> Result<i64, PagingError> {
        self.ram.discard(gpa, nr_pages * PAGE_SIZE)?;
        Ok(nr_pages as i64)
    }

    fn host_op(
        &self,
        _cpu: &mut dyn CpuAccess,
        _op: u64,
        _arg0: u64,
        _arg1: u64,
    ) -> Result<i64, PagingError> {
        Ok(abi::errno::EOPNOTSUPP)
    }

    fn set_paging(&self, cpu: &mut dyn CpuAccess, wp: bool, nx: bool) -> Result<i64, PagingError> {
        // What `mov %cr0` / `wrmsr EFER` would do: KVM resets the vCPU's MMU
        // context when either changes (`kvm_post_set_cr0`, `set_efer`).
        let mut sregs = cpu.sregs()?;
        let (cr0, efer) = (sregs.cr0, sregs.efer);
        sregs.cr0 = if wp { cr0 | CR0_WP } else { cr0 & !CR0_WP };
        sregs.efer = if nx {
            efer | EFER_NXE
        } else {
            efer & !EFER_NXE
        };
        if (sregs.cr0, sregs.efer) != (cr0, efer) {
            cpu.set_sregs(&sregs)?;
        }
        Ok(0)
    }
}
