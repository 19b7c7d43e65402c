//! The device fault path, as `mmu_interval_notifier` users write it
//! (`dmirror_range_fault` in `lib/test_hmm.c`, `ib_umem_odp_map_dma_and_lock`
//! in RDMA ODP): begin a read of the interval's sequence, look the page up
//! in the host (`hva_to_pfn`, may sleep, no device lock), take the device
//! lock, and install only if `mmu_interval_read_retry` says no invalidation
//! collided; otherwise drop the lookup and begin again.
//!
//! Why it is enough: the `invalidate` callback sets the interval's sequence
//! under the device lock before the host changes the PTE, and the host frees
//! the old frame only after the range ends. So either our `read_retry`
//! (under the same lock) sees the new sequence and we retry, or our install
//! precedes the callback, which then removes it before the frame is freed.
//! A lookup begun while the invalidation runs waits in `read_begin` for its
//! end, so it sees the new PTE.

use crate::mm::Access;

use super::device::DmaDevice;
use super::iotlb::IotlbEntry;
use super::stats::inc;
use super::{DmaError, MAX_FAULT_RETRIES};
use crate::mm::PAGE_SIZE;

impl DmaDevice {
    /// Maps the page of `iova` for `access` (ODP's page fault); returns the
    /// translation installed.
    pub fn fault(&self, iova: u64, access: Access) -> Result<IotlbEntry, DmaError> {
        self.check_range(iova, 1)?;
        let inner = &self.inner;
        let page = iova / PAGE_SIZE;
        let hva = inner.base + page * PAGE_SIZE;
        inc(&inner.stats.faults);
        for _ in 0..MAX_FAULT_RETRIES {
            let seq = self.interval.read_begin();
            let host = inner.mm.hva_to_pfn(hva, access).map_err(|source| {
                inc(&inner.stats.host_faults);
                DmaError::HostFault { iova, source }
            })?;
            #[cfg(feature = "test-hooks")]
            {
                // Cloned out first: the hook may run host operations, and
                // must not run under the hook's own lock.
                let hook = inner.race_hook.lock().clone();
                if let Some(hook) = hook {
                    hook(iova);
                }
            }
            let mut tlb = inner.iotlb.lock();
            if self.interval.read_retry(seq) {
                inc(&inner.stats.fault_retries);
                continue;
            }
            let e = IotlbEntry {
                pfn: host.pfn,
                writable: host.writable,
            };
            tlb.install(page as usize, e);
            crate::trace::emit!(DmaFault {
                iova,
                hva,
                frame: e.pfn,
                writable: e.writable,
            });
            return Ok(e);
        }
        Err(DmaError::TooManyRetries(MAX_FAULT_RETRIES))
    }
}
