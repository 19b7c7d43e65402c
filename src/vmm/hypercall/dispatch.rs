//! Running a decoded hypercall: PRINT and EXIT here, the trap table and the
//! stacks into the switcher, the paging ones through [`PagingOps`] (kvm or
//! shadow mode), results back into the vCPU's registers. Only ring 1 (the
//! guest kernel) may make hypercalls: ring 3 gets `EPERM`, and a hypercall
//! from ring 0, which ABI v2 makes unreachable, stops the VM.

use std::sync::Arc;

use vm_memory::ByteValued;

use super::decode::{Hypercall, Limits, validate_trap};
use crate::trace::PfOutcome;
use crate::vmm::abi::{self, TrapInfo};
use crate::vmm::devices::console::ConsoleError;
use crate::vmm::devices::serial::SerialDevice;
use crate::vmm::dma::{GuestDma, GuestDmaError};
use crate::vmm::kvm::cpu::{CpuAccess, CpuError};
use crate::vmm::kvm::exit::HypercallExit;
use crate::vmm::kvm::memory::{MemoryError, SharedGuestMem};
use crate::vmm::paging::{GuestPf, PagingError, PagingOps, PfResolution, Populated};
use crate::vmm::switcher::{Switcher, SwitcherError};

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
    /// Writing the switcher failed.
    #[error(transparent)]
    Switcher(#[from] SwitcherError),
    /// The DMA device failed (never a transfer the host refused: that is
    /// an errno for the guest).
    #[error(transparent)]
    Dma(#[from] GuestDmaError),
    /// The guest reached ring 0, which ABI v2 is built to make impossible
    /// (docs/design.md rule 5): the VM stops rather than run a guest that
    /// may bypass the shadow MMU.
    #[error(
        "the guest made a hypercall from ring 0 (CS {cs:#06x}, DPL {dpl}): its kernel must run \
         in ring 1, and nothing it may do should lead to ring 0"
    )]
    RingZero {
        /// CS selector.
        cs: u16,
        /// CS descriptor privilege level.
        dpl: u8,
    },
}

/// Decodes, validates and runs hypercalls for all vCPUs of a VM.
pub struct HypercallHandler {
    paging: Arc<dyn PagingOps>,
    ram: SharedGuestMem,
    console: Arc<SerialDevice>,
    switcher: Arc<Switcher>,
    limits: Limits,
    /// Shadow mode: the VM's DMA device (kvm mode: none, `EOPNOTSUPP`).
    dma: Option<Arc<GuestDma>>,
}

impl HypercallHandler {
    /// The paging implementation.
    pub fn paging(&self) -> &Arc<dyn PagingOps> {
        &self.paging
    }

    /// A handler whose paging hypercalls go to `paging`, and trap tables
    /// and stacks to `switcher`; arguments are checked against `limits`.
    pub fn new(
        paging: Arc<dyn PagingOps>,
        ram: SharedGuestMem,
        console: Arc<SerialDevice>,
        switcher: Arc<Switcher>,
        limits: Limits,
    ) -> Self {
        HypercallHandler {
            paging,
            ram,
            console,
            switcher,
            limits,
            dma: None,
        }
    }

    /// The same handler with the DMA hypercall going to `dma`.
    pub fn with_dma(mut self, dma: Option<Arc<GuestDma>>) -> Self {
        self.dma = dma;
        self
    }

    /// Handles hypercall `nr` (the whole of `rax`) for `cpu`: checks the
    /// caller's ring, reads its arguments, runs it, and writes the results
    /// back into its registers.
    pub fn handle(
        &self,
        cpu: &mut dyn CpuAccess,
        nr: u64,
    ) -> Result<HypercallExit, HypercallError> {
        let _slice = crate::trace::span::hypercall(nr, abi::hc::name(nr)).entered();
        let mut regs = cpu.regs()?;
        // Read from kvm_run's sync area: no ioctl.
        let sregs = cpu.sregs()?;
        let (cs, dpl) = (sregs.cs.selector, sregs.cs.dpl);
        if cs & 3 == 0 || dpl == 0 {
            return Err(HypercallError::RingZero { cs, dpl });
        }
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10];
        let decoded = if cs & 3 == 3 {
            // Xen's rule: guest user mode may not make hypercalls.
            Err(abi::errno::EPERM)
        } else {
            Hypercall::decode(nr, args, &self.limits, cpu.id())
        };
        let out = match decoded {
            Err(errno) => Results::rax(errno),
            Ok(Hypercall::Exit { code }) => return Ok(HypercallExit::Exit(code)),
            Ok(Hypercall::Halt) => return Ok(HypercallExit::Halt),
            Ok(Hypercall::ResolvePf { error_code, rflags }) => {
                let pf = GuestPf {
                    cr2: sregs.cr2,
                    error_code,
                    rflags,
                };
                self.resolve_pf(cpu, pf)?
            }
            Ok(Hypercall::Populate { gva, len }) => match self.paging.populate(cpu, gva, len)? {
                // rax: pages populated; rdx: pages skipped.
                Populated::Pages(r) => Results {
                    rax: r.mapped as i64,
                    rdx: Some(r.skipped),
                    rsi: None,
                },
                Populated::Errno(errno) => Results::rax(errno),
            },
            Ok(call) => Results::rax(self.execute(cpu, call)?),
        };
        regs.rax = out.rax as u64;
        if let Some(rdx) = out.rdx {
            regs.rdx = rdx;
        }
        if let Some(rsi) = out.rsi {
            regs.rsi = rsi;
        }
        cpu.set_regs(&regs)?;
        Ok(HypercallExit::Resume)
    }

    /// RESOLVE_PF for the fault at `cr2`: `rax` the answer, `rdx` the
    /// error code, `rsi` CR2 (which ring 1 cannot read itself).
    fn resolve_pf(&self, cpu: &mut dyn CpuAccess, pf: GuestPf) -> Result<Results, HypercallError> {
        let GuestPf {
            cr2, error_code, ..
        } = pf;
        let slice = crate::trace::span::resolve_pf(cr2, error_code);
        let _in = slice.enter();
        let (outcome, rax, rdx) = match self.paging.resolve_pf(cpu, pf)? {
            PfResolution::Retry => (PfOutcome::Retry, abi::PF_RETRY, error_code),
            PfResolution::GuestFault { error_code } => {
                (PfOutcome::GuestFault, abi::PF_GUEST_FAULT, error_code)
            }
        };
        crate::trace::span::record_outcome(&slice, outcome);
        crate::trace::emit!(ResolvePf {
            gva: cr2,
            error_code: rdx,
            outcome,
        });
        Ok(Results {
            rax: rax as i64,
            rdx: Some(rdx),
            rsi: Some(cr2),
        })
    }

    /// SET_TRAP_TABLE: every entry is checked before any gate is written.
    fn set_trap_table(&self, cpu: u32, gpa: u64, count: u64) -> Result<i64, HypercallError> {
        let mut table = vec![TrapInfo::default(); count as usize];
        for (i, t) in table.iter_mut().enumerate() {
            let at = gpa + i as u64 * std::mem::size_of::<TrapInfo>() as u64;
            self.ram.read_bytes(at, t.as_mut_slice())?;
        }
        let mut gates = Vec::with_capacity(table.len());
        for t in &table {
            match validate_trap(t, &self.limits) {
                Ok(gate) => gates.push((t.vector, gate)),
                Err(errno) => return Ok(errno),
            }
        }
        for (vector, gate) in gates {
            self.switcher.set_gate(cpu, vector, gate)?;
        }
        Ok(0)
    }

    fn execute(&self, cpu: &mut dyn CpuAccess, call: Hypercall) -> Result<i64, HypercallError> {
        Ok(match call {
            Hypercall::Nop => 0,
            Hypercall::Print { gpa, len } => {
                let mut buf = vec![0u8; len as usize];
                self.ram.read_bytes(gpa, &mut buf)?;
                self.console.write_console(&buf)?;
                len as i64
            }
            Hypercall::LoadCr3 { cr3 } => self.paging.load_cr3(cpu, cr3)?,
            Hypercall::Invlpg { gva } => self.paging.invlpg(cpu, gva)?,
            Hypercall::FlushTlb { global } => self.paging.flush_tlb(cpu, global)?,
            Hypercall::Balloon { gpa, nr_pages } => self.paging.balloon(cpu, gpa, nr_pages)?,
            Hypercall::HostOp {
                op: abi::HOST_OP_PING,
                arg0,
                ..
            } => arg0 as i64,
            Hypercall::HostOp { op, arg0, arg1 } => self.paging.host_op(cpu, op, arg0, arg1)?,
            Hypercall::SetPaging(mode) => self.paging.set_paging(cpu, mode)?,
            Hypercall::SetTrapTable { gpa, count } => self.set_trap_table(cpu.id(), gpa, count)?,
            Hypercall::SetStack { index, rsp } => {
                self.switcher.set_stack(cpu.id(), index, rsp)?;
                0
            }
            Hypercall::Dma(call) => call.run(self.dma.as_deref())?,
            // Handled by the caller.
            Hypercall::Exit { .. }
            | Hypercall::Halt
            | Hypercall::ResolvePf { .. }
            | Hypercall::Populate { .. } => 0,
        })
    }
}

/// A hypercall's results: `rax`, and `rdx`/`rsi` where it returns them.
struct Results {
    rax: i64,
    rdx: Option<u64>,
    rsi: Option<u64>,
}

impl Results {
    fn rax(rax: i64) -> Self {
        Results {
            rax,
            rdx: None,
            rsi: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{AnonMemory, FrameAccess};
    use crate::vmm::abi::errno::{EINVAL, ENOSYS, EOPNOTSUPP, EPERM};
    use crate::vmm::abi::{hc, percpu_gpa};
    use crate::vmm::boot::regs::{CR0_BOOT, CR4_BOOT, EFER_BOOT};
    use crate::vmm::hypercall::decode::tests::{LIMITS, MEM};
    use crate::vmm::kvm::memory::{GuestMemWriter, GuestRam};
    use crate::vmm::kvm::stats::VmStats;
    use crate::vmm::paging::{GuestCpu, KvmPaging};
    use crate::vmm::switcher::{self, descriptors::interrupt_gate};
    use crate::vmm::x86::{CR0_WP, CR4_PGE, CR4_SMAP, CR4_SMEP, EFER_NXE};
    use kvm_bindings::{kvm_regs, kvm_sregs};
    use std::time::Instant;

    const CPU: GuestCpu = GuestCpu {
        maxphyaddr: 40,
        gbpages: true,
        amd: false,
    };

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

    struct Setup {
        h: HypercallHandler,
        cpu: FakeCpu,
        ram: Arc<GuestRam>,
        mem: Arc<AnonMemory>,
    }

    fn setup() -> Setup {
        let ram = Arc::new(GuestRam::new(MEM).unwrap());
        let stats = Arc::new(VmStats::new(Instant::now()));
        let console = Arc::new(SerialDevice::new(Box::new(std::io::sink()), stats).unwrap());
        let paging = Arc::new(KvmPaging::new(ram.clone(), CPU));
        let mem = Arc::new(AnonMemory::new(switcher::pages(1)).unwrap());
        let sw = Arc::new(Switcher::new(mem.clone(), 0, MEM, 1).unwrap());
        let mut sregs = kvm_sregs {
            cr3: 0x8000,
            cr4: CR4_BOOT,
            cr2: 0xdead_b000,
            ..Default::default()
        };
        sregs.cs.selector = abi::KERNEL_CS;
        sregs.cs.dpl = 1;
        Setup {
            h: HypercallHandler::new(paging, ram.clone(), console, sw, LIMITS),
            cpu: FakeCpu {
                regs: kvm_regs::default(),
                sregs,
                set_sregs_calls: vec![],
            },
            ram,
            mem,
        }
    }

    fn call(h: &HypercallHandler, cpu: &mut FakeCpu, nr: u64, args: [u64; 4]) -> HypercallExit {
        cpu.regs.rdi = args[0];
        cpu.regs.rsi = args[1];
        cpu.regs.rdx = args[2];
        cpu.regs.r10 = args[3];
        h.handle(cpu, nr).unwrap()
    }

    #[test]
    fn kvm_mode_dispatch() {
        let Setup { h, mut cpu, .. } = setup();
        assert_eq!(
            call(&h, &mut cpu, hc::EXIT, [3, 0, 0, 0]),
            HypercallExit::Exit(3)
        );
        assert_eq!(call(&h, &mut cpu, hc::HALT, [0; 4]), HypercallExit::Halt);

        call(&h, &mut cpu, 99, [0; 4]);
        assert_eq!(cpu.regs.rax as i64, ENOSYS);
        call(&h, &mut cpu, 1 << 32 | hc::EXIT, [0; 4]);
        assert_eq!(cpu.regs.rax as i64, ENOSYS, "the number is all of rax");

        call(&h, &mut cpu, hc::LOAD_CR3, [0x10_0000, 0, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.sregs.cr3, 0x10_0000);
        assert_eq!(cpu.set_sregs_calls.len(), 1);

        // Same CR3 again: flushed by toggling PGE, CR4 restored.
        call(&h, &mut cpu, hc::LOAD_CR3, [0x10_0000, 0, 0, 0]);
        assert_eq!(cpu.set_sregs_calls.len(), 3);
        assert_eq!(cpu.set_sregs_calls[1].cr4 & CR4_PGE, 0);
        assert_eq!(cpu.sregs.cr4, CR4_BOOT);

        // RESOLVE_PF: CR2 comes from the vCPU and goes back in rsi.
        call(&h, &mut cpu, hc::RESOLVE_PF, [6, 0x202, 0x20_0000, 0]);
        assert_eq!(cpu.regs.rax, abi::PF_GUEST_FAULT);
        assert_eq!(cpu.regs.rdx, 6);
        assert_eq!(cpu.regs.rsi, 0xdead_b000);

        call(&h, &mut cpu, hc::HOST_OP, [abi::HOST_OP_PING, 0x5eed, 0, 0]);
        assert_eq!(cpu.regs.rax, 0x5eed);

        // DMA: bad values are EINVAL in every mode; kvm mode has no device.
        call(&h, &mut cpu, hc::DMA, [abi::DMA_ATTACH, 0x40_0000, 4096, 0]);
        assert_eq!(cpu.regs.rax as i64, EOPNOTSUPP);
        call(&h, &mut cpu, hc::DMA, [abi::DMA_ATTACH, 0x40_0001, 4096, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);
        call(&h, &mut cpu, hc::DMA, [abi::DMA_OP_MAX + 1, 0, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);

        call(&h, &mut cpu, hc::BALLOON, [0x40_0000, 4, 0, 0]);
        assert_eq!(cpu.regs.rax, 4);
        call(&h, &mut cpu, hc::BALLOON, [0x40_0000, 1 << 40, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);

        call(&h, &mut cpu, hc::PRINT, [0x20_0000, 3, 0, 0]);
        assert_eq!(cpu.regs.rax, 3);
        assert_eq!(
            KvmPaging::new(Arc::new(GuestRam::new(MEM).unwrap()), CPU)
                .host_op(&mut cpu, 1, 0, 0)
                .unwrap(),
            EOPNOTSUPP
        );
    }

    /// kvm mode's POPULATE walks the guest's tables in software (the
    /// shadow MMU's rule: accessed at every level, in RAM) and populates
    /// the host memory of what they map; rax and rdx count the pages.
    #[test]
    fn kvm_mode_populate_counts_the_accessed_mappings() {
        use crate::vmm::x86::pte::{A, D, P, PS, U, W};
        let Setup {
            h, mut cpu, ram, ..
        } = setup();
        let mut ram_w = &*ram;
        let table = P | W | U | A;
        // PML4 0x8000 -> PDPT 0x9000 -> PD 0xa000: 2 MiB at 4 MiB accessed
        // and dirty, 2 MiB at 6 MiB not accessed, a PT at 8 MiB mapping
        // one page of RAM and one beyond it.
        ram_w.write_u64(0x8000, 0x9000 | table).unwrap();
        ram_w.write_u64(0x9000, 0xa000 | table).unwrap();
        ram_w
            .write_u64(0xa000 + 8 * 2, 0x40_0000 | P | W | U | A | D | PS)
            .unwrap();
        ram_w
            .write_u64(0xa000 + 8 * 3, 0x60_0000 | P | W | U | PS)
            .unwrap();
        ram_w.write_u64(0xa000 + 8 * 4, 0xb000 | table).unwrap();
        ram_w.write_u64(0xb000, 0x30_0000 | P | W | A | D).unwrap();
        ram_w.write_u64(0xb008, MEM | P | W | A | D).unwrap();
        cpu.sregs.cr3 = 0x8000;
        let populate = |h: &HypercallHandler, cpu: &mut FakeCpu, gva: u64, len: u64| {
            call(h, cpu, hc::POPULATE, [gva, len, 0, 0]);
            (cpu.regs.rax as i64, cpu.regs.rdx)
        };
        assert_eq!(populate(&h, &mut cpu, 0x40_0000, 0x3000), (3, 0));
        assert_eq!(
            populate(&h, &mut cpu, 0x60_0000, 0x2000),
            (0, 2),
            "not accessed"
        );
        assert_eq!(
            populate(&h, &mut cpu, 0x80_0000, 0x3000),
            (1, 2),
            "beyond RAM, not present"
        );
        assert_eq!(populate(&h, &mut cpu, 0, MEM), (513, 4096 - 513));
        assert_eq!(populate(&h, &mut cpu, 1 << 39, 0x1000), (0, 1), "no PDPT");
        call(&h, &mut cpu, hc::POPULATE, [0x40_0000, 0x1000, 1, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL, "a flag");
        call(
            &h,
            &mut cpu,
            hc::POPULATE,
            [abi::SWITCHER_GVA, 0x1000, 0, 0],
        );
        assert_eq!(cpu.regs.rax as i64, EINVAL, "the switcher");
    }

    #[test]
    fn set_paging_sets_cr0_cr4_and_efer() {
        let Setup { h, mut cpu, .. } = setup();
        cpu.sregs.cr0 = CR0_BOOT;
        cpu.sregs.efer = EFER_BOOT;
        call(&h, &mut cpu, hc::SET_PAGING, [abi::SET_PAGING_NX, 0, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.sregs.cr0, CR0_BOOT & !CR0_WP);
        assert_eq!(cpu.sregs.efer, EFER_BOOT);
        call(&h, &mut cpu, hc::SET_PAGING, [0, 0, 0, 0]);
        assert_eq!(cpu.sregs.efer, EFER_BOOT & !EFER_NXE);
        assert_eq!(cpu.sregs.cr4, CR4_BOOT);
        let all = abi::SET_PAGING_ALL;
        call(&h, &mut cpu, hc::SET_PAGING, [all, 0, 0, 0]);
        assert_eq!(cpu.sregs.cr0, CR0_BOOT);
        assert_eq!(cpu.sregs.efer, EFER_BOOT);
        assert_eq!(cpu.sregs.cr4, CR4_BOOT | CR4_SMEP | CR4_SMAP);
        let calls = cpu.set_sregs_calls.len();
        // Unchanged: no SET_SREGS; bad flags: EINVAL, nothing touched.
        call(&h, &mut cpu, hc::SET_PAGING, [all, 0, 0, 0]);
        call(&h, &mut cpu, hc::SET_PAGING, [all | 16, 0, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);
        assert_eq!(cpu.set_sregs_calls.len(), calls);
    }

    #[test]
    fn trap_table_and_stacks_go_into_the_switcher() {
        let Setup {
            h,
            mut cpu,
            ram,
            mem,
        } = setup();
        let word = |off: u64| {
            let mut b = [0u8; 8];
            mem.read_frame(off / 4096, (off % 4096) as usize, &mut b)
                .unwrap();
            u64::from_le_bytes(b)
        };
        let idt = abi::switcher_idt(0) - abi::SWITCHER_GVA;
        let tss = abi::switcher_tss(0) - abi::SWITCHER_GVA;
        let table = [
            TrapInfo {
                handler: 0x20_1000,
                vector: 14,
                ist: 0,
                ..Default::default()
            },
            TrapInfo {
                handler: 0x20_1010,
                vector: 8,
                ist: 1,
                ..Default::default()
            },
        ];
        let mut ram_w = &*ram;
        for (i, t) in table.iter().enumerate() {
            ram_w
                .write_bytes(0x30_0000 + 16 * i as u64, t.as_slice())
                .unwrap();
        }
        call(&h, &mut cpu, hc::SET_TRAP_TABLE, [0x30_0000, 2, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(word(idt + 14 * 16), interrupt_gate(0x20_1000, 0)[0]);
        assert_eq!(word(idt + 8 * 16), interrupt_gate(0x20_1010, 1)[0]);

        // One bad entry (a handler outside the image): nothing written.
        let bad = TrapInfo {
            handler: 0x1000,
            vector: 6,
            ..Default::default()
        };
        ram_w.write_bytes(0x30_0010, bad.as_slice()).unwrap();
        call(&h, &mut cpu, hc::SET_TRAP_TABLE, [0x30_0000, 2, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EINVAL);
        assert_eq!(word(idt + 6 * 16), 0);

        call(
            &h,
            &mut cpu,
            hc::SET_STACK,
            [0, percpu_gpa(0) + 0x4000, 0, 0],
        );
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(word(tss + 4), percpu_gpa(0) + 0x4000, "RSP0");
        assert_eq!(word(tss + 12), percpu_gpa(0) + 0x4000, "RSP1");
        call(
            &h,
            &mut cpu,
            hc::SET_STACK,
            [0, percpu_gpa(1) + 0x4000, 0, 0],
        );
        assert_eq!(cpu.regs.rax as i64, EINVAL, "another vCPU's area");
    }

    #[test]
    fn only_ring_1_makes_hypercalls() {
        let Setup { h, mut cpu, .. } = setup();
        // Ring 3: EPERM, nothing done (not even EXIT).
        cpu.sregs.cs.selector = abi::USER_CS;
        cpu.sregs.cs.dpl = 3;
        assert_eq!(
            call(&h, &mut cpu, hc::EXIT, [3, 0, 0, 0]),
            HypercallExit::Resume
        );
        assert_eq!(cpu.regs.rax as i64, EPERM);
        call(&h, &mut cpu, hc::LOAD_CR3, [0x10_0000, 0, 0, 0]);
        assert_eq!(cpu.regs.rax as i64, EPERM);
        assert!(cpu.set_sregs_calls.is_empty());
        // Ring 0 (selector or descriptor): the VM stops.
        for (selector, dpl) in [(0x08, 1), (0x09, 0), (0x08, 0)] {
            cpu.sregs.cs.selector = selector;
            cpu.sregs.cs.dpl = dpl;
            let e = h.handle(&mut cpu, hc::NOP).unwrap_err();
            assert!(matches!(e, HypercallError::RingZero { .. }), "{e}");
        }
    }
}
