//! Register access to a vCPU, for the code that runs on its behalf
//! (hypercalls, paging operations, kicked requests).

use kvm_bindings::{kvm_regs, kvm_sregs};
use vmm_sys_util::errno;

/// A register ioctl on a vCPU failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct CpuError {
    /// The ioctl.
    pub op: &'static str,
    /// Why.
    #[source]
    pub source: errno::Error,
}

/// Register access to the calling vCPU; the vCPU thread implements it over
/// its `VcpuFd` (`vcpu::FdCpu`), tests over a plain struct.
pub trait CpuAccess {
    /// The vCPU's index.
    fn id(&self) -> u32;
    /// KVM_GET_REGS.
    fn regs(&mut self) -> Result<kvm_regs, CpuError>;
    /// KVM_SET_REGS.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), CpuError>;
    /// KVM_GET_SREGS.
    fn sregs(&mut self) -> Result<kvm_sregs, CpuError>;
    /// KVM_SET_SREGS.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), CpuError>;
}
