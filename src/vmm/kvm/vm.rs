//! The KVM VM: /dev/kvm, the VM fd, guest RAM (kvm mode) or machine memory
//! (shadow mode) as memslot 0, the guest's CPUID, and vCPU creation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, kvm_regs,
    kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::errno;

use super::memory::{GuestMemWriter, GuestRam, MemoryError};
use super::memslot::MemslotBouncer;
use crate::mm::MachineMemory;
use crate::vmm::abi::PAGE_SIZE;

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

/// What KVM's memslot 0 is.
enum Backing {
    /// kvm mode: guest RAM itself.
    Ram(Arc<GuestRam>),
    /// shadow mode: machine memory (frames of the host mm and shadow pages).
    Machine(Arc<dyn MachineMemory>),
}

/// An open VM with its RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    backing: Backing,
    /// Read-only memslots (the switcher in kvm mode), kept alive as long
    /// as the VM fd that maps them.
    readonly: Vec<Arc<dyn MachineMemory>>,
    cpuid: CpuId,
}

impl Vm {
    /// Opens KVM and creates a VM with `mem_size` bytes of RAM at gpa 0.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        Ok(Self::new_ram(mem_size)?.0)
    }

    /// [`Vm::new`], also returning guest RAM.
    pub fn new_ram(mem_size: u64) -> Result<(Self, Arc<GuestRam>), VmError> {
        let ram = Arc::new(GuestRam::new(mem_size)?);
        let base = ram.host_base();
        let size = ram.size();
        Ok((
            Self::with_backing(Backing::Ram(ram.clone()), base, size)?,
            ram,
        ))
    }

    /// Opens KVM and creates a VM whose only memslot is `machine` at KVM
    /// gpa 0, so a frame number is a KVM guest-physical page number
    /// (shadow mode).
    pub fn new_machine(machine: Arc<dyn MachineMemory>) -> Result<Self, VmError> {
        let base = machine.host_base();
        let size = machine.nr_frames() * PAGE_SIZE;
        Self::with_backing(Backing::Machine(machine), base, size)
    }

    fn with_backing(backing: Backing, host_base: *mut u8, size: u64) -> Result<Self, VmError> {
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
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host_base as u64,
        };
        // SAFETY: the region describes the backing's own anonymous mapping
        // (guest RAM or machine memory), which lives in an `Arc` held by
        // this `Vm`, so it outlives the VM fd that references it.
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
            fd: Arc::new(fd),
            backing,
            readonly: Vec::new(),
            cpuid,
        })
    }

    /// Registers `mem` as read-only memslot `slot` at KVM gpa `gpa`: the
    /// guest reads it, and a write exits as KVM_EXIT_MMIO without changing
    /// it (`KVM_MEM_READONLY`).
    pub fn add_readonly_memory(
        &mut self,
        slot: u32,
        gpa: u64,
        mem: Arc<dyn MachineMemory>,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: gpa,
            memory_size: mem.nr_frames() * PAGE_SIZE,
            userspace_addr: mem.host_base() as u64,
        };
        // SAFETY: the region is `mem`'s own mapping, kept alive in
        // `self.readonly` as long as the VM fd that references it.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION (read-only)",
            source,
        })?;
        self.readonly.push(mem);
        Ok(())
    }

    /// Guest RAM (kvm mode; `None` in shadow mode, where guest RAM is a
    /// VMA of the host mm).
    pub fn ram(&self) -> Option<&Arc<GuestRam>> {
        match &self.backing {
            Backing::Ram(r) => Some(r),
            Backing::Machine(_) => None,
        }
    }

    /// A handle that deletes and re-adds memslot 0 (shadow mode's bulk TLB
    /// shootdown). `None` in kvm mode.
    pub fn memslot_bouncer(&self) -> Option<MemslotBouncer> {
        let m = self.machine()?;
        Some(MemslotBouncer::new(self.fd.clone(), m.clone()))
    }

    /// Machine memory (shadow mode; `None` in kvm mode).
    pub fn machine(&self) -> Option<&Arc<dyn MachineMemory>> {
        match &self.backing {
            Backing::Ram(_) => None,
            Backing::Machine(m) => Some(m),
        }
    }

    fn cpuid_entry(&self, function: u32) -> Option<kvm_bindings::kvm_cpuid_entry2> {
        self.cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .copied()
    }

    /// The guest's physical-address width (`CPUID.80000008H:EAX[7:0]`), as
    /// the shadow MMU's walker must use for reserved bits.
    pub fn maxphyaddr(&self) -> u8 {
        self.cpuid_entry(0x8000_0008)
            .map(|e| (e.eax & 0xff) as u8)
            .filter(|&w| (32..=52).contains(&w))
            .unwrap_or(36)
    }

    /// CPUID.80000001H:EDX.Page1GB.
    pub fn gbpages(&self) -> bool {
        self.cpuid_entry(0x8000_0001)
            .is_some_and(|e| e.edx & (1 << 26) != 0)
    }

    /// Whether the CPUID vendor is AMD or Hygon.
    pub fn is_amd(&self) -> bool {
        self.cpuid_entry(0).is_some_and(|e| {
            // "AuthenticAMD" / "HygonGenuine": ebx holds the first 4 bytes.
            e.ebx == u32::from_le_bytes(*b"Auth") || e.ebx == u32::from_le_bytes(*b"Hygo")
        })
    }

    /// Most vCPUs KVM recommends.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates vCPU `id`: CPUID first, then get-modify-set sregs (`sregs`
    /// gets what KVM_GET_SREGS returned and gives back what to set), then
    /// `regs`.
    pub fn create_vcpu(
        &self,
        id: u32,
        sregs: impl FnOnce(kvm_sregs) -> kvm_sregs,
        regs: &kvm_regs,
    ) -> Result<VcpuFd, VmError> {
        let setup = |op| {
            move |source| VmError::VcpuSetup {
                vcpu: id,
                op,
                source,
            }
        };
        let mut vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(setup("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id.
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                0xb | 0x1f => e.edx = id,
                // Hide KVM's paravirtual leaves: a kvm-clock, steal-time or
                // async-PF MSR names a KVM guest-physical address that KVM
                // writes to, which in shadow mode is any machine frame
                // (shadow tables included). With the leaves gone and
                // enforcement on, KVM refuses those MSRs (rule 5).
                0x4000_0000..=0x4000_00ff => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        let enforce = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = vcpu.enable_cap(&enforce) {
            tracing::warn!(%e, "KVM_CAP_ENFORCE_PV_FEATURE_CPUID not available");
        }
        let sregs = sregs(vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?);
        vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
        vcpu.set_regs(regs).map_err(setup("KVM_SET_REGS"))?;
        // Hypercalls then read and write the general registers in kvm_run
        // instead of two ioctls each (see `vcpu::FdCpu`).
        // With the special registers there too, a hypercall reads CS (the
        // caller's ring) and CR2 without an ioctl.
        let sync = self.kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs);
        if sync > 0 && (sync as u32) & KVM_SYNC_X86_REGS != 0 {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        if sync > 0 && (sync as u32) & KVM_SYNC_X86_SREGS != 0 {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
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
