//! The errors `vmm::run` returns before a guest runs: bad configuration,
//! bad images, no KVM. Failures of a running guest are not errors but
//! outcomes (`run::Outcome`), so that statistics still come back with them.

use std::path::PathBuf;

use super::boot::BootError;
use super::config::ConfigError;
use super::kick::KickError;
use super::loader::LoaderError;
use super::memory::MemoryError;
use super::serial::SerialError;
use super::vm::VmError;

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--machine-mem` cannot even hold the boot structures.
    #[error("--machine-mem {size} is too small to boot the guest: {reason}")]
    MachineMemTooSmall {
        /// The machine memory size.
        size: String,
        /// What ran out.
        reason: String,
    },
    /// The shadow MMU could not be set up.
    #[error("cannot set up shadow paging: {0}")]
    ShadowSetup(String),
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
        source: std::io::Error,
    },
    /// The image is not a usable guest.
    #[error("{image}: {source}")]
    Image {
        /// Guest name or path.
        image: String,
        /// Why.
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
    HostOps(#[from] super::hostops::HostOpsError),
    /// The console could not be set up.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    Thread {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        source: std::io::Error,
    },
    /// A host-side memory thread (ksmd, kswapd) could not be started.
    #[error("cannot start the {name} thread: {source}")]
    HostThread {
        /// The thread's name.
        name: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Marking guest RAM for a host-side memory thread failed.
    #[error("cannot set up {name} on guest RAM: {source}")]
    HostMm {
        /// The thread's name.
        name: &'static str,
        /// Why.
        source: crate::mm::MmError,
    },
}
