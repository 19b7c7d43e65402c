//! Shadow mode (`--paging shadow`): the guest runs on shadow page tables
//! that the VMM builds with [`crate::mmu::ShadowMmu`]; the vCPU's CR3 is the
//! shadow root's frame, the guest's CR3 is only known to the MMU.
//!
//! * `machine.rs`: machine memory, the host mm, guest RAM, the host flush.
//! * `build.rs`: a VM built and booted through the host mm.
//! * `critical.rs`: the pages exception delivery needs, kept mapped.
//! * `ops.rs`: the paging hypercalls on the MMU ([`PagingOps`]); its
//!   flushes go to the real host mm (`host::tlb::HostTlbFlush`).
//! * `livelock.rs`: RESOLVE_PF never answers RETRY twice for a fault
//!   nothing changed.
//! * `exit.rs`: the teardown and its report; `check.rs`: `--check`;
//!   `stats.rs`: the counters.
//!
//! [`PagingOps`]: super::PagingOps

pub mod build;
mod check;
mod critical;
mod exit;
mod livelock;
pub mod machine;
mod ops;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mm::MachineMemory as _;
use crate::mmu::{
    Memslot, Memslots, MmuError, PagingState, ReservedSlot, ShadowMmu, ShadowMmuConfig,
};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::boot::loader::ImageLayout;
use crate::vmm::host::ops::HostOpScript;
use crate::vmm::host::ram::ShadowRam;
use crate::vmm::host::tlb::HostTlbFlush;
use crate::vmm::paging::PagingError;
use crate::vmm::switcher::Switcher;

pub use build::{BuildError, ShadowVm, TooSmall, build};
pub use check::CheckError;
pub use exit::ExitReport;
pub use machine::{ShadowMachine, default_machine_mem};
pub use stats::ShadowStats;

use critical::{CriticalPage, critical_pages};
use livelock::LastRetry;

pub use super::GuestCpu;

/// shadow mode's paging operations: the paging hypercalls drive the shadow
/// MMU.
pub struct ShadowPaging {
    mmu: ShadowMmu,
    ram: Arc<ShadowRam>,
    flush: Arc<HostTlbFlush>,
    nr_frames: u64,
    /// Per vCPU: the pages its exception delivery needs.
    critical: Vec<Vec<CriticalPage>>,
    /// Per vCPU: the real CR3 it boots with.
    boot_cr3: Vec<u64>,
    /// Zap counters (leaf sptes + shadow pages) when the critical pages were
    /// last known to be mapped in every vCPU's root.
    zaps_seen: AtomicU64,
    /// `--host-ops`: the script whose checkpoint ops HOST_OP CHECKPOINT runs.
    host_ops: Option<Arc<HostOpScript>>,
    /// The GDT, IDTs and TSSes, linked into every root (checked by
    /// `--check`).
    switcher: Arc<Switcher>,
    /// Per vCPU: the fault RESOLVE_PF last answered RETRY for.
    last_retry: Vec<parking_lot::Mutex<Option<LastRetry>>>,
}

impl ShadowPaging {
    /// Builds the shadow MMU for `machine`'s guest RAM, registers it on the
    /// host mm, loads every vCPU's boot CR3 (`guest_cr3`) and prefaults the
    /// pages exception delivery needs. `host_ops` is the `--host-ops`
    /// script, if any; `pte_prefetch` the guest PTEs prefetched around a
    /// fault.
    pub fn new(
        machine: &ShadowMachine,
        nr_vcpus: u32,
        guest_cr3: u64,
        image: &ImageLayout,
        cpu: GuestCpu,
        host_ops: Option<Arc<HostOpScript>>,
        pte_prefetch: usize,
    ) -> Result<Self, PagingError> {
        let mut slots = Memslots::default();
        slots.add(Memslot {
            base_gfn: 0,
            npages: machine.ram.size_bytes() / PAGE_SIZE,
            userspace_addr: machine.ram.base(),
        })?;
        let cfg = ShadowMmuConfig {
            nr_vcpus: nr_vcpus as usize,
            maxphyaddr: cpu.maxphyaddr,
            reserved: Some(ReservedSlot {
                index: abi::SWITCHER_PML4_INDEX,
                entry: machine.switcher.pml4e(),
            }),
            pte_prefetch,
            ..ShadowMmuConfig::default()
        };
        let mmu = ShadowMmu::new(machine.mm.clone(), slots, machine.flush.clone(), cfg)?;
        let nr_frames = machine.machine.nr_frames();
        let mut me = ShadowPaging {
            mmu,
            ram: machine.ram.clone(),
            flush: machine.flush.clone(),
            nr_frames,
            critical: (0..nr_vcpus).map(|c| critical_pages(c, image)).collect(),
            boot_cr3: Vec::new(),
            zaps_seen: AtomicU64::new(0),
            host_ops,
            switcher: machine.switcher.clone(),
            last_retry: (0..nr_vcpus)
                .map(|_| parking_lot::Mutex::new(None))
                .collect(),
        };
        for vcpu in 0..nr_vcpus as usize {
            let mut mode = PagingState::new(0, cpu.maxphyaddr);
            mode.gbpages = cpu.gbpages;
            mode.amd = cpu.amd;
            let root = me.enter_mode(vcpu, mode, guest_cr3)?;
            me.boot_cr3.push(root << 12);
        }
        me.zaps_seen
            .store(me.mmu.zap_generation(), Ordering::Release);
        for vcpu in 0..nr_vcpus as usize {
            me.prefault(vcpu, false)?;
        }
        Ok(me)
    }

    /// Puts `vcpu` in paging mode `mode` (`kvm_mmu_reset_context`: it
    /// leaves its root) and on the root for `cr3`; returns the root's frame.
    fn enter_mode(&self, vcpu: usize, mode: PagingState, cr3: u64) -> Result<u64, PagingError> {
        self.mmu
            .set_paging_mode(vcpu, mode)
            .map_err(|e| self.mmu_err(e))?;
        self.mmu.load_cr3(vcpu, cr3).map_err(|e| self.mmu_err(e))
    }

    /// The shadow MMU.
    pub fn mmu(&self) -> &ShadowMmu {
        &self.mmu
    }

    /// The host-side flush.
    pub fn host_flush(&self) -> &Arc<HostTlbFlush> {
        &self.flush
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<ShadowRam> {
        &self.ram
    }

    /// Turns an MMU error into the VMM's error; running out of frames gets
    /// its own clear message.
    fn mmu_err(&self, e: MmuError) -> PagingError {
        match e {
            MmuError::Memory(crate::mm::MmError::OutOfFrames) | MmuError::OutOfShadowPages => {
                PagingError::OutOfMachineMemory {
                    frames: self.nr_frames,
                }
            }
            e => PagingError::Mmu(e),
        }
    }
}
