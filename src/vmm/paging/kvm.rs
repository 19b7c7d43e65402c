//! kvm mode's paging operations: the guest's page tables are real, KVM
//! does the second level, and the paging hypercalls do what the native
//! instructions would.

use std::sync::Arc;

use kvm_bindings::kvm_sregs;

use super::{GuestPagingMode, PagingError, PagingOps, PfResolution};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::config::Paging;
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::memory::GuestRam;
use crate::vmm::x86::{CR0_WP, CR4_PGE, CR4_SMAP, CR4_SMEP, EFER_NXE};

/// `sregs` with the mode bits of `mode` set in CR0, CR4 and EFER (`real`:
/// CR0.WP and EFER.NXE too; shadow mode keeps those two set).
pub(super) fn with_mode(mut sregs: kvm_sregs, mode: GuestPagingMode, real: bool) -> kvm_sregs {
    let set = |v: u64, bit: u64, on: bool| if on { v | bit } else { v & !bit };
    sregs.cr4 = set(sregs.cr4, CR4_SMEP, mode.smep);
    sregs.cr4 = set(sregs.cr4, CR4_SMAP, mode.smap);
    if real {
        sregs.cr0 = set(sregs.cr0, CR0_WP, mode.wp);
        sregs.efer = set(sregs.efer, EFER_NXE, mode.nx);
    }
    sregs
}

/// KVM_SET_SREGS refused the mode (`EINVAL`: the host does not offer
/// CR4.SMEP or SMAP): the guest gets `EOPNOTSUPP`, nothing changed.
pub(super) fn refused(e: &CpuError) -> bool {
    e.source.errno() == libc::EINVAL
}

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
        _rflags: u64,
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

    fn set_paging(
        &self,
        cpu: &mut dyn CpuAccess,
        mode: GuestPagingMode,
    ) -> Result<i64, PagingError> {
        // What `mov %cr0` / `mov %cr4` / `wrmsr EFER` would do: KVM resets
        // the vCPU's MMU context when a paging bit changes
        // (`kvm_post_set_cr0`, `kvm_post_set_cr4`, `set_efer`).
        let sregs = cpu.sregs()?;
        let new = with_mode(sregs, mode, true);
        if (new.cr0, new.cr4, new.efer) != (sregs.cr0, sregs.cr4, sregs.efer) {
            match cpu.set_sregs(&new) {
                Ok(()) => {}
                Err(e) if refused(&e) => return Ok(abi::errno::EOPNOTSUPP),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(0)
    }
}
