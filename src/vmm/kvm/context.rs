//! What every vCPU thread of one VM shares: the VMM's exit handler, the
//! counters, the kick handles, the memslot-bounce gate, and the stop
//! protocol (the first reason to stop wins; every vCPU is kicked with
//! STOP; the host waits on a condition variable).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::exit::VcpuExits;
use super::failure::GuestFailure;
use super::kick::{VcpuKick, VcpuRequest};
use super::memslot::MemslotBounce;
use super::stats::VmStats;

/// Why the VM stopped; `F` is the VMM's failure type
/// ([`VcpuExits::Failure`]).
#[derive(Debug)]
pub enum VmStop<F> {
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
    VmmError(F),
    /// `--timeout` expired.
    TimedOut,
    /// The host stopped the VM.
    Host,
}

/// State every vCPU thread of one VM shares.
pub struct VmContext<X: VcpuExits> {
    /// The VMM's side of the exits.
    pub exits: X,
    /// Counters.
    pub stats: Arc<VmStats>,
    /// Kick handles of all vCPUs, by index.
    pub kicks: Vec<Arc<VcpuKick>>,
    /// Shadow mode: held across KVM_RUN so a memslot bounce can keep every
    /// vCPU out of the guest.
    pub memslot_bounce: Option<Arc<MemslotBounce>>,
    stop: Mutex<Option<VmStop<X::Failure>>>,
    stopped: Condvar,
    halted: AtomicU32,
}

impl<X: VcpuExits> VmContext<X> {
    /// Context for `kicks.len()` vCPUs.
    pub fn new(
        exits: X,
        stats: Arc<VmStats>,
        kicks: Vec<Arc<VcpuKick>>,
        memslot_bounce: Option<Arc<MemslotBounce>>,
    ) -> Self {
        VmContext {
            exits,
            stats,
            kicks,
            memslot_bounce,
            stop: Mutex::new(None),
            stopped: Condvar::new(),
            halted: AtomicU32::new(0),
        }
    }

    /// Stops the VM for `why` unless it is already stopping: records the
    /// reason, wakes the waiter and kicks every vCPU with STOP.
    pub fn request_stop(&self, why: VmStop<X::Failure>) {
        {
            let mut stop = self.stop.lock();
            if stop.is_some() {
                return;
            }
            *stop = Some(why);
            self.stopped.notify_all();
        }
        for k in &self.kicks {
            match k.kick(VcpuRequest::STOP) {
                Ok(_) => self.stats.kick_sent(),
                // The request is posted: the vCPU sees STOP at its next
                // exit, only later than a signal would make it.
                Err(e) => tracing::error!("stopping the VM: {e}"),
            }
        }
    }

    /// A vCPU halted; when the last one does, the VM stops (no interrupt
    /// can wake a halted vCPU).
    pub fn vcpu_halted(&self) {
        let halted = self.halted.fetch_add(1, Ordering::SeqCst) + 1;
        if halted as usize == self.kicks.len() {
            self.request_stop(VmStop::AllHalted);
        }
    }

    /// Takes the reason the VM stopped, once the vCPU threads are done.
    pub fn take_stop_reason(&self) -> Option<VmStop<X::Failure>> {
        self.stop.lock().take()
    }

    /// Waits until the VM stops or `timeout` passes; false on timeout.
    pub fn wait_for_stop(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut stop = self.stop.lock();
        loop {
            if stop.is_some() {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.stopped.wait_until(&mut stop, d).timed_out() && stop.is_none() {
                        return false;
                    }
                }
                None => self.stopped.wait(&mut stop),
            }
        }
    }
}
