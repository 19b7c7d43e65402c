//! Shadow mode's counters for `--stats` / `--json`.

use super::ShadowPaging;
use crate::vmm::host::tlb::HostFlushSnapshot;

/// Counters of shadow mode, for `--stats`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShadowStats {
    /// The shadow MMU's counters.
    pub mmu: crate::mmu::MmuStatsSnapshot,
    /// Host-side invalidations done for its flushes.
    pub host_invalidate: HostFlushSnapshot,
    /// The host mm's counters (`/proc/vmstat` names: faults, COW, swap,
    /// `thp_*`).
    pub host_mm: crate::mm::MmStatsSnapshot,
    /// Multi-size THP counters per folio size that saw any activity
    /// (`hugepages-<size>kB/stats`).
    pub host_mthp: Vec<crate::mm::MthpStatsSnapshot>,
    /// Frames of machine memory.
    pub machine_frames: u64,
    /// Of which free at the end.
    pub machine_frames_free: u64,
    /// Shadow page-table pages at the end.
    pub shadow_pages: u64,
}

impl ShadowPaging {
    /// The shadow MMU's, the host flush's and machine memory's counters.
    pub fn stats(&self) -> ShadowStats {
        let frames = self.ram.mm().frames();
        ShadowStats {
            mmu: self.mmu.stats(),
            host_invalidate: self.flush.stats().snapshot(),
            host_mm: self.ram.mm().stats(),
            host_mthp: self
                .ram
                .mm()
                .mthp_stats()
                .into_iter()
                .filter(|s| s.anon_fault_alloc + s.anon_fault_fallback + s.split > 0)
                .collect(),
            machine_frames: frames.nr_frames(),
            machine_frames_free: frames.nr_free(),
            shadow_pages: self.mmu.nr_shadow_pages() as u64,
        }
    }
}
