//! One vCPU on its own thread: a small state machine around KVM_RUN.
//!
//! ```text
//!            requests? ──yes──> handle (STOP: leave)
//!   ┌──────> enter_guest_mode
//!   │            │ none
//!   │        KVM_RUN ──EINTR/EAGAIN──> clear immediate_exit ──┐
//!   │            │ exit                                        │
//!   │        VmExit (translated once) ─> VcpuExits (the VMM)   │
//!   │            │                                             │
//!   └── Resume ──┴── Stop / Halt / Fail ──> tell the VM, wait  │
//!   └──────────────────────────────────────────────────────────┘
//! ```
//!
//! EINTR and EAGAIN from KVM_RUN are not exits: they mean "a kick" or
//! "try again" and are handled before any real exit.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuFd};
use vmm_sys_util::errno;

use super::context::{VmContext, VmStop};
use super::cpu::{CpuAccess, CpuError};
use super::cpu_state::CpuState;
use super::exit::{HypercallExit, IoAction, VcpuError, VcpuExits, VmExit, le_value};
use super::failure::{FailureKind, GuestFailure};
use super::kick::{self, VcpuKick, VcpuRequest};
use crate::trace;

/// What the exit handler decided, before touching the vCPU fd again.
enum Action<F> {
    Resume,
    Hypercall(u64),
    Halt,
    Stop(VmStop<F>),
    Fail(FailureKind),
    InternalError,
}

/// A vCPU and what it needs to run.
pub struct Vcpu<X: VcpuExits> {
    id: u32,
    fd: VcpuFd,
    /// KVM keeps the general registers in `kvm_run` (set up by
    /// `Vm::create_vcpu` when KVM has `KVM_CAP_SYNC_REGS`).
    sync_regs: bool,
    /// And the special registers.
    sync_sregs: bool,
    ctx: Arc<VmContext<X>>,
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

/// `CpuAccess` over a `VcpuFd`, for hypercalls and requests.
///
/// With `sync`, the general registers go through `kvm_run`'s sync area
/// (`KVM_SYNC_X86_REGS`: KVM stores them there at every exit and loads them
/// at the next KVM_RUN when marked dirty), saving the GET_REGS and SET_REGS
/// ioctls of every hypercall. With `sync_sregs`, the special registers are
/// read from it too (`KVM_SYNC_X86_SREGS`), until the first KVM_SET_SREGS
/// makes that copy stale; they are always set with the ioctl, as KVM
/// applies each set (a CR4.PGE toggle is two). Only valid after a KVM_RUN
/// exit, which is when hypercalls run.
struct FdCpu<'a> {
    id: u32,
    fd: &'a mut VcpuFd,
    sync: bool,
    sync_sregs: bool,
}

fn cpu_err(op: &'static str) -> impl FnOnce(errno::Error) -> CpuError {
    move |source| CpuError { op, source }
}

impl CpuAccess for FdCpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }
    fn regs(&mut self) -> Result<kvm_regs, CpuError> {
        if self.sync {
            return Ok(self.fd.sync_regs_mut().regs);
        }
        self.fd.get_regs().map_err(cpu_err("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), CpuError> {
        if self.sync {
            self.fd.sync_regs_mut().regs = *regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.fd.set_regs(regs).map_err(cpu_err("KVM_SET_REGS"))
    }
    fn sregs(&mut self) -> Result<kvm_sregs, CpuError> {
        if self.sync_sregs {
            return Ok(self.fd.sync_regs().sregs);
        }
        self.fd.get_sregs().map_err(cpu_err("KVM_GET_SREGS"))
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), CpuError> {
        self.sync_sregs = false;
        self.fd.set_sregs(sregs).map_err(cpu_err("KVM_SET_SREGS"))
    }
}

/// Phase 1: decide what an exit means, touching only the VMM's devices.
fn handle_exit<X: VcpuExits>(
    ctx: &VmContext<X>,
    id: u32,
    exit: VmExit<'_>,
) -> Result<Action<X::Failure>, VcpuError<X::Error>> {
    ctx.stats.exit(exit.reason());
    let exit_err = |source| VcpuError::Exit { vcpu: id, source };
    Ok(match exit {
        VmExit::IoOut { port, data } => match ctx.exits.io_out(id, port, data).map_err(exit_err)? {
            IoAction::Resume => Action::Resume,
            IoAction::Exit(code) => Action::Stop(VmStop::Exit { code, vcpu: id }),
            IoAction::Hypercall(nr) => Action::Hypercall(nr),
            IoAction::Unclaimed => Action::Fail(FailureKind::UnknownPort {
                port,
                write: true,
                len: data.len(),
                value: Some(le_value(data)),
            }),
        },
        VmExit::IoIn { port, data } => {
            if ctx.exits.io_in(port, data) {
                Action::Resume
            } else {
                Action::Fail(FailureKind::UnknownPort {
                    port,
                    write: false,
                    len: data.len(),
                    value: None,
                })
            }
        }
        VmExit::MmioRead { addr, data } => Action::Fail(FailureKind::UnknownMmio {
            addr,
            write: false,
            len: data.len(),
        }),
        VmExit::MmioWrite { addr, data } => {
            if ctx.exits.mmio_write(addr, data) {
                Action::Resume
            } else {
                Action::Fail(FailureKind::UnknownMmio {
                    addr,
                    write: true,
                    len: data.len(),
                })
            }
        }
        VmExit::Hlt => Action::Halt,
        VmExit::Shutdown => Action::Fail(FailureKind::TripleFault),
        VmExit::FailEntry { reason, cpu } => Action::Fail(FailureKind::FailEntry { reason, cpu }),
        VmExit::InternalError => Action::InternalError,
        VmExit::SystemEvent { kind } => Action::Fail(FailureKind::SystemEvent { kind }),
        VmExit::Interrupted | VmExit::Again => Action::Resume,
        VmExit::Unexpected(what) => Action::Fail(FailureKind::UnexpectedExit(what)),
    })
}

impl<X: VcpuExits> Vcpu<X> {
    /// A configured vCPU, ready to run on its own thread.
    pub fn new(id: u32, mut fd: VcpuFd, ctx: Arc<VmContext<X>>, kick: Arc<VcpuKick>) -> Self {
        let valid = fd.get_kvm_run().kvm_valid_regs;
        let sync_regs = valid & u64::from(KVM_SYNC_X86_REGS) != 0;
        let sync_sregs = valid & u64::from(KVM_SYNC_X86_SREGS) != 0;
        Vcpu {
            id,
            fd,
            sync_regs,
            sync_sregs,
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
            self.ctx.request_stop(VmStop::VmmError(X::Failure::from(e)));
        }

        self.kick.detach_current_thread();
        kick::unregister_kvm_run();
        VcpuReport {
            id: self.id,
            state: self.state(),
        }
    }

    fn run_loop(&mut self) -> Result<(), VcpuError<X::Error>> {
        let ctx = self.ctx.clone();
        let exit_err = |vcpu| move |source| VcpuError::Exit { vcpu, source };
        loop {
            // Held from before "in guest mode" is published until KVM_RUN
            // returns (see `memslot::MemslotBounce`).
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
                    sync_sregs: false,
                };
                ctx.exits
                    .handle_requests(&mut cpu, reqs)
                    .map_err(exit_err(self.id))?;
                continue;
            }

            let t = Instant::now();
            let result = {
                let _slice = trace::span::kvm_run(self.id).entered();
                self.fd.run()
            };
            self.kick.exit_guest_mode();
            drop(gate);
            ctx.stats.guest_time(t.elapsed().as_nanos() as u64);

            let exit = VmExit::from_run(result).map_err(|source| VcpuError::Kvm {
                vcpu: self.id,
                op: "KVM_RUN",
                source,
            })?;
            // Until the end of the iteration: the hypercall, or the wait of
            // a halted vCPU, is part of handling the exit.
            let _slice = trace::span::vcpu_exit(self.id, exit.reason().name()).entered();
            let interrupted = matches!(exit, VmExit::Interrupted | VmExit::Again);
            let action = handle_exit(&ctx, self.id, exit)?;
            if interrupted {
                // The kick handler may have set it; requests are taken at
                // the top of the loop.
                self.fd.set_kvm_immediate_exit(0);
            }

            match action {
                Action::Resume => {}
                Action::Hypercall(_eax) => {
                    let mut cpu = FdCpu {
                        id: self.id,
                        fd: &mut self.fd,
                        sync: self.sync_regs,
                        sync_sregs: self.sync_sregs,
                    };
                    // The number is the whole of rax, not the eax written.
                    let nr = cpu
                        .regs()
                        .map_err(|e| VcpuError::Kvm {
                            vcpu: self.id,
                            op: e.op,
                            source: e.source,
                        })?
                        .rax;
                    ctx.stats.hypercall(nr);
                    let t = Instant::now();
                    self.kick.set_hypercall(Some(nr));
                    let result = ctx.exits.hypercall(&mut cpu, nr);
                    self.kick.set_hypercall(None);
                    ctx.stats.hypercall_time(nr, t.elapsed().as_nanos() as u64);
                    match result.map_err(exit_err(self.id))? {
                        HypercallExit::Resume => {}
                        HypercallExit::Exit(code) => ctx.request_stop(VmStop::Exit {
                            code,
                            vcpu: self.id,
                        }),
                        HypercallExit::Halt => {
                            ctx.vcpu_halted();
                            // Returns only once the VM stopped: never back
                            // into the guest, whose next instruction halts
                            // again (and would count again) until the STOP
                            // request reaches this vCPU.
                            ctx.wait_for_stop(None);
                            return Ok(());
                        }
                    }
                }
                Action::Halt => {
                    ctx.vcpu_halted();
                    // No interrupt can wake a halted vCPU: wait for the end.
                    ctx.wait_for_stop(None);
                    return Ok(());
                }
                Action::Stop(why) => ctx.request_stop(why),
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
