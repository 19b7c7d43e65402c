//! Errors of the simulated host mm: Linux's errno for bad calls, SIGSEGV for
//! bad accesses.

use std::sync::Arc;

use crate::notifier::NotifierError;

use super::{Hva, Pfn, SwapSlot};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// `-EINVAL`: unaligned address, zero or overflowing length.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// `-ENOMEM`: part of the range is not mapped, or no room for a mapping.
    #[error("the range is not fully mapped, or no address space is left")]
    NoMemory,
    /// `-EINVAL` from madvise(MADV_DONTNEED) on a VM_LOCKED area.
    #[error("address {0:#x} is in a locked mapping")]
    Locked(Hva),
    /// SIGSEGV (`SEGV_MAPERR`): no VMA contains the address.
    #[error("no mapping at address {0:#x}")]
    NoVma(Hva),
    /// SIGSEGV (`SEGV_ACCERR`): the VMA's protection forbids the access.
    #[error("{access} access to {addr:#x} is not allowed by the mapping's protection")]
    Access { addr: Hva, access: &'static str },
    /// The frame allocator is empty and reclaim could not free a frame.
    #[error("out of machine memory: no free frame left (reclaim found nothing to evict)")]
    OutOfFrames,
    /// An internal frame number was outside machine memory or in the wrong
    /// state.
    #[error("frame {0} is not valid here")]
    BadFrame(Pfn),
    /// An internal swap slot was not in use.
    #[error("swap slot {0} is not in use")]
    BadSwap(SwapSlot),
    /// The mm has gone through exit_mmap.
    #[error("the address space has exited")]
    Exited,
    /// `-EAGAIN`: a notifier could not proceed without blocking.
    #[error(transparent)]
    Notifier(#[from] NotifierError),
    /// Machine memory could not be created.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Machine memory could not be mapped: `what` failed, because of `source`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("machine memory: {what}")]
pub struct MachineError {
    pub what: &'static str,
    #[source]
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

/// Errors compare by what failed (the source is for the message).
impl PartialEq for MachineError {
    fn eq(&self, other: &Self) -> bool {
        self.what == other.what
    }
}

impl Eq for MachineError {}
