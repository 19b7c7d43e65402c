//! A notifier that records every callback it receives, for tests of the
//! notifier itself and of every layer that drives it.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex};

use super::NotifierError;
use super::ops::{Callbacks, MmuNotifierOps, MmuNotifierRange, NotifierPte};

/// One callback as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Release,
    ClearFlushYoung { start: u64, end: u64 },
    ClearYoung { start: u64, end: u64 },
    TestYoung { address: u64 },
    ChangePte { address: u64, pte: NotifierPte },
    InvalidateRangeStart(MmuNotifierRange),
    InvalidateRangeEnd(MmuNotifierRange),
    InvalidateRange { start: u64, end: u64 },
}

/// Records callbacks; can be told to answer "young", to refuse
/// non-blockable invalidations, and to block inside a callback until
/// released (to hold a dispatch in flight).
pub struct RecordingNotifier {
    name: &'static str,
    log: Mutex<Vec<Recorded>>,
    callbacks: Callbacks,
    young: AtomicBool,
    fail_starts: AtomicBool,
    does_not_block: bool,
    gate: Mutex<GateState>,
    gate_cv: Condvar,
}

#[derive(Default)]
struct GateState {
    armed: bool,
    entered: bool,
    /// Callbacks waiting at the gate now.
    blocked: u32,
}

impl RecordingNotifier {
    pub fn new(name: &'static str) -> Self {
        Self::with_callbacks(name, Callbacks::all())
    }

    /// A recorder that declares only `callbacks` (the others are "NULL").
    pub fn with_callbacks(name: &'static str, callbacks: Callbacks) -> Self {
        Self {
            name,
            log: Mutex::new(Vec::new()),
            callbacks,
            young: AtomicBool::new(false),
            fail_starts: AtomicBool::new(false),
            does_not_block: false,
            gate: Mutex::new(GateState::default()),
            gate_cv: Condvar::new(),
        }
    }

    /// Marks the notifier `MMU_INVALIDATE_DOES_NOT_BLOCK`.
    pub fn non_blocking(mut self) -> Self {
        self.does_not_block = true;
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What the young callbacks answer.
    pub fn set_young(&self, young: bool) {
        self.young.store(young, Ordering::SeqCst);
    }

    /// Makes every `invalidate_range_start` fail, blockable or not (a buggy
    /// notifier: the callers must still end every range).
    pub fn set_fail_starts(&self, fail: bool) {
        self.fail_starts.store(fail, Ordering::SeqCst);
    }

    /// The next callback blocks until [`Self::open_gate`].
    pub fn close_gate(&self) {
        let mut g = self.gate.lock();
        g.armed = true;
        g.entered = false;
    }

    /// Lets a blocked callback go on.
    pub fn open_gate(&self) {
        let mut g = self.gate.lock();
        g.armed = false;
        self.gate_cv.notify_all();
    }

    /// Waits until a callback is blocked at the closed gate.
    pub fn wait_blocked(&self) {
        let mut g = self.gate.lock();
        while !g.entered {
            self.gate_cv.wait(&mut g);
        }
    }

    fn record(&self, r: Recorded) {
        self.log.lock().push(r);
        let mut g = self.gate.lock();
        if g.armed {
            g.entered = true;
            g.blocked += 1;
            self.gate_cv.notify_all();
            while g.armed {
                self.gate_cv.wait(&mut g);
            }
            g.blocked -= 1;
        }
    }

    /// Callbacks blocked at the closed gate now.
    pub fn nr_blocked(&self) -> u32 {
        self.gate.lock().blocked
    }

    /// Everything recorded so far.
    pub fn log(&self) -> Vec<Recorded> {
        self.log.lock().clone()
    }

    /// Takes the log, leaving it empty.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.log.lock())
    }

    /// How many `release` calls were recorded.
    pub fn releases(&self) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|r| **r == Recorded::Release)
            .count()
    }
}

impl MmuNotifierOps for RecordingNotifier {
    fn callbacks(&self) -> Callbacks {
        self.callbacks
    }
    fn invalidate_does_not_block(&self) -> bool {
        self.does_not_block
    }
    fn release(&self) {
        self.record(Recorded::Release);
    }
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.record(Recorded::ClearFlushYoung { start, end });
        self.young.load(Ordering::SeqCst)
    }
    fn clear_young(&self, start: u64, end: u64) -> bool {
        self.record(Recorded::ClearYoung { start, end });
        self.young.load(Ordering::SeqCst)
    }
    fn test_young(&self, address: u64) -> bool {
        self.record(Recorded::TestYoung { address });
        self.young.load(Ordering::SeqCst)
    }
    fn change_pte(&self, address: u64, pte: NotifierPte) {
        self.record(Recorded::ChangePte { address, pte });
    }
    fn invalidate_range_start(&self, range: &MmuNotifierRange) -> Result<(), NotifierError> {
        self.record(Recorded::InvalidateRangeStart(*range));
        if self.fail_starts.load(Ordering::SeqCst) {
            return Err(NotifierError::Again);
        }
        if !range.blockable() && !self.does_not_block {
            return Err(NotifierError::Again);
        }
        Ok(())
    }
    fn invalidate_range_end(&self, range: &MmuNotifierRange) {
        self.record(Recorded::InvalidateRangeEnd(*range));
    }
    fn invalidate_range(&self, start: u64, end: u64) {
        self.record(Recorded::InvalidateRange { start, end });
    }
}
