//! Renders the `shadowvm::trace` events (host mm operations, notifier
//! callbacks, shadow MMU changes, TLB shootdowns, guest faults) as a
//! narrated view, one sentence a line indented by layer, or as JSON lines.
//! Used by `shadowvm demo`; the events themselves are plain `tracing`
//! events, cheap when no subscriber listens.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The target every trace event uses.
pub const TARGET: &str = "shadowvm::trace";

/// Event kinds collapsed into one "... and N more" line when repeated.
const COLLAPSED: &[&str] = &[
    "spte_zapped",
    "shadow_page_zapped",
    "accessed_cleared",
    "resolve_pf",
];

/// Fields shown in hex.
const HEX: &[&str] = &[
    "start",
    "end",
    "address",
    "gva",
    "hva",
    "frame",
    "old_frame",
    "new_frame",
    "sp",
    "len",
    "error_code",
];

struct State {
    out: Box<dyn Write + Send>,
    /// The last narrated kind and how many repeats were held back.
    last: Option<(String, u64)>,
}

/// A `tracing_subscriber` layer writing `shadowvm::trace` events.
#[derive(Clone)]
pub struct TraceLayer {
    json: bool,
    enabled: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
}

impl TraceLayer {
    /// A layer writing to `out`, as JSON lines if `json`. It starts
    /// disabled (see [`TraceLayer::set_enabled`]).
    pub fn new(out: Box<dyn Write + Send>, json: bool) -> Self {
        Self {
            json,
            enabled: Arc::new(AtomicBool::new(false)),
            state: Arc::new(Mutex::new(State { out, last: None })),
        }
    }

    /// Starts or stops recording events (boot noise is left out).
    pub fn set_enabled(&self, on: bool) {
        if !on {
            self.flush();
        }
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Writes any held-back repeat count.
    pub fn flush(&self) {
        let mut st = self.state.lock();
        Self::flush_repeats(&mut st);
        let _ = st.out.flush();
    }

    fn flush_repeats(st: &mut State) {
        if let Some((kind, n)) = st.last.take()
            && n > 0
        {
            let indent = indent(layer_of_kind(&kind));
            let _ = writeln!(
                st.out,
                "{indent}... and {n} more {}",
                kind.replace('_', " ")
            );
        }
    }

    fn write(&self, fields: Map<String, Value>) {
        let mut st = self.state.lock();
        if self.json {
            let _ = writeln!(st.out, "{}", Value::Object(fields));
            return;
        }
        let kind = fields
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if COLLAPSED.contains(&kind.as_str())
            && let Some((last, n)) = st.last.as_mut()
            && *last == kind
        {
            *n += 1;
            return;
        }
        Self::flush_repeats(&mut st);
        st.last = Some((kind, 0));
        let line = narrate(&fields);
        let _ = writeln!(st.out, "{line}");
    }
}

fn layer_of_kind(kind: &str) -> &'static str {
    match kind {
        "spte_zapped" | "shadow_page_zapped" | "accessed_cleared" | "spte_repointed" => "mmu",
        "resolve_pf" => "guest",
        _ => "notifier",
    }
}

fn indent(layer: &str) -> &'static str {
    match layer {
        "mm" => "",
        "notifier" => "  ",
        "mmu" => "    ",
        "tlb" => "      ",
        "guest" => "        ",
        _ => "",
    }
}

fn label(layer: &str) -> &'static str {
    match layer {
        "mm" => "host mm",
        "notifier" => "notifier",
        "mmu" => "shadow MMU",
        "tlb" => "TLB shootdown",
        "guest" => "guest",
        _ => "demo",
    }
}

/// One human line for an event.
pub fn narrate(fields: &Map<String, Value>) -> String {
    let layer = fields.get("layer").and_then(Value::as_str).unwrap_or("");
    let message = fields.get("message").and_then(Value::as_str).unwrap_or("");
    let message = message.strip_prefix("host: ").unwrap_or(message);
    let mut line = format!("{}[{}] {message}", indent(layer), label(layer));
    let mut first = true;
    for (k, v) in fields {
        if matches!(k.as_str(), "layer" | "kind" | "message") {
            continue;
        }
        line.push_str(if first { ": " } else { ", " });
        first = false;
        let text = match v {
            Value::Number(n) if HEX.contains(&k.as_str()) => {
                format!("{:#x}", n.as_u64().unwrap_or_default())
            }
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        line.push_str(&format!("{k}={text}"));
    }
    line
}

#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S: Subscriber> Layer<S> for TraceLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET || !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        self.write(f.0);
    }
}
