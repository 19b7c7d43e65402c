//! `run`: from a configuration to a finished VM. Checks what the user can
//! get wrong first (cheap, before touching KVM), builds the VM, starts one
//! thread per vCPU, waits for the guest to stop or for `--timeout`, and
//! reports the outcome with the statistics.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::abi::{self, PAGE_SIZE};
use super::boot::{BootParams, ImageLayout, loader, regs, write_boot_structures};
use super::config::{GuestSource, Paging, VmConfig};
use super::devices::bus::BusOverlap;
use super::devices::{ConsoleOut, ExitPort, PioBus, SerialDevice};
use super::dma::GuestDma;
use super::error::VmmError;
use super::exits::{VmmExits, VmmFailure};
use super::guests;
use super::host::ksmd::Ksmd;
use super::host::kswapd::Kswapd;
use super::host::timed_ops::TimedOps;
use super::hypercall::{HypercallHandler, HypercallPort, Limits};
use super::kvm::kick::{self, KickError, VcpuActivity, VcpuKick, VcpuRequest};
use super::kvm::memory::{GuestRam, SharedGuestMem};
use super::kvm::{GuestFailure, Vcpu, VcpuReport, Vm, VmContext, VmStats, VmStop};
use super::paging::shadow::{self, CheckError, ShadowPaging};
use super::paging::{GuestCpu, KvmPaging, PagingOps};
use super::stats::StatsSnapshot;
use super::switcher::{self, Switcher};
use crate::mm::AnonMemory;

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest exited with `code`.
    Exited {
        /// Exit code.
        code: u8,
        /// The vCPU that exited.
        vcpu: u32,
    },
    /// Every vCPU halted.
    AllHalted,
    /// The guest failed (triple fault, unknown port, ...).
    Failed(GuestFailure),
    /// The VMM failed while the guest ran.
    VmmError(VmmFailure),
    /// The host stopped it (`RunningVm::stop`).
    Stopped,
    /// `--timeout` expired; each vCPU's registers when it was stopped.
    TimedOut {
        /// The timeout.
        after: Duration,
        /// Final vCPU states.
        vcpus: Vec<VcpuReport>,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited { code, vcpu } => {
                write!(f, "guest exited with code {code} (vCPU {vcpu})")
            }
            Outcome::AllHalted => write!(f, "every vCPU halted"),
            Outcome::Stopped => write!(f, "stopped by the host"),
            Outcome::Failed(failure) => write!(f, "guest failed: {failure}"),
            Outcome::VmmError(msg) => write!(f, "the VMM failed while running the guest: {msg}"),
            Outcome::TimedOut { after, vcpus } => {
                write!(f, "guest timed out: still running after {after:?}")?;
                for r in vcpus {
                    if let Some(s) = &r.state {
                        write!(f, "\nvCPU {}:\n{s}", r.id)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The result of `run`.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest stopped.
    pub outcome: Outcome,
    /// Counters of the run.
    pub stats: StatsSnapshot,
    /// `VmConfig::check` in shadow mode: the coherence checks run after
    /// the guest stopped (`Err` says what is violated). `None` when not
    /// asked for, and in kvm mode (no shadow MMU to check).
    pub check: Option<Result<(), CheckError>>,
}

/// Loads `image` (called `name` in errors) into `ram` with linux-loader.
fn load(ram: &GuestRam, name: &str, image: &[u8]) -> Result<ImageLayout, VmmError> {
    loader::load_elf(ram, image).map_err(|source| VmmError::Image {
        image: name.to_string(),
        source,
    })
}

/// The port-I/O bus: the UART, the exit port and the hypercall port.
fn pio_bus(serial: &Arc<SerialDevice>, stats: &Arc<VmStats>) -> Result<PioBus, BusOverlap> {
    let mut bus = PioBus::new();
    bus.insert(abi::PORT_SERIAL, abi::PORT_SERIAL_LEN, serial.clone())?;
    bus.insert(abi::PORT_EXIT, 1, Arc::new(ExitPort::new(stats.clone())))?;
    bus.insert(abi::PORT_HYPERCALL, 1, Arc::new(HypercallPort))?;
    Ok(bus)
}

/// kvm mode's switcher: its own memory, registered as read-only memslot 1
/// just above guest RAM, so that no gpa of guest RAM reaches it and the
/// guest cannot write it. Returns it with its range of KVM gpas.
fn kvm_switcher(
    vm: &mut Vm,
    config: &VmConfig,
) -> Result<(Arc<Switcher>, std::ops::Range<u64>), VmmError> {
    let pages = switcher::pages(config.vcpus);
    let gpa = config.mem_size;
    let end = gpa + pages * PAGE_SIZE;
    let maxphyaddr = vm.maxphyaddr();
    if end > 1 << maxphyaddr {
        return Err(VmmError::NoRoomForSwitcher {
            mem_size: config.mem_size,
            maxphyaddr,
        });
    }
    let mem = Arc::new(AnonMemory::new(pages).map_err(|source| {
        super::kvm::memory::MemoryError::Host {
            gpa,
            len: pages * PAGE_SIZE,
            source,
        }
    })?);
    let switcher = Arc::new(Switcher::new(mem.clone(), 0, gpa, config.vcpus)?);
    vm.add_readonly_memory(1, gpa, mem)?;
    Ok((switcher, gpa..end))
}

/// Stops a VM whose start failed half-way and joins the vCPU threads it
/// already started; the outcome is dropped (start returns the error).
fn abort(ctx: &VmContext<VmmExits>, threads: Vec<std::thread::JoinHandle<VcpuReport>>) {
    ctx.request_stop(VmStop::Host);
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked while the VM was being torn down");
        }
    }
}

/// The image bytes for `source`.
fn guest_image(source: &GuestSource) -> Result<(String, Cow<'static, [u8]>), VmmError> {
    match source {
        GuestSource::Builtin(name) => match guests::find(name) {
            Some(g) => Ok((name.clone(), Cow::Borrowed(g.elf))),
            None => match guests::unavailable_reason() {
                Some(reason) => Err(VmmError::GuestsUnavailable {
                    name: name.clone(),
                    reason,
                }),
                None => Err(VmmError::UnknownGuest(name.clone())),
            },
        },
        GuestSource::File(path) => match std::fs::read(path) {
            Ok(bytes) => Ok((path.display().to_string(), Cow::Owned(bytes))),
            Err(source)
                if source.kind() == std::io::ErrorKind::NotFound
                    && path.components().count() == 1 =>
            {
                Err(VmmError::UnknownGuest(path.display().to_string()))
            }
            Err(source) => Err(VmmError::ReadImage {
                path: path.clone(),
                source,
            }),
        },
    }
}

/// One line for a vCPU's [`VcpuActivity`].
pub fn describe_activity(a: &VcpuActivity) -> String {
    let doing = match (a.exited, a.in_guest, a.hypercall) {
        (true, _, _) => "left its run loop".to_string(),
        (_, true, _) => "in the guest (KVM_RUN)".to_string(),
        (_, _, Some(nr)) => format!("handling hypercall {nr} ({})", abi::hc::name(nr)),
        _ => "outside the guest, handling an exit or a request".to_string(),
    };
    format!("vCPU {}: {doing}, {} exits so far", a.id, a.exits)
}

/// Fail-stop, never stale: an error the shadow MMU cannot return (inside a
/// notifier callback) or a host TLB flush the host refused stops the VM,
/// and the handler returns only once every vCPU is out of KVM_RUN with a
/// STOP posted, so none runs again on a translation that was not flushed.
/// The handlers hold the context weakly (it owns the MMU that holds them).
fn arm_fail_stop(ctx: &Arc<VmContext<VmmExits>>, shadow: &ShadowPaging) {
    fn stop(ctx: &Weak<VmContext<VmmExits>>, why: VmmFailure) {
        if let Some(ctx) = ctx.upgrade() {
            ctx.request_stop(VmStop::VmmError(why));
            if let Some(b) = &ctx.memslot_bounce {
                b.wait_all_out();
            }
        }
    }
    let weak = Arc::downgrade(ctx);
    shadow.mmu().set_fatal_handler(Arc::new(move |e| {
        stop(&weak, VmmFailure::ShadowMmu(e.clone()))
    }));
    let weak = Arc::downgrade(ctx);
    shadow.host_flush().on_failure(Box::new(move |e| {
        stop(&weak, VmmFailure::HostFlush(e.clone()))
    }));
}

/// Boots `config`'s guest and runs it to the end (or `config.timeout`);
/// guest console output goes to `console`.
pub fn run(config: &VmConfig, console: ConsoleOut) -> Result<RunReport, VmmError> {
    Ok(RunningVm::start(config, console)?.wait(config.timeout))
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    ctx: Arc<VmContext<VmmExits>>,
    threads: Vec<std::thread::JoinHandle<VcpuReport>>,
    stats: Arc<VmStats>,
    vcpus: u32,
    paging: Paging,
    shadow: Option<Arc<ShadowPaging>>,
    check: bool,
    /// `--ksm`: the ksmd thread.
    ksmd: Option<Ksmd>,
    /// `--reclaim`: the kswapd thread.
    kswapd: Option<Kswapd>,
    /// `--host-ops`: the thread running the timed ops.
    host_ops: Option<TimedOps>,
    /// Shadow mode: the guest's DMA device (hypercall DMA).
    dma: Option<Arc<GuestDma>>,
    // Dropped last: the vCPU threads use its memslot.
    _vm: Vm,
}

impl RunningVm {
    /// Checks `config`, builds the VM and starts one thread per vCPU.
    pub fn start(config: &VmConfig, console: ConsoleOut) -> Result<Self, VmmError> {
        config.validate()?;
        let (image_name, image) = guest_image(&config.guest)?;
        loader::check_elf(&image, config.mem_size).map_err(|source| VmmError::Image {
            image: image_name.clone(),
            source,
        })?;
        kick::install_kick_handler()?;

        // Everything from here on counts as VM creation.
        let stats = Arc::new(VmStats::new(Instant::now()));
        let serial = Arc::new(SerialDevice::new(console, stats.clone())?);
        let kicks: Vec<Arc<VcpuKick>> = (0..config.vcpus)
            .map(|id| Arc::new(VcpuKick::new(id)))
            .collect();
        let mut shadow_paging = None;
        let mut memslot_bounce = None;
        let mut ksmd = None;
        let mut kswapd = None;
        let mut rom = None;
        let mut dma = None;
        let (vm, paging, ram, boot_info, layout, switcher) = match config.paging {
            Paging::Kvm => {
                let (mut vm, ram) = Vm::new_ram(config.mem_size)?;
                let (switcher, range) = kvm_switcher(&mut vm, config)?;
                rom = Some(range);
                if config.host_thp.any_enabled() {
                    ram.advise_hugepage()?;
                }
                let layout = load(&ram, &image_name, &image)?;
                let params = BootParams {
                    nr_vcpus: config.vcpus,
                    paging_mode: config.paging.abi_mode(),
                    cmdline: &config.cmdline,
                    image: layout,
                    switcher_pml4e: switcher.pml4e(),
                };
                let boot_info = write_boot_structures(&mut &*ram, &params)?;
                let cpu = GuestCpu {
                    maxphyaddr: vm.maxphyaddr(),
                    gbpages: vm.gbpages(),
                    amd: vm.is_amd(),
                };
                let paging: Arc<dyn PagingOps> = Arc::new(KvmPaging::new(ram.clone(), cpu));
                let ram: SharedGuestMem = ram;
                (vm, paging, ram, boot_info, layout, switcher)
            }
            Paging::Shadow => {
                let scratch = GuestRam::new(config.mem_size)?;
                let layout = load(&scratch, &image_name, &image)?;
                let v = shadow::build(config, &scratch, layout, &kicks)?;
                drop(scratch);
                memslot_bounce = Some(v.bounce);
                let ram = v.paging.ram();
                if let Some(ksm) = config.ksm {
                    ksmd = Some(Ksmd::start(ram, ksm)?);
                }
                if let Some(reclaim) = config.reclaim {
                    let flush: Arc<dyn crate::mmu::TlbFlush> = v.paging.host_flush().clone();
                    kswapd = Some(Kswapd::start(ram, flush, reclaim)?);
                }
                shadow_paging = Some(v.paging.clone());
                let tracker = v.paging.clone();
                let device = GuestDma::new(
                    ram.clone(),
                    Arc::new(move |gpa, len| tracker.device_wrote(gpa, len)),
                );
                #[cfg(feature = "test-hooks")]
                if config.dma_stale_entry {
                    device.inject_stale_entry();
                }
                dma = Some(Arc::new(device));
                let paging: Arc<dyn PagingOps> = v.paging;
                (v.vm, paging, v.ram, v.boot_info, v.layout, v.switcher)
            }
        };

        let bus = pio_bus(&serial, &stats)?;
        let limits = Limits {
            mem_size: config.mem_size,
            image_start: boot_info.image_start & !(PAGE_SIZE - 1),
            image_end: boot_info.image_end,
        };
        let hypercalls = HypercallHandler::new(paging.clone(), ram, serial, switcher, limits)
            .with_dma(dma.clone());
        let exits = VmmExits::new(bus, hypercalls, rom);
        let ctx = Arc::new(VmContext::new(
            exits,
            stats.clone(),
            kicks.clone(),
            memslot_bounce,
        ));
        if let Some(s) = &shadow_paging {
            arm_fail_stop(&ctx, s);
        }
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let cr3 = paging.boot_cr3(id, boot_info.boot_cr3);
            let sregs = |sregs| {
                let mut sregs = regs::vcpu_sregs(sregs, id, config.vcpus);
                sregs.cr3 = cr3;
                sregs
            };
            let fd = vm.create_vcpu(id, sregs, &regs::vcpu_regs(layout.entry, id))?;
            vcpus.push(Vcpu::new(id, fd, ctx.clone(), kicks[id as usize].clone()));
        }
        stats.vm_created();

        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = threads.len() as u32;
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu.run())
            {
                Ok(t) => threads.push(t),
                Err(source) => {
                    abort(&ctx, threads);
                    return Err(VmmError::Thread { vcpu: id, source });
                }
            }
        }
        let host_ops = match (&config.host_ops, &shadow_paging) {
            (Some(script), Some(s)) => {
                let stop_ctx = ctx.clone();
                let on_failure = Box::new(move |e| {
                    stop_ctx.request_stop(VmStop::VmmError(VmmFailure::HostOp(e)));
                });
                match TimedOps::start(s.ram().clone(), script, on_failure) {
                    Ok(t) => t,
                    Err(e) => {
                        abort(&ctx, threads);
                        return Err(e.into());
                    }
                }
            }
            _ => None,
        };
        Ok(RunningVm {
            ctx,
            threads,
            stats,
            vcpus: config.vcpus,
            paging: config.paging,
            shadow: shadow_paging,
            check: config.check,
            ksmd,
            kswapd,
            host_ops,
            dma,
            _vm: vm,
        })
    }

    /// Posts `req` to vCPU `vcpu` and kicks it out of KVM_RUN; with `wait`,
    /// returns once it is outside guest mode. `Ok(false)` if there is no
    /// such vCPU.
    pub fn kick(
        &self,
        vcpu: u32,
        req: VcpuRequest,
        wait: Option<Duration>,
    ) -> Result<bool, KickError> {
        let Some(k) = self.ctx.kicks.get(vcpu as usize) else {
            return Ok(false);
        };
        self.stats.kick_sent();
        match wait {
            Some(timeout) => k.kick_and_wait(req, timeout)?,
            None => {
                k.kick(req)?;
            }
        }
        Ok(true)
    }

    /// The kick handle of vCPU `vcpu` (to watch its requests).
    pub fn vcpu_kick(&self, vcpu: u32) -> Option<&Arc<VcpuKick>> {
        self.ctx.kicks.get(vcpu as usize)
    }

    /// Shadow mode: the shadow MMU, the host mm and guest RAM (to drive
    /// host-side memory operations against a running guest).
    pub fn shadow(&self) -> Option<&Arc<ShadowPaging>> {
        self.shadow.as_ref()
    }

    /// Where each vCPU is now: in the guest, in a hypercall (which), or
    /// neither (handling an exit, or blocked on a lock outside KVM_RUN).
    pub fn activity(&self) -> Vec<VcpuActivity> {
        self.ctx.kicks.iter().map(|k| k.activity()).collect()
    }

    /// Waits up to `timeout` for the guest to stop, without ending the run
    /// (`wait` still reports it): true if it stopped.
    pub fn wait_for_stop(&self, timeout: Option<Duration>) -> bool {
        self.ctx.wait_for_stop(timeout)
    }

    /// Stops the guest from the host side.
    pub fn stop(&self) {
        self.ctx.request_stop(VmStop::Host);
    }

    /// Waits for the guest to stop (or `timeout`, then stops it), joins the
    /// vCPU threads and reports.
    ///
    /// Then, in shadow mode, the host memory threads are stopped and joined,
    /// `--check` runs (the DMA device's coherence too), the statistics are
    /// taken, and the guest's memory is torn down (`exit_mmap`,
    /// [`ShadowPaging::exit_mmap`], which also invalidates a DMA device the
    /// guest left attached; the device is detached after it): the report
    /// says whether every frame came back.
    pub fn wait(mut self, timeout: Option<Duration>) -> RunReport {
        if !self.ctx.wait_for_stop(timeout) {
            self.ctx.request_stop(VmStop::TimedOut);
        }
        let mut reports = Vec::with_capacity(self.threads.len());
        for (id, t) in self.threads.into_iter().enumerate() {
            match t.join() {
                Ok(r) => reports.push(r),
                Err(_) => self
                    .ctx
                    .request_stop(VmStop::VmmError(VmmFailure::VcpuPanicked(id as u32))),
            }
        }
        let outcome = match self.ctx.take_stop_reason() {
            Some(VmStop::Exit { code, vcpu }) => Outcome::Exited { code, vcpu },
            Some(VmStop::AllHalted) => Outcome::AllHalted,
            Some(VmStop::Failed(f)) => Outcome::Failed(f),
            Some(VmStop::VmmError(e)) => Outcome::VmmError(e),
            Some(VmStop::Host) => Outcome::Stopped,
            Some(VmStop::TimedOut) | None => Outcome::TimedOut {
                after: timeout.unwrap_or_default(),
                vcpus: reports,
            },
        };
        // Every vCPU thread is done; stop the host memory threads too, so
        // this is a quiescent point, before teardown.
        if let Some(h) = self.host_ops.as_mut() {
            h.stop();
        }
        let ksm = self.ksmd.as_mut().map(|k| {
            k.stop();
            k.stats()
        });
        let reclaim = self.kswapd.as_mut().map(|k| {
            k.stop();
            k.stats()
        });
        let check = match &self.shadow {
            Some(s) if self.check => Some(s.check().and_then(|()| {
                self.dma
                    .as_ref()
                    .map_or(Ok(()), |d| d.check().map_err(CheckError::Dma))
            })),
            _ => None,
        };
        let vm = self.stats.snapshot(self.vcpus, self.paging.name());
        let shadow = self.shadow.as_ref().map(|s| s.stats());
        let exit = self.shadow.as_ref().map(|s| s.exit_mmap());
        // After the mm's exit, which invalidated the device's interval.
        let dma = self.dma.as_ref().map(|d| d.exit());
        let stats = StatsSnapshot {
            vm,
            shadow,
            ksm,
            reclaim,
            dma,
            exit,
        };
        RunReport {
            outcome,
            stats,
            check,
        }
    }
}
