//! The thread that runs a `--host-ops` script's timed operations (`at
//! 200ms ...`) against a running guest, on the host-thread scaffold.

use std::sync::Arc;
use std::time::Instant;

use super::ops::{HostOpFailed, HostOpScript};
use super::ram::ShadowRam;
use super::thread::{HostThread, StartError};

/// What to do when an operation fails: the run cannot go on as scripted.
pub type OnFailure = Box<dyn Fn(HostOpFailed) + Send>;

/// The thread running the timed ops of a script.
pub struct TimedOps {
    thread: HostThread<()>,
}

impl TimedOps {
    /// Starts the thread (`None` if the script has no timed op); an op that
    /// fails is handed to `on_failure` and ends the thread.
    pub fn start(
        ram: Arc<ShadowRam>,
        script: &HostOpScript,
        on_failure: OnFailure,
    ) -> Result<Option<Self>, StartError> {
        let timed = script.timed();
        if timed.is_empty() {
            return Ok(None);
        }
        let script = script.clone();
        let t0 = Instant::now();
        let thread = HostThread::spawn("host-ops", (), move |stop, _| {
            for (at, op) in timed {
                if stop.sleep(at.saturating_sub(t0.elapsed())) {
                    return Ok(());
                }
                if let Err(e) = op.apply(&ram) {
                    on_failure(script.failed(&op, e.clone()));
                    return Err(e.into());
                }
            }
            Ok(())
        })?;
        Ok(Some(TimedOps { thread }))
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.thread.stop();
    }
}
