//! Kicking a vCPU out of KVM_RUN from another thread: KVM's
//! `kvm_make_request` + `kvm_vcpu_kick`, done from user space with a
//! real-time signal and `kvm_run.immediate_exit`.
//!
//! Protocol (the same pairing as KVM's `vcpu->mode` and `vcpu->requests`):
//!
//! * the vCPU thread stores `IN_GUEST_MODE`, then reads (and clears) its
//!   requests, and only enters KVM_RUN if there were none;
//! * a kicker sets the request bit, then reads the mode and signals the
//!   thread if it is `IN_GUEST_MODE`.
//!
//! Both sides use SeqCst, so at least one of them sees the other: either the
//! vCPU sees the request before entering, or the kicker sees
//! `IN_GUEST_MODE` and signals. The signal handler sets
//! `kvm_run.immediate_exit`, so a signal that lands after the vCPU checked
//! its requests but before the ioctl entered the kernel still makes KVM_RUN
//! return EINTR at once; one that lands inside KVM_RUN interrupts it.
//!
//! Shadow mode uses `kick_and_wait` for TLB shootdowns: it returns once the
//! vCPU is outside guest mode, and the vCPU handles the request before it
//! enters again (`kvm_make_all_cpus_request(.., KVM_REQUEST_WAIT)`).

use std::cell::Cell;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use parking_lot::Mutex;
use vmm_sys_util::errno;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// Errors of the kick machinery.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// Installing the signal handler failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Handler(errno::Error),
    /// pthread_kill failed.
    #[error("cannot signal vCPU {vcpu}: {source}")]
    Signal {
        /// vCPU index.
        vcpu: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The vCPU did not leave guest mode in time.
    #[error("vCPU {0} did not leave guest mode within {1:?} of a kick")]
    Timeout(u32, Duration),
}

/// The signal used to kick vCPU threads (the first real-time signal).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, if it is a vCPU thread.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    // Async-signal-safe: a TLS read of a `Cell` with a const initializer and
    // one volatile byte store.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was registered by this very thread with
        // `register_kvm_run` and points into the vCPU's kvm_run mapping,
        // which stays mapped until `unregister_kvm_run` clears the pointer
        // (on the same thread, so no handler can run concurrently with the
        // clearing). A volatile write of one byte has no alignment needs.
        unsafe { ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the process-wide kick signal handler (once).
pub fn install_kick_handler() -> Result<(), KickError> {
    static RESULT: OnceLock<Option<i32>> = OnceLock::new();
    let failed = RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), handle_kick)
            .err()
            .map(|e| e.errno())
    });
    match failed {
        Some(errno) => Err(KickError::Handler(errno::Error::new(*errno))),
        None => Ok(()),
    }
}

/// Makes the kick handler of the calling (vCPU) thread set `run`'s
/// `immediate_exit`.
///
/// # Safety
/// `run` must point to this vCPU's mapped `kvm_run` and stay valid until
/// `unregister_kvm_run` is called on this same thread.
pub unsafe fn register_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Undoes `register_kvm_run` for the calling thread.
pub fn unregister_kvm_run() {
    KVM_RUN.with(|c| c.set(ptr::null_mut()));
}

bitflags::bitflags! {
    /// Requests a vCPU handles before it next enters the guest
    /// (KVM's `KVM_REQ_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct VcpuRequest: u32 {
        /// Leave the run loop: the VM is stopping.
        const STOP = 1 << 0;
        /// Flush this vCPU's TLB before re-entering (`KVM_REQ_TLB_FLUSH`).
        const TLB_FLUSH = 1 << 1;
    }
}

/// `VcpuKick::mode` values, KVM's names.
const OUTSIDE_GUEST_MODE: u8 = 0;
const IN_GUEST_MODE: u8 = 1;
const EXITED: u8 = 2;

/// Where a vCPU is ([`VcpuKick::activity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VcpuActivity {
    /// vCPU index.
    pub id: u32,
    /// Inside (or entering) KVM_RUN.
    pub in_guest: bool,
    /// Its thread left the run loop.
    pub exited: bool,
    /// The hypercall it is handling, if any.
    pub hypercall: Option<u64>,
    /// KVM_RUN returns so far.
    pub exits: u64,
}

/// The part of a vCPU other threads may touch: its requests and mode, and
/// its thread id for signalling.
#[derive(Debug)]
pub struct VcpuKick {
    id: u32,
    requests: AtomicU32,
    mode: AtomicU8,
    /// Incremented every time KVM_RUN returns.
    exits: AtomicU64,
    /// Requests handled so far, for tests and stats.
    handled: AtomicU64,
    /// The hypercall being handled, plus one (0: none): where a stuck vCPU
    /// is, for the stress run's overrun report.
    hypercall: AtomicU64,
    /// The thread, while it runs; the lock orders pthread_kill against exit.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl VcpuKick {
    /// Kick state of vCPU `id`, not yet running.
    pub fn new(id: u32) -> Self {
        VcpuKick {
            id,
            requests: AtomicU32::new(0),
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            exits: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            hypercall: AtomicU64::new(0),
            thread: Mutex::new(None),
        }
    }

    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Called on the vCPU thread when it starts.
    pub fn attach_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        *self.thread.lock() = Some(unsafe { libc::pthread_self() });
    }

    /// Called on the vCPU thread when it leaves its run loop; after this no
    /// signal is sent to it.
    pub fn detach_current_thread(&self) {
        let mut t = self.thread.lock();
        self.mode.store(EXITED, Ordering::SeqCst);
        *t = None;
    }

    /// vCPU side: publish that we are about to enter the guest, then take
    /// pending requests. Enter only if the result is empty.
    pub fn enter_guest_mode(&self) -> VcpuRequest {
        self.mode.store(IN_GUEST_MODE, Ordering::SeqCst);
        let reqs = VcpuRequest::from_bits_truncate(self.requests.swap(0, Ordering::SeqCst));
        if !reqs.is_empty() {
            self.mode.store(OUTSIDE_GUEST_MODE, Ordering::SeqCst);
            self.handled.fetch_add(1, Ordering::Relaxed);
        }
        reqs
    }

    /// vCPU side: KVM_RUN returned.
    pub fn exit_guest_mode(&self) {
        self.mode.store(OUTSIDE_GUEST_MODE, Ordering::SeqCst);
        self.exits.fetch_add(1, Ordering::SeqCst);
    }

    /// vCPU side: hypercall `nr` is being handled (`None`: it is done).
    pub fn set_hypercall(&self, nr: Option<u64>) {
        self.hypercall
            .store(nr.map_or(0, |n| n.wrapping_add(1)), Ordering::Relaxed);
    }

    /// Where the vCPU is now (a racy snapshot, for reports).
    pub fn activity(&self) -> VcpuActivity {
        let mode = self.mode.load(Ordering::SeqCst);
        let hc = self.hypercall.load(Ordering::Relaxed);
        VcpuActivity {
            id: self.id,
            in_guest: mode == IN_GUEST_MODE,
            exited: mode == EXITED,
            hypercall: hc.checked_sub(1),
            exits: self.exits.load(Ordering::Relaxed),
        }
    }

    /// Number of times the vCPU took requests.
    pub fn requests_handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Whether the vCPU is inside (or about to enter) KVM_RUN.
    pub fn in_guest_mode(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == IN_GUEST_MODE
    }

    /// Posts `req` and, if the vCPU is in guest mode, signals it. Returns
    /// whether a signal was sent.
    pub fn kick(&self, req: VcpuRequest) -> Result<bool, KickError> {
        self.requests.fetch_or(req.bits(), Ordering::SeqCst);
        if self.mode.load(Ordering::SeqCst) != IN_GUEST_MODE {
            return Ok(false);
        }
        let thread = self.thread.lock();
        let Some(tid) = *thread else { return Ok(false) };
        // SAFETY: `tid` is a live thread: it is cleared (under this lock)
        // before the vCPU thread returns, and we hold the lock.
        let ret = unsafe { libc::pthread_kill(tid, kick_signal()) };
        if ret != 0 {
            return Err(KickError::Signal {
                vcpu: self.id,
                source: std::io::Error::from_raw_os_error(ret),
            });
        }
        Ok(true)
    }

    /// Posts `req`, kicks, and waits until the vCPU is outside guest mode
    /// (it then handles `req` before entering again).
    pub fn kick_and_wait(&self, req: VcpuRequest, timeout: Duration) -> Result<(), KickError> {
        let seq = self.exits.load(Ordering::SeqCst);
        if !self.kick(req)? {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        while self.mode.load(Ordering::SeqCst) == IN_GUEST_MODE
            && self.exits.load(Ordering::SeqCst) == seq
        {
            if Instant::now() > deadline {
                return Err(KickError::Timeout(self.id, timeout));
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                // Give the CPU away: on a 2-core host the vCPU thread may
                // need this one to take the signal.
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_seen_before_entry() {
        let k = VcpuKick::new(0);
        assert!(
            !k.kick(VcpuRequest::TLB_FLUSH).unwrap(),
            "outside guest mode: no signal"
        );
        assert_eq!(k.enter_guest_mode(), VcpuRequest::TLB_FLUSH);
        assert!(!k.in_guest_mode());
        assert_eq!(k.enter_guest_mode(), VcpuRequest::empty());
        assert!(k.in_guest_mode());
        k.exit_guest_mode();
        assert_eq!(k.requests_handled(), 1);
    }

    #[test]
    fn signal_sets_immediate_exit() {
        install_kick_handler().unwrap();
        let k = std::sync::Arc::new(VcpuKick::new(3));
        let (tx, rx) = std::sync::mpsc::channel();
        let k2 = k.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: zeroed kvm_run is plain data; it lives on this stack
            // frame until after unregister_kvm_run below.
            let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
            // SAFETY: the box outlives the registration (unregistered below).
            unsafe { register_kvm_run(&raw mut *run) };
            k2.attach_current_thread();
            assert_eq!(k2.enter_guest_mode(), VcpuRequest::empty());
            tx.send(()).unwrap();
            // Stand-in for KVM_RUN: wait for the handler's store.
            let start = Instant::now();
            // SAFETY: reading our own boxed struct.
            while unsafe { ptr::read_volatile(&raw const run.immediate_exit) } == 0 {
                assert!(start.elapsed() < Duration::from_secs(10), "no kick arrived");
                std::thread::yield_now();
            }
            k2.exit_guest_mode();
            let reqs = k2.enter_guest_mode();
            k2.detach_current_thread();
            unregister_kvm_run();
            reqs
        });
        rx.recv().unwrap();
        k.kick_and_wait(VcpuRequest::STOP, Duration::from_secs(10))
            .unwrap();
        assert_eq!(t.join().unwrap(), VcpuRequest::STOP);
        assert!(
            !k.kick(VcpuRequest::STOP).unwrap(),
            "exited thread is not signalled"
        );
    }
}
