//! The KVM objects (Firecracker's `vstate`): the VM and its memslot, guest
//! memory, vCPUs and their run loop, exits, kicks, the memslot bounce.
//! Nothing here knows the devices, the hypercalls or the paging modes: the
//! run loop hands every exit it does not handle itself to the VMM through
//! [`exit::VcpuExits`].

pub mod context;
pub mod cpu;
pub mod cpu_state;
pub mod exit;
pub mod failure;
pub mod kick;
pub mod memory;
pub mod memslot;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use context::{VmContext, VmStop};
pub use cpu::{CpuAccess, CpuError};
pub use exit::{IoAction, VcpuError, VcpuExits, VmExit};
pub use failure::{FailureKind, GuestFailure};
pub use kick::{KickError, VcpuKick, VcpuRequest};
pub use memory::{GuestMemWriter, GuestRam, MemoryError};
pub use memslot::{MemslotBounce, MemslotBouncer};
pub use stats::VmStats;
pub use vcpu::{Vcpu, VcpuReport};
pub use vm::{Vm, VmError};
