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
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use super::narrate::TraceLayer;
use crate::mm::{FrameAccess, Mm, PAGE_SIZE, Prot, Pte};
use crate::vmm::config::ConfigError;
use crate::vmm::{
    ConsoleBuffer, GuestSource, Outcome, Paging, RunReport, RunningVm, VmConfig, VmmError, guests,
};

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
}

type Result<T> = std::result::Result<T, DemoError>;

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

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Guest {
    vm: RunningVm,
    console: ConsoleBuffer,
    mm: Arc<Mm>,
    base: u64,
    size: u64,
    gpa: u64,
    hva: u64,
}

impl Guest {
    fn pfn(&self) -> Option<u64> {
        match self.mm.pte(self.hva) {
            Some(Pte::Present(p)) => Some(p.pfn),
            _ => None,
        }
    }

    fn read(&self, pfn: u64) -> u64 {
        self.mm
            .memory()
            .frame_word(pfn, 0)
            .map(|w| w.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or_default()
    }

    fn fault_line(&self) -> Option<String> {
        let text = self.console.text();
        text.lines()
            .find(|l| l.contains(": fault vector"))
            .map(str::to_string)
    }
}

fn boot() -> Result<Guest> {
    if guests::find("test-counter").is_none() {
        return Err(DemoError::NotBuiltIn("test-counter"));
    }
    let mut config = VmConfig::new(GuestSource::Builtin("test-counter".into()));
    config.mem_size = 16 << 20;
    config.paging = Paging::Shadow;
    config.validate()?;
    let console = ConsoleBuffer::new();
    let vm = RunningVm::start(&config, Box::new(console.clone()))?;
    let gpa = wait_for(Duration::from_secs(5), || {
        let text = console.text();
        let line = text.lines().find(|l| l.starts_with("counter 0 at "))?;
        u64::from_str_radix(line.trim_start_matches("counter 0 at ").trim(), 16).ok()
    });
    let Some(gpa) = gpa else {
        vm.stop();
        let r = vm.wait(Some(Duration::from_secs(5)));
        return Err(DemoError::NotCounting(Box::new(r.outcome)));
    };
    let sp = vm.shadow().ok_or(DemoError::NotShadow)?.clone();
    let mm = sp.ram().mm().clone();
    let base = sp.ram().base();
    let size = sp.ram().size_bytes();
    let g = Guest {
        vm,
        console,
        mm,
        base,
        size,
        gpa,
        hva: base + gpa,
    };
    let counting = wait_for(Duration::from_secs(5), || {
        let pfn = g.pfn()?;
        let v = g.read(pfn);
        wait_for(Duration::from_millis(200), || {
            (g.read(pfn) != v).then_some(())
        })
    });
    if counting.is_none() {
        return Err(DemoError::CounterStill);
    }
    Ok(g)
}

/// Runs scenario `name`, writing the trace (narrated or JSON lines) and
/// the counters to `out`. `Err` for an unknown scenario or a failure.
pub fn run(name: &str, json: bool, out: Box<dyn Write + Send>) -> Result<()> {
    let Some(scenario) = find(name) else {
        return Err(DemoError::UnknownScenario(name.to_string()));
    };
    let out = Arc::new(Mutex::new(out));
    let layer = TraceLayer::new(Box::new(Shared(out.clone())), json);
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::set_global_default(subscriber)?;
    }
    if name == "cow" {
        return run_cow(scenario, json, &out, &layer);
    }
    let g = boot()?;
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
    let result = scenario_body(name, &g);
    let mut released = false;
    if name != "release" {
        layer.set_enabled(false);
    } else {
        released = true;
    }
    let ksm = g.mm.ksm_stats();
    g.vm.stop();
    let report = g.vm.wait(Some(Duration::from_secs(10)));
    if released {
        guest_saw!(
            "the guest is gone ({}); every spte was torn down before the frames were freed",
            report.outcome
        );
        layer.set_enabled(false);
    }
    result?;
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

fn scenario_body(name: &str, g: &Guest) -> Result<()> {
    let page = PAGE_SIZE;
    match name {
        "dontneed" => {
            let old_pfn = g.pfn().unwrap_or_default();
            let before = g.read(old_pfn);
            g.mm.madvise_dontneed(g.hva, page)?;
            let new = wait_for(Duration::from_secs(5), || g.pfn());
            match new {
                Some(pfn) => {
                    let now = g.read(pfn);
                    let restarted = if now < before {
                        ", so it restarted from zero"
                    } else {
                        ""
                    };
                    guest_saw!(
                        "the guest's next write refaulted: the host gave it a zero page on frame {pfn:#x}; its counter read {now} right after (it was {before} before the discard{restarted})"
                    );
                }
                None => return Err(DemoError::NoRefault),
            }
        }
        "munmap" | "mprotect" => {
            if name == "munmap" {
                g.mm.munmap(g.hva, page)?;
            } else {
                g.mm.mprotect(g.hva, page, Prot::READ)?;
            }
            match wait_for(Duration::from_secs(5), || g.fault_line()) {
                Some(line) => guest_saw!("the guest's next write faulted; it reported: {line}"),
                None => return Err(DemoError::NoFaultReported),
            }
        }
        "aging" => {
            let young = g.mm.clear_flush_young(g.hva)?;
            demo_note!("clear_flush_young returned young={young}");
            std::thread::sleep(Duration::from_millis(50));
            let again = g.mm.test_young(g.hva)?;
            guest_saw!("the guest kept writing: 50 ms later the page is young again ({again})");
            if !again {
                return Err(DemoError::NotYoungAgain);
            }
        }
        "reclaim" => {
            let nr = g.size / page;
            let mut swapped = false;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                g.mm.reclaim(nr)?;
                if matches!(g.mm.pte(g.hva), Some(Pte::Swap(_))) {
                    swapped = true;
                    break;
                }
            }
            if swapped {
                let pfn = wait_for(Duration::from_secs(5), || g.pfn());
                guest_saw!(
                    "the guest touched its page again: swapped back in on frame {:#x}, counter {}",
                    pfn.unwrap_or_default(),
                    pfn.map(|p| g.read(p)).unwrap_or_default()
                );
            } else {
                guest_saw!(
                    "the guest's hot page kept being young and was never chosen; it keeps counting"
                );
            }
        }
        "ksm" => {
            // Two pages the guest never touched, faulted in by the host as
            // zero pages: identical, so ksmd merges them.
            let a = g.base + g.size - 2 * page;
            for hva in [a, a + page] {
                drop(g.mm.get_user_page(hva, crate::mm::Access::Write)?);
            }
            demo_note!(
                "the host faulted in two identical zero pages at {a:#x} and {:#x}",
                a + page
            );
            g.mm.madvise_mergeable(g.base, g.size)?;
            let mut merged = 0;
            for _ in 0..4 {
                merged += g.mm.ksm_scan(g.size / page)?.merged;
            }
            let k = g.mm.ksm_stats();
            guest_saw!(
                "ksmd merged {merged} pages (pages_shared {}, pages_sharing {}); the guest has no spte for those pages, so change_pte had nothing to repoint; its own counter page changes all the time, is never merged, and it keeps counting",
                k.pages_shared,
                k.pages_sharing
            );
        }
        "release" => {
            demo_note!("stopping the guest; the VMM then tears its mm down");
        }
        _ => unreachable!(),
    }
    Ok(())
}

/// The `cow` scenario: the `ksm` guest fills pages with two patterns and
/// waits while ksmd merges them (write-protect, then `change_pte` to the
/// shared frame); its writes to every other page then fault through the
/// shadow MMU into the host's copy-on-write (`CowBreak`, `change_pte` to a
/// private copy) and it verifies every byte.
fn run_cow(
    scenario: &Scenario,
    json: bool,
    out: &Arc<Mutex<Box<dyn Write + Send>>>,
    layer: &TraceLayer,
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
    let mm = vm.shadow().ok_or(DemoError::NotShadow)?.ram().mm().clone();
    let report = vm.wait(Some(Duration::from_secs(20)));
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
