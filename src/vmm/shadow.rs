//! Shadow mode (`--paging shadow`): the guest runs on shadow page tables
//! that the VMM builds with [`crate::mmu::ShadowMmu`].
//!
//! ```text
//! machine memory (AnonMemory) ══ KVM memslot 0 at KVM gpa 0: frame n = KVM page n
//!   └─ FrameAllocator ─┬─ host mm (Mm): guest RAM is one VMA, bound to gpa 0.. by our memslot
//!                      └─ shadow MMU: shadow page-table pages
//! vCPU CR3 = shadow root frame << 12; the guest's CR3 is only known to the MMU
//! ```
//!
//! * Boot: the ELF and the boot structures are written into guest RAM
//!   through the host mm ([`ShadowRam`], as a process writes its own
//!   memory); the VMM area (GDT, TSS, boot tables, per-vCPU stacks) and the
//!   image are `mlock`ed so reclaim, KSM and `MADV_DONTNEED` never take them.
//! * Exception delivery needs the GDT, IDT, TSS, stacks and handler code
//!   mapped before any exception: they are prefaulted into every vCPU's
//!   root at boot, after every CR3 load, and whenever sptes were zapped.
//! * The paging hypercalls go to the MMU ([`ShadowPaging`]); its flushes go
//!   to the real host mm ([`super::tlb::HostTlbFlush`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_sregs;

use super::abi::{self, BootInfo, PAGE_SIZE};
use super::boot::{self, BootParams, ImageLayout, percpu_gpa, tss_gpa};
use super::config::{Paging, VmConfig, format_size};
use super::error::VmmError;
use super::hypercall::{
    CpuAccess, HypercallError, PagingOps, PfResolution, ShadowStats, SharedGuestMem,
};
use super::kick::{VcpuKick, VcpuRequest};
use super::loader;
use super::memory::{GuestMemWriter, GuestRam, MemoryError, check_range};
use super::tlb::{HostTlbFlush, MemslotBounce};
use super::vm::Vm;
use crate::mm::{
    AnonMemory, FrameAllocator, FrameOwner, Hva, MachineMemory, Mm, MmError, MmapFlags, Prot,
};
use crate::mmu::{
    FaultOutcome, Memslot, Memslots, MmuError, PagingState, PfErrorCode, ShadowMmu, ShadowMmuConfig,
};

/// Machine memory beyond guest RAM by default: shadow pages and slack.
pub const DEFAULT_OVERHEAD: u64 = 4 << 20;

/// The default `--machine-mem` for `mem_size` bytes of guest RAM: all of
/// guest RAM, plus 1/16 of it and 4 MiB for shadow page tables, rounded up
/// to 2 MiB.
pub fn default_machine_mem(mem_size: u64) -> u64 {
    (mem_size + mem_size / 16 + DEFAULT_OVERHEAD).next_multiple_of(2 << 20)
}

/// Guest RAM seen through the host mm: gpa `g` is hva `base + g`.
pub struct ShadowRam {
    mm: Arc<Mm>,
    base: Hva,
    size: u64,
}

impl ShadowRam {
    /// The host mm.
    pub fn mm(&self) -> &Arc<Mm> {
        &self.mm
    }

    /// The hva of gpa 0.
    pub fn base(&self) -> Hva {
        self.base
    }

    /// Bytes of guest RAM.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    fn host_err(gpa: u64, len: u64) -> impl FnOnce(MmError) -> MemoryError {
        move |source| MemoryError::Host { gpa, len, source }
    }
}

impl GuestMemWriter for ShadowRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        (&*self).write_bytes(gpa, bytes)
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(gpa, buf.len() as u64, self.size)?;
        self.mm
            .read(self.base + gpa, buf)
            .map_err(Self::host_err(gpa, buf.len() as u64))
    }
}

/// Writing through a shared reference: the host mm serializes itself.
impl GuestMemWriter for &ShadowRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        check_range(gpa, bytes.len() as u64, self.size)?;
        self.mm
            .write(self.base + gpa, bytes)
            .map_err(ShadowRam::host_err(gpa, bytes.len() as u64))
    }

    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read_bytes(gpa, buf)
    }
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
}

/// Builds a shadow-mode VM for `config`: machine memory registered with
/// KVM, the host mm with guest RAM, the ELF and the boot structures written
/// through the mm, the boot pages locked, the shadow MMU with every vCPU's
/// boot root. `kicks` are the vCPUs' kick handles (for memslot bounces).
pub fn build(
    config: &VmConfig,
    image_name: &str,
    image: &[u8],
    kicks: &[Arc<VcpuKick>],
) -> Result<ShadowVm, VmmError> {
    let machine_mem = config
        .machine_mem
        .unwrap_or_else(|| default_machine_mem(config.mem_size));
    let bounce = MemslotBounce::new();
    let machine = ShadowMachine::new(
        config.mem_size,
        machine_mem,
        config.host_tlb_flush,
        Some(bounce.clone()),
    )?;
    let vm = Vm::new_machine(machine.machine.clone())?;
    if let Some(b) = vm.memslot_bouncer() {
        bounce.attach(b, kicks.to_vec());
    }
    let too_small = |e: &dyn std::fmt::Display| VmmError::MachineMemTooSmall {
        size: format_size(machine_mem),
        reason: e.to_string(),
    };
    // linux-loader writes into a vm-memory region: load into a scratch one
    // (untouched pages cost nothing) and copy the image into guest RAM
    // through the host mm.
    let scratch = GuestRam::new(config.mem_size)?;
    let layout = loader::load_elf(&scratch, image).map_err(|source| VmmError::Image {
        image: image_name.to_string(),
        source,
    })?;
    copy_image(&scratch, &machine.ram, &layout).map_err(|e| too_small(&e))?;
    drop(scratch);
    let params = BootParams {
        nr_vcpus: config.vcpus,
        paging_mode: config.paging.abi_mode(),
        cmdline: &config.cmdline,
        image: layout,
    };
    let boot_info =
        boot::write_boot_structures(&mut &*machine.ram, &params).map_err(|e| too_small(&e))?;
    machine
        .lock_boot_pages(&layout)
        .map_err(|e| too_small(&e))?;
    let cpu = GuestCpu {
        maxphyaddr: vm.maxphyaddr(),
        gbpages: vm.gbpages(),
        amd: vm.is_amd(),
    };
    let paging = ShadowPaging::new(&machine, config.vcpus, boot_info.boot_cr3, &layout, cpu)
        .map_err(|e| match e {
            e @ HypercallError::OutOfMachineMemory { .. } => too_small(&e),
            e => VmmError::ShadowSetup(e.to_string()),
        })?;
    Ok(ShadowVm {
        vm,
        paging: Arc::new(paging),
        ram: machine.ram.clone(),
        boot_info,
        layout,
        bounce,
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

/// Machine memory, the host mm over it, and guest RAM in that mm.
pub struct ShadowMachine {
    /// Machine memory (registered with KVM as memslot 0).
    pub machine: Arc<AnonMemory>,
    /// The simulated host mm of the VMM process.
    pub mm: Arc<Mm>,
    /// Guest RAM, a VMA of `mm`.
    pub ram: Arc<ShadowRam>,
    /// The flush the shadow MMU uses.
    pub flush: Arc<HostTlbFlush>,
}

impl ShadowMachine {
    /// `machine_mem` bytes of machine memory and a `mem_size`-byte guest
    /// RAM VMA in a fresh host mm (frames are allocated on first touch).
    /// With `bounce`, large flushes bounce the memslot instead.
    pub fn new(
        mem_size: u64,
        machine_mem: u64,
        host_flush: bool,
        bounce: Option<Arc<MemslotBounce>>,
    ) -> Result<Self, MemoryError> {
        let nr_frames = machine_mem / PAGE_SIZE;
        let machine = Arc::new(
            AnonMemory::new(nr_frames).map_err(|source| MemoryError::Host {
                gpa: 0,
                len: machine_mem,
                source,
            })?,
        );
        let mem: Arc<dyn MachineMemory> = machine.clone();
        let frames = FrameAllocator::with_reserved(mem, 0, true);
        let mm = Mm::new(frames);
        let base = mm
            .mmap(None, mem_size, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .map_err(|source| MemoryError::Host {
                gpa: 0,
                len: mem_size,
                source,
            })?;
        let flush = if host_flush {
            HostTlbFlush::new(machine.host_base(), nr_frames)
        } else {
            HostTlbFlush::disabled(machine.host_base(), nr_frames)
        };
        let flush = Arc::new(match bounce {
            Some(b) => flush.with_memslot_bounce(b),
            None => flush,
        });
        Ok(ShadowMachine {
            machine,
            ram: Arc::new(ShadowRam {
                mm: mm.clone(),
                base,
                size: mem_size,
            }),
            mm,
            flush,
        })
    }

    /// Locks the pages exception delivery needs (the VMM area below the
    /// image: GDT, boot info, TSSes, boot tables, per-vCPU stacks; and the
    /// image: IDT and handler code) so reclaim, KSM and `MADV_DONTNEED`
    /// never take them; `mlock` also faults them in.
    pub fn lock_boot_pages(&self, image: &ImageLayout) -> Result<(), MemoryError> {
        let base = self.ram.base;
        let lock = |gpa: u64, len: u64| {
            self.mm
                .mlock(base + gpa, len)
                .map_err(ShadowRam::host_err(gpa, len))
        };
        lock(0, abi::IMAGE_MIN_GPA)?;
        let start = image.start & !(PAGE_SIZE - 1);
        let end = image.end.next_multiple_of(PAGE_SIZE);
        if end > start {
            lock(start, end - start)?;
        }
        Ok(())
    }
}

/// One page exception delivery may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CriticalPage {
    gva: u64,
    /// Written during delivery (stacks), so prefaulted writable.
    write: bool,
}

/// The pages vCPU `cpu` needs mapped to take an exception: the GDT, the
/// boot info, its TSS, its per-vCPU area (per-vCPU page, IST, trap and
/// kernel stacks), and the image (IDT, stubs at 0x201000, handler code).
/// All identity-mapped by the boot tables (docs/guest-abi.md §3).
fn critical_pages(cpu: u32, image: &ImageLayout) -> Vec<CriticalPage> {
    let page = |gva: u64, write: bool| CriticalPage {
        gva: gva & !(PAGE_SIZE - 1),
        write,
    };
    let mut v = vec![
        page(abi::GDT_GPA, true),
        page(abi::BOOT_INFO_GPA, false),
        page(tss_gpa(cpu), true),
    ];
    let area = percpu_gpa(cpu);
    v.extend((0..abi::PERCPU_STRIDE / PAGE_SIZE).map(|i| page(area + i * PAGE_SIZE, true)));
    let start = image.start & !(PAGE_SIZE - 1);
    let end = image.end.next_multiple_of(PAGE_SIZE);
    v.extend(
        (start..end)
            .step_by(PAGE_SIZE as usize)
            .map(|g| page(g, false)),
    );
    v.dedup();
    v
}

/// shadow mode's [`PagingOps`]: the paging hypercalls drive the shadow MMU.
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
    host_ops: std::sync::OnceLock<Arc<super::hostops::HostOpScript>>,
}

/// The end of a shadow-mode run: exit_mmap ran `release` (the shadow MMU
/// dropped every spte and shadow page) and tore down every mapping; did
/// every frame come back?
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExitReport {
    /// Frames of machine memory.
    pub frames_total: u64,
    /// Of which kept for the VMM (never handed out).
    pub frames_reserved: u64,
    /// Free after the teardown.
    pub frames_free: u64,
    /// Shadow pages the MMU still holds after the teardown.
    pub shadow_pages_left: u64,
    /// Pages still in swap after the teardown.
    pub swap_slots_left: u64,
    /// `frames_free == frames_total - frames_reserved`, no shadow page and
    /// no swap slot left: everything came back.
    pub frames_returned: bool,
}

/// What the VMM needs to know about the guest's CPU for the walker.
#[derive(Clone, Copy, Debug)]
pub struct GuestCpu {
    /// CPUID's physical-address width.
    pub maxphyaddr: u8,
    /// 1 GiB pages.
    pub gbpages: bool,
    /// AMD-compatible vendor.
    pub amd: bool,
}

impl ShadowPaging {
    /// Builds the shadow MMU for `machine`'s guest RAM, registers it on the
    /// host mm, loads every vCPU's boot CR3 (`guest_cr3`) and prefaults the
    /// pages exception delivery needs.
    pub fn new(
        machine: &ShadowMachine,
        nr_vcpus: u32,
        guest_cr3: u64,
        image: &ImageLayout,
        cpu: GuestCpu,
    ) -> Result<Self, HypercallError> {
        let mut slots = Memslots::default();
        slots
            .add(Memslot {
                base_gfn: 0,
                npages: machine.ram.size / PAGE_SIZE,
                userspace_addr: machine.ram.base,
            })
            .map_err(|e| {
                HypercallError::Mmu(MmuError::Register(MmError::Machine(
                    crate::mm::MachineError {
                        what: "binding guest RAM",
                        source: std::sync::Arc::new(e),
                    },
                )))
            })?;
        let cfg = ShadowMmuConfig {
            nr_vcpus: nr_vcpus as usize,
            maxphyaddr: cpu.maxphyaddr,
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
            host_ops: std::sync::OnceLock::new(),
        };
        for vcpu in 0..nr_vcpus as usize {
            let mut mode = PagingState::new(0, cpu.maxphyaddr);
            mode.gbpages = cpu.gbpages;
            mode.amd = cpu.amd;
            me.mmu
                .set_paging_mode(vcpu, mode)
                .map_err(|e| me.mmu_err(e))?;
            let root = me
                .mmu
                .load_cr3(vcpu, guest_cr3)
                .map_err(|e| me.mmu_err(e))?;
            me.boot_cr3.push(root << 12);
        }
        me.zaps_seen.store(me.zaps(), Ordering::Release);
        for vcpu in 0..nr_vcpus as usize {
            me.prefault(vcpu, false)?;
        }
        Ok(me)
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

    /// Sets the `--host-ops` script (before the vCPUs start; once).
    pub fn set_host_ops(&self, script: Arc<super::hostops::HostOpScript>) {
        let _ = self.host_ops.set(script);
    }

    /// Tears the guest's memory down as the VMM process's exit would:
    /// `exit_mmap` (if it has not run) calls the shadow MMU's `release`,
    /// which drops every spte and shadow page, then frees every page and
    /// swap slot. Reports whether every frame came back. Call it only
    /// once every vCPU and host memory thread has stopped.
    pub fn exit_mmap(&self) -> ExitReport {
        let mm = &self.ram.mm;
        mm.exit_mmap();
        let frames = mm.frames();
        let frames_total = frames.nr_frames();
        let frames_reserved = frames.count(FrameOwner::Reserved);
        let frames_free = frames.nr_free();
        let shadow_pages_left = self.mmu.nr_shadow_pages() as u64;
        let swap_slots_left = mm.swap_used() as u64;
        ExitReport {
            frames_total,
            frames_reserved,
            frames_free,
            shadow_pages_left,
            swap_slots_left,
            frames_returned: frames_free == frames_total - frames_reserved
                && shadow_pages_left == 0
                && swap_slots_left == 0,
        }
    }

    /// `--check`, at a quiescent point (every vCPU stopped): the host mm's
    /// consistency, the shadow MMU's coherence (DESIGN.md rules 1 and 5:
    /// every leaf spte maps a frame of guest memory that the host maps at
    /// the spte's gfn), and that every memslot lies inside the guest RAM
    /// VMA, so no leaf can reach a frame outside guest RAM (rule 5).
    pub fn check(&self) -> Result<(), String> {
        self.ram.mm.check_consistency().map_err(|e| e.to_string())?;
        let (lo, hi) = (self.ram.base, self.ram.base + self.ram.size);
        for s in self.mmu.memslots().iter() {
            let end = s.userspace_addr + s.npages * PAGE_SIZE;
            if s.userspace_addr < lo || end > hi {
                return Err(format!(
                    "memslot at gfn {:#x} maps hva {:#x}..{end:#x}, outside guest RAM {lo:#x}..{hi:#x}",
                    s.base_gfn, s.userspace_addr
                ));
            }
        }
        self.mmu.check_coherence().map_err(|e| e.to_string())
    }

    /// Turns an MMU error into the VMM's error; running out of frames gets
    /// its own clear message.
    fn mmu_err(&self, e: MmuError) -> HypercallError {
        match e {
            MmuError::Memory(MmError::OutOfFrames) | MmuError::OutOfShadowPages => {
                HypercallError::OutOfMachineMemory {
                    frames: self.nr_frames,
                    size: format_size(self.nr_frames * PAGE_SIZE),
                }
            }
            e => HypercallError::Mmu(e),
        }
    }

    fn zaps(&self) -> u64 {
        let s = self.mmu.stats();
        s.spte_zapped + s.mmu_shadow_zapped
    }

    /// Maps vCPU `vcpu`'s critical pages in its root; with `only_missing`,
    /// only those whose spte is gone.
    fn prefault(&self, vcpu: usize, only_missing: bool) -> Result<(), HypercallError> {
        for p in &self.critical[vcpu] {
            if only_missing
                && self
                    .mmu
                    .lookup_spte(vcpu, p.gva)
                    .map_err(|e| self.mmu_err(e))?
                    .is_some()
            {
                continue;
            }
            // Supervisor accesses, as exception delivery makes them. A write
            // the guest's tables refuse (a read-only page) is tried as a read.
            let mut tries = vec![PfErrorCode::empty()];
            if p.write {
                tries.insert(0, PfErrorCode::WRITE);
            }
            for ec in tries {
                match self
                    .mmu
                    .page_fault(vcpu, p.gva, ec)
                    .map_err(|e| self.mmu_err(e))?
                {
                    FaultOutcome::Fixed | FaultOutcome::Retry => break,
                    // Not mapped by the guest's tables, or not RAM: nothing
                    // to prefault (kvm mode would fault the same way).
                    FaultOutcome::Guest(_)
                    | FaultOutcome::Mmio { .. }
                    | FaultOutcome::HostFault { .. } => {}
                }
            }
        }
        Ok(())
    }

    /// After anything that may have zapped sptes: puts back every vCPU's
    /// critical pages (roots are shared between vCPUs with the same CR3,
    /// so one vCPU's guest page-table write can empty another's root; an
    /// exception the other vCPU takes before this runs is not covered, see
    /// docs/shadow-mmu.md).
    fn ensure_critical(&self) -> Result<(), HypercallError> {
        let now = self.zaps();
        if self.zaps_seen.load(Ordering::Acquire) == now {
            return Ok(());
        }
        for vcpu in 0..self.critical.len() {
            self.prefault(vcpu, true)?;
        }
        // Zaps made by the prefaults themselves (replacing a stale entry)
        // are covered: everything was re-checked after `now` was read.
        self.zaps_seen.fetch_max(now, Ordering::AcqRel);
        Ok(())
    }

    /// Sets the vCPU's real CR3 to the shadow root `root`.
    fn set_root(cpu: &mut dyn CpuAccess, root: u64) -> Result<(), HypercallError> {
        let mut sregs: kvm_sregs = cpu.sregs()?;
        sregs.cr3 = root << 12;
        cpu.set_sregs(&sregs)
    }
}

impl PagingOps for ShadowPaging {
    fn mode(&self) -> Paging {
        Paging::Shadow
    }

    fn boot_cr3(&self, vcpu: u32, guest_cr3: u64) -> u64 {
        self.boot_cr3
            .get(vcpu as usize)
            .copied()
            .unwrap_or(guest_cr3)
    }

    fn handle_requests(
        &self,
        _cpu: &mut dyn CpuAccess,
        _requests: VcpuRequest,
    ) -> Result<(), HypercallError> {
        self.ensure_critical()
    }

    fn load_cr3(&self, cpu: &mut dyn CpuAccess, cr3: u64) -> Result<i64, HypercallError> {
        let vcpu = cpu.id() as usize;
        let root = match self.mmu.load_cr3(vcpu, cr3) {
            Ok(r) => r,
            Err(MmuError::InvalidCr3(_)) => return Ok(abi::errno::EINVAL),
            Err(e) => return Err(self.mmu_err(e)),
        };
        Self::set_root(cpu, root)?;
        // A new root starts empty; a cached one may have lost entries.
        self.prefault(vcpu, true)?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn invlpg(&self, cpu: &mut dyn CpuAccess, gva: u64) -> Result<i64, HypercallError> {
        self.mmu
            .invlpg(cpu.id() as usize, gva)
            .map_err(|e| self.mmu_err(e))?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn flush_tlb(&self, cpu: &mut dyn CpuAccess, _global: bool) -> Result<i64, HypercallError> {
        // No spte is ever global: a global flush is a flush.
        self.mmu
            .flush_tlb(cpu.id() as usize)
            .map_err(|e| self.mmu_err(e))?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn resolve_pf(
        &self,
        cpu: &mut dyn CpuAccess,
        cr2: u64,
        error_code: u64,
        _rip: u64,
    ) -> Result<PfResolution, HypercallError> {
        let ec = PfErrorCode::from_bits_truncate(error_code as u32);
        let outcome = match self.mmu.page_fault(cpu.id() as usize, cr2, ec) {
            Ok(o) => o,
            // Host invalidations (ksmd merging, kswapd evicting) kept racing
            // the fault: let the guest retry the access, as KVM's
            // RET_PF_RETRY re-enters the guest, rather than fail the run.
            // Re-entering also lets the vCPU see kicks and stop requests.
            Err(MmuError::TooManyRetries(_)) => FaultOutcome::Retry,
            Err(e) => return Err(self.mmu_err(e)),
        };
        let res = match outcome {
            FaultOutcome::Fixed | FaultOutcome::Retry => PfResolution::Retry,
            FaultOutcome::Guest(pf) => PfResolution::GuestFault {
                error_code: u64::from(pf.error_code.bits()),
            },
            // Guest RAM the host does not back (MMIO: outside every memslot;
            // or refused by the host mm): the guest sees its own fault with
            // the error code it passed in (docs/guest-abi.md, shadow mode).
            FaultOutcome::Mmio { .. } | FaultOutcome::HostFault { .. } => {
                PfResolution::GuestFault { error_code }
            }
        };
        self.ensure_critical()?;
        Ok(res)
    }

    fn balloon(
        &self,
        _cpu: &mut dyn CpuAccess,
        gpa: u64,
        nr_pages: u64,
    ) -> Result<i64, HypercallError> {
        let len = nr_pages * PAGE_SIZE;
        let r = match self.ram.mm.madvise_dontneed(self.ram.base + gpa, len) {
            Ok(()) => nr_pages as i64,
            // The image is mlocked in shadow mode (exception delivery needs
            // it): it cannot be given back.
            Err(MmError::Locked(_)) => abi::errno::EINVAL,
            Err(MmError::OutOfFrames) => {
                return Err(self.mmu_err(MmuError::Memory(MmError::OutOfFrames)));
            }
            Err(source) => {
                return Err(HypercallError::Memory(MemoryError::Host {
                    gpa,
                    len,
                    source,
                }));
            }
        };
        self.ensure_critical()?;
        Ok(r)
    }

    fn host_op(
        &self,
        _cpu: &mut dyn CpuAccess,
        op: u64,
        arg0: u64,
        _arg1: u64,
    ) -> Result<i64, HypercallError> {
        if op != abi::HOST_OP_CHECKPOINT {
            return Ok(abi::errno::EINVAL);
        }
        // decode already refused n >= 2^16; a direct caller gets EINVAL too.
        let Ok(n) = u16::try_from(arg0) else {
            return Ok(abi::errno::EINVAL);
        };
        let Some(script) = self.host_ops.get() else {
            return Ok(0);
        };
        let mut ran = 0;
        for hop in script.checkpoint(n) {
            match hop.apply(&self.ram) {
                Ok(()) => ran += 1,
                Err(MmError::OutOfFrames) => {
                    return Err(self.mmu_err(MmuError::Memory(MmError::OutOfFrames)));
                }
                // The script's operation failed (e.g. the range was already
                // unmapped): the user's script, not the guest, is wrong.
                Err(source) => {
                    return Err(HypercallError::Memory(MemoryError::Host {
                        gpa: hop.gpa,
                        len: hop.len,
                        source,
                    }));
                }
            }
        }
        self.ensure_critical()?;
        Ok(ran)
    }

    fn set_paging(
        &self,
        cpu: &mut dyn CpuAccess,
        wp: bool,
        nx: bool,
    ) -> Result<i64, HypercallError> {
        // The real CR0.WP and EFER.NXE stay set, as KVM keeps them under its
        // own shadow paging: the shadow tables give the guest's mode its
        // meaning (WP=0: supervisor-only writable sptes for read-only guest
        // PTEs; NXE=0: no NX in sptes, bit 63 of a guest PTE a reserved-bit
        // fault of the walker). `set_paging_mode` drops every shadow page
        // built under the old mode (`kvm_mmu_reset_context`).
        let vcpu = cpu.id() as usize;
        let mut mode = self.mmu.paging(vcpu).map_err(|e| self.mmu_err(e))?;
        if (mode.cr0_wp, mode.efer_nx) == (wp, nx) {
            return Ok(0);
        }
        mode.cr0_wp = wp;
        mode.efer_nx = nx;
        self.mmu
            .set_paging_mode(vcpu, mode)
            .map_err(|e| self.mmu_err(e))?;
        // Then what LOAD_CR3 does: back on the (now empty) root for the
        // guest's CR3, with the exception-delivery pages prefaulted, on this
        // vCPU and any other whose root the reset emptied.
        let root = self
            .mmu
            .load_cr3(vcpu, mode.cr3)
            .map_err(|e| self.mmu_err(e))?;
        Self::set_root(cpu, root)?;
        self.prefault(vcpu, true)?;
        self.ensure_critical()?;
        Ok(0)
    }

    fn shadow_stats(&self) -> Option<ShadowStats> {
        let frames = self.ram.mm.frames();
        Some(ShadowStats {
            mmu: self.mmu.stats(),
            host_invalidate: self.flush.stats().snapshot(),
            machine_frames: frames.nr_frames(),
            machine_frames_free: frames.nr_free(),
            shadow_pages: self.mmu.nr_shadow_pages() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_machine_mem_covers_ram_and_overhead() {
        assert_eq!(default_machine_mem(64 << 20), 72 << 20);
        assert!(default_machine_mem(4 << 20) >= 8 << 20);
        assert_eq!(default_machine_mem(64 << 20) % (2 << 20), 0);
    }

    #[test]
    fn critical_pages_cover_delivery() {
        let image = ImageLayout {
            start: 0x20_0000,
            end: 0x20_3010,
            entry: 0x20_0000,
        };
        let v = critical_pages(1, &image);
        let has = |gva: u64, write: bool| v.contains(&CriticalPage { gva, write });
        assert!(has(abi::GDT_GPA, true));
        assert!(has(0x4000, true)); // vCPU 1's TSS at 0x4100
        assert!(has(percpu_gpa(1) + 0x3000, true)); // trap stack
        assert!(has(0x20_1000, false)); // exception stubs
        assert!(has(0x20_3000, false));
        assert!(!has(percpu_gpa(0), true));
    }

    #[test]
    fn shadow_ram_reads_back_through_the_host_mm() {
        let m = ShadowMachine::new(4 << 20, 8 << 20, true, None).unwrap();
        let mut ram = &*m.ram;
        ram.write_u64(0x20_0008, 0x1234).unwrap();
        assert_eq!(ram.read_u64(0x20_0008).unwrap(), 0x1234);
        assert!(ram.write_u64(4 << 20, 1).is_err());
        m.lock_boot_pages(&ImageLayout {
            start: 0x20_0000,
            end: 0x20_1000,
            entry: 0x20_0000,
        })
        .unwrap();
        assert!(m.mm.madvise_dontneed(m.ram.base + 0x20_0000, 4096).is_err());
    }
}
