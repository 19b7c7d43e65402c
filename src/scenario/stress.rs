//! `shadowvm stress`: issue 6's bounded reliability run.
//!
//! The `verify` guest (a byte-exact checksum loop over its pages, on every
//! vCPU) runs in shadow mode with ksmd and kswapd on and machine memory
//! smaller than what is touched, while a host thread scripts DONTNEED,
//! mprotect, balloon-style inflate/deflate and host writes. Freed frames
//! are poisoned (0x6b), so a stale shadow mapping would show as corrupted
//! bytes in the guest.
//!
//! What the host thread touches must be invisible to the guest: a DONTNEED
//! on verify's own pages would legitimately zero them (and verify would
//! rightly report corruption), and a read-only mprotect of them would make
//! its writes fault into the guest. So the scripted operations target the
//! upper half of guest RAM, which verify never uses (its bump allocator
//! hands out pages from the bottom, and `pages` is capped to fit below the
//! half). KSM and reclaim run over all of guest RAM: they are invisible by
//! design, and that is what the guest checks.
//!
//! verify cannot be told to stop, so the run is a sequence of whole verify
//! runs (a fresh VM each): the first with a few rounds to measure the
//! speed, then runs of at most [`MAX_RUN_BUDGET`] each, with as many
//! rounds as the slowest seconds-per-round seen so far allows (a run under
//! reclaim and KSM in steady state is slower than the first one). Each run
//! must exit 0 with 0 corrupted bytes, pass `--check` and give every frame
//! back. A run still going [`OVERRUN_GRACE`] past its budget is stopped
//! and reported as an overrun, with where each vCPU was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use super::stress_dma::{self, DMA_PAGES};
use crate::mm::{KsmConfig, MmError, Prot};
use crate::vmm::host::kswapd::ReclaimConfig;
use crate::vmm::paging::ShadowPaging;
use crate::vmm::paging::shadow::CheckError;
use crate::vmm::{ConsoleBuffer, GuestSource, Outcome, Paging, RunningVm, VmConfig, VmmError};

const PAGE: u64 = 4096;
/// The longest one verify run is planned to take.
pub const MAX_RUN_BUDGET: Duration = Duration::from_secs(5);
/// How far past its budget a run may go before it is called an overrun
/// (a starved vCPU, not a slow machine: a loaded machine is seen in the
/// seconds-per-round of the earlier runs).
pub const OVERRUN_GRACE: Duration = Duration::from_secs(60);
/// Pages a scripted operation covers at most.
const CHUNK_PAGES: u64 = 16;

/// Why the stress run could not run.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// verify's pages do not fit below the half the host thread uses.
    #[error(
        "cannot set up shadow paging: stress: pages={pages} does not fit in the lower half of {mem_mib} MiB of RAM (4 MiB kept for the image and tables)"
    )]
    PagesTooMany {
        /// verify's pages.
        pages: u64,
        /// Guest RAM in MiB.
        mem_mib: u64,
    },
    /// The VM does not run on shadow tables.
    #[error("cannot set up shadow paging: stress needs shadow paging")]
    NotShadow,
    /// A VM could not be started.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// What `shadowvm stress` runs.
#[derive(Clone, Debug)]
pub struct StressConfig {
    /// How long to run.
    pub duration: Duration,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// Guest RAM.
    pub mem_size: u64,
    /// Machine memory (smaller than what is touched, so reclaim works).
    pub machine_mem: u64,
    /// verify's `pages`.
    pub pages: u64,
    /// Seed of the host thread's choices.
    pub seed: u64,
    /// Large folios for guest RAM (`--host-thp`, `--host-mthp`).
    pub host_thp: crate::mm::ThpConfig,
    /// Guest PTEs prefetched around a shadow fault.
    pub pte_prefetch: usize,
    /// A fault injected into every run's host TLB flush (tests only: the
    /// negative control).
    #[cfg(feature = "test-hooks")]
    pub flush_fault: Option<crate::vmm::host::tlb::FlushFault>,
}

impl StressConfig {
    /// Defaults for `duration`: 2 vCPUs, 32M of RAM, 2048 verify pages
    /// (8M), 10M of machine memory (verify's 8M plus up to 16M the host
    /// thread touches).
    pub fn new(duration: Duration) -> Self {
        StressConfig {
            duration,
            vcpus: 2,
            mem_size: 32 << 20,
            machine_mem: 10 << 20,
            pages: 2048,
            seed: 0x5eed_1234_abcd_ef01,
            host_thp: crate::mm::ThpConfig::off(),
            pte_prefetch: crate::mmu::PTE_PREFETCH_NUM,
            #[cfg(feature = "test-hooks")]
            flush_fault: None,
        }
    }

    fn check(&self) -> Result<(), StressError> {
        // verify's pages plus its metadata, page tables and image must
        // stay below the half the host thread uses.
        if self.pages == 0 || self.pages * PAGE + (4 << 20) > self.mem_size / 2 {
            return Err(StressError::PagesTooMany {
                pages: self.pages,
                mem_mib: self.mem_size >> 20,
            });
        }
        Ok(())
    }
}

/// Counts of the host thread's operations.
#[derive(Debug, Default)]
struct HostOps {
    dontneed: AtomicU64,
    mprotect: AtomicU64,
    balloon: AtomicU64,
    host_writes: AtomicU64,
    /// Nanoseconds in the DONTNEED calls (each one notifier invalidation:
    /// invalidate_range_start, shadow zap, host flush, range_end).
    dontneed_ns: AtomicU64,
    /// Nanoseconds in the read-only mprotect calls (one invalidation each).
    mprotect_ns: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<HostOpError>>,
}

/// A host-thread operation failed (e.g. out of frames): counted, the run
/// goes on.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct HostOpError {
    /// The operation.
    pub op: &'static str,
    /// Why.
    #[source]
    pub source: MmError,
}

/// In the JSON report, the message.
impl serde::Serialize for HostOpError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl HostOps {
    fn err(&self, op: &'static str, source: MmError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(HostOpError { op, source });
    }
}

/// A run's `--check`: "ok", the violation, or "not run" (in the report
/// and its JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult(pub Option<Result<(), CheckError>>);

impl CheckResult {
    /// The check ran and passed.
    pub fn is_ok(&self) -> bool {
        matches!(self.0, Some(Ok(())))
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(Ok(())) => write!(f, "ok"),
            Some(Err(e)) => write!(f, "{e}"),
            None => write!(f, "not run"),
        }
    }
}

impl serde::Serialize for CheckResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One verify run of the sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StressRun {
    /// verify's rounds.
    pub rounds: u64,
    /// The seconds the run was planned to take (rounds × the slowest
    /// seconds per round seen so far).
    pub budget_seconds: f64,
    /// The run was stopped for running far past its budget: where each
    /// vCPU was at that moment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overrun: Option<Vec<String>>,
    /// How the run ended.
    pub outcome: String,
    /// The guest's exit code (None if it did not exit).
    pub exit_code: Option<u8>,
    /// Corrupted bytes verify reported (None if it printed no summary).
    pub corrupted_bytes: Option<u64>,
    /// `--check`: "ok" or the violation.
    pub check: CheckResult,
    /// The exit report says every frame came back.
    pub frames_returned: bool,
    /// Seconds.
    pub seconds: f64,
}

/// The result of `stress`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StressReport {
    /// Seconds of the whole run.
    pub seconds: f64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, machine memory (bytes) and verify's pages.
    pub mem_bytes: u64,
    /// Machine memory in bytes.
    pub machine_mem_bytes: u64,
    /// verify's pages.
    pub verify_pages: u64,
    /// The verify runs.
    pub runs: Vec<StressRun>,
    /// Sum over runs of verify's corrupted bytes.
    pub corrupted_bytes: u64,
    /// Every run's coherence check passed.
    pub check_ok: bool,
    /// Every run gave every frame back.
    pub frames_returned: bool,
    /// Totals by kind.
    pub ops: std::collections::BTreeMap<&'static str, u64>,
    /// Totals by kind, per second.
    pub ops_per_sec: std::collections::BTreeMap<&'static str, f64>,
    /// Mean nanoseconds: a host DONTNEED call and a read-only mprotect
    /// call (each one notifier invalidation on the live path: the shadow
    /// zap and the host TLB flush included), and one host TLB flush.
    pub timings_ns: std::collections::BTreeMap<&'static str, f64>,
    /// Bytes the DMA device read back that it had not written (nor were
    /// zero after a discard).
    pub dma_corrupted_bytes: u64,
    /// DMAs that reached a frame the mm no longer owned (a freed frame).
    pub dma_freed_frame_accesses: u64,
    /// Why the DMA device's thread stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_error: Option<String>,
    /// Host-thread operations that failed (e.g. out of frames).
    pub host_op_errors: u64,
    /// The last of those.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_op_last_error: Option<HostOpError>,
    /// Everything held.
    pub ok: bool,
}

impl StressReport {
    /// One line: PASS/FAIL and why.
    pub fn verdict(&self) -> String {
        let status = if self.ok { "PASS" } else { "FAIL" };
        let unknown = self
            .runs
            .iter()
            .filter(|r| r.corrupted_bytes.is_none())
            .count();
        let corrupted = if unknown == 0 {
            format!("{} corrupted bytes", self.corrupted_bytes)
        } else {
            format!(
                "{} corrupted bytes counted ({unknown} run(s) never reported theirs)",
                self.corrupted_bytes
            )
        };
        let first_failure = self
            .runs
            .iter()
            .enumerate()
            .find(|(_, r)| !r.passed())
            .map(|(i, r)| format!("; run {i}: {}", r.outcome.lines().next().unwrap_or("")))
            .unwrap_or_default();
        let dma = match &self.dma_error {
            Some(e) => format!("DMA device stopped: {e}"),
            None => format!(
                "DMA {} corrupted bytes, {} freed-frame accesses",
                self.dma_corrupted_bytes, self.dma_freed_frame_accesses
            ),
        };
        format!(
            "stress: {status}: {} verify run(s) in {:.1}s, {corrupted}, {dma}, coherence check {}, frames {}{first_failure}",
            self.runs.len(),
            self.seconds,
            if self.check_ok { "ok" } else { "FAILED" },
            if self.frames_returned {
                "all returned"
            } else {
                "NOT all returned"
            }
        )
    }
}

impl StressRun {
    /// The run exited 0, reported 0 corrupted bytes, passed the checks and
    /// gave every frame back.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0)
            && self.corrupted_bytes == Some(0)
            && self.check.is_ok()
            && self.frames_returned
    }
}

/// A tiny xorshift generator for the host thread's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// The host thread: random operations on the upper half of guest RAM
/// until `stop`.
fn host_thread(sp: &ShadowPaging, ops: &HostOps, stop: &AtomicBool, seed: u64) {
    let ram = sp.ram();
    let mm = ram.mm();
    let lo = ram.base() + ram.size_bytes() / 2;
    // The top of RAM belongs to the DMA device's thread.
    let pages = ram.size_bytes() / 2 / PAGE - DMA_PAGES;
    let mut rng = Rng(seed | 1);
    // A page pattern many pages share, for ksmd to merge.
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i as u8) ^ 0xa5).collect();
    while !stop.load(Ordering::Relaxed) {
        let n = 1 + rng.below(CHUNK_PAGES);
        let first = rng.below(pages.saturating_sub(n) + 1);
        let addr = lo + first * PAGE;
        let len = n * PAGE;
        match rng.below(8) {
            // Host writes: fault pages in (and break KSM sharing of merged
            // ones); identical contents so ksmd has work.
            0..=2 => {
                for p in 0..n {
                    match mm.write(addr + p * PAGE, &pattern) {
                        Ok(()) => {
                            ops.host_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => ops.err("host write", e),
                    }
                }
            }
            3 | 4 => match timed(&ops.dontneed_ns, || mm.madvise_dontneed(addr, len)) {
                Ok(()) => {
                    ops.dontneed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => ops.err("madvise(DONTNEED)", e),
            },
            // mprotect RO then back to RW: write-protects the present
            // pages (notifier invalidation) on the way down.
            5 | 6 => {
                let r = timed(&ops.mprotect_ns, || mm.mprotect(addr, len, Prot::READ))
                    .and_then(|()| mm.mprotect(addr, len, Prot::READ | Prot::WRITE));
                match r {
                    Ok(()) => {
                        ops.mprotect.fetch_add(2, Ordering::Relaxed);
                    }
                    Err(e) => ops.err("mprotect", e),
                }
            }
            // Balloon: inflate (give a larger range back), then deflate
            // (the host touches part of it again).
            _ => {
                let n = (n * 4).min(pages.saturating_sub(first));
                match mm.madvise_dontneed(addr, n * PAGE) {
                    Ok(()) => {
                        ops.balloon.fetch_add(1, Ordering::Relaxed);
                        for p in (0..n).step_by(4) {
                            if let Err(e) = mm.write(addr + p * PAGE, &pattern[..8]) {
                                ops.err("balloon deflate", e);
                            }
                        }
                    }
                    Err(e) => ops.err("balloon inflate", e),
                }
            }
        }
        // Random pause: 0 to 2 ms.
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
}

/// `f()`, its time added to `ns`.
fn timed<T>(ns: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |x, p| &x[*p]).as_u64().unwrap_or(0)
}

/// verify's "N corrupted bytes" from its console output.
fn corrupted_from(console: &str) -> Option<u64> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("verify:") && l.ends_with(" corrupted bytes"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words.get(words.len().checked_sub(3)?)?.parse().ok()
}

/// Runs the stress sequence; `on_console` gets each run's guest output.
pub fn stress(
    config: &StressConfig,
    mut on_console: impl FnMut(&str),
) -> Result<StressReport, StressError> {
    config.check()?;
    let start = Instant::now();
    let deadline = start + config.duration;
    let ops = Arc::new(HostOps::default());
    let dma = Arc::new(stress_dma::DmaCounters::default());
    let dma_error: Mutex<Option<String>> = Mutex::new(None);
    let mut totals = std::collections::BTreeMap::<&'static str, u64>::new();
    let mut runs = Vec::new();
    // The slowest seconds per round seen so far (None before the first run).
    let mut secs_per_round: Option<f64> = None;
    let mut seed = config.seed;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let budget_left = left.min(MAX_RUN_BUDGET).as_secs_f64();
        let rounds = match secs_per_round {
            None => 4,
            Some(s) => ((budget_left / s.max(1e-6)) as u64).clamp(1, 1_000_000),
        };
        let budget = secs_per_round.map_or(budget_left, |s| s * rounds as f64);
        let mut vm_config = VmConfig::new(GuestSource::Builtin("verify".into()));
        vm_config.mem_size = config.mem_size;
        vm_config.vcpus = config.vcpus;
        vm_config.paging = Paging::Shadow;
        vm_config.machine_mem = Some(config.machine_mem);
        vm_config.check = true;
        vm_config.host_thp = config.host_thp;
        vm_config.pte_prefetch = config.pte_prefetch;
        vm_config.cmdline = format!("pages={} rounds={rounds}", config.pages);
        #[cfg(feature = "test-hooks")]
        {
            vm_config.flush_fault = config.flush_fault;
        }
        vm_config.ksm = Some(KsmConfig {
            pages_to_scan: 1000,
            sleep_millisecs: 1,
        });
        vm_config.reclaim = Some(ReclaimConfig {
            interval: Duration::from_millis(20),
        });
        let console = ConsoleBuffer::new();
        let t0 = Instant::now();
        let vm = RunningVm::start(&vm_config, Box::new(console.clone()))?;
        let sp = vm.shadow().cloned().ok_or(StressError::NotShadow)?;
        let stop = Arc::new(AtomicBool::new(false));
        seed = Rng(seed).next();
        let dma = {
            let (c, stop) = (dma.clone(), stop.clone());
            let mm = sp.ram().mm().clone();
            let base = sp.ram().base() + sp.ram().size_bytes() - DMA_PAGES * PAGE;
            let run_seed = seed.rotate_left(17);
            std::thread::Builder::new()
                .name("stress-dma".into())
                .spawn(move || stress_dma::run(&mm, base, &stop, run_seed, &c))
        };
        let host = {
            let (ops, stop) = (ops.clone(), stop.clone());
            let run_seed = seed;
            std::thread::Builder::new()
                .name("stress-host".into())
                .spawn(move || host_thread(&sp, &ops, &stop, run_seed))
        };
        let limit = Duration::from_secs_f64(budget) + OVERRUN_GRACE;
        let overrun = (!vm.wait_for_stop(Some(limit))).then(|| {
            vm.activity()
                .iter()
                .map(crate::vmm::run::describe_activity)
                .collect::<Vec<_>>()
        });
        // The host thread stops before the report's quiescent point.
        stop.store(true, Ordering::Relaxed);
        let host_ok = match host {
            Ok(t) => t.join().is_ok(),
            Err(_) => false,
        };
        let dma_ok = match dma {
            Ok(t) => match t.join() {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    *dma_error.lock() = Some(e.to_string());
                    false
                }
                Err(_) => false,
            },
            Err(_) => false,
        };
        let host_ok = host_ok && dma_ok;
        let report = vm.wait(Some(Duration::from_millis(1)));
        let seconds = t0.elapsed().as_secs_f64();
        let text = console.text();
        on_console(&text);
        let stats = serde_json::to_value(&report.stats).unwrap_or(Value::Null);
        for (name, path) in [
            ("faults_fixed", &["mmu", "pf_fixed"][..]),
            ("ksm_merges", &["ksm", "merges"]),
            ("cow_breaks", &["ksm", "pgcow"]),
            ("reclaim_evictions", &["reclaim", "pages_evicted"]),
            ("swap_outs", &["reclaim", "pswpout"]),
            ("swap_ins", &["reclaim", "pswpin"]),
            ("shootdowns", &["mmu", "remote_tlb_flush"]),
            (
                "notifier_invalidations",
                &["mmu", "mn_invalidate_range_start"],
            ),
            ("host_tlb_flushes", &["host_invalidate", "flushes"]),
            ("host_tlb_flush_ns", &["host_invalidate", "flush_ns"]),
            ("thp_fault_alloc", &["host_mm", "thp_fault_alloc"]),
            ("thp_split_pmd", &["host_mm", "thp_split_pmd"]),
            ("thp_split_page", &["host_mm", "thp_split_page"]),
            ("faults_fixed_2m", &["mmu", "pf_fixed_2m"]),
            ("sptes_zapped_2m", &["mmu", "spte_zapped_2m"]),
            ("sptes_prefetched", &["mmu", "pf_prefetch"]),
        ] {
            *totals.entry(name).or_default() += num(&stats, path);
        }
        // Multi-size THP below PMD size, all sizes together.
        for m in stats["host_mthp"].as_array().into_iter().flatten() {
            if m["size_kb"].as_u64().is_some_and(|kb| kb < 2048) {
                for (name, key) in [
                    ("mthp_fault_alloc", "anon_fault_alloc"),
                    ("mthp_split", "split"),
                ] {
                    *totals.entry(name).or_default() += m[key].as_u64().unwrap_or(0);
                }
            }
        }
        let exit_code = match report.outcome {
            Outcome::Exited { code, .. } => Some(code),
            _ => None,
        };
        let mut outcome = match &overrun {
            Some(_) => format!("overran its budget of {budget:.1}s: stopped after {seconds:.1}s"),
            None => report.outcome.to_string(),
        };
        if !host_ok {
            outcome.push_str(" (the host thread failed)");
        }
        runs.push(StressRun {
            rounds,
            budget_seconds: budget,
            overrun,
            outcome,
            exit_code: if host_ok { exit_code } else { None },
            corrupted_bytes: corrupted_from(&text),
            check: CheckResult(report.check),
            frames_returned: report.stats.exit.is_some_and(|e| e.frames_returned),
            seconds,
        });
        let failed = runs
            .last()
            .is_some_and(|r| r.exit_code != Some(0) || !r.check.is_ok() || !r.frames_returned);
        let spr = seconds / rounds as f64;
        secs_per_round = Some(secs_per_round.map_or(spr, |s: f64| s.max(spr)));
        if failed || Instant::now() >= deadline {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    totals.insert("dontneed", ops.dontneed.load(Ordering::Relaxed));
    totals.insert("mprotect", ops.mprotect.load(Ordering::Relaxed));
    totals.insert("balloon", ops.balloon.load(Ordering::Relaxed));
    totals.insert("host_page_writes", ops.host_writes.load(Ordering::Relaxed));
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    totals.insert("dma_writes", l(&dma.writes));
    totals.insert("dma_reads", l(&dma.reads));
    totals.insert("dma_faults", l(&dma.faults));
    totals.insert("dma_invalidations", l(&dma.invalidations));
    totals.insert("dma_checks", l(&dma.checks));
    totals.insert("dma_host_ops", l(&dma.host_ops));
    let dma_corrupted_bytes = l(&dma.corrupted_bytes);
    let dma_freed_frame_accesses = l(&dma.freed_frame_accesses);
    let flush_ns = totals.remove("host_tlb_flush_ns").unwrap_or(0);
    let per = |ns: u64, n: u64| if n == 0 { 0.0 } else { ns as f64 / n as f64 };
    let timings_ns = [
        (
            "dontneed_call",
            per(
                ops.dontneed_ns.load(Ordering::Relaxed),
                ops.dontneed.load(Ordering::Relaxed),
            ),
        ),
        (
            "mprotect_ro_call",
            per(
                ops.mprotect_ns.load(Ordering::Relaxed),
                ops.mprotect.load(Ordering::Relaxed) / 2,
            ),
        ),
        (
            "host_tlb_flush",
            per(
                flush_ns,
                totals.get("host_tlb_flushes").copied().unwrap_or(0),
            ),
        ),
    ]
    .into_iter()
    .collect();
    let ops_per_sec = totals
        .iter()
        .map(|(k, v)| (*k, *v as f64 / seconds.max(1e-9)))
        .collect();
    let corrupted_bytes = runs.iter().map(|r| r.corrupted_bytes.unwrap_or(0)).sum();
    let check_ok = runs.iter().all(|r| r.check.is_ok());
    let frames_returned = runs.iter().all(|r| r.frames_returned);
    let ok = !runs.is_empty()
        && check_ok
        && frames_returned
        && corrupted_bytes == 0
        && dma_corrupted_bytes == 0
        && dma_freed_frame_accesses == 0
        && dma_error.lock().is_none()
        && runs
            .iter()
            .all(|r| r.exit_code == Some(0) && r.corrupted_bytes == Some(0));
    let host_op_last_error = ops.last_error.lock().clone();
    Ok(StressReport {
        seconds,
        vcpus: config.vcpus,
        mem_bytes: config.mem_size,
        machine_mem_bytes: config.machine_mem,
        verify_pages: config.pages,
        runs,
        corrupted_bytes,
        check_ok,
        frames_returned,
        ops: totals,
        ops_per_sec,
        timings_ns,
        dma_corrupted_bytes,
        dma_freed_frame_accesses,
        dma_error: dma_error.lock().clone(),
        host_op_errors: ops.errors.load(Ordering::Relaxed),
        host_op_last_error,
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_bytes_are_parsed_from_the_summary() {
        let out = "verify: 2048 pages on 2 vCPUs, 4 rounds\n\
                   verify: 0 page checksums wrong, 8 pages rewritten\n\
                   verify: 2048 pages x 4 rounds, 17 corrupted bytes\n";
        assert_eq!(corrupted_from(out), Some(17));
        assert_eq!(corrupted_from("verify: 1 pages on 1 vCPUs"), None);
    }

    #[test]
    fn pages_must_fit_below_the_half() {
        let mut c = StressConfig::new(Duration::from_secs(1));
        assert!(c.check().is_ok());
        c.pages = 4096;
        assert!(c.check().is_err());
    }
}
