//! The stress run's DMA device (issue 13): a second secondary MMU on the
//! same host mm. It mirrors the top of guest RAM through an interval
//! notifier and, from its own thread, writes tagged patterns by DMA and
//! reads them back, while ksmd, kswapd and its own host operations
//! (DONTNEED, read-only mprotect) invalidate under it. A read must give
//! back what was just written; anything else is a corrupted byte. Every DMA checks that the frame it
//! reaches is still the mm's (`DmaConfig::check_frames`): a freed frame
//! (poisoned, or someone else's) is counted, and fails the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dma::{DmaConfig, DmaDevice, DmaError};
use crate::mm::{Mm, Prot};

/// Pages the device mirrors, at the top of guest RAM.
pub const DMA_PAGES: u64 = 256;
const PAGE: u64 = 4096;
/// Bytes per DMA transfer.
const CHUNK: usize = 64;

/// What the device thread did.
#[derive(Debug, Default)]
pub struct DmaCounters {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    /// Bytes a read gave back that differ from the pattern just written.
    pub corrupted_bytes: AtomicU64,
    /// DMAs that reached a frame the mm no longer owned.
    pub freed_frame_accesses: AtomicU64,
    /// Host operations on the device's pages.
    pub host_ops: AtomicU64,
    /// DMAs the host refused (a page read-only or unmapped meanwhile).
    pub refused: AtomicU64,
    pub faults: AtomicU64,
    pub invalidations: AtomicU64,
    /// Coherence checks of the IOTLB against the host mm, all passed.
    pub checks: AtomicU64,
}

/// DMAs between two coherence checks of the device.
const CHECK_EVERY: u64 = 4096;

/// A tagged pattern: no byte 0x6b (the free poison), never all zero.
fn pattern(page: u64, seq: u64) -> [u8; CHUNK] {
    let mut b = [0u8; CHUNK];
    for (i, x) in b.iter_mut().enumerate() {
        let v = (page.wrapping_mul(31) ^ seq.wrapping_mul(7) ^ i as u64) as u8;
        *x = if v == 0x6b || v == 0 { 0x5a } else { v };
    }
    b
}

/// Runs the device over `[base, base + DMA_PAGES pages)` of `mm` until
/// `stop`; `seed` picks pages and operations.
pub fn run(
    mm: &Arc<Mm>,
    base: u64,
    stop: &AtomicBool,
    seed: u64,
    c: &DmaCounters,
) -> Result<(), DmaError> {
    let cfg = DmaConfig { check_frames: true };
    let dev = DmaDevice::attach(mm, base, DMA_PAGES * PAGE, cfg)?;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seq = 0u64;
    let mut buf = [0u8; CHUNK];
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        ops += 1;
        if ops.is_multiple_of(CHECK_EVERY) {
            // Holds at any moment, under ksmd, kswapd and the host thread
            // (`DmaDevice::check_coherence`): no need to stop them.
            dev.check_coherence()?;
            c.checks.fetch_add(1, Ordering::Relaxed);
        }
        let page = next() % DMA_PAGES;
        let off = (next() % (PAGE / CHUNK as u64)) * CHUNK as u64;
        let iova = page * PAGE + off;
        match next() % 16 {
            0 => {
                if mm.madvise_dontneed(base + page * PAGE, PAGE).is_ok() {
                    c.host_ops.fetch_add(1, Ordering::Relaxed);
                }
            }
            1 => {
                let hva = base + page * PAGE;
                if mm.mprotect(hva, PAGE, Prot::READ).is_ok()
                    && mm.mprotect(hva, PAGE, Prot::READ | Prot::WRITE).is_ok()
                {
                    c.host_ops.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                seq += 1;
                let want = pattern(page, seq);
                // A freed frame is counted by the device's stats and fails
                // the run; the thread goes on to see how often.
                match dev.write(iova, &want) {
                    Ok(()) => c.writes.fetch_add(1, Ordering::Relaxed),
                    Err(DmaError::HostFault { .. } | DmaError::FreedFrame { .. }) => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                match dev.read(iova, &mut buf) {
                    Ok(()) => c.reads.fetch_add(1, Ordering::Relaxed),
                    Err(DmaError::HostFault { .. } | DmaError::FreedFrame { .. }) => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                // Only this thread writes or discards these bytes, and not
                // between the two DMAs: reclaim, swap-in and KSM keep them.
                if buf != want {
                    let bad = buf.iter().zip(&want).filter(|(a, b)| a != b).count();
                    c.corrupted_bytes.fetch_add(bad as u64, Ordering::Relaxed);
                }
            }
        }
    }
    dev.check_coherence()?;
    c.checks.fetch_add(1, Ordering::Relaxed);
    let s = dev.stats();
    c.freed_frame_accesses
        .fetch_add(s.freed_frame_accesses, Ordering::Relaxed);
    c.faults.fetch_add(s.faults, Ordering::Relaxed);
    c.invalidations
        .fetch_add(s.invalidations, Ordering::Relaxed);
    dev.detach();
    Ok(())
}
