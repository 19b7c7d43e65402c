//! Counters of the shadow MMU, with KVM's names (`/sys/kernel/debug/kvm`).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! mmu_counters {
    ($($(#[$m:meta])* $f:ident),* $(,)?) => {
        /// Live counters.
        #[derive(Default, Debug)]
        pub struct MmuStats { $($(#[$m])* pub $f: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct MmuStatsSnapshot { $($(#[$m])* pub $f: u64,)* }

        impl MmuStats {
            pub fn snapshot(&self) -> MmuStatsSnapshot {
                MmuStatsSnapshot { $($f: self.$f.load(Ordering::Relaxed),)* }
            }
        }
    };
}

mmu_counters!(
    /// Faults fixed by installing an spte.
    pf_fixed,
    /// Of those, fixed with a 2 MiB spte (guest 2 MiB page over a host
    /// huge PMD; KVM counts these in `pages_2m`).
    pf_fixed_2m,
    /// Sptes installed by prefetch for neighbours of a faulting gva
    /// (`FNAME(pte_prefetch)` / `direct_pte_prefetch`), not by a fault.
    pf_prefetch,
    /// Prefetch candidates dropped under the MMU lock: an invalidation
    /// touched their host page since the sequence read, or the guest PTE
    /// changed.
    pf_prefetch_raced,
    /// Faults that were the guest's own (a #PF for the guest).
    pf_guest,
    /// Faults on a gpa outside every memslot (MMIO).
    pf_mmio,
    /// Faults whose host page could not be had (host munmap/mprotect).
    pf_host_error,
    /// Fault attempts dropped because an invalidation raced them
    /// (`mmu_invalidate_retry`).
    pf_retry,
    /// Most retries one fault needed (bounded by invalidations of the
    /// pages it relied on, not by invalidations elsewhere).
    pf_retry_max,
    /// Retries that first slept until an invalidation of the fault's pages
    /// ended.
    pf_invalidate_wait,
    /// Nanoseconds in the guest page-table walk (`walk_addr`, with A/D
    /// emulation) of faults that got that far.
    pf_walk_ns,
    /// Nanoseconds in the host fault (`hva_to_pfn`).
    pf_host_ns,
    /// Nanoseconds from taking the MMU lock to the end of the install,
    /// the TLB flush included.
    pf_install_ns,
    /// Guest invlpg requests.
    invlpg,
    /// Guest full TLB flushes (and CR3 loads that flushed).
    tlb_flush,
    /// Flush requests sent to the TLB-flush backend.
    remote_tlb_flush,
    /// Frames named in those requests.
    remote_tlb_flush_frames,
    /// Shadow pages zapped.
    mmu_shadow_zapped,
    /// Shadow pages created (no cached page fitted).
    mmu_cache_miss,
    /// Roots recycled because the root cache was full.
    mmu_recycled,
    /// Shadow tables a link was cleared in, or that were freed or emptied
    /// (each named in a `TableChanged` flush): what can cut a vCPU's path
    /// to a page without zapping that page's spte.
    mmu_table_changed,
    /// Guest page-table pages unprotected because the guest wrote them.
    mmu_unsync,
    /// Leaf sptes zapped (by the notifier, invlpg, flushes).
    spte_zapped,
    /// Of those, 2 MiB sptes.
    spte_zapped_2m,
    /// Pre-fault requests (`KVM_PRE_FAULT_MEMORY`), apart from the fault
    /// path.
    prefault_calls,
    /// 4 KiB pages a pre-fault left mapped by an spte (installed, or found
    /// present).
    prefault_pages,
    /// 4 KiB pages a pre-fault skipped: the guest does not map them, or
    /// its PTE is not yet accessed, or the host cannot back them.
    prefault_skipped,
    /// Notifier callbacks received.
    mn_invalidate_range_start,
    mn_invalidate_range_end,
    mn_invalidate_range,
    mn_change_pte,
    mn_clear_flush_young,
    mn_clear_young,
    mn_test_young,
    mn_release,
);

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn max(c: &AtomicU64, v: u64) {
    c.fetch_max(v, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds the nanoseconds since `t` to `c`.
pub(crate) fn add_ns(c: &AtomicU64, t: std::time::Instant) {
    add(c, t.elapsed().as_nanos() as u64);
}
