//! `shadowvm demo <scenario>`: boots the `test-counter` guest in shadow
//! mode (a ring-3 loop incrementing a counter on its own page), performs
//! one host memory operation on that page's host address, and narrates
//! what happens through the `shadowvm::trace` events (see [`narrate`]):
//! the host operation, the notifier callbacks, the sptes zapped, repointed
//! or aged, the TLB shootdown, and what the guest saw. Then it prints the
//! counters.
//!
//! [`narrate`]: super::narrate

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

use super::narrate::TraceLayer;
use super::observe::{self, ObserveError, Observer, cold_after};
use crate::mm::Mm;
use crate::vmm::config::ConfigError;
use crate::vmm::{Outcome, RunReport, VmmError};

/// Why a demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No such scenario.
    #[error("unknown demo scenario `{0}` (try `shadowvm demo` for the list)")]
    UnknownScenario(String),
    /// The guest the scenario needs was not compiled in.
    #[error("the {0} guest is not built in")]
    NotBuiltIn(&'static str),
    /// The VM does not run on shadow tables.
    #[error("the demo VM is not in shadow mode")]
    NotShadow,
    /// The counter guest never printed its counter's address.
    #[error("the guest did not start counting: {0}")]
    NotCounting(Box<Outcome>),
    /// The counter guest printed it but its counter stands still.
    #[error("the guest's counter does not move")]
    CounterStill,
    /// After DONTNEED, the guest never faulted its page back in.
    #[error("the guest did not fault its page back in")]
    NoRefault,
    /// After munmap or mprotect, the guest never reported its fault.
    #[error("the guest did not report a fault")]
    NoFaultReported,
    /// After clear_flush_young, the hot page stayed old.
    #[error("the hot page did not become young again")]
    NotYoungAgain,
    /// ksmd merged nothing before the guest wrote its pages.
    #[error("no copy-on-write happened: ksmd merged nothing in time")]
    NoCow,
    /// The host did not back the guest's 2 MiB page with a huge page, or
    /// the shadow MMU did not map it with a 2 MiB spte.
    #[error("no 2 MiB spte over a host huge page to split: {0}")]
    NoLargeSpte(&'static str),
    /// The DMA device failed.
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
    /// The guest failed.
    #[error("the guest failed: {0}")]
    GuestFailed(Box<Outcome>),
    /// The ksm guest failed or found a wrong byte; `summary` is its last
    /// line.
    #[error("the guest failed: {outcome} ({summary})")]
    KsmGuestFailed {
        /// How the run ended.
        outcome: Box<Outcome>,
        /// The guest's summary line.
        summary: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Mm(#[from] crate::mm::MmError),
    #[error("writing the trace: {0}")]
    Io(#[from] std::io::Error),
    #[error("installing the trace subscriber: {0}")]
    Subscriber(#[from] tracing::subscriber::SetGlobalDefaultError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

type Result<T> = std::result::Result<T, DemoError>;

/// With `--timeline`, how long the guest is watched before and after the
/// host operation.
const TIMELINE_WATCH: Duration = Duration::from_millis(100);

/// A scenario: its name and a one-line description.
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
}

/// Every scenario, in the order `scripts/demo.sh` runs them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "munmap",
        description: "munmap the guest's page: sptes zapped, the guest's next access faults",
    },
    Scenario {
        name: "dontneed",
        description: "madvise(DONTNEED) the page: sptes zapped, the guest refaults a zero page",
    },
    Scenario {
        name: "mprotect",
        description: "mprotect the page read-only: the guest's next write faults",
    },
    Scenario {
        name: "ksm",
        description: "ksmd merges two identical guest pages: write-protect, then change_pte",
    },
    Scenario {
        name: "cow",
        description: "the ksm guest's identical pages are merged by ksmd, then its writes break the sharing by copy-on-write",
    },
    Scenario {
        name: "aging",
        description: "clear_flush_young on a hot page: Accessed cleared, young again",
    },
    Scenario {
        name: "reclaim",
        description: "kswapd-style reclaim swaps guest pages out; a refault swaps in",
    },
    Scenario {
        name: "release",
        description: "the guest stops: exit_mmap calls release, every spte is torn down",
    },
    Scenario {
        name: "thp",
        description: "a host huge page backs the guest's 2 MiB page: a DONTNEED of one 4 KiB page splits it, and the invalidation of the whole 2 MiB range zaps the 2 MiB spte",
    },
    Scenario {
        name: "dma",
        description: "a DMA device mirrors the guest's counter page through an interval notifier: one madvise(DONTNEED) invalidates both secondary MMUs",
    },
];

/// Looks a scenario up by name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Narration from the demo itself (what the guest saw).
macro_rules! guest_saw {
    ($($arg:tt)*) => {
        crate::trace::emit!(GuestSaw(format_args!($($arg)*)))
    };
}

/// A remark of the demo's own.
macro_rules! demo_note {
    ($($arg:tt)*) => {
        crate::trace::emit!(Note(format_args!($($arg)*)))
    };
}

mod counter;
mod cow;
mod steps;

use counter::boot;

/// Runs scenario `name`, writing the trace (narrated or JSON lines) and
/// the counters to `out`; `observer`'s layers are installed beside the
/// narrator and its timeline samples the demo's guest (the caller finishes
/// it). `Err` for an unknown scenario or a failure.
pub fn run(
    name: &str,
    json: bool,
    out: Box<dyn Write + Send>,
    observer: &mut Observer,
) -> Result<()> {
    let Some(scenario) = find(name) else {
        return Err(DemoError::UnknownScenario(name.to_string()));
    };
    let out = Arc::new(Mutex::new(out));
    let layer = TraceLayer::new(Box::new(Shared(out.clone())), json);
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry()
            .with(observer.layers())
            .with(layer.clone());
        tracing::subscriber::set_global_default(subscriber)?;
    }
    let title = format!("shadowvm demo {name}: guest page states");
    if name == "cow" {
        return cow::run(scenario, json, &out, &layer, observer, &title);
    }
    let g = boot(name == "thp")?;
    if let Some(paging) = g.vm.shadow() {
        observer.attach(paging, cold_after(None), &title)?;
    }
    // With a timeline, the picture shows the guest before and after.
    let watch = if observer.wants_timeline() {
        TIMELINE_WATCH
    } else {
        Duration::ZERO
    };
    std::thread::sleep(watch);
    if !json {
        writeln!(
            out.lock(),
            "demo {}: {}\nguest test-counter counts on gpa {:#x} (host address {:#x}, frame {:#x})\n",
            scenario.name,
            scenario.description,
            g.gpa,
            g.hva,
            g.pfn().unwrap_or_default()
        )?;
    }
    layer.set_enabled(true);
    let result = steps::run(name, &g);
    let mut released = false;
    if name != "release" {
        layer.set_enabled(false);
    } else {
        released = true;
    }
    std::thread::sleep(watch);
    let ksm = g.mm.ksm_stats();
    g.vm.stop();
    let (report, detached) = observe::end(g.vm, observer, None);
    if released {
        guest_saw!(
            "the guest is gone ({}); every spte was torn down before the frames were freed",
            report.outcome
        );
        layer.set_enabled(false);
    }
    result?;
    detached?;
    if matches!(report.outcome, Outcome::Failed(_) | Outcome::VmmError(_)) {
        return Err(DemoError::GuestFailed(Box::new(report.outcome)));
    }
    let counters = summary(&report, &g.mm, ksm);
    layer.finish()?;
    print_summary(&out, json, &counters)
}

/// The non-zero counters of the MMU, the host flush, the mm and KSM.
fn summary(report: &RunReport, mm: &Mm, ksm: crate::mm::KsmStats) -> Value {
    let mut m = serde_json::Map::new();
    let mut add = |prefix: &str, v: Value| {
        if let Value::Object(o) = v {
            for (k, v) in o {
                if v.as_u64().is_some_and(|n| n > 0) {
                    m.insert(format!("{prefix}.{k}"), v);
                }
            }
        }
    };
    if let Some(s) = &report.stats.shadow {
        add("mmu", serde_json::to_value(s.mmu).unwrap_or_default());
        add(
            "host_flush",
            serde_json::to_value(s.host_invalidate).unwrap_or_default(),
        );
    }
    add("mm", serde_json::to_value(mm.stats()).unwrap_or_default());
    add("ksm", serde_json::to_value(ksm).unwrap_or_default());
    Value::Object(m)
}

struct Shared(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().flush()
    }
}

/// Writes the counters, as a table or as the last JSON line.
fn print_summary(
    out: &Arc<Mutex<Box<dyn Write + Send>>>,
    json: bool,
    counters: &Value,
) -> Result<()> {
    let mut o = out.lock();
    if json {
        writeln!(
            o,
            "{}",
            serde_json::json!({ "kind": "summary", "counters": counters })
        )?;
    } else {
        writeln!(o, "\ncounters:")?;
        if let Value::Object(m) = counters {
            for (k, v) in m {
                writeln!(o, "  {k:<40} {v:>8}")?;
            }
        }
    }
    o.flush()?;
    Ok(())
}
