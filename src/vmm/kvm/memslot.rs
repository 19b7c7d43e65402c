//! The bulk TLB shootdown: delete and re-add the machine-memory memslot
//! with every vCPU kicked out of KVM_RUN and held out until it is back.
//! KVM drops every translation it built from the slot
//! (`kvm_arch_flush_shadow_memslot`) and flushes every vCPU's TLB.

use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use parking_lot::{RwLock, RwLockReadGuard};
use vmm_sys_util::errno;

use super::kick::{VcpuKick, VcpuRequest};
use crate::mm::MachineMemory;
use crate::vmm::abi::PAGE_SIZE;

/// Deletes and re-adds memslot 0. The caller must keep every vCPU out of
/// KVM_RUN while it runs (no memslot: a vCPU would see MMIO).
pub struct MemslotBouncer {
    fd: Arc<VmFd>,
    machine: Arc<dyn MachineMemory>,
}

impl MemslotBouncer {
    /// A bouncer for `machine`, registered as memslot 0 of `fd`.
    pub fn new(fd: Arc<VmFd>, machine: Arc<dyn MachineMemory>) -> Self {
        MemslotBouncer { fd, machine }
    }

    /// Delete + re-add.
    pub fn bounce(&self) -> Result<(), errno::Error> {
        let mut region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: self.machine.host_base() as u64,
        };
        // SAFETY: a zero size deletes slot 0; nothing in guest memory is
        // touched, and no vCPU runs (the caller's contract).
        unsafe { self.fd.set_user_memory_region(region) }?;
        region.memory_size = self.machine.nr_frames() * PAGE_SIZE;
        // SAFETY: the same region as at creation: machine memory, kept
        // alive by `self.machine` (and by the `Vm`), outlives the VM fd.
        unsafe { self.fd.set_user_memory_region(region) }
    }
}

/// The gate that keeps vCPUs out of the guest during a bounce.
///
/// vCPU threads hold [`MemslotBounce::enter`]'s read guard from just before
/// they publish "in guest mode" until KVM_RUN returns; the bouncer posts a
/// request to every vCPU and kicks it (signal + `immediate_exit`), then
/// takes the write side, which it gets once no vCPU is in or entering
/// KVM_RUN, and no vCPU can enter until it is done.
#[derive(Default)]
pub struct MemslotBounce {
    gate: RwLock<()>,
    kicks: OnceLock<Vec<Arc<VcpuKick>>>,
    bouncer: OnceLock<MemslotBouncer>,
}

impl MemslotBounce {
    /// Not usable until [`MemslotBounce::attach`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Gives it the memslot and the vCPUs, once the VM exists. A second
    /// call changes nothing (the VM has one memslot and one set of vCPUs).
    pub fn attach(&self, bouncer: MemslotBouncer, kicks: Vec<Arc<VcpuKick>>) {
        self.bouncer.get_or_init(|| bouncer);
        self.kicks.get_or_init(|| kicks);
    }

    /// vCPU side: hold the guard across entering and running the guest.
    pub fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read()
    }

    /// Returns once no vCPU is in or entering KVM_RUN. With a STOP posted
    /// to every vCPU first, none enters again: the fail-stop of a flush
    /// that could not be done.
    pub fn wait_all_out(&self) {
        drop(self.gate.write());
    }

    /// Bounces the memslot with every vCPU out of the guest. `false` if it
    /// is not attached or KVM refused (the caller falls back).
    pub fn bounce(&self) -> bool {
        let (Some(bouncer), Some(kicks)) = (self.bouncer.get(), self.kicks.get()) else {
            return false;
        };
        // A vCPU between taking the guard and publishing guest mode sees the
        // request and does not enter; one in KVM_RUN is signalled out.
        for k in kicks {
            if let Err(e) = k.kick(VcpuRequest::TLB_FLUSH) {
                tracing::error!("memslot bounce: {e}");
                return false;
            }
        }
        let _all_out = self.gate.write();
        match bouncer.bounce() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("memslot bounce failed: {e}");
                false
            }
        }
    }
}
