//! Exits: what KVM_RUN returned, translated once from kvm-ioctls'
//! `VcpuExit` into [`VmExit`] (cloud-hypervisor's pattern; exits we never
//! enable collapse into `Unexpected`), and [`VcpuExits`], the VMM's side of
//! them: the vCPU loop hands port I/O, hypercalls and kicked requests to it
//! and knows nothing of devices, hypercalls or paging.

use kvm_ioctls::VcpuExit;
use vmm_sys_util::errno;

use super::cpu::CpuAccess;
use super::kick::VcpuRequest;

/// What the vCPU loop does after the VMM handled an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Resume the guest.
    Resume,
    /// The guest asked to exit with this code.
    Exit(u8),
    /// A hypercall: the loop calls [`VcpuExits::hypercall`] with `nr` once
    /// the exit's data is released.
    Hypercall(u64),
    /// No device claims the port (or the access).
    Unclaimed,
}

/// What the vCPU loop does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallExit {
    /// Resume the guest (results already in its registers).
    Resume,
    /// The guest asked to exit with this code.
    Exit(u8),
    /// The vCPU halts for good (no interrupt can wake it).
    Halt,
}

/// The VMM's side of a vCPU's exits.
pub trait VcpuExits: Send + Sync {
    /// Why the VMM cannot go on with an exit.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Why the VMM stops a VM (`VmStop::VmmError`): at least a vCPU
    /// thread's failure.
    type Failure: From<VcpuError<Self::Error>> + Send + 'static;

    /// `out` of `data` to `port` by vCPU `vcpu`.
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> Result<IoAction, Self::Error>;
    /// `in` from `port`: fills `data`; false if no device claims it.
    fn io_in(&self, port: u16, data: &mut [u8]) -> bool;
    /// A write to unbacked guest-physical memory (or to a read-only
    /// memslot): true if the VMM takes it (the write is dropped and the
    /// guest resumes), false to fail the guest.
    fn mmio_write(&self, _addr: u64, _data: &[u8]) -> bool {
        false
    }
    /// Hypercall `nr` (the whole of `rax`) with the calling vCPU's
    /// registers.
    fn hypercall(&self, cpu: &mut dyn CpuAccess, nr: u64) -> Result<HypercallExit, Self::Error>;
    /// Requests other threads posted with a kick (minus STOP), before the
    /// vCPU enters the guest again.
    fn handle_requests(
        &self,
        cpu: &mut dyn CpuAccess,
        requests: VcpuRequest,
    ) -> Result<(), Self::Error>;
}

/// Errors of a vCPU thread that are the VMM's, not the guest's; `E` is
/// the VMM's exit handler's error ([`VcpuExits::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError<E: std::error::Error + 'static> {
    /// KVM_RUN failed.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: errno::Error,
    },
    /// The VMM could not handle an exit.
    #[error("vCPU {vcpu}: {source}")]
    Exit {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        #[source]
        source: E,
    },
}

/// The first (up to) 8 bytes of an I/O access, little-endian.
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Why KVM_RUN returned.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `out` to `port`; `data` holds `size * count` bytes (string I/O).
    IoOut {
        /// Port.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// `in` from `port`; fill `data` before the next KVM_RUN.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes to return.
        data: &'a mut [u8],
    },
    /// A read of unbacked guest-physical memory.
    MmioRead {
        /// gpa.
        addr: u64,
        /// Bytes to return.
        data: &'a mut [u8],
    },
    /// A write to unbacked guest-physical memory.
    MmioWrite {
        /// gpa.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// `hlt` with no in-kernel interrupt controller.
    Hlt,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM_EXIT_INTERNAL_ERROR; details are in `kvm_run.internal`.
    InternalError,
    /// KVM_EXIT_SYSTEM_EVENT (reset, shutdown, crash).
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// KVM_RUN returned EINTR (a kick) or KVM_EXIT_INTR.
    Interrupted,
    /// KVM_RUN returned EAGAIN: run again.
    Again,
    /// Any other exit (we enable none of them).
    Unexpected(&'static str),
}

impl<'a> VmExit<'a> {
    /// Translates KVM_RUN's result. `Err` only for real ioctl failures.
    pub fn from_run(result: Result<VcpuExit<'a>, errno::Error>) -> Result<Self, errno::Error> {
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => return Ok(VmExit::Interrupted),
            Err(e) if e.errno() == libc::EAGAIN => return Ok(VmExit::Again),
            Err(e) => return Err(e),
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::FailEntry(reason, cpu) => VmExit::FailEntry { reason, cpu },
            VcpuExit::InternalError => VmExit::InternalError,
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent { kind },
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::Unknown => VmExit::Unexpected("KVM_EXIT_UNKNOWN"),
            VcpuExit::Exception => VmExit::Unexpected("KVM_EXIT_EXCEPTION"),
            VcpuExit::Hypercall(_) => VmExit::Unexpected("KVM_EXIT_HYPERCALL"),
            VcpuExit::Debug(_) => VmExit::Unexpected("KVM_EXIT_DEBUG"),
            VcpuExit::IrqWindowOpen => VmExit::Unexpected("KVM_EXIT_IRQ_WINDOW_OPEN"),
            VcpuExit::Nmi => VmExit::Unexpected("KVM_EXIT_NMI"),
            VcpuExit::X86Rdmsr(_) => VmExit::Unexpected("KVM_EXIT_X86_RDMSR"),
            VcpuExit::X86Wrmsr(_) => VmExit::Unexpected("KVM_EXIT_X86_WRMSR"),
            VcpuExit::MemoryFault { .. } => VmExit::Unexpected("KVM_EXIT_MEMORY_FAULT"),
            _ => VmExit::Unexpected("an exit reason this VMM does not enable"),
        })
    }

    /// The exit's name in `--stats` (KVM's names, lower case).
    pub fn reason(&self) -> ExitReason {
        match self {
            VmExit::IoOut { .. } | VmExit::IoIn { .. } => ExitReason::Io,
            VmExit::MmioRead { .. } | VmExit::MmioWrite { .. } => ExitReason::Mmio,
            VmExit::Hlt => ExitReason::Hlt,
            VmExit::Shutdown => ExitReason::Shutdown,
            VmExit::FailEntry { .. } => ExitReason::FailEntry,
            VmExit::InternalError => ExitReason::InternalError,
            VmExit::SystemEvent { .. } => ExitReason::SystemEvent,
            VmExit::Interrupted => ExitReason::Intr,
            VmExit::Again => ExitReason::Again,
            VmExit::Unexpected(_) => ExitReason::Other,
        }
    }
}

/// Exit reasons counted by `--stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// KVM_EXIT_IO.
    Io,
    /// KVM_EXIT_MMIO.
    Mmio,
    /// KVM_EXIT_HLT.
    Hlt,
    /// KVM_EXIT_SHUTDOWN.
    Shutdown,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent,
    /// EINTR / KVM_EXIT_INTR (kicks).
    Intr,
    /// EAGAIN.
    Again,
    /// Anything else.
    Other,
}

impl ExitReason {
    /// All reasons, in `--stats` order.
    pub const ALL: [ExitReason; 10] = [
        ExitReason::Io,
        ExitReason::Mmio,
        ExitReason::Hlt,
        ExitReason::Intr,
        ExitReason::Again,
        ExitReason::Shutdown,
        ExitReason::FailEntry,
        ExitReason::InternalError,
        ExitReason::SystemEvent,
        ExitReason::Other,
    ];

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Io => "io",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::InternalError => "internal_error",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Intr => "intr",
            ExitReason::Again => "eagain",
            ExitReason::Other => "other",
        }
    }

    /// Index into counter arrays.
    pub fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(Self::ALL.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_translation() {
        assert!(matches!(
            VmExit::from_run(Err(errno::Error::new(libc::EINTR))),
            Ok(VmExit::Interrupted)
        ));
        assert!(matches!(
            VmExit::from_run(Err(errno::Error::new(libc::EAGAIN))),
            Ok(VmExit::Again)
        ));
        assert!(VmExit::from_run(Err(errno::Error::new(libc::EFAULT))).is_err());
        assert!(matches!(
            VmExit::from_run(Ok(VcpuExit::Shutdown)),
            Ok(VmExit::Shutdown)
        ));
        let data = [1u8, 2];
        let exit = VmExit::from_run(Ok(VcpuExit::IoOut(0x3f8, &data))).unwrap();
        assert_eq!(exit.reason(), ExitReason::Io);
    }

    #[test]
    fn le_values() {
        assert_eq!(le_value(&[1, 2]), 0x0201);
        assert_eq!(le_value(&[0xff; 16]), u64::MAX);
        assert_eq!(le_value(&[]), 0);
    }

    #[test]
    fn reason_indices_are_distinct() {
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
