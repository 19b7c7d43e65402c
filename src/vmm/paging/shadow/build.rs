//! Building a shadow-mode VM: machine memory registered with KVM, the host
//! mm with guest RAM, the loaded image and the boot structures written
//! through the mm, the boot pages locked, and the shadow MMU with every
//! vCPU's boot root.

use std::sync::Arc;

use super::machine::{MachineError, ShadowMachine, default_machine_mem};
use super::{GuestCpu, ShadowPaging};
use crate::vmm::abi::{BootInfo, PAGE_SIZE};
use crate::vmm::boot::loader::ImageLayout;
use crate::vmm::boot::structures::{self, BootError, BootParams};
use crate::vmm::config::VmConfig;
use crate::vmm::host::ops::HostOpsError;
use crate::vmm::host::ram::ShadowRam;
use crate::vmm::kvm::kick::VcpuKick;
use crate::vmm::kvm::memory::{GuestMemWriter, MemoryError, SharedGuestMem};
use crate::vmm::kvm::memslot::MemslotBounce;
use crate::vmm::kvm::vm::{Vm, VmError};
use crate::vmm::paging::PagingError;
use crate::vmm::switcher::{self, Switcher, SwitcherError};
use crate::vmm::units::format_size;

/// Why a shadow-mode VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM or the VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Machine memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A `--host-ops` script touches the image.
    #[error(transparent)]
    HostOps(#[from] HostOpsError),
    /// `--machine-mem` cannot even hold the boot structures.
    #[error(
        "--machine-mem {} is too small to boot the guest: {source}",
        format_size(*.size)
    )]
    MachineMemTooSmall {
        /// The machine memory size in bytes.
        size: u64,
        /// What ran out.
        #[source]
        source: TooSmall,
    },
    /// The shadow MMU could not be set up.
    #[error("cannot set up shadow paging: {0}")]
    Setup(#[source] PagingError),
}

/// What ran out when machine memory was too small to boot.
#[derive(Debug, thiserror::Error)]
pub enum TooSmall {
    /// Writing the switcher.
    #[error(transparent)]
    Switcher(SwitcherError),
    /// Copying the image into guest RAM.
    #[error(transparent)]
    Image(MemoryError),
    /// Writing the boot structures.
    #[error(transparent)]
    Boot(BootError),
    /// Locking the pages exception delivery needs.
    #[error(transparent)]
    Lock(MemoryError),
    /// Building the boot roots.
    #[error(transparent)]
    Paging(PagingError),
}

/// A shadow-mode VM, built and booted, ready for its vCPUs.
pub struct ShadowVm {
    /// The KVM VM, machine memory as its memslot.
    pub vm: Vm,
    /// The paging hypercalls.
    pub paging: Arc<ShadowPaging>,
    /// Guest RAM, for the other hypercalls.
    pub ram: SharedGuestMem,
    /// The boot info written into guest RAM.
    pub boot_info: BootInfo,
    /// Where the image landed.
    pub layout: ImageLayout,
    /// The bulk-shootdown gate the vCPU threads must honour.
    pub bounce: Arc<MemslotBounce>,
    /// The GDT, IDTs and TSSes, in reserved frames of machine memory.
    pub switcher: Arc<Switcher>,
}

/// Builds a shadow-mode VM for `config` around the image loaded at
/// `layout` in `image` (linux-loader writes into a vm-memory region: the
/// caller loads into a scratch one, where untouched pages cost nothing,
/// and it is copied into guest RAM through the host mm). `kicks` are the
/// vCPUs' kick handles (for memslot bounces).
pub fn build(
    config: &VmConfig,
    image: &dyn GuestMemWriter,
    layout: ImageLayout,
    kicks: &[Arc<VcpuKick>],
) -> Result<ShadowVm, BuildError> {
    let machine_mem = config
        .machine_mem
        .unwrap_or_else(|| default_machine_mem(config.mem_size));
    let bounce = MemslotBounce::new();
    let too_small = |source| BuildError::MachineMemTooSmall {
        size: machine_mem,
        source,
    };
    let machine = match ShadowMachine::new(
        config.mem_size,
        machine_mem,
        config.vcpus,
        config.host_tlb_flush,
        Some(bounce.clone()),
    ) {
        Ok(m) => m,
        Err(MachineError::Memory(e)) => return Err(e.into()),
        Err(MachineError::Switcher(e)) => return Err(too_small(TooSmall::Switcher(e))),
    };
    #[cfg(feature = "test-hooks")]
    machine.flush.set_fault(config.flush_fault);
    machine.set_thp(config.host_thp)?;
    let vm = Vm::new_machine(machine.machine.clone())?;
    if let Some(b) = vm.memslot_bouncer() {
        bounce.attach(b, kicks.to_vec());
    }
    // Lock before anything is written: the locked ranges become VMAs of
    // their own before their first fault, so no large folio can hold both
    // a page exception delivery needs and one reclaim may split (a split
    // invalidates the whole folio, and a vCPU in ring 3 whose IDT or stack
    // is unmapped triple-faults).
    machine
        .lock_boot_pages(&layout)
        .map_err(|e| too_small(TooSmall::Lock(e)))?;
    copy_image(image, &machine.ram, &layout).map_err(|e| too_small(TooSmall::Image(e)))?;
    let params = BootParams {
        nr_vcpus: config.vcpus,
        paging_mode: config.paging.abi_mode(),
        cmdline: &config.cmdline,
        image: layout,
        // What the guest finds in its boot PML4 is what kvm mode maps there
        // (its switcher memslot just above RAM), so both modes boot on the
        // same bytes; in shadow mode the MMU ignores the guest's entry.
        switcher_pml4e: switcher::pml4e(config.mem_size, config.vcpus),
    };
    let boot_info = structures::write_boot_structures(&mut &*machine.ram, &params)
        .map_err(|e| too_small(TooSmall::Boot(e)))?;
    if let Some(script) = &config.host_ops {
        script.check_image(layout.start, layout.end)?;
    }
    let cpu = GuestCpu {
        maxphyaddr: vm.maxphyaddr(),
        gbpages: vm.gbpages(),
        amd: vm.is_amd(),
    };
    let paging = ShadowPaging::new(
        &machine,
        config.vcpus,
        boot_info.boot_cr3,
        &layout,
        cpu,
        config.host_ops.clone(),
        config.pte_prefetch,
    )
    .map_err(|e| match e {
        e @ PagingError::OutOfMachineMemory { .. } => too_small(TooSmall::Paging(e)),
        e => BuildError::Setup(e),
    })?;
    Ok(ShadowVm {
        vm,
        paging: Arc::new(paging),
        ram: machine.ram.clone(),
        boot_info,
        layout,
        bounce,
        switcher: machine.switcher.clone(),
    })
}

/// Copies the loaded image (`layout`, page-aligned outwards) from `from`
/// into guest RAM through the host mm, as a process writes its memory.
pub fn copy_image(
    from: &dyn GuestMemWriter,
    to: &ShadowRam,
    layout: &ImageLayout,
) -> Result<(), MemoryError> {
    const CHUNK: u64 = 64 << 10;
    let start = layout.start & !(PAGE_SIZE - 1);
    let end = layout.end.next_multiple_of(PAGE_SIZE);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut to = to;
    let mut gpa = start;
    while gpa < end {
        let n = CHUNK.min(end - gpa) as usize;
        from.read_bytes(gpa, &mut buf[..n])?;
        to.write_bytes(gpa, &buf[..n])?;
        gpa += n as u64;
    }
    Ok(())
}
