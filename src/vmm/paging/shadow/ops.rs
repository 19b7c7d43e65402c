//! The paging hypercalls on the shadow MMU.

use kvm_bindings::kvm_sregs;

use super::ShadowPaging;
use crate::mm::MmError;
use crate::mmu::{Access, FaultOutcome, MmuError, PfErrorCode};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::config::Paging;
use crate::vmm::host::ram::host_err;
use crate::vmm::kvm::cpu::CpuAccess;
use crate::vmm::kvm::kick::VcpuRequest;
use crate::vmm::paging::kvm::{refused, with_mode};
use crate::vmm::paging::{
    GuestPagingMode, GuestPf, PagingError, PagingOps, PagingResult, PfResolution, Populated,
};
use crate::vmm::x86::RFLAGS_AC;

/// How much of a POPULATE's host memory is faulted in between two looks
/// at the free frames: a PMD-size folio.
const POPULATE_CHUNK: u64 = 2 << 20;

/// Sets the vCPU's real CR3 to the shadow root `root`.
fn set_root(cpu: &mut dyn CpuAccess, root: u64) -> PagingResult<()> {
    let mut sregs: kvm_sregs = cpu.sregs()?;
    sregs.cr3 = root << 12;
    Ok(cpu.set_sregs(&sregs)?)
}

impl ShadowPaging {
    /// Guest RAM `[gpa, gpa + len)` was written by a device: guest page
    /// tables there lose their shadow pages (their write protection did not
    /// see the write), and the pages exception delivery needs are mapped
    /// again if that zapped them.
    pub fn device_wrote(&self, gpa: u64, len: u64) -> PagingResult<()> {
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE);
        self.mmu
            .track_write(first..end)
            .map_err(|e| self.mmu_err(e))?;
        self.ensure_critical()
    }
}

impl PagingOps for ShadowPaging {
    fn mode(&self) -> Paging {
        Paging::Shadow
    }

    fn boot_cr3(&self, vcpu: u32, guest_cr3: u64) -> u64 {
        self.boot_cr3
            .get(vcpu as usize)
            .copied()
            .unwrap_or(guest_cr3)
    }

    fn handle_requests(
        &self,
        _cpu: &mut dyn CpuAccess,
        _requests: VcpuRequest,
    ) -> PagingResult<()> {
        self.ensure_critical()
    }

    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> PagingResult<i64> {
        let vcpu = cpu.id() as usize;
        let root = match self.mmu.load_cr3(vcpu, cr3) {
            Ok(r) => r,
            Err(MmuError::InvalidCr3(_)) => return Ok(abi::errno::EINVAL),
            Err(e) => return Err(self.mmu_err(e)),
        };
        set_root(cpu, root)?;
        // A new root starts empty; a cached one may have lost entries.
        self.prefault(vcpu, true)?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn invlpg(&self, cpu: &mut dyn CpuAccess, gva: u64) -> PagingResult<i64> {
        self.mmu
            .invlpg(cpu.id() as usize, gva)
            .map_err(|e| self.mmu_err(e))?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, _global: bool) -> PagingResult<i64> {
        // No spte is ever global: a global flush is a flush.
        self.mmu
            .flush_tlb(cpu.id() as usize)
            .map_err(|e| self.mmu_err(e))?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn resolve_pf(&self, cpu: &mut dyn CpuAccess, pf: GuestPf) -> PagingResult<PfResolution> {
        let GuestPf {
            cr2,
            error_code,
            rflags,
        } = pf;
        let vcpu = cpu.id();
        let generation = self.check_livelock(vcpu, pf)?;
        let ec = PfErrorCode::from_bits_truncate(error_code as u32);
        let mut access = Access::from_error_code(ec & !PfErrorCode::RSVD);
        // SMAP is waived for explicit supervisor accesses with EFLAGS.AC
        // set (KVM reads RFLAGS in `permission_fault`; here the guest's
        // handler passes the RFLAGS of its trap frame).
        access.eflags_ac = !access.user && rflags & RFLAGS_AC != 0;
        let outcome = match self.mmu.page_fault_access(vcpu as usize, cr2, access) {
            Ok(o) => o,
            // Host invalidations (ksmd merging, kswapd evicting) kept racing
            // the fault: let the guest retry the access, as KVM's
            // RET_PF_RETRY re-enters the guest, rather than fail the run.
            // Re-entering also lets the vCPU see kicks and stop requests.
            Err(MmuError::TooManyRetries(_)) => FaultOutcome::Retry,
            Err(e) => return Err(self.mmu_err(e)),
        };
        let fixed = matches!(outcome, FaultOutcome::Fixed);
        let res = match outcome {
            FaultOutcome::Fixed | FaultOutcome::Retry => PfResolution::Retry,
            FaultOutcome::Guest(pf) => PfResolution::GuestFault {
                error_code: u64::from(pf.error_code.bits()),
            },
            // Guest RAM the host does not back (MMIO: outside every memslot;
            // or refused by the host mm): the guest sees its own fault with
            // the error code it passed in (docs/guest-abi.md, shadow mode).
            FaultOutcome::Mmio { .. } | FaultOutcome::HostFault { .. } => {
                PfResolution::GuestFault { error_code }
            }
        };
        self.ensure_critical()?;
        self.note_resolution(vcpu, pf, fixed.then_some(generation));
        Ok(res)
    }

    fn balloon(&self, _cpu: &mut dyn CpuAccess, gpa: u64, nr_pages: u64) -> PagingResult<i64> {
        let len = nr_pages * PAGE_SIZE;
        let r = match self.ram.mm().madvise_dontneed(self.ram.base() + gpa, len) {
            Ok(()) => nr_pages as i64,
            // The image is mlocked in shadow mode (exception delivery needs
            // it): it cannot be given back.
            Err(MmError::Locked(_)) => abi::errno::EINVAL,
            Err(MmError::OutOfFrames) => {
                return Err(self.mmu_err(MmuError::Memory(MmError::OutOfFrames)));
            }
            Err(source) => {
                return Err(PagingError::Memory(host_err(gpa, len)(source)));
            }
        };
        self.ensure_critical()?;
        Ok(r)
    }

    fn host_op(
        &self,
        _cpu: &mut dyn CpuAccess,
        op: u64,
        arg0: u64,
        _arg1: u64,
    ) -> PagingResult<i64> {
        if op != abi::HOST_OP_CHECKPOINT {
            return Ok(abi::errno::EINVAL);
        }
        // decode already refused n >= 2^16; a direct caller gets EINVAL too.
        let Ok(n) = u16::try_from(arg0) else {
            return Ok(abi::errno::EINVAL);
        };
        let Some(script) = &self.host_ops else {
            return Ok(0);
        };
        let mut ran = 0;
        for hop in script.checkpoint(n) {
            match hop.apply(&self.ram) {
                Ok(()) => ran += 1,
                Err(MmError::OutOfFrames) => {
                    return Err(self.mmu_err(MmuError::Memory(MmError::OutOfFrames)));
                }
                // The script's operation failed (e.g. the range was already
                // unmapped): the user's script, not the guest, is wrong.
                Err(source) => {
                    return Err(PagingError::Memory(host_err(hop.gpa, hop.len)(source)));
                }
            }
        }
        self.ensure_critical()?;
        Ok(ran)
    }

    fn populate(&self, cpu: &mut dyn CpuAccess, gva: u64, len: u64) -> PagingResult<Populated> {
        // What a VMM does on a real host: madvise(MADV_POPULATE_WRITE) on
        // the hva range, then KVM_PRE_FAULT_MEMORY. The gpa range comes
        // from the guest's tables (`accessed_runs`, advice only); the
        // pre-fault re-walks them under the invalidation protocol, finds
        // the host pages present, and installs the sptes, Accessed (and
        // Dirty where writable) as after the access the guest announced by
        // setting A (and D) in its PTEs (`ShadowMmu::populate`). Host pages a
        // concurrent invalidation (ksmd, kswapd, a host op) takes back in
        // between are faulted in again by the pre-fault itself.
        let vcpu = cpu.id() as usize;
        let runs = self
            .mmu
            .accessed_runs(vcpu, gva, len)
            .map_err(|e| self.mmu_err(e))?;
        let mm = self.ram.mm();
        // Populating is advice and must not push the host into reclaim: a
        // burst of young pages leaves direct reclaim nothing to evict when
        // the guest's next fault needs a frame, and running out there stops
        // the VM. So the populate ends where free machine memory would fall
        // below an eighth (the guest's faults and the shadow tables keep
        // that much), 2 MiB at a time, and the rest of the range is skipped.
        let reserve = self.nr_frames / 8 + POPULATE_CHUNK / PAGE_SIZE;
        let mut end = gva + len;
        'runs: for run in &runs.runs {
            let mut off = 0;
            while off < run.len {
                if mm.frames().nr_free() < reserve {
                    end = run.gva + off;
                    break 'runs;
                }
                let n = (run.len - off).min(POPULATE_CHUNK);
                match mm.madvise_populate_write(self.ram.base() + run.gpa + off, n) {
                    Ok(()) => {}
                    // Reclaim found nothing cold: stop here, as above.
                    Err(MmError::OutOfFrames) => {
                        end = run.gva + off;
                        break 'runs;
                    }
                    // The host made part of guest RAM read-only or unmapped
                    // it (a host op): the pre-fault maps what the host
                    // allows and skips the rest, as the fault path would
                    // refuse it.
                    Err(MmError::InvalidArgument(_) | MmError::NoMemory) => {}
                    Err(source) => {
                        return Err(PagingError::Memory(host_err(run.gpa + off, n)(source)));
                    }
                }
                off += n;
            }
        }
        let done = end - gva;
        let mut res = self
            .mmu
            .populate(vcpu, gva, done)
            .map_err(|e| self.mmu_err(e))?;
        res.skipped += (len - done) / PAGE_SIZE;
        self.ensure_critical()?;
        Ok(Populated::Pages(res))
    }

    fn set_paging(&self, cpu: &mut dyn CpuAccess, mode: GuestPagingMode) -> PagingResult<i64> {
        // The real CR0.WP and EFER.NXE stay set, as KVM keeps them under its
        // own shadow paging: the shadow tables give the guest's mode its
        // meaning (WP=0: supervisor-only writable sptes for read-only guest
        // PTEs, also non-executable under SMEP; NXE=0: no NX in sptes, bit 63
        // of a guest PTE a reserved-bit fault of the walker). The real
        // CR4.SMEP and CR4.SMAP are the guest's, as KVM sets them
        // (`vmx_set_cr4` with shadow paging): the hardware enforces them on
        // the sptes, and shadow pages are keyed by them where CR0.WP=0
        // changes what an spte means (`smep_andnot_wp`, `smap_andnot_wp`).
        // `set_paging_mode` makes the vCPU leave its root
        // (`kvm_mmu_reset_context`); pages of the old mode stay for vCPUs
        // still in it.
        let vcpu = cpu.id() as usize;
        let mut state = self.mmu.paging(vcpu).map_err(|e| self.mmu_err(e))?;
        let old = GuestPagingMode {
            wp: state.cr0_wp,
            nx: state.efer_nx,
            smep: state.cr4_smep,
            smap: state.cr4_smap,
        };
        if old == mode {
            return Ok(0);
        }
        let sregs = cpu.sregs()?;
        let mut real = with_mode(sregs, mode, false);
        if real.cr4 != sregs.cr4
            && let Err(e) = cpu.set_sregs(&real)
        {
            return if refused(&e) {
                Ok(abi::errno::EOPNOTSUPP)
            } else {
                Err(e.into())
            };
        }
        state.cr0_wp = mode.wp;
        state.efer_nx = mode.nx;
        state.cr4_smep = mode.smep;
        state.cr4_smap = mode.smap;
        // Then what LOAD_CR3 does: back on the (now empty) root for the
        // guest's CR3, with the exception-delivery pages prefaulted, on this
        // vCPU and any other whose root the reset emptied.
        let root = self.enter_mode(vcpu, state, state.cr3)?;
        real.cr3 = root << 12;
        cpu.set_sregs(&real)?;
        self.prefault(vcpu, true)?;
        self.ensure_critical()?;
        Ok(0)
    }
}
