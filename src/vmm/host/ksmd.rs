//! `--ksm`: a ksmd thread for a shadow-mode run (`mm/ksm.c`'s ksmd).
//!
//! Guest RAM is marked `MADV_MERGEABLE` (the mlocked VMM area and image
//! are skipped by the scanner: KSM never takes VM_LOCKED pages); the thread
//! then calls [`Mm::ksm_scan`] with `pages_to_scan` and sleeps
//! `sleep_millisecs`, until the run ends. Merging write-protects the page
//! and repoints secondary MMUs with `change_pte` inside
//! `invalidate_range_start/end`, so the shadow MMU follows; a guest write
//! to a merged page takes a shadow fault, whose host fault breaks the
//! sharing by copy-on-write.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::ram::ShadowRam;
use super::thread::{HostThread, StartError, StopSignal, ThreadError};
use crate::mm::{KsmConfig, KsmStats, Mm, MmError};

/// What ksmd reports in `--stats` / `--json`: KSM's counters with the
/// names of `/sys/kernel/mm/ksm`, at the end of the run, plus what the
/// thread saw while the guest ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmdStats {
    /// The tunables used.
    pub pages_to_scan: u64,
    /// Sleep between wake-ups.
    pub sleep_millisecs: u64,
    /// KSM's counters when the guest stopped.
    #[serde(flatten)]
    pub ksm: KsmStats,
    /// The largest `pages_sharing` seen after a wake-up (a guest that
    /// frees or rewrites its memory before it exits ends with none).
    pub max_pages_sharing: u64,
    /// Wake-ups of the thread.
    pub wakeups: u64,
    /// Pages scanned in all.
    pub pages_scanned: u64,
    /// Copy-on-write copies the mm made in the run (`pgcow`): with no fork
    /// in the VMM's mm, writes that broke KSM sharing.
    pub pgcow: u64,
    /// Why the thread stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ThreadError>,
}

/// A running ksmd.
pub struct Ksmd {
    thread: HostThread<KsmdStats>,
    mm: Arc<Mm>,
}

impl Ksmd {
    /// Marks guest RAM mergeable and starts the thread.
    pub fn start(ram: &ShadowRam, config: KsmConfig) -> Result<Self, StartError> {
        let mm = ram.mm().clone();
        mm.madvise_mergeable(ram.base(), ram.size_bytes())
            .map_err(|source| StartError::Mm {
                name: "ksmd",
                source,
            })?;
        let report = KsmdStats {
            pages_to_scan: config.pages_to_scan,
            sleep_millisecs: config.sleep_millisecs,
            ..KsmdStats::default()
        };
        let thread = {
            let mm = mm.clone();
            HostThread::spawn("ksmd", report, move |stop, stats| {
                Ok(ksmd_loop(&mm, stop, stats, config)?)
            })?
        };
        Ok(Ksmd { thread, mm })
    }

    /// What the thread did so far, with KSM's counters now.
    pub fn stats(&self) -> KsmdStats {
        let mut s = self.thread.report();
        if !self.mm.has_exited() {
            s.ksm = self.mm.ksm_stats();
            s.max_pages_sharing = s.max_pages_sharing.max(s.ksm.pages_sharing);
        }
        s.pgcow = self.mm.stats().pgcow;
        s.error = self.thread.error();
        s
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.thread.stop();
    }
}

/// `ksm_scan_thread`: a scan of `pages_to_scan` pages per wake-up.
fn ksmd_loop(
    mm: &Mm,
    stop: &StopSignal,
    stats: &Mutex<KsmdStats>,
    config: KsmConfig,
) -> Result<(), MmError> {
    let sleep = Duration::from_millis(config.sleep_millisecs);
    while !stop.is_stopped() {
        let r = mm.ksm_scan(config.pages_to_scan.max(1))?;
        let ksm = mm.ksm_stats();
        let mut s = stats.lock();
        s.wakeups += 1;
        s.pages_scanned += r.scanned;
        s.ksm = ksm;
        s.max_pages_sharing = s.max_pages_sharing.max(ksm.pages_sharing);
        drop(s);
        if stop.sleep(sleep) {
            break;
        }
    }
    Ok(())
}
