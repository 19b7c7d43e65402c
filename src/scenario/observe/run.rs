//! `shadowvm run` with observers: the VM runs while the timeline samples
//! it and a callback hears how it goes every [`TICK`]; when the guest
//! stops (or `--timeout` expires) the timeline takes its last sample
//! before the VM's memory is torn down.

use std::time::{Duration, Instant};

use super::{ObserveError, Observer, cold_after};
use crate::vmm::config::ConfigError;
use crate::vmm::devices::ConsoleOut;
use crate::vmm::paging::shadow::ShadowStats;
use crate::vmm::{Outcome, Paging, RunReport, RunningVm, VmConfig, VmmError};

/// How often the progress callback runs.
pub const TICK: Duration = Duration::from_millis(100);

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM could not start.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The trace or the timeline failed.
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

/// What the progress callback sees.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Since the guest started.
    pub elapsed: Duration,
    /// `--timeout`, if any.
    pub timeout: Option<Duration>,
    /// Shadow mode: the MMU's and the host flush's counters so far.
    pub shadow: Option<ShadowStats>,
}

/// Runs `config`'s guest to the end (or `config.timeout`) with `observer`
/// attached, calling `on_tick` every [`TICK`] while it runs; the
/// timeline's title names `title`. The observer is not finished (the
/// caller does, once it is done with tracing).
pub fn run(
    config: &VmConfig,
    console: ConsoleOut,
    observer: &mut Observer,
    title: &str,
    mut on_tick: impl FnMut(&Progress),
) -> Result<RunReport, RunError> {
    if observer.wants_timeline() && config.paging != Paging::Shadow {
        return Err(VmmError::from(ConfigError::NeedsShadow("--timeline")).into());
    }
    let vm = RunningVm::start(config, console)?;
    let start = Instant::now();
    if let Some(paging) = vm.shadow()
        && let Err(e) = observer.attach(paging, cold_after(config.reclaim), title)
    {
        vm.stop();
        vm.wait(None);
        return Err(e.into());
    }
    let deadline = config.timeout.map(|t| start + t);
    loop {
        let now = Instant::now();
        let tick = match deadline {
            Some(d) if d <= now => break,
            Some(d) => TICK.min(d - now),
            None => TICK,
        };
        if vm.wait_for_stop(Some(tick)) {
            break;
        }
        on_tick(&Progress {
            elapsed: start.elapsed(),
            timeout: config.timeout,
            shadow: vm.shadow().map(|s| s.stats()),
        });
    }
    let (report, detached) = end(vm, observer, config.timeout);
    detached?;
    Ok(report)
}

/// Ends `vm`, which stopped or ran out of `timeout` (then it is stopped
/// and reported as timed out after `timeout`): the timeline's last sample
/// first, then [`RunningVm::wait`] tears the VM down. The report, and
/// whether the timeline's sampler ended well.
pub fn end(
    vm: RunningVm,
    observer: &mut Observer,
    timeout: Option<Duration>,
) -> (RunReport, Result<(), ObserveError>) {
    let detached = observer.detach();
    let mut report = vm.wait(Some(Duration::ZERO));
    if let (Outcome::TimedOut { after, .. }, Some(timeout)) = (&mut report.outcome, timeout) {
        *after = timeout;
    }
    (report, detached)
}
