//! The scaffold every host-side thread of a shadow-mode run shares (ksmd,
//! kswapd, the scripted host operations): a stop signal it sleeps on
//! (`kthread_should_stop` plus the wait queue that wakes it), its join
//! handle, the report it keeps up to date, and why it stopped early.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::mm::MmError;

/// A stop request a host thread sleeps on.
#[derive(Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl StopSignal {
    /// Asks the thread to stop and wakes it.
    pub fn stop(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock()
    }

    /// Sleeps up to `d`; true if a stop was asked for (before or during).
    pub fn sleep(&self, d: Duration) -> bool {
        let mut stopped = self.stopped.lock();
        if !*stopped && !d.is_zero() {
            // Timed out or woken: either way the flag below says which.
            let _timed_out = self.cv.wait_for(&mut stopped, d);
        }
        *stopped
    }
}

/// Why a host thread stopped before it was asked to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThreadError {
    /// A host mm operation failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A host TLB flush failed (the VM is being stopped).
    #[error(transparent)]
    Flush(#[from] crate::mmu::TlbFlushError),
    /// The thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// In `--json`, the message.
impl serde::Serialize for ThreadError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A host thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The thread could not be spawned.
    #[error("cannot start the {name} thread: {source}")]
    Spawn {
        /// The thread's name.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Preparing guest RAM for it failed.
    #[error("cannot set up {name} on guest RAM: {source}")]
    Mm {
        /// The thread's name.
        name: &'static str,
        /// Why.
        #[source]
        source: MmError,
    },
}

/// What the thread shares with its owner.
struct Shared<S> {
    report: Mutex<S>,
    error: Mutex<Option<ThreadError>>,
}

/// A running host thread that keeps a report of type `S`.
pub struct HostThread<S> {
    name: &'static str,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared<S>>,
}

impl<S: Clone + Send + 'static> HostThread<S> {
    /// Runs `body` on a thread called `name`, with `report` as its first
    /// report. `body` sleeps on the stop signal and updates the report;
    /// the error it returns is kept, except `MmError::Exited` (the mm went
    /// away: nothing is left to do).
    pub fn spawn<F>(name: &'static str, report: S, body: F) -> Result<Self, StartError>
    where
        F: FnOnce(&StopSignal, &Mutex<S>) -> Result<(), ThreadError> + Send + 'static,
    {
        let stop = Arc::new(StopSignal::default());
        let shared = Arc::new(Shared {
            report: Mutex::new(report),
            error: Mutex::new(None),
        });
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || match body(&stop, &shared.report) {
                    Ok(()) | Err(ThreadError::Mm(MmError::Exited)) => {}
                    Err(e) => *shared.error.lock() = Some(e),
                })
                .map_err(|source| StartError::Spawn { name, source })?
        };
        Ok(HostThread {
            name,
            stop,
            thread: Some(thread),
            shared,
        })
    }

    /// The report so far.
    pub fn report(&self) -> S {
        self.shared.report.lock().clone()
    }

    /// Why the thread stopped early, if it did.
    pub fn error(&self) -> Option<ThreadError> {
        self.shared.error.lock().clone()
    }
}

impl<S> HostThread<S> {
    /// Stops the thread and waits for it; a panic is kept as its error.
    pub fn stop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            *self.shared.error.lock() = Some(ThreadError::Panicked(self.name));
        }
    }
}

impl<S> Drop for HostThread<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_reports_and_keeps_errors() {
        let mut t = HostThread::spawn("counter", 0u64, |stop, n| {
            while !stop.sleep(Duration::from_millis(1)) {
                *n.lock() += 1;
            }
            Ok(())
        })
        .unwrap();
        t.stop();
        assert_eq!(t.error(), None);
        let before = t.report();
        assert_eq!(t.report(), before, "stopped: the report no longer moves");

        let mut t =
            HostThread::spawn("failing", (), |_, _| Err(MmError::OutOfFrames.into())).unwrap();
        t.stop();
        assert_eq!(t.error(), Some(ThreadError::Mm(MmError::OutOfFrames)));
        let mut t = HostThread::spawn("exiting", (), |_, _| Err(MmError::Exited.into())).unwrap();
        t.stop();
        assert_eq!(t.error(), None, "the mm going away is not an error");
        let mut t = HostThread::spawn("panicking", (), |_, _| panic!("boom")).unwrap();
        t.stop();
        assert_eq!(t.error(), Some(ThreadError::Panicked("panicking")));
        assert_eq!(
            t.error().unwrap().to_string(),
            "the panicking thread panicked"
        );
    }
}
