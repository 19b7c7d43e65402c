//! The VMM's side of every vCPU exit: the port-I/O bus (UART, exit port,
//! hypercall port), the hypercalls, and the requests kicked vCPUs handle;
//! and what stops a running VM on the VMM's side.

use super::devices::bus::{DeviceError, PioBus};
use super::host::ops::HostOpFailed;
use super::hypercall::{HypercallError, HypercallHandler};
use super::kvm::cpu::CpuAccess;
use super::kvm::exit::{HypercallExit, IoAction, VcpuError, VcpuExits};
use super::kvm::kick::VcpuRequest;
use super::paging::PagingError;

/// The VMM could not handle a vCPU's exit.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// A device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A hypercall could not be completed.
    #[error(transparent)]
    Hypercall(#[from] HypercallError),
    /// A kicked request (a shootdown's follow-up) failed.
    #[error(transparent)]
    Request(#[from] PagingError),
}

/// Why the VMM stopped a running VM (`Outcome::VmmError`).
#[derive(Debug, thiserror::Error)]
pub enum VmmFailure {
    /// A vCPU thread could not go on.
    #[error(transparent)]
    Vcpu(#[from] VcpuError<ExitError>),
    /// A vCPU thread panicked.
    #[error("vCPU {0} thread panicked")]
    VcpuPanicked(u32),
    /// A `--host-ops` timed operation failed.
    #[error(transparent)]
    HostOp(#[from] HostOpFailed),
    /// The shadow MMU met an error it could not return (a host TLB flush
    /// the host refused, a zap inside a notifier callback): a translation
    /// may be stale, so the VM stops (fail-stop, never stale).
    #[error("fail-stop: {0}")]
    ShadowMmu(crate::mmu::MmuError),
    /// A host TLB flush outside the shadow MMU (kswapd's batched aging
    /// flush) failed.
    #[error("fail-stop: {0}")]
    HostFlush(crate::mmu::TlbFlushError),
}

/// The devices and the hypercalls of one VM.
pub struct VmmExits {
    bus: PioBus,
    hypercalls: HypercallHandler,
    /// kvm mode: the switcher's read-only memslot, `[start, end)` in KVM
    /// gpas. A write there (a ring-1 write with CR0.WP=0) is dropped, as
    /// by ROM.
    rom: Option<std::ops::Range<u64>>,
}

impl VmmExits {
    /// Exits go to `bus` and `hypercalls`; writes to `rom` are dropped.
    pub fn new(
        bus: PioBus,
        hypercalls: HypercallHandler,
        rom: Option<std::ops::Range<u64>>,
    ) -> Self {
        VmmExits {
            bus,
            hypercalls,
            rom,
        }
    }
}

impl VcpuExits for VmmExits {
    type Error = ExitError;
    type Failure = VmmFailure;

    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> Result<IoAction, ExitError> {
        Ok(self.bus.write(vcpu, port, data)?)
    }

    fn io_in(&self, port: u16, data: &mut [u8]) -> bool {
        self.bus.read(port, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let end = addr.saturating_add(data.len() as u64);
        self.rom
            .as_ref()
            .is_some_and(|r| r.start <= addr && end <= r.end)
    }

    fn hypercall(&self, cpu: &mut dyn CpuAccess, nr: u64) -> Result<HypercallExit, ExitError> {
        Ok(self.hypercalls.handle(cpu, nr)?)
    }

    /// kvm mode: nothing to do, KVM keeps its translations coherent with the
    /// guest's tables and being out of guest mode is all a shootdown needs;
    /// shadow mode: put back the pages exception delivery needs.
    fn handle_requests(
        &self,
        cpu: &mut dyn CpuAccess,
        requests: VcpuRequest,
    ) -> Result<(), ExitError> {
        Ok(self.hypercalls.paging().handle_requests(cpu, requests)?)
    }
}
