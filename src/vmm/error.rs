//! The errors `vmm::run` returns before a guest runs: bad configuration,
//! bad images, no KVM. Failures of a running guest are not errors but
//! outcomes (`run::Outcome`, with `exits::VmmFailure` when the VMM is at
//! fault), so that statistics still come back with them.

use std::path::PathBuf;

use super::boot::{BootError, LoaderError};
use super::config::ConfigError;
use super::devices::bus::BusOverlap;
use super::devices::serial::SerialError;
use super::host::ops::HostOpsError;
use super::host::thread::StartError;
use super::kvm::kick::KickError;
use super::kvm::memory::MemoryError;
use super::kvm::vm::VmError;
use super::paging::shadow::BuildError;
use super::switcher::SwitcherError;

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A shadow-mode VM could not be built.
    #[error(transparent)]
    Shadow(#[from] BuildError),
    /// The built-in guests were not compiled in.
    #[error("built-in guest `{name}` is not available: {reason}")]
    GuestsUnavailable {
        /// The guest asked for.
        name: String,
        /// Why there are none.
        reason: &'static str,
    },
    /// Neither a built-in guest nor a file.
    #[error("`{0}` is neither a built-in guest (see `shadowvm guests`) nor an existing file")]
    UnknownGuest(String),
    /// The image file could not be read.
    #[error("cannot read guest image {}: {source}", path.display())]
    ReadImage {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is not a usable guest.
    #[error("{image}: {source}")]
    Image {
        /// Guest name or path.
        image: String,
        /// Why.
        #[source]
        source: LoaderError,
    },
    /// KVM or the VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kick handler could not be installed.
    #[error(transparent)]
    Kick(#[from] KickError),
    /// A `--host-ops` script that cannot be used.
    #[error(transparent)]
    HostOps(#[from] HostOpsError),
    /// The console could not be set up.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Two devices claim the same port.
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    Thread {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The switcher could not be built.
    #[error(transparent)]
    Switcher(#[from] SwitcherError),
    /// kvm mode puts the switcher just above guest RAM, which must stay
    /// below the guest's physical-address width.
    #[error(
        "--mem {} leaves no room for the switcher below the guest's {maxphyaddr}-bit physical \
         address space: use less --mem",
        crate::vmm::units::format_size(*.mem_size)
    )]
    NoRoomForSwitcher {
        /// Bytes of guest RAM.
        mem_size: u64,
        /// CPUID's physical-address width.
        maxphyaddr: u8,
    },
    /// A host-side thread (ksmd, kswapd, the scripted operations) could
    /// not be started.
    #[error(transparent)]
    HostThread(#[from] StartError),
}
