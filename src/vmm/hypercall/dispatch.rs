//! Running a decoded hypercall: PRINT and EXIT here, the paging ones
//! through [`PagingOps`] (kvm or shadow mode), results back into the
//! vCPU's registers.

use std::sync::Arc;

use super::decode::Hypercall;
use crate::trace::PfOutcome;
use crate::vmm::abi;
use crate::vmm::devices::console::ConsoleError;
use crate::vmm::devices::serial::SerialDevice;
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::memory::{MemoryError, SharedGuestMem};
use crate::vmm::paging::{PagingError, PagingOps, PfResolution};

/// Errors that stop the VM while handling a hypercall (never the guest's
/// arguments: those become errno results).
#[derive(Debug, thiserror::Error)]
pub enum HypercallError {
    /// A vCPU register ioctl failed.
    #[error("{op} failed during a hypercall: {source}", op = .0.op, source = .0.source)]
    Cpu(#[from] CpuError),
    /// Writing the console failed.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Reading guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A paging operation failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
}

/// What the vCPU loop does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// Resume the guest (results already in its registers).
    Resume,
    /// The guest asked to exit with this code.
    Exit(u8),
}

/// Decodes, validates and runs hypercalls for all vCPUs of a VM.
pub struct HypercallHandler {
    paging: Arc<dyn PagingOps>,
    ram: SharedGuestMem,
    console: Arc<SerialDevice>,
}

impl HypercallHandler {
    /// The paging implementation.
    pub fn paging(&self) -> &Arc<dyn PagingOps> {
        &self.paging
    }

    /// A handler whose paging hypercalls go to `paging`.
    pub fn new(
        paging: Arc<dyn PagingOps>,
        ram: SharedGuestMem,
        console: Arc<SerialDevice>,
    ) -> Self {
        HypercallHandler {
            paging,
            ram,
            console,
        }
    }

    /// Handles hypercall `nr` for `cpu`: reads its arguments, runs it, and
    /// writes the results back into its registers.
    pub fn handle(
        &self,
        cpu: &mut dyn CpuAccess,
        nr: u64,
    ) -> Result<HypercallOutcome, HypercallError> {
        let _slice = crate::trace::span::hypercall(nr, abi::hc::name(nr)).entered();
        let mut regs = cpu.regs()?;
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10];
        let (rax, rdx) = match Hypercall::decode(nr, args, self.ram.size()) {
            Err(errno) => (errno, None),
            Ok(Hypercall::Exit { code }) => return Ok(HypercallOutcome::Exit(code)),
            Ok(call) => self.execute(cpu, call)?,
        };
        regs.rax = rax as u64;
        if let Some(rdx) = rdx {
            regs.rdx = rdx;
        }
        cpu.set_regs(&regs)?;
        Ok(HypercallOutcome::Resume)
    }

    /// RESOLVE_PF through the paging mode, in a slice that records the
    /// outcome.
    fn resolve_pf(
        &self,
        cpu: &mut dyn CpuAccess,
        cr2: u64,
        error_code: u64,
        rip: u64,
    ) -> Result<PfResolution, PagingError> {
        let slice = crate::trace::span::resolve_pf(cr2, error_code);
        let _in = slice.enter();
        let resolution = self.paging.resolve_pf(cpu, cr2, error_code, rip)?;
        let outcome = match resolution {
            PfResolution::Retry => PfOutcome::Retry,
            PfResolution::GuestFault { .. } => PfOutcome::GuestFault,
        };
        crate::trace::span::record_outcome(&slice, outcome);
        Ok(resolution)
    }

    fn execute(
        &self,
        cpu: &mut dyn CpuAccess,
        call: Hypercall,
    ) -> Result<(i64, Option<u64>), HypercallError> {
        Ok(match call {
            Hypercall::Nop => (0, None),
            Hypercall::Print { gpa, len } => {
                let mut buf = vec![0u8; len as usize];
                self.ram.read_bytes(gpa, &mut buf)?;
                self.console.write_console(&buf)?;
                (len as i64, None)
            }
            Hypercall::LoadCr3 { cr3 } => (self.paging.load_cr3(cpu, cr3)?, None),
            Hypercall::Invlpg { gva } => (self.paging.invlpg(cpu, gva)?, None),
            Hypercall::FlushTlb { global } => (self.paging.flush_tlb(cpu, global)?, None),
            Hypercall::ResolvePf {
                cr2,
                error_code,
                rip,
            } => match self.resolve_pf(cpu, cr2, error_code, rip)? {
                PfResolution::Retry => {
                    crate::trace::emit!(ResolvePf {
                        gva: cr2,
                        error_code,
                        outcome: PfOutcome::Retry,
                    });
                    (abi::PF_RETRY as i64, None)
                }
                PfResolution::GuestFault { error_code } => {
                    crate::trace::emit!(ResolvePf {
                        gva: cr2,
                        error_code,
                        outcome: PfOutcome::GuestFault,
                    });
                    (abi::PF_GUEST_FAULT as i64, Some(error_code))
                }
            },
            Hypercall::Balloon { gpa, nr_pages } => {
                (self.paging.balloon(cpu, gpa, nr_pages)?, None)
            }
            Hypercall::HostOp {
                op: abi::HOST_OP_PING,
                arg0,
                ..
            } => (arg0 as i64, None),
            Hypercall::HostOp { op, arg0, arg1 } => {
                (self.paging.host_op(cpu, op, arg0, arg1)?, None)
            }
            Hypercall::SetPaging { wp, nx } => (self.paging.set_paging(cpu, wp, nx)?, None),
            // Handled by the caller.
            Hypercall::Exit { .. } => (0, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::abi::errno::{EINVAL, ENOSYS, EOPNOTSUPP};
    use crate::vmm::abi::hc;
    use crate::vmm::boot::regs::{CR0_BOOT, CR4_BOOT, EFER_BOOT};
    use crate::vmm::kvm::memory::GuestRam;
    use crate::vmm::kvm::stats::VmStats;
    use crate::vmm::paging::KvmPaging;
    use crate::vmm::x86::{CR0_WP, CR4_PGE, EFER_NXE};
    use kvm_bindings::{kvm_regs, kvm_sregs};
    use std::time::Instant;

    const MEM: u64 = 16 << 20;

    /// A vCPU made of two structs.
    struct FakeCpu {
        regs: kvm_regs,
        sregs: kvm_sregs,
        set_sregs_calls: Vec<kvm_sregs>,
    }

    impl CpuAccess for FakeCpu {
        fn id(&self) -> u32 {
            0
        }
        fn regs(&mut self) -> Result<kvm_regs, CpuError> {
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), CpuError> {
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&mut self) -> Result<kvm_sregs, CpuError> {
            Ok(self.sregs)
        }
        fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), CpuError> {
            self.sregs = *sregs;
            self.set_sregs_calls.push(*sregs);
            Ok(())
        }
    }

    fn setup() -> (HypercallHandler, FakeCpu) {
        let ram = Arc::new(GuestRam::new(MEM).unwrap());
        let stats = Arc::new(VmStats::new(Instant::now()));
        let console = Arc::new(SerialDevice::new(Box::new(std::io::sink()), stats).unwrap());
        let paging = Arc::new(KvmPaging::new(ram.clone()));
        let sregs = kvm_sregs {
            cr3: 0x8000,
            cr4: CR4_BOOT,
            ..Default::default()
        };
        (
            HypercallHandler::new(paging, ram, console),
            FakeCpu {
                regs: kvm_regs::default(),
                sregs,
                set_sregs_calls: vec![],
            },
        )
    }

    fn call(h: &HypercallHandler, cpu: &mut FakeCpu, nr: u64, args: [u64; 4]) -> HypercallOutcome {
        cpu.regs.rdi = args[0];
        cpu.regs.rsi = args[1];
        cpu.regs.rdx = args[2];
        cpu.regs.r10 = args[3];
        h.handle(cpu, nr).unwrap()
    }

    #[test]
    fn kvm_mode_dispatch() {
        let (h, mut cpu) = setup();
        assert_eq!(
            call(&h, &mut cpu, hc::EXIT, [3, 0, 0, 0]),
            HypercallOutcome::Exit(3)
        );

        call(&h, &mut cpu, 99, [0; 4]);
        assert_eq!(cpu.regs.rax as i64, ENOSYS);

        call(&h, &mut cpu, hc::LOAD_CR3, [0x10_0000, 0, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.sregs.cr3, 0x10_0000);
        assert_eq!(cpu.set_sregs_calls.len(), 1);

        // Same CR3 again: flushed by toggling PGE, CR4 restored.
        call(&h, &mut cpu, hc::LOAD_CR3, [0x10_0000, 0, 0, 0]);
        assert_eq!(cpu.set_sregs_calls.len(), 3);
        assert_eq!(cpu.set_sregs_calls[1].cr4 & CR4_PGE, 0);
        assert_eq!(cpu.sregs.cr4, CR4_BOOT);

        call(&h, &mut cpu, hc::RESOLVE_PF, [0x5000, 6, 0x20_0000, 0]);
        assert_eq!(cpu.regs.rax, abi::PF_GUEST_FAULT);
        assert_eq!(cpu.regs.rdx, 6);

        call(&h, &mut cpu, hc::HOST_OP, [abi::HOST_OP_PING, 0x5eed, 0, 0]);
        assert_eq!(cpu.regs.rax, 0x5eed);

        call(&h, &mut cpu, hc::BALLOON, [0x40_0000, 4, 0, 0]);
        assert_eq!(cpu.regs.rax, 4);
        call(&h, &mut cpu, hc::BALLOON, [0x40_0000, 1 << 40, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);

        // SET_PAGING: get-modify-set of CR0.WP and EFER.NXE only.
        cpu.sregs.cr0 = CR0_BOOT;
        cpu.sregs.efer = EFER_BOOT;
        let calls = cpu.set_sregs_calls.len();
        call(&h, &mut cpu, hc::SET_PAGING, [abi::SET_PAGING_NX, 0, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.sregs.cr0, CR0_BOOT & !CR0_WP);
        assert_eq!(cpu.sregs.efer, EFER_BOOT);
        call(&h, &mut cpu, hc::SET_PAGING, [0, 0, 0, 0]);
        assert_eq!(cpu.sregs.efer, EFER_BOOT & !EFER_NXE);
        assert_eq!(cpu.sregs.cr4, CR4_BOOT);
        let both = abi::SET_PAGING_WP | abi::SET_PAGING_NX;
        call(&h, &mut cpu, hc::SET_PAGING, [both, 0, 0, 0]);
        assert_eq!(cpu.sregs.cr0, CR0_BOOT);
        assert_eq!(cpu.sregs.efer, EFER_BOOT);
        assert_eq!(cpu.set_sregs_calls.len(), calls + 3);
        // Unchanged: no SET_SREGS; bad flags: EINVAL, nothing touched.
        call(&h, &mut cpu, hc::SET_PAGING, [both, 0, 0, 0]);
        call(&h, &mut cpu, hc::SET_PAGING, [both | 4, 0, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);
        assert_eq!(cpu.set_sregs_calls.len(), calls + 3);

        call(&h, &mut cpu, hc::PRINT, [0x20_0000, 3, 0, 0]);
        assert_eq!(cpu.regs.rax, 3);
        assert_eq!(
            KvmPaging::new(Arc::new(GuestRam::new(MEM).unwrap()))
                .host_op(&mut cpu, 1, 0, 0)
                .unwrap(),
            EOPNOTSUPP
        );
    }
}
