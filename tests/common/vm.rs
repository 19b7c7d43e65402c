//! Ending a live VM from the host side, as a test that drove it must.

use std::time::Duration;

use shadowvm::vmm::{Outcome, RunReport, RunningVm};

/// Stops `vm` from the host and waits (at most 10 s) for its report; the
/// run must have ended `Stopped`, not by a guest exit or a VMM failure.
#[track_caller]
pub fn stop_vm(vm: RunningVm) -> RunReport {
    vm.stop();
    let report = vm.wait(Some(Duration::from_secs(10)));
    assert!(
        matches!(report.outcome, Outcome::Stopped),
        "{}",
        report.outcome
    );
    report
}
