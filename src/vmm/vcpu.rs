//! One vCPU on its own thread: a small state machine around KVM_RUN.
//!
//! ```text
//!            requests? ──yes──> handle (STOP: leave)
//!   ┌──────> enter_guest_mode
//!   │            │ none
//!   │        KVM_RUN ──EINTR/EAGAIN──> clear immediate_exit ──┐
//!   │            │ exit                                        │
//!   │        VmExit (translated once)                          │
//!   │            │                                             │
//!   └── Resume ──┴── Stop / Halt / Fail ──> tell the VM, wait  │
//!   └──────────────────────────────────────────────────────────┘
//! ```
//!
//! EINTR and EAGAIN from KVM_RUN are not exits: they mean "a kick" or
//! "try again" and are handled before any real exit.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_SYNC_X86_REGS;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuFd};
use parking_lot::{Condvar, Mutex};
use vmm_sys_util::errno;

use super::cpu_state::CpuState;
use super::exit::VmExit;
use super::hypercall::{CpuAccess, HypercallError, HypercallHandler, HypercallOutcome};
use super::kick::{self, VcpuKick, VcpuRequest};
use super::pio::{self, PioTarget};
use super::serial::SerialDevice;
use super::stats::VmStats;

/// Errors of a vCPU thread that are the VMM's, not the guest's.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: errno::Error,
    },
    /// A hypercall could not be completed.
    #[error("vCPU {vcpu}: {source}")]
    Hypercall {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        source: HypercallError,
    },
    /// The console failed.
    #[error("vCPU {vcpu}: {source}")]
    Serial {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        source: super::serial::SerialError,
    },
}

/// What went wrong inside the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// Extra data words.
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// I/O on a port no device claims (or an `in` from a write-only one).
    UnknownPort {
        /// Port.
        port: u16,
        /// `out` (true) or `in`.
        write: bool,
        /// Access size times count.
        len: usize,
        /// The value written (first 8 bytes).
        value: Option<u64>,
    },
    /// An access to unbacked guest-physical memory.
    UnknownMmio {
        /// gpa.
        addr: u64,
        /// Write (true) or read.
        write: bool,
        /// Length.
        len: usize,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// An exit this VMM never enables.
    UnexpectedExit(&'static str),
    /// The VMM itself failed while running the guest.
    Vmm(String),
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            FailureKind::InternalError { suberror, data } => {
                let what = match suberror {
                    1 => "KVM could not emulate an instruction",
                    2 => "simultaneous exceptions",
                    3 => "failed to deliver an event",
                    4 => "unexpected exit reason",
                    _ => "unknown suberror",
                };
                write!(f, "KVM internal error {suberror} ({what})")?;
                if !data.is_empty() {
                    write!(f, ", data:")?;
                    for d in data {
                        write!(f, " {d:#x}")?;
                    }
                }
                Ok(())
            }
            FailureKind::FailEntry { reason, cpu } => {
                write!(
                    f,
                    "KVM_RUN failed to enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
                )
            }
            FailureKind::UnknownPort {
                port,
                write: true,
                len,
                value,
            } => {
                write!(
                    f,
                    "write to unknown I/O port {port:#x} ({len} byte{}",
                    if *len == 1 { "" } else { "s" }
                )?;
                if let Some(v) = value {
                    write!(f, ", value {v:#x}")?;
                }
                write!(f, ")")
            }
            FailureKind::UnknownPort {
                port,
                write: false,
                len,
                ..
            } => {
                write!(f, "read from unknown I/O port {port:#x} ({len} bytes)")
            }
            FailureKind::UnknownMmio { addr, write, len } => {
                write!(
                    f,
                    "{} of {len} bytes at unbacked guest-physical address {addr:#x} (MMIO)",
                    if *write { "write" } else { "read" }
                )
            }
            FailureKind::SystemEvent { kind } => write!(f, "system event {kind}"),
            FailureKind::UnexpectedExit(what) => write!(f, "unexpected exit {what}"),
            FailureKind::Vmm(msg) => write!(f, "{msg}"),
        }
    }
}

/// A guest failure with the vCPU's registers.
#[derive(Clone, Debug)]
pub struct GuestFailure {
    /// vCPU index.
    pub vcpu: u32,
    /// What happened.
    pub kind: FailureKind,
    /// Registers at the time, if they could be read.
    pub state: Option<Box<CpuState>>,
}

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.kind)?;
        if let Some(s) = &self.state {
            write!(f, "\n{s}")?;
        }
        Ok(())
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug)]
pub enum VmStop {
    /// The guest exited (EXIT hypercall or exit port).
    Exit {
        /// Exit code.
        code: u8,
        /// The vCPU that asked.
        vcpu: u32,
    },
    /// Every vCPU executed `hlt` (with no interrupt source, that is forever).
    AllHalted,
    /// The guest failed.
    Failed(GuestFailure),
    /// The VMM failed.
    VmmError(String),
    /// `--timeout` expired.
    TimedOut,
    /// The host stopped the VM.
    Host,
}

/// State every vCPU thread of one VM shares.
pub struct VmContext {
    /// The console.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Hypercall dispatch.
    pub hypercalls: HypercallHandler,
    /// Counters.
    pub stats: Arc<VmStats>,
    /// Kick handles of all vCPUs, by index.
    pub kicks: Vec<Arc<VcpuKick>>,
    /// Shadow mode: held across KVM_RUN so a memslot bounce can keep every
    /// vCPU out of the guest.
    pub memslot_bounce: Option<Arc<super::tlb::MemslotBounce>>,
    stop: Mutex<Option<VmStop>>,
    stopped: Condvar,
    halted: AtomicU32,
}

impl VmContext {
    /// Context for `kicks.len()` vCPUs.
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        hypercalls: HypercallHandler,
        stats: Arc<VmStats>,
        kicks: Vec<Arc<VcpuKick>>,
    ) -> Self {
        VmContext {
            serial,
            hypercalls,
            stats,
            kicks,
            memslot_bounce: None,
            stop: Mutex::new(None),
            stopped: Condvar::new(),
            halted: AtomicU32::new(0),
        }
    }

    /// With the shadow-mode memslot bounce.
    pub fn with_memslot_bounce(mut self, bounce: Arc<super::tlb::MemslotBounce>) -> Self {
        self.memslot_bounce = Some(bounce);
        self
    }

    /// Stops the VM for `why` unless it is already stopping: records the
    /// reason, wakes the waiter and kicks every vCPU with STOP.
    pub fn request_stop(&self, why: VmStop) {
        {
            let mut stop = self.stop.lock();
            if stop.is_some() {
                return;
            }
            *stop = Some(why);
            self.stopped.notify_all();
        }
        for k in &self.kicks {
            if k.kick(VcpuRequest::STOP).is_ok() {
                self.stats.kick_sent();
            }
        }
    }

    /// Why the VM stopped, if it did.
    pub fn stop_reason(&self) -> Option<VmStop> {
        self.stop.lock().clone()
    }

    /// Waits until the VM stops or `timeout` passes; `None` on timeout.
    pub fn wait_for_stop(&self, timeout: Option<Duration>) -> Option<VmStop> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut stop = self.stop.lock();
        loop {
            if let Some(why) = stop.as_ref() {
                return Some(why.clone());
            }
            match deadline {
                Some(d) => {
                    if self.stopped.wait_until(&mut stop, d).timed_out() && stop.is_none() {
                        return None;
                    }
                }
                None => self.stopped.wait(&mut stop),
            }
        }
    }
}

/// What the exit handler decided, before touching the vCPU fd again.
enum Action {
    Resume,
    Hypercall(u64),
    Halt,
    Stop(VmStop),
    Fail(FailureKind),
    InternalError,
}

/// A vCPU and what it needs to run.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    /// KVM keeps the general registers in `kvm_run` (set up by
    /// `Vm::create_vcpu` when KVM has `KVM_CAP_SYNC_REGS`).
    sync_regs: bool,
    ctx: Arc<VmContext>,
    kick: Arc<VcpuKick>,
}

/// What a vCPU thread hands back when it ends.
#[derive(Debug)]
pub struct VcpuReport {
    /// vCPU index.
    pub id: u32,
    /// Its registers when it stopped.
    pub state: Option<CpuState>,
}

/// `CpuAccess` over a `VcpuFd`, for hypercalls.
///
/// With `sync`, the general registers go through `kvm_run`'s sync area
/// (`KVM_SYNC_X86_REGS`: KVM stores them there at every exit and loads them
/// at the next KVM_RUN when marked dirty), saving the GET_REGS and SET_REGS
/// ioctls of every hypercall. Only valid after a KVM_RUN exit, which is when
/// hypercalls run.
struct FdCpu<'a> {
    id: u32,
    fd: &'a mut VcpuFd,
    sync: bool,
}

impl FdCpu<'_> {
    fn kvm_err(&self, op: &'static str) -> impl FnOnce(errno::Error) -> HypercallError {
        move |source| HypercallError::Kvm { op, source }
    }
}

impl CpuAccess for FdCpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }
    fn regs(&mut self) -> Result<kvm_regs, HypercallError> {
        if self.sync {
            return Ok(self.fd.sync_regs_mut().regs);
        }
        self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), HypercallError> {
        if self.sync {
            self.fd.sync_regs_mut().regs = *regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.fd.set_regs(regs).map_err(self.kvm_err("KVM_SET_REGS"))
    }
    fn sregs(&mut self) -> Result<kvm_sregs, HypercallError> {
        self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), HypercallError> {
        self.fd
            .set_sregs(sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Phase 1: decide what an exit means, touching only devices.
fn handle_exit(ctx: &VmContext, id: u32, exit: VmExit<'_>) -> Result<Action, VcpuError> {
    let stats = &ctx.stats;
    stats.exit(exit.reason());
    Ok(match exit {
        VmExit::IoOut { port, data } => match pio::route(port) {
            Some(PioTarget::Serial(offset)) => {
                stats.io_serial();
                ctx.serial
                    .lock()
                    .write(offset, data)
                    .map_err(|source| VcpuError::Serial { vcpu: id, source })?;
                Action::Resume
            }
            Some(PioTarget::Exit) => {
                stats.io_exit_port();
                Action::Stop(VmStop::Exit {
                    code: data.first().copied().unwrap_or(0),
                    vcpu: id,
                })
            }
            Some(PioTarget::Hypercall) if data.len() == 4 => Action::Hypercall(le_value(data)),
            Some(PioTarget::Hypercall) | None => Action::Fail(FailureKind::UnknownPort {
                port,
                write: true,
                len: data.len(),
                value: Some(le_value(data)),
            }),
        },
        VmExit::IoIn { port, data } => match pio::route(port) {
            Some(PioTarget::Serial(offset)) => {
                stats.io_serial();
                ctx.serial.lock().read(offset, data);
                Action::Resume
            }
            _ => Action::Fail(FailureKind::UnknownPort {
                port,
                write: false,
                len: data.len(),
                value: None,
            }),
        },
        VmExit::MmioRead { addr, data } => Action::Fail(FailureKind::UnknownMmio {
            addr,
            write: false,
            len: data.len(),
        }),
        VmExit::MmioWrite { addr, data } => Action::Fail(FailureKind::UnknownMmio {
            addr,
            write: true,
            len: data.len(),
        }),
        VmExit::Hlt => Action::Halt,
        VmExit::Shutdown => Action::Fail(FailureKind::TripleFault),
        VmExit::FailEntry { reason, cpu } => Action::Fail(FailureKind::FailEntry { reason, cpu }),
        VmExit::InternalError => Action::InternalError,
        VmExit::SystemEvent { kind } => Action::Fail(FailureKind::SystemEvent { kind }),
        VmExit::Interrupted | VmExit::Again => Action::Resume,
        VmExit::Unexpected(what) => Action::Fail(FailureKind::UnexpectedExit(what)),
    })
}

impl Vcpu {
    /// A configured vCPU, ready to run on its own thread.
    pub fn new(id: u32, mut fd: VcpuFd, ctx: Arc<VmContext>, kick: Arc<VcpuKick>) -> Self {
        let sync_regs = fd.get_kvm_run().kvm_valid_regs & u64::from(KVM_SYNC_X86_REGS) != 0;
        Vcpu {
            id,
            fd,
            sync_regs,
            ctx,
            kick,
        }
    }

    fn state(&self) -> Option<CpuState> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        Some(CpuState { regs, sregs })
    }

    /// The internal-error details from `kvm_run`.
    fn internal_error(&mut self) -> FailureKind {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        FailureKind::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }

    /// The thread body: runs until the VM stops; never panics on guest input.
    pub fn run(mut self) -> VcpuReport {
        let run_ptr = &raw mut *self.fd.get_kvm_run();
        // SAFETY: `run_ptr` points into this vCPU's kvm_run mapping, owned
        // by `self.fd`, which outlives the registration: we unregister below
        // on this thread before `self` is dropped.
        unsafe { kick::register_kvm_run(run_ptr) };
        self.kick.attach_current_thread();

        if let Err(e) = self.run_loop() {
            self.ctx.request_stop(VmStop::VmmError(e.to_string()));
        }

        self.kick.detach_current_thread();
        kick::unregister_kvm_run();
        VcpuReport {
            id: self.id,
            state: self.state(),
        }
    }

    fn run_loop(&mut self) -> Result<(), VcpuError> {
        let ctx = self.ctx.clone();
        loop {
            // Held from before "in guest mode" is published until KVM_RUN
            // returns (see `tlb::MemslotBounce`).
            let gate = ctx.memslot_bounce.as_ref().map(|b| b.enter());
            let reqs = self.kick.enter_guest_mode();
            if !reqs.is_empty() {
                drop(gate);
                if reqs.contains(VcpuRequest::STOP) {
                    return Ok(());
                }
                let mut cpu = FdCpu {
                    id: self.id,
                    fd: &mut self.fd,
                    sync: false,
                };
                self.ctx
                    .hypercalls
                    .paging()
                    .handle_requests(&mut cpu, reqs)
                    .map_err(|source| VcpuError::Hypercall {
                        vcpu: self.id,
                        source,
                    })?;
                continue;
            }

            let t = Instant::now();
            let result = self.fd.run();
            self.kick.exit_guest_mode();
            drop(gate);
            self.ctx.stats.guest_time(t.elapsed().as_nanos() as u64);

            let exit = VmExit::from_run(result).map_err(|source| VcpuError::Kvm {
                vcpu: self.id,
                op: "KVM_RUN",
                source,
            })?;
            let interrupted = matches!(exit, VmExit::Interrupted | VmExit::Again);
            let action = handle_exit(&self.ctx, self.id, exit)?;
            if interrupted {
                // The kick handler may have set it; requests are taken at
                // the top of the loop.
                self.fd.set_kvm_immediate_exit(0);
            }

            match action {
                Action::Resume => {}
                Action::Hypercall(nr) => {
                    self.ctx.stats.hypercall(nr);
                    let mut cpu = FdCpu {
                        id: self.id,
                        fd: &mut self.fd,
                        sync: self.sync_regs,
                    };
                    let t = Instant::now();
                    let result = self.ctx.hypercalls.handle(&mut cpu, nr);
                    self.ctx
                        .stats
                        .hypercall_time(nr, t.elapsed().as_nanos() as u64);
                    match result {
                        Ok(HypercallOutcome::Resume) => {}
                        Ok(HypercallOutcome::Exit(code)) => self.ctx.request_stop(VmStop::Exit {
                            code,
                            vcpu: self.id,
                        }),
                        Err(source) => {
                            return Err(VcpuError::Hypercall {
                                vcpu: self.id,
                                source,
                            });
                        }
                    }
                }
                Action::Halt => {
                    let halted = self.ctx.halted.fetch_add(1, Ordering::SeqCst) + 1;
                    if halted as usize == self.ctx.kicks.len() {
                        self.ctx.request_stop(VmStop::AllHalted);
                    }
                    // No interrupt can wake a halted vCPU: wait for the end.
                    self.ctx.wait_for_stop(None);
                }
                Action::Stop(why) => self.ctx.request_stop(why),
                Action::Fail(kind) => self.fail(kind),
                Action::InternalError => {
                    let kind = self.internal_error();
                    self.fail(kind);
                }
            }
        }
    }

    fn fail(&self, kind: FailureKind) {
        let failure = GuestFailure {
            vcpu: self.id,
            kind,
            state: self.state().map(Box::new),
        };
        self.ctx.request_stop(VmStop::Failed(failure));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages() {
        let f = FailureKind::UnknownPort {
            port: 0x1234,
            write: true,
            len: 1,
            value: Some(0x42),
        };
        assert_eq!(
            f.to_string(),
            "write to unknown I/O port 0x1234 (1 byte, value 0x42)"
        );
        assert_eq!(
            FailureKind::TripleFault.to_string(),
            "triple fault (KVM_EXIT_SHUTDOWN)"
        );
        let ie = FailureKind::InternalError {
            suberror: 1,
            data: vec![0x10],
        };
        assert_eq!(
            ie.to_string(),
            "KVM internal error 1 (KVM could not emulate an instruction), data: 0x10"
        );
        let g = GuestFailure {
            vcpu: 1,
            kind: FailureKind::UnknownMmio {
                addr: 0xfee0_0000,
                write: true,
                len: 4,
            },
            state: None,
        };
        assert_eq!(
            g.to_string(),
            "vCPU 1: write of 4 bytes at unbacked guest-physical address 0xfee00000 (MMIO)"
        );
    }

    #[test]
    fn le_values() {
        assert_eq!(le_value(&[1, 2]), 0x0201);
        assert_eq!(le_value(&[0xff; 16]), u64::MAX);
        assert_eq!(le_value(&[]), 0);
    }
}
