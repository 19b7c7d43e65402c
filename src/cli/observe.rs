//! `--trace FILE` and `--timeline FILE.svg`, shared by `run` and `demo`
//! (`stress` takes `--trace` only).

use std::path::PathBuf;

use shadowvm::scenario::observe::{ObserveError, ObserveOptions, Observer};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ObserveArgs {
    /// Write a Perfetto trace of the run to FILE.
    ///
    /// Chrome trace-event JSON: open it in the Perfetto UI
    /// (ui.perfetto.dev) or chrome://tracing. A track per thread (vCPUs,
    /// ksmd, kswapd, host operations) with slices for KVM_RUN, exits,
    /// hypercalls, page faults and their outcome, host operations, notifier
    /// callbacks and TLB shootdowns (docs/observability.md).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// Draw guest RAM's page states over time into FILE.svg.
    ///
    /// Needs shadow paging. Time across, the pages the guest touched down,
    /// a colour per state (not present, present, young, cold, KSM-shared,
    /// swapped out), lines for invalidations, ticks for shootdowns
    /// (docs/observability.md).
    #[arg(long, value_name = "FILE.svg")]
    pub timeline: Option<PathBuf>,
}

impl ObserveArgs {
    /// Opens the files (a path that cannot be written fails here, before
    /// any guest starts).
    pub fn open(&self) -> Result<Observer, ObserveError> {
        Observer::open(&ObserveOptions {
            trace: self.trace.clone(),
            timeline: self.timeline.clone(),
        })
    }
}
