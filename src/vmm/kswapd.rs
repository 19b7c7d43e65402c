//! `--reclaim`: a kswapd-like thread for a shadow-mode run: page aging, a
//! working-set estimate and reclaim of cold guest pages (`mm/vmscan.c`).
//!
//! Every interval the thread runs one aging pass over guest RAM
//! ([`Aging::pass`]): each present page's young bits are tested and
//! cleared, the host PTE's and, through `clear_young`, the Accessed bits
//! the CPU set in our sptes. Clearing an spte's Accessed bit is not enough
//! for the CPU to set it again: the host KVM keeps its own shadow of our
//! tables (DESIGN.md, "TLB shootdown"), so the pass ends with **one
//! batched host invalidation** of every frame whose bits it cleared, and
//! the next access walks our tables again and sets Accessed afresh.
//!
//! A page is in the working set if it was young in any of the last
//! [`AGING_HISTORY`] passes. When free frames fall below a low watermark
//! (1/16 of machine memory) the thread calls [`Mm::reclaim`], which gives
//! young pages a second chance and evicts cold ones (unmapped under
//! `invalidate_range_start/end`, dirty ones written to swap); the guest
//! faults them back through the shadow fault path.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::abi::PAGE_SIZE;
use super::error::VmmError;
use super::ksmd::StopSignal;
use super::shadow::ShadowRam;
use crate::mm::{Hva, Mm, MmError, Pte};
use crate::mmu::{FlushFrame, FlushReason, TlbFlush};

/// Passes the working-set estimate looks back over.
pub const AGING_HISTORY: u32 = 4;

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

/// What one aging pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgingPass {
    /// Present pages looked at.
    pub scanned: u64,
    /// Pages that were young (bits now cleared).
    pub young: Vec<Hva>,
    /// Frames the batched host invalidation covered.
    pub flushed_frames: u64,
    /// Pages young in any of the last [`AGING_HISTORY`] passes.
    pub working_set: u64,
}

/// Page aging over one range of guest RAM, with a per-page history of the
/// last [`AGING_HISTORY`] passes (bit 0: the latest).
pub struct Aging {
    base: Hva,
    history: Vec<u8>,
    passes: u64,
}

impl Aging {
    const MASK: u8 = (1 << AGING_HISTORY) - 1;

    /// Aging for the `size` bytes of guest RAM at `base`.
    pub fn new(base: Hva, size: u64) -> Self {
        Aging {
            base,
            history: vec![0; (size / PAGE_SIZE) as usize],
            passes: 0,
        }
    }

    /// Aging for all of guest RAM.
    pub fn for_ram(ram: &ShadowRam) -> Self {
        Self::new(ram.base(), ram.size_bytes())
    }

    /// Passes made.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The history of the page at `hva`: bit `i` set if it was young `i`
    /// passes ago (bit 0: the latest pass). `None` outside the range.
    pub fn history(&self, hva: Hva) -> Option<u8> {
        let i = hva.checked_sub(self.base)? / PAGE_SIZE;
        self.history.get(usize::try_from(i).ok()?).copied()
    }

    /// Pages young in any of the last [`AGING_HISTORY`] passes.
    pub fn working_set(&self) -> u64 {
        self.history.iter().filter(|h| **h != 0).count() as u64
    }

    /// One aging pass: clears every present page's young bits (host PTE
    /// and sptes, `clear_young`), then invalidates every frame it found
    /// young in one batched host flush so the CPU sets Accessed afresh.
    pub fn pass(&mut self, mm: &Mm, flush: &dyn TlbFlush) -> Result<AgingPass, AgingError> {
        let end = self.base + self.history.len() as u64 * PAGE_SIZE;
        let aged = mm.age_range(self.base, end, false)?;
        let frames: Vec<FlushFrame> = aged
            .young
            .iter()
            .filter_map(|hva| match mm.pte(*hva) {
                Some(Pte::Present(p)) => Some(FlushFrame {
                    pfn: p.pfn,
                    reason: FlushReason::AccessedCleared,
                }),
                _ => None,
            })
            .collect();
        if !frames.is_empty() {
            flush.flush_frames(&frames)?;
        }
        for h in &mut self.history {
            *h = (*h << 1) & Self::MASK;
        }
        for hva in &aged.young {
            let Some(i) = hva
                .checked_sub(self.base)
                .and_then(|off| usize::try_from(off / PAGE_SIZE).ok())
            else {
                continue;
            };
            if let Some(h) = self.history.get_mut(i) {
                *h |= 1;
            }
        }
        self.passes += 1;
        Ok(AgingPass {
            scanned: aged.scanned,
            young: aged.young,
            flushed_frames: frames.len() as u64,
            working_set: self.working_set(),
        })
    }
}

/// Why an aging pass failed.
#[derive(Debug, thiserror::Error)]
pub enum AgingError {
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The batched host flush failed: the VM is being stopped.
    #[error(transparent)]
    Flush(#[from] crate::mmu::TlbFlushError),
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
    pub error: Option<String>,
}

/// A running kswapd.
pub struct Kswapd {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<KswapdStats>>,
    mm: Arc<Mm>,
}

impl Kswapd {
    /// Starts the thread over `ram`; `flush` is the shadow MMU's host flush.
    pub fn start(
        ram: &ShadowRam,
        flush: Arc<dyn TlbFlush>,
        config: ReclaimConfig,
    ) -> Result<Self, VmmError> {
        let mm = ram.mm().clone();
        let nr_frames = mm.frames().nr_frames();
        let stats = Arc::new(Mutex::new(KswapdStats {
            interval_ms: config.interval.as_millis() as u64,
            history_passes: AGING_HISTORY,
            low_watermark_frames: (nr_frames / 16).max(1),
            high_watermark_frames: (nr_frames / 8).max(2),
            ..KswapdStats::default()
        }));
        let stop = Arc::new(StopSignal::default());
        let aging = Aging::for_ram(ram);
        let thread = {
            let (mm, stop, stats) = (mm.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("kswapd".into())
                .spawn(move || {
                    kswapd_loop(&mm, &*flush, aging, &stop, &stats, config.interval);
                })
                .map_err(|source| VmmError::HostThread {
                    name: "kswapd",
                    source,
                })?
        };
        Ok(Kswapd {
            stop,
            thread: Some(thread),
            stats,
            mm,
        })
    }

    /// What the thread did so far.
    pub fn stats(&self) -> KswapdStats {
        let mut s = self.stats.lock().clone();
        let m = self.mm.stats();
        s.pswpout = m.pswpout;
        s.pswpin = m.pswpin;
        s.refaults = m.pswpin;
        s
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            self.stats.lock().error = Some("the kswapd thread panicked".into());
        }
    }
}

impl Drop for Kswapd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kswapd_loop(
    mm: &Mm,
    flush: &dyn TlbFlush,
    mut aging: Aging,
    stop: &StopSignal,
    stats: &Mutex<KswapdStats>,
    interval: Duration,
) {
    let (low, high) = {
        let s = stats.lock();
        (s.low_watermark_frames, s.high_watermark_frames)
    };
    let fail = |e: MmError| {
        if !matches!(e, MmError::Exited) {
            stats.lock().error = Some(e.to_string());
        }
    };
    while !stop.sleep(interval) {
        let pass = match aging.pass(mm, flush) {
            Ok(p) => p,
            Err(AgingError::Mm(e)) => return fail(e),
            Err(e) => {
                stats.lock().error = Some(e.to_string());
                return;
            }
        };
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
            let r = match mm.reclaim(RECLAIM_BATCH) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let mut s = stats.lock();
            s.reclaim_calls += 1;
            s.pages_evicted += r.evicted;
            s.pages_swapped_out += r.swapped_out;
            if r.scanned == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MmapFlags, Prot};
    use crate::mmu::NoFlush;

    #[test]
    fn history_and_working_set_follow_the_young_bits() {
        let mm = Mm::new_anonymous(64).unwrap();
        let size = 8 * PAGE_SIZE;
        let base = mm
            .mmap(None, size, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .unwrap();
        let (hot, cold) = (base, base + 3 * PAGE_SIZE);
        mm.write(hot, &[1]).unwrap();
        mm.write(cold, &[2]).unwrap();
        let mut aging = Aging::new(base, size);
        let p = aging.pass(&mm, &NoFlush).unwrap();
        assert_eq!((p.scanned, p.young.len(), p.working_set), (2, 2, 2));
        assert_eq!(p.flushed_frames, 2);
        for i in 1..=AGING_HISTORY {
            mm.write(hot, &[1]).unwrap();
            let p = aging.pass(&mm, &NoFlush).unwrap();
            assert_eq!(p.young, vec![hot]);
            let ws = if i < AGING_HISTORY { 2 } else { 1 };
            assert_eq!(p.working_set, ws, "pass {i}");
        }
        assert_eq!(aging.history(hot), Some(0b1111));
        assert_eq!(aging.history(cold), Some(0));
        assert_eq!(aging.history(base + size), None);
        assert_eq!(aging.history(base - 1), None);
        assert_eq!(aging.passes(), u64::from(AGING_HISTORY) + 1);
    }
}
