//! The isa-debug-exit style port: an `out` of any size stops the VM with
//! the low byte of the value as the exit code.

use std::sync::Arc;

use super::bus::{DeviceError, PioDevice};
use crate::vmm::kvm::exit::IoAction;
use crate::vmm::kvm::stats::VmStats;

/// The exit port.
pub struct ExitPort {
    stats: Arc<VmStats>,
}

impl ExitPort {
    /// An exit port counting its exits in `stats`.
    pub fn new(stats: Arc<VmStats>) -> Self {
        ExitPort { stats }
    }
}

impl PioDevice for ExitPort {
    fn write(&self, _vcpu: u32, _offset: u16, data: &[u8]) -> Result<IoAction, DeviceError> {
        self.stats.io_exit_port();
        Ok(IoAction::Exit(data.first().copied().unwrap_or(0)))
    }
}
