//! Renders the trace events (`crate::trace`: host mm operations, notifier
//! callbacks, shadow MMU changes, TLB shootdowns, guest faults) as a
//! narrated view, one sentence a line indented by layer, or as JSON lines
//! (docs/trace-events.md). Used by `shadowvm demo`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;

use crate::trace::{HEX_FIELDS, Kind, Layer, TARGET};

struct State {
    out: Box<dyn Write + Send>,
    /// The last narrated kind and how many repeats were held back.
    last: Option<(Kind, u64)>,
    /// The first write that failed: a `tracing` layer cannot return it, so
    /// [`TraceLayer::finish`] does.
    error: Option<std::io::Error>,
}

impl State {
    fn keep(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }
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
            state: Arc::new(Mutex::new(State {
                out,
                last: None,
                error: None,
            })),
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
        let r = st.out.flush();
        st.keep(r);
    }

    /// Flushes, and returns the first write that failed, if any.
    pub fn finish(&self) -> std::io::Result<()> {
        self.flush();
        match self.state.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn flush_repeats(st: &mut State) {
        if let Some((kind, n)) = st.last.take()
            && n > 0
        {
            let indent = indent(Some(kind.layer()));
            let r = writeln!(
                st.out,
                "{indent}... and {n} more {}",
                kind.name().replace('_', " ")
            );
            st.keep(r);
        }
    }

    fn write(&self, fields: Map<String, Value>) {
        let mut st = self.state.lock();
        if self.json {
            let r = writeln!(st.out, "{}", Value::Object(fields));
            st.keep(r);
            return;
        }
        let kind = fields
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_name);
        if let Some(kind) = kind
            && kind.repeats()
            && let Some((last, n)) = st.last.as_mut()
            && *last == kind
        {
            *n += 1;
            return;
        }
        Self::flush_repeats(&mut st);
        st.last = kind.map(|k| (k, 0));
        let line = narrate(&fields);
        let r = writeln!(st.out, "{line}");
        st.keep(r);
    }
}

/// Each layer one step deeper: a host operation, the notifier it calls,
/// the shadow MMU the notifier calls, the shootdown, the guest.
fn indent(layer: Option<Layer>) -> &'static str {
    match layer {
        Some(Layer::Mm) | Some(Layer::Demo) | None => "",
        Some(Layer::Notifier) => "  ",
        Some(Layer::Mmu) | Some(Layer::Dma) => "    ",
        Some(Layer::Tlb) => "      ",
        Some(Layer::Guest) => "        ",
    }
}

fn label(layer: Option<Layer>) -> &'static str {
    match layer {
        Some(Layer::Mm) => "host mm",
        Some(Layer::Notifier) => "notifier",
        Some(Layer::Mmu) => "shadow MMU",
        Some(Layer::Dma) => "DMA device",
        Some(Layer::Tlb) => "TLB shootdown",
        Some(Layer::Guest) => "guest",
        Some(Layer::Demo) | None => "demo",
    }
}

/// One human line for an event.
pub fn narrate(fields: &Map<String, Value>) -> String {
    let layer = fields
        .get("layer")
        .and_then(Value::as_str)
        .and_then(Layer::from_name);
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
            Value::Number(n) if HEX_FIELDS.contains(&k.as_str()) => {
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

impl<S: Subscriber> tracing_subscriber::Layer<S> for TraceLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET || !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        self.write(f.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Event as E, HostOp, PfOutcome, ShootdownMethod};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `events` look like through a [`TraceLayer`].
    fn render(json: bool, events: &[E<'_>]) -> String {
        let buf = Buf::default();
        let layer = TraceLayer::new(Box::new(buf.clone()), json);
        layer.set_enabled(true);
        let subscriber = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::with_default(subscriber, || {
            for e in events {
                e.emit();
            }
        });
        layer.flush();
        String::from_utf8_lossy(&buf.0.lock()).into_owned()
    }

    /// Every event, with the keys its JSON object has (docs/trace-events.md).
    #[test]
    fn json_lines_have_the_documented_keys() {
        #[derive(Debug)]
        struct Clear;
        let (ev, prot) = (Clear, Clear);
        let common = ["kind", "layer", "message"];
        let cases: Vec<(E<'_>, &[&str])> = vec![
            (
                E::HostOp(HostOp::MadviseDontneed { start: 1, len: 2 }),
                &["op", "start", "len"],
            ),
            (
                E::HostOp(HostOp::MadviseMergeable { start: 1, len: 2 }),
                &["op", "start", "len"],
            ),
            (
                E::HostOp(HostOp::Munmap { start: 1, len: 2 }),
                &["op", "start", "len"],
            ),
            (
                E::HostOp(HostOp::Mprotect {
                    start: 1,
                    len: 2,
                    prot: &prot,
                }),
                &["op", "start", "len", "prot"],
            ),
            (
                E::HostOp(HostOp::KsmScan { pages_to_scan: 1 }),
                &["op", "pages_to_scan"],
            ),
            (
                E::HostOp(HostOp::AgeRange {
                    start: 1,
                    end: 2,
                    flush: true,
                }),
                &["op", "start", "end", "flush"],
            ),
            (
                E::HostOp(HostOp::Reclaim { nr_to_scan: 1 }),
                &["op", "nr_to_scan"],
            ),
            (
                E::HostOp(HostOp::ClearFlushYoung { start: 1 }),
                &["op", "start"],
            ),
            (E::HostOp(HostOp::ExitMmap), &["op"]),
            (E::SwapOut { hva: 1, frame: 2 }, &["hva", "frame"]),
            (
                E::SwapIn {
                    hva: 1,
                    write: true,
                },
                &["hva", "write"],
            ),
            (
                E::Cow {
                    hva: 1,
                    old_frame: 2,
                    new_frame: 3,
                },
                &["hva", "old_frame", "new_frame"],
            ),
            (E::Release, &[]),
            (E::ClearFlushYoung { start: 1, end: 2 }, &["start", "end"]),
            (E::ClearYoung { start: 1, end: 2 }, &["start", "end"]),
            (E::TestYoung { address: 1 }, &["address"]),
            (
                E::ChangePte {
                    address: 1,
                    frame: 2,
                    writable: false,
                },
                &["address", "frame", "writable"],
            ),
            (
                E::InvalidateRangeStart {
                    start: 1,
                    end: 2,
                    event: &ev,
                    blockable: true,
                },
                &["start", "end", "event", "blockable"],
            ),
            (
                E::InvalidateRangeEnd {
                    start: 1,
                    end: 2,
                    event: &ev,
                },
                &["start", "end", "event"],
            ),
            (
                E::SpteZapped {
                    sp: 1,
                    idx: 2,
                    frame: 3,
                    large: false,
                    reason: &ev,
                },
                &["sp", "idx", "frame", "large", "reason"],
            ),
            (
                E::FolioAlloc {
                    hva: 1,
                    frame: 2,
                    order: 4,
                },
                &["hva", "frame", "order"],
            ),
            (E::SplitPmd { hva: 1, frame: 2 }, &["hva", "frame"]),
            (
                E::SplitFolio {
                    hva: 1,
                    frame: 2,
                    order: 4,
                },
                &["hva", "frame", "order"],
            ),
            (E::DmaAttach { start: 1, end: 2 }, &["start", "end"]),
            (
                E::DmaFault {
                    iova: 1,
                    hva: 2,
                    frame: 3,
                    writable: true,
                },
                &["iova", "hva", "frame", "writable"],
            ),
            (
                E::DmaInvalidate {
                    start: 1,
                    end: 2,
                    event: &ev,
                    cur_seq: 3,
                    dropped: 4,
                },
                &["start", "end", "event", "cur_seq", "dropped"],
            ),
            (
                E::HostOp(HostOp::MadviseHugepage { start: 1, len: 2 }),
                &["op", "start", "len"],
            ),
            (
                E::HostOp(HostOp::MadvisePopulateWrite { start: 1, len: 2 }),
                &["op", "start", "len"],
            ),
            (E::ShadowPageZapped { sp: 1, level: 2 }, &["sp", "level"]),
            (
                E::SptePrefetched {
                    sp: 1,
                    idx: 2,
                    gfn: 3,
                    frame: 4,
                },
                &["sp", "idx", "gfn", "frame"],
            ),
            (
                E::AccessedCleared {
                    sp: 1,
                    idx: 2,
                    frame: 3,
                },
                &["sp", "idx", "frame"],
            ),
            (
                E::SpteRepointed {
                    sp: 1,
                    idx: 2,
                    old_frame: 3,
                    new_frame: 4,
                },
                &["sp", "idx", "old_frame", "new_frame"],
            ),
            (
                E::Shootdown {
                    frames: 1,
                    runs: 1,
                    method: ShootdownMethod::ProtectToggle,
                },
                &["frames", "runs", "method"],
            ),
            (
                E::ResolvePf {
                    gva: 1,
                    error_code: 6,
                    outcome: PfOutcome::Retry,
                },
                &["gva", "error_code", "outcome"],
            ),
            (E::GuestSaw(format_args!("saw")), &[]),
            (E::Note(format_args!("note")), &[]),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for (e, keys) in cases {
            let line = render(true, &[e]);
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            let got: std::collections::BTreeSet<&str> =
                v.as_object().unwrap().keys().map(String::as_str).collect();
            let want: std::collections::BTreeSet<&str> =
                common.iter().chain(keys.iter()).copied().collect();
            assert_eq!(got, want, "{line}");
            assert_eq!(v["kind"], e.kind().name(), "{line}");
            assert_eq!(v["layer"], e.kind().layer().name(), "{line}");
            kinds.insert(e.kind().name());
        }
        assert_eq!(kinds.len(), Kind::ALL.len(), "every kind is covered");
        let line = render(
            true,
            &[E::SpteZapped {
                sp: 1,
                idx: 2,
                frame: 3,
                large: false,
                reason: &ev,
            }],
        );
        assert_eq!(
            line.trim(),
            r#"{"frame":3,"idx":2,"kind":"spte_zapped","large":false,"layer":"mmu","message":"spte zapped","reason":"Clear","sp":1}"#
        );
    }

    #[test]
    fn narration_indents_by_layer_and_folds_repeats() {
        let zap = |frame| E::SpteZapped {
            sp: 0x208,
            idx: 4,
            frame,
            large: false,
            reason: &"Zapped",
        };
        let text = render(
            false,
            &[
                E::HostOp(HostOp::Munmap {
                    start: 0x7000,
                    len: 0x1000,
                }),
                zap(1),
                zap(2),
                zap(3),
                E::Shootdown {
                    frames: 3,
                    runs: 1,
                    method: ShootdownMethod::ProtectToggle,
                },
            ],
        );
        assert_eq!(
            text,
            "[host mm] munmap: len=0x1000, op=munmap, start=0x7000\n\
             \x20   [shadow MMU] spte zapped: frame=0x1, idx=4, large=false, reason=\"Zapped\", sp=0x208\n\
             \x20   ... and 2 more spte zapped\n\
             \x20     [TLB shootdown] stale host translations invalidated: frames=3, method=protect_toggle, runs=1\n"
        );
    }
}
