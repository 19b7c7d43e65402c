//! A simulated DMA device: a second secondary MMU on the host mm, next to
//! the shadow MMU, like an RDMA NIC's on-demand-paging memory region or a
//! GPU's HMM mirror (`tools/testing/selftests/mm/hmm-tests.c` drives Linux's
//! `test_hmm.c` "dmirror" the same way).
//!
//! The device mirrors a buffer `[hva, hva + len)` of an mm, addressed by I/O
//! virtual address `iova = hva - base`. Its page table (its IOTLB) starts
//! empty; a DMA to an unmapped page faults it in through the
//! `mmu_interval_notifier` protocol (`mmu_interval_read_begin`,
//! `hva_to_pfn`, the device lock, `mmu_interval_read_retry`, install), and
//! the mm takes mappings away through the interval's `invalidate` callback.
//!
//! * `device.rs`: [`DmaDevice`], attach and detach, DMA reads and writes.
//! * `iotlb.rs`: the device page table.
//! * `fault.rs`: the fault path.
//! * `notifier.rs`: the `invalidate` callback.
//! * `engine.rs`: [`DmaEngine`], the device's own thread running DMA
//!   requests.
//! * `check.rs`: the coherence checker.
//! * `stats.rs`: counters.
//!
//! Lock order: the device lock (the IOTLB's), then the mm's page-table lock
//! or the frame allocator's (the checker and the freed-frame check); the mm
//! calls `invalidate` with neither held. DMA touches a frame only under the
//! device lock, and `invalidate` clears entries under it before the mm can
//! free a frame, so a DMA never reaches a freed frame. Machine memory is
//! accessed only through `FrameAccess::frame_word` atomics: a vCPU may write
//! it concurrently.

mod check;
mod device;
mod engine;
mod fault;
mod iotlb;
mod notifier;
mod stats;

use crate::mm::MmError;

pub use check::DmaCheckError;
#[cfg(feature = "test-hooks")]
pub use device::RaceHook;
pub use device::{DmaConfig, DmaDevice};
pub use engine::{DmaDone, DmaEngine, DmaOp};
pub use iotlb::IotlbEntry;
pub use stats::{DmaStats, DmaStatsSnapshot};

/// Bound on attempts of one device fault; each failed one means an
/// invalidation of the device's interval collided with it.
pub(crate) const MAX_FAULT_RETRIES: u32 = 1000;

/// Errors of the DMA device, as its driver would report them.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The buffer is not page aligned, empty, or wraps.
    #[error("the DMA buffer at {hva:#x} of {len} bytes is not a page-aligned, non-empty range")]
    InvalidBuffer { hva: u64, len: u64 },
    /// A DMA reaches past the end of the buffer.
    #[error("DMA of {len} bytes at iova {iova:#x} runs past the {size}-byte buffer")]
    OutOfRange { iova: u64, len: u64, size: u64 },
    /// An 8-byte access at an unaligned iova.
    #[error("iova {0:#x} is not 8-byte aligned")]
    Unaligned(u64),
    /// The host has no page the device may use there (an ODP page fault the
    /// host cannot resolve: unmapped, protected, or the mm has exited).
    #[error("device fault at iova {iova:#x}: {source}")]
    HostFault {
        iova: u64,
        #[source]
        source: MmError,
    },
    /// A fault kept colliding with invalidations.
    #[error("a device fault was retried {0} times because of concurrent invalidations")]
    TooManyRetries(u32),
    /// A DMA found a frame the mm does not own (a bug: checked only with
    /// `DmaConfig::check_frames`).
    #[error("DMA at iova {iova:#x} reached frame {pfn}, which the mm does not own")]
    FreedFrame { iova: u64, pfn: u64 },
    /// Subscribing to the mm failed.
    #[error("subscribing the device to the mm: {0}")]
    Attach(#[source] MmError),
    /// Machine memory refused an access (a frame number out of range).
    #[error("machine memory: {0}")]
    Memory(#[source] MmError),
    /// The engine thread could not be started.
    #[error("cannot start the DMA engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The engine thread is gone.
    #[error("the DMA engine has stopped")]
    EngineStopped,
    /// The device's IOTLB disagrees with the host mm (a bug).
    #[error("the device's IOTLB is not coherent with the host mm: {0}")]
    Incoherent(#[from] DmaCheckError),
}
