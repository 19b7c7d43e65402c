//! The device's `invalidate` callback (`dmirror_interval_invalidate`,
//! `ib_umem_notifier_invalidate_range_start`).

use crate::notifier::{MmuInterval, MmuIntervalNotifierOps, MmuNotifierRange};

use super::device::DeviceInner;
use super::stats::{add, inc};

impl MmuIntervalNotifierOps for DeviceInner {
    fn invalidate(&self, interval: &MmuInterval, range: &MmuNotifierRange, cur_seq: u64) -> bool {
        // A DMA in flight holds the lock: waiting for it is waiting for the
        // device to stop touching the frames, which a non-blockable caller
        // cannot do.
        let mut tlb = if range.blockable() {
            self.iotlb.lock()
        } else if let Some(g) = self.iotlb.try_lock() {
            g
        } else {
            inc(&self.stats.invalidations_refused);
            return false;
        };
        // Before any entry goes: a fault that looked the page up earlier
        // sees the new sequence under this lock and retries.
        interval.set_seq(cur_seq);
        let start = range.start.max(self.base) - self.base;
        let end = range
            .end
            .min(self.base + self.size)
            .saturating_sub(self.base);
        let n = if start < end {
            tlb.clear_range(start, end)
        } else {
            0
        };
        inc(&self.stats.invalidations);
        add(&self.stats.iotlb_invalidated, n as u64);
        crate::trace::emit!(DmaInvalidate {
            start: range.start,
            end: range.end,
            event: &range.event,
            cur_seq,
            dropped: n as u64,
        });
        true
    }
}
