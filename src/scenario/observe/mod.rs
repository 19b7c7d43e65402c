//! What a run can be watched with besides its text: `--trace FILE`, a
//! Perfetto trace of the trace events and slices (`perfetto.rs`), and
//! `--timeline FILE.svg`, a picture of guest RAM's page states over time
//! (`timeline/`). docs/observability.md says what each shows.
//!
//! An [`Observer`] opens both files first (a bad path is an error before
//! any guest starts), hands out the `tracing` layers to install, samples a
//! VM once it runs ([`Observer::attach`]), and writes everything out at
//! the end ([`Observer::finish`]). [`run`] is `shadowvm run` with it.

pub mod perfetto;
mod run;
pub mod timeline;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::Layer;
use tracing_subscriber::registry::Registry;

pub use perfetto::{TraceFileError, TraceWriter};
pub use run::{Progress, RunError, end, run};
pub use timeline::{Timeline, TimelineError, TimelineSummary};

use crate::vmm::host::aging::AGING_HISTORY;
use crate::vmm::host::kswapd::ReclaimConfig;
use crate::vmm::paging::ShadowPaging;

/// The files to write.
#[derive(Clone, Debug, Default)]
pub struct ObserveOptions {
    /// `--trace FILE`.
    pub trace: Option<PathBuf>,
    /// `--timeline FILE.svg`.
    pub timeline: Option<PathBuf>,
}

/// Why observing failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The trace file.
    #[error(transparent)]
    Trace(#[from] TraceFileError),
    /// The timeline.
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    /// A global subscriber was already installed.
    #[error("cannot install the trace subscriber: {0}")]
    Subscriber(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// The trace and the timeline of one run, as asked for.
pub struct Observer {
    trace: Option<TraceWriter>,
    /// The trace's layer, until [`Observer::layers`] hands it out.
    trace_layer: Option<BoxedLayer>,
    timeline: Option<Timeline>,
    /// [`Observer::layers`] was called.
    layers_taken: bool,
}

/// A `tracing` layer for the registry.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

impl Observer {
    /// Creates the files `options` names (truncating them).
    pub fn open(options: &ObserveOptions) -> Result<Observer, ObserveError> {
        let (trace, trace_layer) = match options.trace.as_deref() {
            Some(path) => {
                let (writer, layer) = TraceWriter::create(path)?;
                (Some(writer), Some(layer))
            }
            None => (None, None),
        };
        let timeline = options
            .timeline
            .as_deref()
            .map(Timeline::create)
            .transpose()?;
        Ok(Observer {
            trace,
            trace_layer,
            timeline,
            layers_taken: false,
        })
    }

    /// Whether anything is observed (nothing to install otherwise: the
    /// trace events then cost one relaxed load each).
    pub fn is_active(&self) -> bool {
        self.trace.is_some() || self.timeline.is_some()
    }

    /// Whether a timeline is asked for.
    pub fn wants_timeline(&self) -> bool {
        self.timeline.is_some()
    }

    /// The layers to install, for a caller that builds its own subscriber
    /// (once: later calls return `None`). `None` when nothing is observed:
    /// an empty list of layers would be taken as "interested in nothing"
    /// and silence every other layer.
    pub fn layers(&mut self) -> Option<Vec<BoxedLayer>> {
        if std::mem::replace(&mut self.layers_taken, true) {
            return None;
        }
        let mut v: Vec<BoxedLayer> = self.trace_layer.take().into_iter().collect();
        if let Some(t) = &self.timeline {
            v.push(Box::new(t.layer()));
        }
        (!v.is_empty()).then_some(v)
    }

    /// Installs the layers as the process's global subscriber, if there
    /// is anything to observe.
    pub fn install(&mut self) -> Result<(), ObserveError> {
        if !self.is_active() {
            return Ok(());
        }
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry().with(self.layers());
        tracing::subscriber::set_global_default(subscriber)?;
        Ok(())
    }

    /// Starts the timeline's sampling of `paging` (a VM in shadow mode);
    /// a page not seen young for `cold_after` is cold ([`cold_after`]);
    /// `title` heads the picture.
    pub fn attach(
        &mut self,
        paging: &Arc<ShadowPaging>,
        cold_after: Duration,
        title: &str,
    ) -> Result<(), ObserveError> {
        if let Some(t) = self.timeline.as_mut() {
            t.attach(paging.clone(), cold_after, title)?;
        }
        Ok(())
    }

    /// Takes the timeline's last sample: when the guest stopped, before
    /// its memory is torn down.
    pub fn detach(&mut self) -> Result<(), ObserveError> {
        if let Some(t) = self.timeline.as_mut() {
            t.detach()?;
        }
        Ok(())
    }

    /// Draws the timeline and completes the trace file. Call it once every
    /// traced thread is done.
    pub fn finish(mut self) -> Result<Option<TimelineSummary>, ObserveError> {
        let summary = self.timeline.take().map(Timeline::write).transpose();
        drop(self.trace_layer.take());
        let trace = self.trace.take().map(TraceWriter::finish).transpose();
        let summary = summary?;
        trace?;
        Ok(summary)
    }
}

/// The cold window of a run: a page is cold once its Accessed bits stayed
/// clear for [`AGING_HISTORY`] aging intervals, kswapd's own working-set
/// window (with its default interval when kswapd does not run; then
/// nothing clears the bits but a demo's own reclaim, and a page once
/// touched stays young).
pub fn cold_after(reclaim: Option<ReclaimConfig>) -> Duration {
    reclaim.unwrap_or_default().interval * AGING_HISTORY
}
