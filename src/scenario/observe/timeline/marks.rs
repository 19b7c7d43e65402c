//! What the timeline marks besides page states, from the trace events as
//! they happen: each notifier invalidation (`invalidate_range_start`, the
//! host address range it covers) and each TLB shootdown (`shootdown`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;

use crate::trace::{Kind, TARGET};

/// Marks kept at most of each kind; later ones are counted, not kept.
pub const MAX_MARKS: usize = 1 << 20;

/// The marks of one run, in the order they happened.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    /// Invalidations: when, and the host address range `[start, end)`.
    pub invalidations: Vec<(Duration, u64, u64)>,
    /// Shootdowns: when, and how many frames.
    pub shootdowns: Vec<(Duration, u64)>,
    /// Marks not kept (beyond [`MAX_MARKS`]).
    pub dropped: u64,
}

/// A `tracing` layer that records the [`Marks`].
#[derive(Clone)]
pub struct MarksLayer {
    t0: Instant,
    marks: Arc<Mutex<Marks>>,
}

impl MarksLayer {
    /// A layer whose times count from `t0`.
    pub fn new(t0: Instant) -> Self {
        MarksLayer {
            t0,
            marks: Arc::default(),
        }
    }

    /// The marks so far.
    pub fn marks(&self) -> Marks {
        self.marks.lock().clone()
    }
}

/// The fields a mark needs.
#[derive(Default)]
struct Fields {
    kind: Option<Kind>,
    start: u64,
    end: u64,
    frames: u64,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "start" => self.start = value,
            "end" => self.end = value,
            "frames" => self.frames = value,
            _ => {}
        }
    }
    // `kind` is recorded as Display (`trace::Event::emit`).
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "kind" {
            self.kind = Kind::from_name(&format!("{value:?}"));
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for MarksLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let t = self.t0.elapsed();
        let mut m = self.marks.lock();
        match f.kind {
            Some(Kind::InvalidateRangeStart) if m.invalidations.len() < MAX_MARKS => {
                m.invalidations.push((t, f.start, f.end));
            }
            Some(Kind::Shootdown) if m.shootdowns.len() < MAX_MARKS => {
                m.shootdowns.push((t, f.frames));
            }
            Some(Kind::InvalidateRangeStart | Kind::Shootdown) => m.dropped += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Event as E, ShootdownMethod};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn invalidations_and_shootdowns_are_marked_in_order() {
        let layer = MarksLayer::new(Instant::now());
        let subscriber = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::with_default(subscriber, || {
            E::InvalidateRangeStart {
                start: 0x1000,
                end: 0x3000,
                event: &"Clear",
                blockable: true,
            }
            .emit();
            E::Shootdown {
                frames: 2,
                runs: 1,
                method: ShootdownMethod::ProtectToggle,
            }
            .emit();
            E::SwapOut { hva: 1, frame: 2 }.emit();
        });
        let m = layer.marks();
        assert_eq!(m.invalidations.len(), 1);
        assert_eq!(
            (m.invalidations[0].1, m.invalidations[0].2),
            (0x1000, 0x3000)
        );
        assert_eq!(m.shootdowns.len(), 1);
        assert_eq!(m.shootdowns[0].1, 2);
        assert!(m.shootdowns[0].0 >= m.invalidations[0].0);
        assert_eq!(m.dropped, 0);
    }
}
