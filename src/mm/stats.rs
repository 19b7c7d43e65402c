//! Event counters of the host mm, named after `/proc/vmstat`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $($(#[$fm])* pub $f: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct $snap { $($(#[$fm])* pub $f: u64,)* }

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($f: self.$f.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters!(
    /// Counters of one mm.
    MmStats, MmStatsSnapshot {
        /// Page faults handled (`pgfault`).
        pgfault,
        /// Demand-zero pages allocated.
        pgfault_zero,
        /// Copy-on-write copies made (`cow_ksm` included).
        pgcow,
        /// Write faults that reused the page in place.
        pgreuse,
        /// Pages read back from swap (`pswpin`).
        pswpin,
        /// Pages written to swap (`pswpout`).
        pswpout,
        /// Pages evicted by reclaim (`pgsteal`).
        pgsteal,
        /// Pages examined by reclaim (`pgscan`).
        pgscan,
        /// Pages found young by aging and kept (`pgactivate`).
        pgactivate,
        /// Pages dropped by MADV_DONTNEED, munmap or exit.
        pgzap,
        /// `lock_page` calls that had to sleep: another thread held the
        /// page lock (KSM merging it, reclaim unmapping it).
        page_lock_wait,
        /// `mmap_write_lock` calls that had to wait for another holder.
        mmap_lock_wait,
        /// Blockable `invalidate_range_start` calls a notifier failed
        /// (a notifier bug: blockable starts may not fail).
        mn_start_failed,
        /// PMD-size folios allocated and mapped by a fault (`thp_fault_alloc`).
        thp_fault_alloc,
        /// Faults that wanted a PMD-size folio and found no 2 MiB run of
        /// free frames (`thp_fault_fallback`).
        thp_fault_fallback,
        /// Huge PMDs split into PTE tables (`thp_split_pmd`).
        thp_split_pmd,
        /// PMD-size folios split into small pages (`thp_split_page`).
        thp_split_page,
        /// Splits of PMD-size folios refused: pinned or locked
        /// (`thp_split_page_failed`).
        thp_split_page_failed,
        /// Large folios queued for a later split after a partial unmap
        /// (`thp_deferred_split_page`).
        thp_deferred_split_page,
        /// Pages faulted in by `madvise(MADV_POPULATE_WRITE)` (the faults
        /// are in `pgfault` too).
        populate_fault,
        /// Pages `MADV_POPULATE_WRITE` found already present and writable.
        populate_present,
    }
);

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
