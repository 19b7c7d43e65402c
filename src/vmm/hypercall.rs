//! Hypercalls: decoding and validation (pure), dispatch, and the paging
//! operations behind a trait so that shadow mode can plug in its own.
//!
//! ABI (docs/guest-abi.md): `outl %eax, $0xf5` with the number in `eax`,
//! arguments in `rdi, rsi, rdx, r10`; the result goes to `rax` (and `rdx`
//! for RESOLVE_PF). Bad arguments return a negative errno; nothing a guest
//! passes can make the VMM fail.

use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs};
use parking_lot::Mutex;
use vmm_sys_util::errno;

use super::abi::{self, PAGE_SIZE, hc};
use super::boot::{CR0_WP, CR4_PGE, EFER_NXE, pte};
use super::config::Paging;
use super::kick::VcpuRequest;
use super::memory::{GuestMemWriter, GuestRam, check_range};
use super::serial::{SerialDevice, SerialError};
use crate::trace::{Event, PfOutcome};

/// Errors that stop the VM while handling a hypercall (never the guest's
/// arguments: those become errno results).
#[derive(Debug, thiserror::Error)]
pub enum HypercallError {
    /// A vCPU ioctl failed.
    #[error("{op} failed during a hypercall: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: errno::Error,
    },
    /// Writing the console failed.
    #[error(transparent)]
    Console(#[from] SerialError),
    /// A host memory operation failed.
    #[error(transparent)]
    Memory(#[from] super::memory::MemoryError),
    /// Machine memory ran out (shadow mode): no frame for guest RAM or for a
    /// shadow page table.
    #[error(
        "out of machine memory: all {frames} frames ({size}) of --machine-mem are in use by guest RAM \
         and shadow page tables; give the VM more with --machine-mem"
    )]
    OutOfMachineMemory {
        /// Frames of machine memory.
        frames: u64,
        /// Its size, as `--machine-mem` spells it.
        size: String,
    },
    /// The shadow MMU failed (shadow mode).
    #[error("shadow MMU: {0}")]
    Mmu(#[from] crate::mmu::MmuError),
}

/// Register access to the calling vCPU; the vCPU thread implements it over
/// its `VcpuFd`, tests over a plain struct.
pub trait CpuAccess {
    /// The vCPU's index.
    fn id(&self) -> u32;
    /// KVM_GET_REGS.
    fn regs(&mut self) -> Result<kvm_regs, HypercallError>;
    /// KVM_SET_REGS.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), HypercallError>;
    /// KVM_GET_SREGS.
    fn sregs(&mut self) -> Result<kvm_sregs, HypercallError>;
    /// KVM_SET_SREGS.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), HypercallError>;
}

/// A decoded, validated hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// NOP.
    Nop,
    /// PRINT.
    Print {
        /// Buffer.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// EXIT.
    Exit {
        /// Exit code.
        code: u8,
    },
    /// LOAD_CR3.
    LoadCr3 {
        /// New CR3.
        cr3: u64,
    },
    /// INVLPG.
    Invlpg {
        /// Address.
        gva: u64,
    },
    /// FLUSH_TLB.
    FlushTlb {
        /// Global entries too.
        global: bool,
    },
    /// RESOLVE_PF.
    ResolvePf {
        /// Faulting address.
        cr2: u64,
        /// Hardware error code.
        error_code: u64,
        /// Faulting instruction.
        rip: u64,
    },
    /// BALLOON.
    Balloon {
        /// First page.
        gpa: u64,
        /// Page count.
        nr_pages: u64,
    },
    /// HOST_OP.
    HostOp {
        /// Operation.
        op: u64,
        /// First argument.
        arg0: u64,
        /// Second argument.
        arg1: u64,
    },
    /// SET_PAGING.
    SetPaging {
        /// CR0.WP.
        wp: bool,
        /// EFER.NXE.
        nx: bool,
    },
}

/// Longest PRINT.
pub const PRINT_MAX: u64 = 4096;
/// #PF error-code bits a guest may pass (P, W, U, RSVD, I, PK, SS, SGX).
pub const PF_ERROR_CODE_MASK: u64 = 0xffff;
const CR3_FLAG_BITS: u64 = (1 << 3) | (1 << 4); // PWT, PCD

/// Whether `va` is canonical with 48-bit virtual addresses.
pub fn is_canonical(va: u64) -> bool {
    (((va << 16) as i64) >> 16) as u64 == va
}

/// The name of hypercall `nr` in stats.
pub fn hypercall_name(nr: u64) -> &'static str {
    match nr {
        hc::NOP => "nop",
        hc::PRINT => "print",
        hc::EXIT => "exit",
        hc::LOAD_CR3 => "load_cr3",
        hc::INVLPG => "invlpg",
        hc::FLUSH_TLB => "flush_tlb",
        hc::RESOLVE_PF => "resolve_pf",
        hc::BALLOON => "balloon",
        hc::HOST_OP => "host_op",
        hc::SET_PAGING => "set_paging",
        _ => "unknown",
    }
}

impl Hypercall {
    /// Decodes hypercall `nr` with `args` (`rdi, rsi, rdx, r10`) for a
    /// guest with `mem_size` bytes of RAM; `Err` is the errno to return.
    pub fn decode(nr: u64, args: [u64; 4], mem_size: u64) -> Result<Self, i64> {
        use abi::errno::{EFAULT, EINVAL, ENOSYS};
        let [a0, a1, a2, _a3] = args;
        Ok(match nr {
            hc::NOP => Hypercall::Nop,
            hc::PRINT => {
                if a1 > PRINT_MAX {
                    return Err(EINVAL);
                }
                check_range(a0, a1, mem_size).map_err(|_| EFAULT)?;
                Hypercall::Print { gpa: a0, len: a1 }
            }
            hc::EXIT => Hypercall::Exit { code: a0 as u8 },
            hc::LOAD_CR3 => {
                let root = a0 & pte::ADDR_MASK;
                if a0 & !(pte::ADDR_MASK | CR3_FLAG_BITS) != 0
                    || check_range(root, PAGE_SIZE, mem_size).is_err()
                {
                    return Err(EINVAL);
                }
                Hypercall::LoadCr3 { cr3: a0 }
            }
            hc::INVLPG => {
                if !is_canonical(a0) {
                    return Err(EINVAL);
                }
                Hypercall::Invlpg { gva: a0 }
            }
            hc::FLUSH_TLB => {
                if a0 & !abi::FLUSH_GLOBAL != 0 {
                    return Err(EINVAL);
                }
                Hypercall::FlushTlb {
                    global: a0 & abi::FLUSH_GLOBAL != 0,
                }
            }
            hc::RESOLVE_PF => {
                if a1 & !PF_ERROR_CODE_MASK != 0 {
                    return Err(EINVAL);
                }
                Hypercall::ResolvePf {
                    cr2: a0,
                    error_code: a1,
                    rip: a2,
                }
            }
            hc::BALLOON => {
                let len = a1.checked_mul(PAGE_SIZE).ok_or(EINVAL)?;
                if !a0.is_multiple_of(PAGE_SIZE)
                    || a1 == 0
                    || a0 < abi::IMAGE_MIN_GPA
                    || check_range(a0, len, mem_size).is_err()
                {
                    return Err(EINVAL);
                }
                Hypercall::Balloon {
                    gpa: a0,
                    nr_pages: a1,
                }
            }
            hc::HOST_OP => {
                if a0 > abi::HOST_OP_MAX
                    || (a0 == abi::HOST_OP_CHECKPOINT && a1 >= super::hostops::MAX_CHECKPOINT)
                {
                    return Err(EINVAL);
                }
                Hypercall::HostOp {
                    op: a0,
                    arg0: a1,
                    arg1: a2,
                }
            }
            hc::SET_PAGING => {
                if a0 & !(abi::SET_PAGING_WP | abi::SET_PAGING_NX) != 0 {
                    return Err(EINVAL);
                }
                Hypercall::SetPaging {
                    wp: a0 & abi::SET_PAGING_WP != 0,
                    nx: a0 & abi::SET_PAGING_NX != 0,
                }
            }
            _ => return Err(ENOSYS),
        })
    }
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

/// Counters of shadow mode, for `--stats`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ShadowStats {
    /// The shadow MMU's counters.
    pub mmu: crate::mmu::MmuStatsSnapshot,
    /// Host-side invalidations done for its flushes.
    pub host_invalidate: super::tlb::HostFlushSnapshot,
    /// Frames of machine memory.
    pub machine_frames: u64,
    /// Of which free at the end.
    pub machine_frames_free: u64,
    /// Shadow page-table pages at the end.
    pub shadow_pages: u64,
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
    ) -> Result<(), HypercallError> {
        Ok(())
    }
    /// LOAD_CR3 (validated).
    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> Result<i64, HypercallError>;
    /// INVLPG (validated).
    fn invlpg(&self, cpu: &mut dyn CpuAccess, gva: u64) -> Result<i64, HypercallError>;
    /// FLUSH_TLB.
    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, global: bool) -> Result<i64, HypercallError>;
    /// RESOLVE_PF.
    fn resolve_pf(
        &self,
        cpu: &mut dyn CpuAccess,
        cr2: u64,
        error_code: u64,
        rip: u64,
    ) -> Result<PfResolution, HypercallError>;
    /// BALLOON (validated): give the pages back to the host.
    fn balloon(
        &self,
        cpu: &mut dyn CpuAccess,
        gpa: u64,
        nr_pages: u64,
    ) -> Result<i64, HypercallError>;
    /// SET_PAGING (validated): the guest's CR0.WP and EFER.NXE.
    fn set_paging(
        &self,
        cpu: &mut dyn CpuAccess,
        wp: bool,
        nx: bool,
    ) -> Result<i64, HypercallError>;
    /// The shadow MMU's and the host flush's counters (shadow mode only).
    fn shadow_stats(&self) -> Option<ShadowStats> {
        None
    }
    /// HOST_OP operations other than PING.
    fn host_op(
        &self,
        cpu: &mut dyn CpuAccess,
        op: u64,
        arg0: u64,
        arg1: u64,
    ) -> Result<i64, HypercallError>;
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
    fn flush(cpu: &mut dyn CpuAccess, mut sregs: kvm_sregs) -> Result<(), HypercallError> {
        sregs.cr4 ^= CR4_PGE;
        cpu.set_sregs(&sregs)?;
        sregs.cr4 ^= CR4_PGE;
        cpu.set_sregs(&sregs)
    }
}

impl PagingOps for KvmPaging {
    fn mode(&self) -> Paging {
        Paging::Kvm
    }

    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> Result<i64, HypercallError> {
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

    fn invlpg(&self, cpu: &mut dyn CpuAccess, _gva: u64) -> Result<i64, HypercallError> {
        // No ioctl drops one translation; flushing more is always allowed.
        let sregs = cpu.sregs()?;
        Self::flush(cpu, sregs)?;
        Ok(0)
    }

    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, _global: bool) -> Result<i64, HypercallError> {
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
    ) -> Result<PfResolution, HypercallError> {
        // The hardware walked the guest's own tables: the fault is the guest's.
        Ok(PfResolution::GuestFault { error_code })
    }

    fn balloon(
        &self,
        _cpu: &mut dyn CpuAccess,
        gpa: u64,
        nr_pages: u64,
    ) -> Result<i64, HypercallError> {
        self.ram.discard(gpa, nr_pages * PAGE_SIZE)?;
        Ok(nr_pages as i64)
    }

    fn host_op(
        &self,
        _cpu: &mut dyn CpuAccess,
        _op: u64,
        _arg0: u64,
        _arg1: u64,
    ) -> Result<i64, HypercallError> {
        Ok(abi::errno::EOPNOTSUPP)
    }

    fn set_paging(
        &self,
        cpu: &mut dyn CpuAccess,
        wp: bool,
        nx: bool,
    ) -> Result<i64, HypercallError> {
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

/// What the vCPU loop does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// Resume the guest (results already in its registers).
    Resume,
    /// The guest asked to exit with this code.
    Exit(u8),
}

/// Guest RAM as the hypercalls read it: `GuestRam` in kvm mode, the host
/// mm's guest-RAM VMA in shadow mode.
pub type SharedGuestMem = Arc<dyn GuestMemWriter + Send + Sync>;

/// Decodes, validates and runs hypercalls for all vCPUs of a VM.
pub struct HypercallHandler {
    paging: Arc<dyn PagingOps>,
    ram: SharedGuestMem,
    console: Arc<Mutex<SerialDevice>>,
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
        console: Arc<Mutex<SerialDevice>>,
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
                self.console.lock().write_console(&buf)?;
                (len as i64, None)
            }
            Hypercall::LoadCr3 { cr3 } => (self.paging.load_cr3(cpu, cr3)?, None),
            Hypercall::Invlpg { gva } => (self.paging.invlpg(cpu, gva)?, None),
            Hypercall::FlushTlb { global } => (self.paging.flush_tlb(cpu, global)?, None),
            Hypercall::ResolvePf {
                cr2,
                error_code,
                rip,
            } => match self.paging.resolve_pf(cpu, cr2, error_code, rip)? {
                PfResolution::Retry => {
                    Event::ResolvePf {
                        gva: cr2,
                        error_code,
                        outcome: PfOutcome::Retry,
                    }
                    .emit();
                    (abi::PF_RETRY as i64, None)
                }
                PfResolution::GuestFault { error_code } => {
                    Event::ResolvePf {
                        gva: cr2,
                        error_code,
                        outcome: PfOutcome::GuestFault,
                    }
                    .emit();
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
    use crate::vmm::abi::errno::{EFAULT, EINVAL, ENOSYS, EOPNOTSUPP};
    use crate::vmm::stats::VmStats;
    use std::time::Instant;

    const MEM: u64 = 16 << 20;

    fn decode(nr: u64, a: &[u64]) -> Result<Hypercall, i64> {
        let mut args = [0u64; 4];
        args[..a.len()].copy_from_slice(a);
        Hypercall::decode(nr, args, MEM)
    }

    #[test]
    fn decode_validates_arguments() {
        assert_eq!(decode(hc::NOP, &[]), Ok(Hypercall::Nop));
        assert_eq!(decode(hc::MAX + 1, &[]), Err(ENOSYS));
        assert_eq!(decode(u64::MAX, &[]), Err(ENOSYS));

        assert_eq!(
            decode(hc::PRINT, &[0x20_0000, 5]),
            Ok(Hypercall::Print {
                gpa: 0x20_0000,
                len: 5
            })
        );
        assert_eq!(decode(hc::PRINT, &[0x20_0000, PRINT_MAX + 1]), Err(EINVAL));
        assert_eq!(decode(hc::PRINT, &[MEM - 2, 5]), Err(EFAULT));
        assert_eq!(decode(hc::PRINT, &[u64::MAX - 1, 5]), Err(EFAULT));

        assert_eq!(
            decode(hc::EXIT, &[0x1_0007]),
            Ok(Hypercall::Exit { code: 7 })
        );

        assert_eq!(
            decode(hc::LOAD_CR3, &[0x8000]),
            Ok(Hypercall::LoadCr3 { cr3: 0x8000 })
        );
        assert_eq!(
            decode(hc::LOAD_CR3, &[0x8018]),
            Ok(Hypercall::LoadCr3 { cr3: 0x8018 })
        );
        assert_eq!(decode(hc::LOAD_CR3, &[0x8001]), Err(EINVAL));
        assert_eq!(decode(hc::LOAD_CR3, &[MEM]), Err(EINVAL));
        assert_eq!(decode(hc::LOAD_CR3, &[1 << 60 | 0x8000]), Err(EINVAL));

        assert_eq!(
            decode(hc::INVLPG, &[0xffff_8000_0000_0000]),
            Ok(Hypercall::Invlpg {
                gva: 0xffff_8000_0000_0000
            })
        );
        assert_eq!(decode(hc::INVLPG, &[0x0000_8000_0000_0000]), Err(EINVAL));

        assert_eq!(
            decode(hc::FLUSH_TLB, &[0]),
            Ok(Hypercall::FlushTlb { global: false })
        );
        assert_eq!(
            decode(hc::FLUSH_TLB, &[1]),
            Ok(Hypercall::FlushTlb { global: true })
        );
        assert_eq!(decode(hc::FLUSH_TLB, &[2]), Err(EINVAL));

        assert_eq!(
            decode(hc::RESOLVE_PF, &[0x1234, 7, 0x20_0000]),
            Ok(Hypercall::ResolvePf {
                cr2: 0x1234,
                error_code: 7,
                rip: 0x20_0000
            })
        );
        assert_eq!(decode(hc::RESOLVE_PF, &[0x1234, 1 << 16]), Err(EINVAL));

        assert_eq!(
            decode(hc::BALLOON, &[0x40_0000, 2]),
            Ok(Hypercall::Balloon {
                gpa: 0x40_0000,
                nr_pages: 2
            })
        );
        assert_eq!(decode(hc::BALLOON, &[0x40_0001, 1]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x40_0000, 0]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x1000, 1]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[MEM - PAGE_SIZE, 2]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x40_0000, u64::MAX / 2]), Err(EINVAL));

        assert_eq!(
            decode(hc::HOST_OP, &[0, 9]),
            Ok(Hypercall::HostOp {
                op: 0,
                arg0: 9,
                arg1: 0
            })
        );
        assert_eq!(decode(hc::HOST_OP, &[abi::HOST_OP_MAX + 1]), Err(EINVAL));
        assert_eq!(
            decode(hc::HOST_OP, &[abi::HOST_OP_CHECKPOINT, 1 << 16]),
            Err(EINVAL)
        );
        assert!(decode(hc::HOST_OP, &[abi::HOST_OP_CHECKPOINT, (1 << 16) - 1]).is_ok());

        assert_eq!(
            decode(hc::SET_PAGING, &[0]),
            Ok(Hypercall::SetPaging {
                wp: false,
                nx: false
            })
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_WP | abi::SET_PAGING_NX]),
            Ok(Hypercall::SetPaging { wp: true, nx: true })
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_NX]),
            Ok(Hypercall::SetPaging {
                wp: false,
                nx: true
            })
        );
        for bad in [4, 1 << 63 | 3, u64::MAX, 1 << 11, 1 << 16] {
            assert_eq!(decode(hc::SET_PAGING, &[bad]), Err(EINVAL), "{bad:#x}");
        }
    }

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
        fn regs(&mut self) -> Result<kvm_regs, HypercallError> {
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), HypercallError> {
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&mut self) -> Result<kvm_sregs, HypercallError> {
            Ok(self.sregs)
        }
        fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), HypercallError> {
            self.sregs = *sregs;
            self.set_sregs_calls.push(*sregs);
            Ok(())
        }
    }

    fn setup() -> (HypercallHandler, FakeCpu) {
        let ram = Arc::new(GuestRam::new(MEM).unwrap());
        let stats = Arc::new(VmStats::new(Instant::now()));
        let console = Arc::new(Mutex::new(
            SerialDevice::new(Box::new(std::io::sink()), stats).unwrap(),
        ));
        let paging = Arc::new(KvmPaging::new(ram.clone()));
        let sregs = kvm_sregs {
            cr3: 0x8000,
            cr4: crate::vmm::boot::CR4_BOOT,
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
        assert_eq!(cpu.sregs.cr4, crate::vmm::boot::CR4_BOOT);

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
        cpu.sregs.cr0 = crate::vmm::boot::CR0_BOOT;
        cpu.sregs.efer = crate::vmm::boot::EFER_BOOT;
        let calls = cpu.set_sregs_calls.len();
        call(&h, &mut cpu, hc::SET_PAGING, [abi::SET_PAGING_NX, 0, 0, 0]);
        assert_eq!(cpu.regs.rax, 0);
        assert_eq!(cpu.sregs.cr0, crate::vmm::boot::CR0_BOOT & !CR0_WP);
        assert_eq!(cpu.sregs.efer, crate::vmm::boot::EFER_BOOT);
        call(&h, &mut cpu, hc::SET_PAGING, [0, 0, 0, 0]);
        assert_eq!(cpu.sregs.efer, crate::vmm::boot::EFER_BOOT & !EFER_NXE);
        assert_eq!(cpu.sregs.cr4, crate::vmm::boot::CR4_BOOT);
        let both = abi::SET_PAGING_WP | abi::SET_PAGING_NX;
        call(&h, &mut cpu, hc::SET_PAGING, [both, 0, 0, 0]);
        assert_eq!(cpu.sregs.cr0, crate::vmm::boot::CR0_BOOT);
        assert_eq!(cpu.sregs.efer, crate::vmm::boot::EFER_BOOT);
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
