//! The TLB flush the shadow MMU asks for after changing sptes.
//!
//! On our machines the only flush that reaches the host KVM's own shadow of
//! our tables is invalidating the affected frames in the real host mm
//! (docs/design.md, "TLB shootdown"), so the request names frames, not gvas.

use parking_lot::Mutex;

use crate::mm::Pfn;

/// Why a frame's translation changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushReason {
    /// An spte to the frame was zapped; the frame may be freed after the
    /// flush (the host may drop its contents).
    Zapped,
    /// Zapped and the host is about to free the frame for sure (exit):
    /// its contents may be discarded.
    Freed,
    /// Write access was removed (the frame keeps its contents).
    WriteProtected,
    /// The spte now points at another frame (`change_pte`).
    Repointed,
    /// The Accessed bit was cleared and must be seen again on the next access.
    AccessedCleared,
}

/// One frame whose translations must no longer be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct FlushFrame {
    pub pfn: Pfn,
    pub reason: FlushReason,
}

/// `kvm_flush_remote_tlbs`, by frame. Returns only when no vCPU can use a
/// translation to any of the frames through a stale cached entry.
pub trait TlbFlush: Send + Sync {
    fn flush_frames(&self, frames: &[FlushFrame]);
}

/// A flush that does nothing: for a shadow MMU no vCPU runs on (unit tests,
/// benchmarks).
pub struct NoFlush;

impl TlbFlush for NoFlush {
    fn flush_frames(&self, _frames: &[FlushFrame]) {}
}

/// Records every flush request, for tests that prove a flush happened before
/// a callback returned.
#[derive(Default)]
pub struct RecordingFlush {
    calls: Mutex<Vec<Vec<FlushFrame>>>,
}

impl RecordingFlush {
    /// Every call so far, each a batch of frames.
    pub fn calls(&self) -> Vec<Vec<FlushFrame>> {
        self.calls.lock().clone()
    }
    /// Takes the recorded calls.
    pub fn take(&self) -> Vec<Vec<FlushFrame>> {
        std::mem::take(&mut *self.calls.lock())
    }
    /// Whether `pfn` was flushed in some call.
    pub fn flushed(&self, pfn: Pfn) -> bool {
        self.calls.lock().iter().flatten().any(|f| f.pfn == pfn)
    }
}

impl TlbFlush for RecordingFlush {
    fn flush_frames(&self, frames: &[FlushFrame]) {
        self.calls.lock().push(frames.to_vec());
    }
}
