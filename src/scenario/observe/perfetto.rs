//! `--trace FILE`: the `shadowvm::trace` events and slices written as a
//! Chrome trace-event JSON file by tracing-chrome, which the Perfetto UI
//! (and `chrome://tracing`) opens: a track per thread (`vcpu0`, `vcpu1`,
//! `ksmd`, `kswapd`, `host-ops`, `main`, ...), each span a slice named by
//! its `label`, each other event an instant named by its `kind`, every
//! field an argument (docs/observability.md).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Level, Metadata, Subscriber};
use tracing_chrome::{ChromeLayerBuilder, EventOrSpan, FlushGuard};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt as _, Targets};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::{LookupSpan, Registry};

use crate::trace::{Kind, span};

/// Why the trace could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the trace {}: {source}", path.display())]
pub struct TraceFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A writer that keeps its first error instead of returning it: the trace
/// is written on tracing-chrome's own thread, which would panic on one.
/// Later writes are dropped; [`TraceWriter::finish`] reports the error.
struct KeepError {
    file: File,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl Write for KeepError {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut error = self.error.lock();
        if error.is_none()
            && let Err(e) = self.file.write_all(buf)
        {
            *error = Some(e);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut error = self.error.lock();
        if error.is_none()
            && let Err(e) = self.file.flush()
        {
            *error = Some(e);
        }
        Ok(())
    }
}

/// The `label` field of a span: its name in the viewer.
struct Label(String);

#[derive(Default)]
struct FindLabel(Option<String>);

impl Visit for FindLabel {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "label" {
            self.0 = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "label" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Keeps each new span's `label` in its extensions, where the name
/// function finds it.
struct Labels;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Labels {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut label = FindLabel::default();
        attrs.record(&mut label);
        if let (Some(label), Some(span)) = (label.0, ctx.span(id)) {
            span.extensions_mut().insert(Label(label));
        }
    }
}

/// An event's `kind` (a trace event) or else its `message`.
#[derive(Default)]
struct FindName {
    kind: Option<String>,
    message: Option<String>,
}

impl Visit for FindName {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "kind" => self.kind = Some(format!("{value:?}")),
            "message" => self.message = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// Leaves out the instant a slice's own event makes (`trace::slice!`
/// emits it inside the slice for the narrator): the slice carries the same
/// arguments, and the trace is half the size.
struct NoSliceEvents;

impl<S> Filter<S> for NoSliceEvents {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        let mut f = FindName::default();
        event.record(&mut f);
        !f.kind
            .as_deref()
            .and_then(Kind::from_name)
            .is_some_and(span::is_slice)
    }
}

/// A slice's or an instant's name in the viewer.
fn name(item: &EventOrSpan<'_, '_, Registry>) -> String {
    match item {
        EventOrSpan::Span(span) => match span.extensions().get::<Label>() {
            Some(Label(l)) => l.clone(),
            None => span.name().to_string(),
        },
        EventOrSpan::Event(event) => {
            let mut f = FindName::default();
            event.record(&mut f);
            f.kind
                .or(f.message)
                .unwrap_or_else(|| event.metadata().name().to_string())
        }
    }
}

/// A trace being written; [`TraceWriter::finish`] completes the file.
pub struct TraceWriter {
    path: PathBuf,
    guard: Option<FlushGuard>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl TraceWriter {
    /// Creates `path` (truncating it) and the layer that writes into it:
    /// everything the crate traces at DEBUG and above (`shadowvm::*`
    /// targets), the trace events and slices first of all.
    pub fn create(
        path: &Path,
    ) -> Result<(TraceWriter, Box<dyn Layer<Registry> + Send + Sync>), TraceFileError> {
        let file = File::create(path).map_err(|source| TraceFileError {
            path: path.to_path_buf(),
            source,
        })?;
        let error = Arc::new(Mutex::new(None));
        let (chrome, guard) = ChromeLayerBuilder::<Registry>::new()
            .writer(KeepError {
                file,
                error: error.clone(),
            })
            .include_args(true)
            .include_locations(false)
            .name_fn(Box::new(name))
            .build();
        let ours = Targets::new()
            .with_target("shadowvm", Level::DEBUG)
            .and(NoSliceEvents);
        let layer = Labels.and_then(chrome.with_filter(ours));
        let writer = TraceWriter {
            path: path.to_path_buf(),
            guard: Some(guard),
            error,
        };
        Ok((writer, Box::new(layer)))
    }

    /// Writes what is left and closes the JSON array; the first write
    /// error, if any. Call it once every traced thread is done.
    pub fn finish(mut self) -> Result<(), TraceFileError> {
        // Dropping the guard joins tracing-chrome's writer thread.
        drop(self.guard.take());
        match self.error.lock().take() {
            Some(source) => Err(TraceFileError {
                path: self.path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }
}
