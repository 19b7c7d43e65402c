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
    /// A link in the shadow table at this frame was cleared, or the shadow
    /// page at this frame was freed: every translation structure built from
    /// our tables must go, not only the leaves. A host KVM that shadows our
    /// tables caches their upper levels and never sees the VMM's writes to
    /// them, so a stale link would lead its walk, and its prefetch, into a
    /// table that no longer sits there (or into a frame reused for guest
    /// data). The shadow MMU keeps a freed page's frame out of use until
    /// this flush has returned.
    TableChanged,
}

/// One frame whose translations must no longer be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct FlushFrame {
    pub pfn: Pfn,
    pub reason: FlushReason,
}

/// A flush the host refused: frames `first..first + count` may still be
/// reachable through stale translations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host invalidation ({method}) of frames {first:#x}..{:#x} failed: {}", first + count, std::io::Error::from_raw_os_error(*errno))]
pub struct TlbFlushError {
    /// How the flush was attempted (`mprotect`, `madvise`, `memslot_bounce`).
    pub method: &'static str,
    pub first: Pfn,
    pub count: u64,
    /// The errno the host returned.
    pub errno: i32,
}

/// `kvm_flush_remote_tlbs`, by frame. Returns only when no vCPU can use a
/// translation to any of the frames through a stale cached entry; an error
/// means that could not be ensured, and the VM must stop (fail-stop, never
/// stale): the implementation keeps every vCPU out of the guest before it
/// returns one.
pub trait TlbFlush: Send + Sync {
    fn flush_frames(&self, frames: &[FlushFrame]) -> Result<(), TlbFlushError>;
}

/// A flush that does nothing: for a shadow MMU no vCPU runs on (unit tests,
/// benchmarks).
pub struct NoFlush;

impl TlbFlush for NoFlush {
    fn flush_frames(&self, _frames: &[FlushFrame]) -> Result<(), TlbFlushError> {
        Ok(())
    }
}

/// Records every flush request, for tests that prove a flush happened before
/// a callback returned; can be told to fail.
#[derive(Default)]
pub struct RecordingFlush {
    calls: Mutex<Vec<Vec<FlushFrame>>>,
    fail: Mutex<Option<i32>>,
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
    /// Makes every later flush fail with `errno` (`None`: succeed again).
    pub fn set_fail(&self, errno: Option<i32>) {
        *self.fail.lock() = errno;
    }
    /// Whether `pfn` was flushed in some call.
    pub fn flushed(&self, pfn: Pfn) -> bool {
        self.calls.lock().iter().flatten().any(|f| f.pfn == pfn)
    }
}

impl TlbFlush for RecordingFlush {
    fn flush_frames(&self, frames: &[FlushFrame]) -> Result<(), TlbFlushError> {
        self.calls.lock().push(frames.to_vec());
        match *self.fail.lock() {
            Some(errno) => Err(TlbFlushError {
                method: "recording",
                first: frames.first().map_or(0, |f| f.pfn),
                count: frames.len() as u64,
                errno,
            }),
            None => Ok(()),
        }
    }
}
