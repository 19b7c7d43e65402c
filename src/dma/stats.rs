//! The device's counters (Firecracker-style named atomics).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct DmaStats {
    /// Device page faults (IOTLB misses) taken.
    pub faults: AtomicU64,
    /// Fault attempts thrown away because `read_retry` saw a collision.
    pub fault_retries: AtomicU64,
    /// Faults the host could not resolve (no VMA, protection, exit).
    pub host_faults: AtomicU64,
    /// `invalidate` callbacks that ran.
    pub invalidations: AtomicU64,
    /// Non-blockable invalidations refused because the device lock was busy.
    pub invalidations_refused: AtomicU64,
    /// IOTLB entries dropped by invalidations.
    pub iotlb_invalidated: AtomicU64,
    pub dma_reads: AtomicU64,
    pub dma_writes: AtomicU64,
    pub dma_read_bytes: AtomicU64,
    pub dma_write_bytes: AtomicU64,
    /// DMAs that found a frame the mm does not own (must stay 0).
    pub freed_frame_accesses: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaStatsSnapshot {
    pub faults: u64,
    pub fault_retries: u64,
    pub host_faults: u64,
    pub invalidations: u64,
    pub invalidations_refused: u64,
    pub iotlb_invalidated: u64,
    pub dma_reads: u64,
    pub dma_writes: u64,
    pub dma_read_bytes: u64,
    pub dma_write_bytes: u64,
    pub freed_frame_accesses: u64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn inc(c: &AtomicU64) {
    add(c, 1);
}

impl DmaStats {
    pub fn snapshot(&self) -> DmaStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DmaStatsSnapshot {
            faults: g(&self.faults),
            fault_retries: g(&self.fault_retries),
            host_faults: g(&self.host_faults),
            invalidations: g(&self.invalidations),
            invalidations_refused: g(&self.invalidations_refused),
            iotlb_invalidated: g(&self.iotlb_invalidated),
            dma_reads: g(&self.dma_reads),
            dma_writes: g(&self.dma_writes),
            dma_read_bytes: g(&self.dma_read_bytes),
            dma_write_bytes: g(&self.dma_write_bytes),
            freed_frame_accesses: g(&self.freed_frame_accesses),
        }
    }
}
