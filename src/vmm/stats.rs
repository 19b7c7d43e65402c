//! The statistics a run reports (`--stats`, `--json`): the VM's counters,
//! and in shadow mode the shadow MMU's, ksmd's, kswapd's, the DMA device's
//! and the teardown's.

use std::fmt;

use super::dma::GuestDmaStats;
use super::host::ksmd::KsmdStats;
use super::host::kswapd::KswapdStats;
use super::kvm::stats::VmStatsSnapshot;
use super::paging::shadow::{ExitReport, ShadowStats};

/// Statistics of one run, as printed by `--stats` and `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatsSnapshot {
    /// The VM's counters.
    #[serde(flatten)]
    pub vm: VmStatsSnapshot,
    /// Shadow mode: MMU counters and host invalidations.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub shadow: Option<ShadowStats>,
    /// `--ksm`: ksmd and KSM's counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ksm: Option<KsmdStats>,
    /// `--reclaim`: aging, working set and reclaim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim: Option<KswapdStats>,
    /// Shadow mode: the DMA device's counters (hypercall DMA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma: Option<GuestDmaStats>,
    /// Shadow mode: the teardown after the guest stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitReport>,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.vm)?;
        if let Some(s) = &self.shadow {
            writeln!(f)?;
            writeln!(
                f,
                "  machine frames       {:>12} ({} free, {} shadow pages)",
                s.machine_frames, s.machine_frames_free, s.shadow_pages
            )?;
            let m = &s.mmu;
            for (name, n) in [
                ("pf_fixed", m.pf_fixed),
                ("pf_guest", m.pf_guest),
                ("pf_mmio", m.pf_mmio),
                ("pf_host_error", m.pf_host_error),
                ("pf_retry", m.pf_retry),
                ("pf_walk_ns", m.pf_walk_ns),
                ("pf_host_ns", m.pf_host_ns),
                ("pf_install_ns", m.pf_install_ns),
                ("invlpg", m.invlpg),
                ("tlb_flush", m.tlb_flush),
                ("remote_tlb_flush", m.remote_tlb_flush),
                ("remote_tlb_flush_frames", m.remote_tlb_flush_frames),
                ("mmu_shadow_zapped", m.mmu_shadow_zapped),
                ("mmu_cache_miss", m.mmu_cache_miss),
                ("mmu_recycled", m.mmu_recycled),
                ("mmu_table_changed", m.mmu_table_changed),
                ("mmu_unsync", m.mmu_unsync),
                ("spte_zapped", m.spte_zapped),
            ] {
                writeln!(f, "    mmu {name:<23} {n:>8}")?;
            }
            // POPULATE, apart from the fault path (KVM_PRE_FAULT_MEMORY and
            // MADV_POPULATE_WRITE): sptes installed, host pages faulted in.
            let hm = &s.host_mm;
            writeln!(
                f,
                "  populate             {:>12} calls: {} pages mapped, {} skipped; host \
                 populate_fault {}, populate_present {}",
                m.prefault_calls,
                m.prefault_pages,
                m.prefault_skipped,
                hm.populate_fault,
                hm.populate_present
            )?;
            let h = &s.host_invalidate;
            writeln!(
                f,
                "  host invalidations   {:>12} frames in {} flushes",
                h.frames, h.flushes
            )?;
            let per = |ns: u64, n: u64| ns as f64 / 1000.0 / n.max(1) as f64;
            writeln!(
                f,
                "    flush_frames         {:>8} us ({:.2} us per flush)",
                h.flush_ns / 1000,
                per(h.flush_ns, h.flushes)
            )?;
            writeln!(
                f,
                "    mprotect pairs       {:>8} ({} frames, {:.2} us each)",
                h.mprotect_calls,
                h.mprotect_frames,
                per(h.mprotect_ns, h.mprotect_calls)
            )?;
            writeln!(
                f,
                "    memslot bounces      {:>8} ({} frames, {:.2} us each)",
                h.memslot_bounces,
                h.memslot_bounce_frames,
                per(h.memslot_bounce_ns, h.memslot_bounces)
            )?;
            write!(
                f,
                "    madvise(DONTNEED)    {:>8} ({} frames), {} errors",
                h.dontneed_calls, h.dontneed_frames, h.errors
            )?;
        }
        if let Some(k) = &self.ksm {
            writeln!(f)?;
            write!(
                f,
                "  ksm (pages_to_scan {}, sleep_millisecs {}): {} wake-ups, {} pages scanned",
                k.pages_to_scan, k.sleep_millisecs, k.wakeups, k.pages_scanned
            )?;
            for (name, n) in [
                ("pages_shared", k.ksm.pages_shared),
                ("pages_sharing", k.ksm.pages_sharing),
                ("pages_unshared", k.ksm.pages_unshared),
                ("pages_volatile", k.ksm.pages_volatile),
                ("full_scans", k.ksm.full_scans),
                ("merges", k.ksm.merges),
                ("max_pages_sharing", k.max_pages_sharing),
                ("pgcow", k.pgcow),
            ] {
                write!(f, "\n    ksm {name:<23} {n:>8}")?;
            }
            if let Some(e) = &k.error {
                write!(f, "\n    ksmd stopped: {e}")?;
            }
        }
        if let Some(r) = &self.reclaim {
            writeln!(f)?;
            write!(
                f,
                "  reclaim (every {} ms): {} aging passes, working set {} pages (max {}, young in the last {} passes)",
                r.interval_ms,
                r.passes,
                r.working_set_pages,
                r.working_set_max_pages,
                r.history_passes
            )?;
            for (name, n) in [
                ("young_last", r.young_last),
                ("aging_flushed_frames", r.aging_flushed_frames),
                ("low_watermark_frames", r.low_watermark_frames),
                ("reclaim_calls", r.reclaim_calls),
                ("pages_evicted", r.pages_evicted),
                ("pages_swapped_out", r.pages_swapped_out),
                ("pswpout", r.pswpout),
                ("pswpin", r.pswpin),
                ("refaults", r.refaults),
            ] {
                write!(f, "\n    reclaim {name:<19} {n:>8}")?;
            }
            if let Some(e) = &r.error {
                write!(f, "\n    kswapd stopped: {e}")?;
            }
        }
        if let Some(d) = &self.dma {
            writeln!(f)?;
            write!(f, "{d}")?;
        }
        if let Some(x) = &self.exit {
            writeln!(f)?;
            write!(
                f,
                "  exit_mmap            {:>12} ({} of {} frames free, {} reserved, {} shadow pages and {} swap slots left)",
                if x.frames_returned {
                    "every frame came back"
                } else {
                    "FRAMES MISSING"
                },
                x.frames_free,
                x.frames_total,
                x.frames_reserved,
                x.shadow_pages_left,
                x.swap_slots_left
            )?;
        }
        Ok(())
    }
}
