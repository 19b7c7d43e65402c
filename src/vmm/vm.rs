//! The KVM VM: /dev/kvm, the VM fd, guest RAM as memslot 0, and vCPU
//! creation with CPUID, long-mode sregs and entry registers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::errno;

use super::boot;
use super::memory::{GuestMemWriter, GuestRam, MemoryError};

/// The KVM device; `SHADOWVM_KVM_DEVICE` overrides it (tests use that to
/// check the "no KVM" message).
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device does not exist.
    #[error(
        "{} does not exist: this machine has no KVM. Enable virtualization and load the kvm module \
         (modprobe kvm_intel or kvm_amd), or pass the device into the container or VM you run in",
        .0.display()
    )]
    NoKvm(PathBuf),
    /// No permission to open it.
    #[error(
        "permission denied opening {}: add your user to the kvm group \
         (sudo usermod -aG kvm $USER, then log in again) or run shadowvm as root",
        .0.display()
    )]
    KvmPermission(PathBuf),
    /// Opening it failed otherwise.
    #[error("cannot open {}: {source}", path.display())]
    OpenKvm {
        /// The device.
        path: PathBuf,
        /// Why.
        source: errno::Error,
    },
    /// Unexpected KVM API version.
    #[error("unsupported KVM API version {0} (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A VM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: errno::Error,
    },
    /// A vCPU ioctl failed during setup.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    VcpuSetup {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: errno::Error,
    },
    /// Guest RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// An open VM with its RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    cpuid: CpuId,
}

impl Vm {
    /// Opens KVM and creates a VM with `mem_size` bytes of RAM at gpa 0.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let path = std::env::var_os("SHADOWVM_KVM_DEVICE")
            .map_or_else(|| PathBuf::from(KVM_DEVICE), PathBuf::from);
        let kvm = open_kvm(&path)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?;
        let ram = Arc::new(GuestRam::new(mem_size)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base() as u64,
        };
        // SAFETY: the region describes `ram`'s own anonymous mapping, which
        // lives in an `Arc` held by this `Vm` (and by everyone who can run
        // its vCPUs), so it outlives the VM fd that references it.
        unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(Vm {
            kvm,
            fd,
            ram,
            cpuid,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Most vCPUs KVM recommends.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates vCPU `id` of `nr_vcpus` and puts it at `entry` in long mode
    /// with `cr3`: CPUID first, then get-modify-set sregs, then regs.
    pub fn create_vcpu(
        &self,
        id: u32,
        nr_vcpus: u32,
        entry: u64,
        cr3: u64,
    ) -> Result<VcpuFd, VmError> {
        let setup = |op| {
            move |source| VmError::VcpuSetup {
                vcpu: id,
                op,
                source,
            }
        };
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(setup("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id.
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        let mut sregs = boot::vcpu_sregs(
            vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?,
            id,
            nr_vcpus,
        );
        sregs.cr3 = cr3;
        vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot::vcpu_regs(entry, id))
            .map_err(setup("KVM_SET_REGS"))?;
        Ok(vcpu)
    }
}

fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    use std::os::unix::ffi::OsStrExt as _;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| open_error(path, errno::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(&cpath).map_err(|source| open_error(path, source))
}

/// Turns a failed open of the KVM device into advice.
fn open_error(path: &Path, source: errno::Error) -> VmError {
    match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm(path.to_path_buf()),
        libc::EACCES | libc::EPERM => VmError::KvmPermission(path.to_path_buf()),
        _ => VmError::OpenKvm {
            path: path.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_say_what_to_do() {
        let p = Path::new("/dev/kvm");
        let msg = open_error(p, errno::Error::new(libc::EACCES)).to_string();
        assert!(
            msg.starts_with("permission denied opening /dev/kvm: add your user to the kvm group"),
            "{msg}"
        );
        let msg = open_error(p, errno::Error::new(libc::ENOENT)).to_string();
        assert!(
            msg.starts_with("/dev/kvm does not exist: this machine has no KVM"),
            "{msg}"
        );
        let msg = open_error(p, errno::Error::new(libc::EBUSY)).to_string();
        assert!(msg.starts_with("cannot open /dev/kvm: "), "{msg}");
    }
}
