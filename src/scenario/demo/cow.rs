//! The `cow` scenario, on the `ksm` guest.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::super::narrate::TraceLayer;
use super::super::observe::{self, Observer, cold_after};
use super::{DemoError, Result, Scenario, print_summary, summary};
use crate::vmm::{ConsoleBuffer, GuestSource, Outcome, Paging, RunningVm, VmConfig, guests};

/// The `cow` scenario: the `ksm` guest fills pages with two patterns and
/// waits while ksmd merges them (write-protect, then `change_pte` to the
/// shared frame); its writes to every other page then fault through the
/// shadow MMU into the host's copy-on-write (`CowBreak`, `change_pte` to a
/// private copy) and it verifies every byte.
pub(super) fn run(
    scenario: &Scenario,
    json: bool,
    out: &Arc<Mutex<Box<dyn Write + Send>>>,
    layer: &TraceLayer,
    observer: &mut Observer,
    title: &str,
) -> Result<()> {
    if guests::find("ksm").is_none() {
        return Err(DemoError::NotBuiltIn("ksm"));
    }
    let mut config = VmConfig::new(GuestSource::Builtin("ksm".into()));
    config.mem_size = 16 << 20;
    config.paging = Paging::Shadow;
    config.cmdline = "pages=4 patterns=2 wait_ms=400".into();
    config.ksm = Some(crate::mm::KsmConfig {
        pages_to_scan: 4096,
        sleep_millisecs: 25,
    });
    config.validate()?;
    if !json {
        writeln!(
            out.lock(),
            "demo {}: {}\nguest ksm: 4 pages, 2 patterns, a 400 ms wait for ksmd, then a write to every other page\n",
            scenario.name,
            scenario.description
        )?;
    }
    let console = ConsoleBuffer::new();
    layer.set_enabled(true);
    let vm = RunningVm::start(&config, Box::new(console.clone()))?;
    let paging = vm.shadow().ok_or(DemoError::NotShadow)?;
    let mm = paging.ram().mm().clone();
    observer.attach(paging, cold_after(None), title)?;
    let timeout = Some(Duration::from_secs(20));
    vm.wait_for_stop(timeout);
    let (report, detached) = observe::end(vm, observer, timeout);
    detached?;
    let cows = mm.stats().pgcow;
    let text = console.text();
    let summary_line = text
        .lines()
        .rfind(|l| l.starts_with("ksm: ") && l.ends_with(" errors"))
        .unwrap_or("(no summary line)")
        .to_string();
    guest_saw!(
        "the guest's writes broke the sharing ({cows} copy-on-write copies) and it verified every byte: {summary_line}"
    );
    layer.set_enabled(false);
    if matches!(report.outcome, Outcome::Failed(_) | Outcome::VmmError(_))
        || !summary_line.ends_with(" 0 errors")
    {
        return Err(DemoError::KsmGuestFailed {
            outcome: Box::new(report.outcome),
            summary: summary_line,
        });
    }
    if cows == 0 {
        return Err(DemoError::NoCow);
    }
    let counters = summary(&report, &mm, mm.ksm_stats());
    layer.finish()?;
    print_summary(out, json, &counters)
}
