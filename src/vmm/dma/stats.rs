//! The guest DMA device's counters for `--stats` / `--json` (the `dma`
//! object): what the guest asked for, what was refused, and the device's
//! own counters (faults, invalidations by the host mm) over every device
//! the guest attached.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dma::DmaStatsSnapshot;

/// Counters of the hypercall side, shared by every vCPU.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) attaches: AtomicU64,
    pub(super) detaches: AtomicU64,
    pub(super) copies: AtomicU64,
    pub(super) fills: AtomicU64,
    pub(super) bytes_copied: AtomicU64,
    pub(super) bytes_filled: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) again: AtomicU64,
    pub(super) busy: AtomicU64,
    pub(super) no_device: AtomicU64,
    pub(super) out_of_buffer: AtomicU64,
}

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The `dma` object of `--json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestDmaStats {
    /// ATTACH calls that attached a device.
    pub attaches: u64,
    /// DETACH calls that detached one.
    pub detaches: u64,
    /// COPY transfers completed.
    pub copies: u64,
    /// FILL transfers completed.
    pub fills: u64,
    /// Bytes those copies wrote.
    pub bytes_copied: u64,
    /// Bytes those fills wrote.
    pub bytes_filled: u64,
    /// Transfers the host refused (`EFAULT`: a page unmapped, or read-only
    /// for a write).
    pub refused: u64,
    /// Transfers given up because invalidations kept colliding (`EAGAIN`).
    pub again: u64,
    /// ATTACH while a device was attached (`EBUSY`).
    pub busy: u64,
    /// COPY, FILL or DETACH with no device attached (`ENODEV`).
    pub no_device: u64,
    /// Transfers outside the buffer (`EINVAL`).
    pub out_of_buffer: u64,
    /// The buffer still attached when the guest stopped, as `[gpa, len]`;
    /// the teardown detached it.
    pub attached_at_exit: Option<[u64; 2]>,
    /// IOTLB entries that device held after the host mm's exit (0: the
    /// exit's invalidation reached it).
    pub iotlb_after_exit: u64,
    /// The device's own counters, summed over every device attached.
    #[serde(flatten)]
    pub device: DmaStatsSnapshot,
}

impl Counters {
    /// The hypercall side's counters, with `device` and the exit's fields
    /// as given.
    pub(super) fn snapshot(&self, device: DmaStatsSnapshot) -> GuestDmaStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GuestDmaStats {
            attaches: g(&self.attaches),
            detaches: g(&self.detaches),
            copies: g(&self.copies),
            fills: g(&self.fills),
            bytes_copied: g(&self.bytes_copied),
            bytes_filled: g(&self.bytes_filled),
            refused: g(&self.refused),
            again: g(&self.again),
            busy: g(&self.busy),
            no_device: g(&self.no_device),
            out_of_buffer: g(&self.out_of_buffer),
            attached_at_exit: None,
            iotlb_after_exit: 0,
            device,
        }
    }
}

/// `a + b`, counter by counter.
pub(super) fn sum(a: DmaStatsSnapshot, b: DmaStatsSnapshot) -> DmaStatsSnapshot {
    DmaStatsSnapshot {
        faults: a.faults + b.faults,
        fault_retries: a.fault_retries + b.fault_retries,
        host_faults: a.host_faults + b.host_faults,
        invalidations: a.invalidations + b.invalidations,
        invalidations_refused: a.invalidations_refused + b.invalidations_refused,
        iotlb_invalidated: a.iotlb_invalidated + b.iotlb_invalidated,
        dma_reads: a.dma_reads + b.dma_reads,
        dma_writes: a.dma_writes + b.dma_writes,
        dma_read_bytes: a.dma_read_bytes + b.dma_read_bytes,
        dma_write_bytes: a.dma_write_bytes + b.dma_write_bytes,
        freed_frame_accesses: a.freed_frame_accesses + b.freed_frame_accesses,
    }
}

impl fmt::Display for GuestDmaStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.device;
        write!(
            f,
            "  dma device           {:>12} attaches, {} detaches",
            self.attaches, self.detaches
        )?;
        if let Some([gpa, len]) = self.attached_at_exit {
            write!(
                f,
                " (gpa {gpa:#x}+{len:#x} attached at exit: detached, {} IOTLB entries left)",
                self.iotlb_after_exit
            )?;
        }
        for (name, n) in [
            ("copies", self.copies),
            ("fills", self.fills),
            ("bytes_copied", self.bytes_copied),
            ("bytes_filled", self.bytes_filled),
            ("refused", self.refused),
            ("again", self.again),
            ("busy", self.busy),
            ("no_device", self.no_device),
            ("out_of_buffer", self.out_of_buffer),
            ("faults", d.faults),
            ("fault_retries", d.fault_retries),
            ("host_faults", d.host_faults),
            ("invalidations", d.invalidations),
            ("invalidations_refused", d.invalidations_refused),
            ("iotlb_invalidated", d.iotlb_invalidated),
            ("dma_reads", d.dma_reads),
            ("dma_writes", d.dma_writes),
            ("freed_frame_accesses", d.freed_frame_accesses),
        ] {
            write!(f, "\n    dma {name:<23} {n:>8}")?;
        }
        Ok(())
    }
}
