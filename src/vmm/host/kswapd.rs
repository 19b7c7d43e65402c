//! `--reclaim`: a kswapd-like thread for a shadow-mode run: page aging, a
//! working-set estimate and reclaim of cold guest pages (`mm/vmscan.c`).
//!
//! Every interval the thread runs one aging pass over guest RAM
//! ([`Aging::pass`], with its batched host invalidation).
//!
//! A page is in the working set if it was young in any of the last
//! [`AGING_HISTORY`] passes. When free frames fall below a low watermark
//! (1/16 of machine memory) the thread calls [`Mm::reclaim`], which gives
//! young pages a second chance and evicts cold ones (unmapped under
//! `invalidate_range_start/end`, dirty ones written to swap); the guest
//! faults them back through the shadow fault path.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::aging::{AGING_HISTORY, Aging};
use super::ram::ShadowRam;
use super::thread::{HostThread, StartError, StopSignal, ThreadError};
use crate::mm::Mm;
use crate::mmu::TlbFlush;

/// `--reclaim-interval-ms` by default.
pub const DEFAULT_RECLAIM_INTERVAL: Duration = Duration::from_millis(50);

/// Pages one reclaim call scans.
const RECLAIM_BATCH: u64 = 512;
/// Reclaim calls per wake-up at most.
const RECLAIM_CALLS_MAX: u32 = 16;

/// The kswapd tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimConfig {
    /// Time between aging passes.
    pub interval: Duration,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_RECLAIM_INTERVAL,
        }
    }
}

/// What kswapd reports in `--stats` / `--json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KswapdStats {
    /// Milliseconds between aging passes.
    pub interval_ms: u64,
    /// Passes the working-set estimate looks back over.
    pub history_passes: u32,
    /// Aging passes made.
    pub passes: u64,
    /// Pages young in the last pass.
    pub young_last: u64,
    /// Working-set estimate after the last pass, in pages.
    pub working_set_pages: u64,
    /// The largest working-set estimate seen, in pages.
    pub working_set_max_pages: u64,
    /// Frames invalidated in the host by the aging passes' batched flushes.
    pub aging_flushed_frames: u64,
    /// Free frames below which reclaim runs.
    pub low_watermark_frames: u64,
    /// Free frames reclaim aims for.
    pub high_watermark_frames: u64,
    /// Reclaim calls made.
    pub reclaim_calls: u64,
    /// Pages evicted by this thread.
    pub pages_evicted: u64,
    /// Of those, written to swap.
    pub pages_swapped_out: u64,
    /// Pages written to swap in the run (`pswpout`, direct reclaim included).
    pub pswpout: u64,
    /// Pages read back from swap in the run (`pswpin`).
    pub pswpin: u64,
    /// Swapped-out pages the guest faulted back in (swap-ins).
    pub refaults: u64,
    /// Why the thread stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ThreadError>,
}

/// A running kswapd.
pub struct Kswapd {
    thread: HostThread<KswapdStats>,
    mm: Arc<Mm>,
}

impl Kswapd {
    /// Starts the thread over `ram`; `flush` is the shadow MMU's host flush.
    pub fn start(
        ram: &ShadowRam,
        flush: Arc<dyn TlbFlush>,
        config: ReclaimConfig,
    ) -> Result<Self, StartError> {
        let mm = ram.mm().clone();
        let nr_frames = mm.frames().nr_frames();
        let report = KswapdStats {
            interval_ms: config.interval.as_millis() as u64,
            history_passes: AGING_HISTORY,
            low_watermark_frames: (nr_frames / 16).max(1),
            high_watermark_frames: (nr_frames / 8).max(2),
            ..KswapdStats::default()
        };
        let aging = Aging::for_ram(ram);
        let thread = {
            let mm = mm.clone();
            HostThread::spawn("kswapd", report, move |stop, stats| {
                kswapd_loop(&mm, &*flush, aging, stop, stats, config.interval)
            })?
        };
        Ok(Kswapd { thread, mm })
    }

    /// What the thread did so far.
    pub fn stats(&self) -> KswapdStats {
        let mut s = self.thread.report();
        let m = self.mm.stats();
        s.pswpout = m.pswpout;
        s.pswpin = m.pswpin;
        s.refaults = m.pswpin;
        s.error = self.thread.error();
        s
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.thread.stop();
    }
}

/// `kswapd`: an aging pass every `interval`, and reclaim down to the high
/// watermark whenever free frames fall below the low one.
fn kswapd_loop(
    mm: &Mm,
    flush: &dyn TlbFlush,
    mut aging: Aging,
    stop: &StopSignal,
    stats: &Mutex<KswapdStats>,
    interval: Duration,
) -> Result<(), ThreadError> {
    let (low, high) = {
        let s = stats.lock();
        (s.low_watermark_frames, s.high_watermark_frames)
    };
    while !stop.sleep(interval) {
        let pass = aging.pass(mm, flush)?;
        {
            let mut s = stats.lock();
            s.passes += 1;
            s.young_last = pass.young.len() as u64;
            s.working_set_pages = pass.working_set;
            s.working_set_max_pages = s.working_set_max_pages.max(pass.working_set);
            s.aging_flushed_frames += pass.flushed_frames;
        }
        if mm.frames().nr_free() >= low {
            continue;
        }
        for _ in 0..RECLAIM_CALLS_MAX {
            if stop.is_stopped() || mm.frames().nr_free() >= high {
                break;
            }
            let r = mm.reclaim(RECLAIM_BATCH)?;
            let mut s = stats.lock();
            s.reclaim_calls += 1;
            s.pages_evicted += r.evicted;
            s.pages_swapped_out += r.swapped_out;
            if r.scanned == 0 {
                break;
            }
        }
    }
    Ok(())
}
