//! kvm mode's paging operations: the guest's page tables are real, KVM
//! does the second level, and the paging hypercalls do what the native
//! instructions would.
//!
//! POPULATE here is the host half only: the VMM walks the guest's tables
//! in software with the shadow MMU's walker (the same rule as shadow mode:
//! mappings accessed at every level, so both modes count the same pages)
//! and populates the real host memory behind them with
//! `madvise(MADV_POPULATE_WRITE)`. KVM's own second level is left to the
//! first touch: `KVM_PRE_FAULT_MEMORY` (Linux 6.10) works only with TDP,
//! which the `kvm_pvm` backend does not have (its KVM shadows the guest's
//! tables, keyed by gva, which no gpa-range ioctl can prebuild).

use std::sync::Arc;

use kvm_bindings::kvm_sregs;

use super::{GuestCpu, GuestPagingMode, GuestPf, PagingOps, PagingResult, PfResolution, Populated};
use crate::mmu::walk::GuestPtMemory;
use crate::mmu::{PagingState, PrefaultResult, accessed_runs};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::config::Paging;
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::memory::{GuestMemWriter, GuestRam};
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

/// The guest's page tables in kvm mode's guest RAM, read for a software
/// walk that never writes them (no Accessed or Dirty bit is set).
struct RamTables<'a>(&'a GuestRam);

impl GuestPtMemory for RamTables<'_> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        // vm-memory's copy is volatile: the vCPUs may write the tables.
        self.0.read_u64(gpa).ok()
    }
    fn cmpxchg_gpte(&self, _gpa: u64, _old: u64, _new: u64) -> Option<Result<(), u64>> {
        None
    }
    fn is_ram(&self, gpa: u64) -> bool {
        gpa < self.0.size()
    }
}

/// kvm mode: the guest's page tables are real, KVM does the second level;
/// the paging hypercalls do what the native instructions would.
pub struct KvmPaging {
    ram: Arc<GuestRam>,
    cpu: GuestCpu,
}

impl KvmPaging {
    /// Paging operations over `ram` for a guest CPU `cpu` (its CPUID, for
    /// POPULATE's walk).
    pub fn new(ram: Arc<GuestRam>, cpu: GuestCpu) -> Self {
        KvmPaging { ram, cpu }
    }

    /// The walker's view of the vCPU's paging registers.
    fn paging_state(&self, sregs: &kvm_sregs) -> PagingState {
        PagingState {
            cr3: sregs.cr3,
            cr0_wp: sregs.cr0 & CR0_WP != 0,
            cr4_smep: sregs.cr4 & CR4_SMEP != 0,
            cr4_smap: sregs.cr4 & CR4_SMAP != 0,
            efer_nx: sregs.efer & EFER_NXE != 0,
            maxphyaddr: self.cpu.maxphyaddr,
            gbpages: self.cpu.gbpages,
            amd: self.cpu.amd,
        }
    }

    /// A full TLB flush, global entries included: toggling CR4.PGE makes
    /// KVM reset the vCPU's MMU context (SET_SREGS with a changed CR4).
    fn flush(cpu: &mut dyn CpuAccess, mut sregs: kvm_sregs) -> PagingResult<()> {
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

    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> PagingResult<i64> {
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

    fn invlpg(&self, cpu: &mut dyn CpuAccess, _gva: u64) -> PagingResult<i64> {
        // No ioctl drops one translation; flushing more is always allowed.
        let sregs = cpu.sregs()?;
        Self::flush(cpu, sregs)?;
        Ok(0)
    }

    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, _global: bool) -> PagingResult<i64> {
        let sregs = cpu.sregs()?;
        Self::flush(cpu, sregs)?;
        Ok(0)
    }

    fn resolve_pf(&self, _cpu: &mut dyn CpuAccess, pf: GuestPf) -> PagingResult<PfResolution> {
        // The hardware walked the guest's own tables: the fault is the guest's.
        Ok(PfResolution::GuestFault {
            error_code: pf.error_code,
        })
    }

    fn balloon(&self, _cpu: &mut dyn CpuAccess, gpa: u64, nr_pages: u64) -> PagingResult<i64> {
        self.ram.discard(gpa, nr_pages * PAGE_SIZE)?;
        Ok(nr_pages as i64)
    }

    fn host_op(
        &self,
        _cpu: &mut dyn CpuAccess,
        _op: u64,
        _arg0: u64,
        _arg1: u64,
    ) -> PagingResult<i64> {
        Ok(abi::errno::EOPNOTSUPP)
    }

    fn populate(&self, cpu: &mut dyn CpuAccess, gva: u64, len: u64) -> PagingResult<Populated> {
        let mode = self.paging_state(&cpu.sregs()?);
        // The switcher's memslot lies above RAM: `is_ram` leaves it out.
        let t = accessed_runs(&mode, || RamTables(&self.ram), gva, len, None);
        for run in &t.runs {
            if !self.ram.populate_write(run.gpa, run.len)? {
                return Ok(Populated::Errno(abi::errno::EOPNOTSUPP));
            }
        }
        Ok(Populated::Pages(PrefaultResult {
            mapped: t.mapped(),
            skipped: t.skipped,
        }))
    }

    fn set_paging(&self, cpu: &mut dyn CpuAccess, mode: GuestPagingMode) -> PagingResult<i64> {
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
