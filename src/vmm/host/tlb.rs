//! The shadow MMU's TLB flush, done through the host kernel's own MMU
//! notifier (docs/design.md, "TLB shootdown").
//!
//! The shadow tables live in machine memory, which KVM sees as guest RAM;
//! KVM (on our `kvm_pvm` machines) keeps its own shadow of them and never
//! sees the VMM's writes to them. What makes KVM drop its cached
//! translation of a frame is an invalidation of that frame's host address:
//! KVM's `kvm_mmu_notifier_invalidate_range_start` zaps every spte of its
//! own that maps the frame and flushes every vCPU's TLB before the syscall
//! returns. So for each frame the shadow MMU names, we change the
//! protection of its range and change it back, which keeps the contents;
//! contiguous frames go in one call.
//!
//! The toggle adds `PROT_EXEC` (read-write-execute, then read-write), not
//! the read-only toggle docs/design.md measured: both run the host notifier, but
//! while the range is read-only a vCPU writing the frame makes the host
//! KVM fail `KVM_RUN` with `EFAULT` (seen in 1 of ~20 runs of
//! `tests/shadow_stale.rs`); with `PROT_EXEC` the frame stays writable
//! throughout (40 of 40 runs clean, and the guest still never reaches a
//! zapped frame).
//!
//! `madvise(MADV_DONTNEED)` would do for a frame that is really being
//! freed ([`FlushReason::Freed`], which the MMU now reports only from
//! `release`), but discarding a frame that survives (KSM-shared, pinned by
//! `get_user_page`, in the swap cache) would zero data other mappings still
//! use, and it buys nothing: the mm poisons a freed frame right after,
//! which touches every byte again. So discarding is off unless
//! [`HostTlbFlush::with_discard_freed`] asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::mm::{PAGE_SIZE, Pfn};
use crate::mmu::{FlushFrame, FlushReason, TlbFlush};
use crate::trace::ShootdownMethod;
use crate::vmm::kvm::memslot::MemslotBounce;

/// Above this many runs of contiguous frames in one flush, bouncing the
/// memslot (~0.5–1 ms, docs/design.md) is cheaper than one mprotect pair per
/// run (~30–50 µs each).
pub const DEFAULT_BOUNCE_RUNS: usize = 32;

/// Counters of host-side invalidations, for `--stats`.
#[derive(Debug, Default)]
pub struct HostFlushStats {
    /// `flush_frames` calls with at least one frame.
    pub flushes: AtomicU64,
    /// Frames named in them.
    pub frames: AtomicU64,
    /// Nanoseconds in `flush_frames` (all kinds, with coalescing).
    pub flush_ns: AtomicU64,
    /// `mprotect` pairs (read-write-execute, then read-write).
    pub mprotect_calls: AtomicU64,
    /// Frames invalidated by an `mprotect` pair.
    pub mprotect_frames: AtomicU64,
    /// Nanoseconds in those pairs.
    pub mprotect_ns: AtomicU64,
    /// `madvise(MADV_DONTNEED)` calls.
    pub dontneed_calls: AtomicU64,
    /// Frames discarded by them.
    pub dontneed_frames: AtomicU64,
    /// Memslot bounces (bulk flushes).
    pub memslot_bounces: AtomicU64,
    /// Frames covered by them.
    pub memslot_bounce_frames: AtomicU64,
    /// Nanoseconds in them (kicking the vCPUs out included).
    pub memslot_bounce_ns: AtomicU64,
    /// Syscalls that failed (the flush then falls back to nothing: see
    /// `HostTlbFlush::flush_frames`).
    pub errors: AtomicU64,
}

/// A copy of [`HostFlushStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostFlushSnapshot {
    /// `flush_frames` calls.
    pub flushes: u64,
    /// Frames named.
    pub frames: u64,
    /// Nanoseconds in `flush_frames`.
    pub flush_ns: u64,
    /// `mprotect` pairs.
    pub mprotect_calls: u64,
    /// Frames they covered.
    pub mprotect_frames: u64,
    /// Nanoseconds in them.
    pub mprotect_ns: u64,
    /// `madvise(MADV_DONTNEED)` calls.
    pub dontneed_calls: u64,
    /// Frames they covered.
    pub dontneed_frames: u64,
    /// Memslot bounces.
    pub memslot_bounces: u64,
    /// Frames they covered.
    pub memslot_bounce_frames: u64,
    /// Nanoseconds in them.
    pub memslot_bounce_ns: u64,
    /// Failed syscalls.
    pub errors: u64,
}

impl HostFlushStats {
    /// A snapshot.
    pub fn snapshot(&self) -> HostFlushSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HostFlushSnapshot {
            flushes: l(&self.flushes),
            frames: l(&self.frames),
            flush_ns: l(&self.flush_ns),
            mprotect_calls: l(&self.mprotect_calls),
            mprotect_frames: l(&self.mprotect_frames),
            mprotect_ns: l(&self.mprotect_ns),
            dontneed_calls: l(&self.dontneed_calls),
            dontneed_frames: l(&self.dontneed_frames),
            memslot_bounces: l(&self.memslot_bounces),
            memslot_bounce_frames: l(&self.memslot_bounce_frames),
            memslot_bounce_ns: l(&self.memslot_bounce_ns),
            errors: l(&self.errors),
        }
    }
}

/// A run of contiguous frames invalidated the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRun {
    /// First frame.
    pub first: Pfn,
    /// Number of frames.
    pub count: u64,
    /// Discard (frames being freed) rather than protect-toggle.
    pub discard: bool,
}

/// Sorts `frames` and coalesces them into runs of contiguous frames of the
/// same kind; with `discard_freed`, `Freed` frames are discarded. A frame
/// named twice counts once; if any of its entries is not `Freed`, it is
/// protect-toggled (keeping its contents wins).
pub fn coalesce(frames: &[FlushFrame], discard_freed: bool) -> Vec<FrameRun> {
    let mut v: Vec<(Pfn, bool)> = frames
        .iter()
        .map(|f| (f.pfn, discard_freed && f.reason == FlushReason::Freed))
        .collect();
    // Sort by frame, non-discard first, so dedup keeps "protect".
    v.sort_unstable();
    v.dedup_by_key(|(pfn, _)| *pfn);
    let mut runs: Vec<FrameRun> = Vec::new();
    for (pfn, discard) in v {
        match runs.last_mut() {
            Some(r) if r.discard == discard && r.first + r.count == pfn => r.count += 1,
            _ => runs.push(FrameRun {
                first: pfn,
                count: 1,
                discard,
            }),
        }
    }
    runs
}

/// [`TlbFlush`] through the real host mm: invalidates the flushed frames'
/// addresses in the VMM's mapping of machine memory.
pub struct HostTlbFlush {
    base: usize,
    nr_frames: u64,
    enabled: bool,
    discard_freed: bool,
    bounce: Option<Arc<MemslotBounce>>,
    bounce_runs: AtomicUsize,
    stats: HostFlushStats,
}

impl HostTlbFlush {
    /// A flush for machine memory mapped at `base` (page aligned) with
    /// `nr_frames` frames. The mapping must outlive this object and be a
    /// private anonymous read-write mapping.
    pub fn new(base: *mut u8, nr_frames: u64) -> Self {
        HostTlbFlush {
            base: base as usize,
            nr_frames,
            enabled: true,
            discard_freed: false,
            bounce: None,
            bounce_runs: AtomicUsize::new(DEFAULT_BOUNCE_RUNS),
            stats: HostFlushStats::default(),
        }
    }

    /// Flushes of more than [`DEFAULT_BOUNCE_RUNS`] runs bounce the memslot
    /// through `bounce` instead.
    pub fn with_memslot_bounce(self, bounce: Arc<MemslotBounce>) -> Self {
        HostTlbFlush {
            bounce: Some(bounce),
            ..self
        }
    }

    /// Changes the bounce threshold (runs of contiguous frames); 0 bounces
    /// every flush, `usize::MAX` never does.
    pub fn set_bounce_runs(&self, runs: usize) {
        self.bounce_runs.store(runs, Ordering::Relaxed);
    }

    /// Frames flushed as [`FlushReason::Freed`] are discarded with
    /// `MADV_DONTNEED` instead of protect-toggled. Only correct when every
    /// such frame is really freed (no KSM, no pins, no swap cache).
    pub fn with_discard_freed(self) -> Self {
        HostTlbFlush {
            discard_freed: true,
            ..self
        }
    }

    /// A flush that only counts and invalidates nothing: for tests that
    /// show what goes wrong without it (`VmConfig::host_tlb_flush`).
    pub fn disabled(base: *mut u8, nr_frames: u64) -> Self {
        HostTlbFlush {
            enabled: false,
            ..Self::new(base, nr_frames)
        }
    }

    /// The counters.
    pub fn stats(&self) -> &HostFlushStats {
        &self.stats
    }

    /// Invalidates one run; `false` if the host refused.
    fn invalidate(&self, run: FrameRun) -> bool {
        if run.first >= self.nr_frames {
            return true;
        }
        let count = run.count.min(self.nr_frames - run.first);
        let addr = (self.base + (run.first * PAGE_SIZE) as usize) as *mut libc::c_void;
        let len = (count * PAGE_SIZE) as usize;
        let ok = if run.discard {
            // SAFETY: `addr..addr+len` lies inside the VMM's private
            // anonymous mapping of machine memory (checked against
            // `nr_frames` above). The frames are being freed: nobody needs
            // their contents, and no Rust reference into machine memory
            // exists (all access is through raw copies and atomics).
            let r = unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
            self.stats.dontneed_calls.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dontneed_frames
                .fetch_add(count, Ordering::Relaxed);
            r == 0
        } else {
            let t = Instant::now();
            let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
            // SAFETY: same range as above, always left readable and
            // writable: adding PROT_EXEC changes the VMA's flags, so the
            // kernel's change_protection() runs over the populated range and
            // calls the MMU notifier (MMU_NOTIFY_PROTECTION_VMA): the host
            // KVM zaps its sptes for these frames and flushes every vCPU's
            // TLB before the call returns. The second call restores the
            // original protection (and the VMAs merge back). Contents kept.
            let r1 = unsafe { libc::mprotect(addr, len, rwx) };
            let r1 = if r1 == 0 {
                0
            } else {
                // PROT_EXEC refused (a W^X policy): the measured read-only
                // toggle, which a vCPU writing the frame meanwhile may see
                // as EFAULT from KVM_RUN.
                // SAFETY: as above; read-only only until the call below.
                unsafe { libc::mprotect(addr, len, libc::PROT_READ) }
            };
            // SAFETY: as above; restores read-write.
            let r2 = unsafe { libc::mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE) };
            self.stats
                .mprotect_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.mprotect_calls.fetch_add(1, Ordering::Relaxed);
            self.stats
                .mprotect_frames
                .fetch_add(count, Ordering::Relaxed);
            r1 == 0 && r2 == 0
        };
        if !ok {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "host invalidation of frames {:#x}+{count} failed: {}",
                run.first,
                std::io::Error::last_os_error()
            );
        }
        ok
    }
}

impl HostTlbFlush {
    /// Bounces the memslot, counting it; `false` if there is no bouncer or
    /// it failed.
    fn try_bounce(&self, nr_frames: usize) -> bool {
        let Some(b) = self.bounce.as_ref() else {
            return false;
        };
        let t = Instant::now();
        if !b.bounce() {
            return false;
        }
        let s = &self.stats;
        s.memslot_bounce_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        s.memslot_bounces.fetch_add(1, Ordering::Relaxed);
        s.memslot_bounce_frames
            .fetch_add(nr_frames as u64, Ordering::Relaxed);
        true
    }

    fn flush_frames_timed(&self, frames: &[FlushFrame]) {
        let runs = coalesce(frames, self.discard_freed);
        if runs.len() > self.bounce_runs.load(Ordering::Relaxed)
            && runs.iter().all(|r| !r.discard)
            && self.try_bounce(frames.len())
        {
            crate::trace::emit!(Shootdown {
                frames: frames.len(),
                runs: runs.len(),
                method: ShootdownMethod::MemslotBounce,
            });
            return;
        }
        let method = if runs.iter().any(|r| r.discard) {
            ShootdownMethod::Discard
        } else {
            ShootdownMethod::ProtectToggle
        };
        crate::trace::emit!(Shootdown {
            frames: frames.len(),
            runs: runs.len(),
            method,
        });
        let mut failed = false;
        for run in runs {
            failed |= !self.invalidate(run);
        }
        // Rule 3 must hold whatever the host refused: bounce the memslot.
        if failed {
            self.try_bounce(frames.len());
        }
    }
}

impl TlbFlush for HostTlbFlush {
    fn flush_frames(&self, frames: &[FlushFrame]) {
        if frames.is_empty() {
            return;
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if !self.enabled {
            crate::trace::emit!(Shootdown {
                frames: frames.len(),
                runs: 0,
                method: ShootdownMethod::Disabled,
            });
            return;
        }
        let t = Instant::now();
        self.flush_frames_timed(frames);
        self.stats
            .flush_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pfn: Pfn, reason: FlushReason) -> FlushFrame {
        FlushFrame { pfn, reason }
    }

    #[test]
    fn coalesces_contiguous_runs_by_kind() {
        use FlushReason::*;
        let all = [
            f(7, Zapped),
            f(5, Zapped),
            f(6, WriteProtected),
            f(9, Freed),
            f(10, Freed),
            f(12, Freed),
            f(12, Zapped),
            f(5, Zapped),
        ];
        let runs = coalesce(&all, true);
        assert_eq!(
            runs,
            vec![
                FrameRun {
                    first: 5,
                    count: 3,
                    discard: false
                },
                FrameRun {
                    first: 9,
                    count: 2,
                    discard: true
                },
                FrameRun {
                    first: 12,
                    count: 1,
                    discard: false
                },
            ]
        );
        assert!(coalesce(&[], true).is_empty());
        // Without discarding, one run of protect-toggles per contiguous range.
        assert_eq!(
            coalesce(&all, false),
            vec![
                FrameRun {
                    first: 5,
                    count: 3,
                    discard: false
                },
                FrameRun {
                    first: 9,
                    count: 2,
                    discard: false
                },
                FrameRun {
                    first: 12,
                    count: 1,
                    discard: false
                },
            ]
        );
    }

    #[test]
    fn protect_toggle_keeps_contents_and_discard_zeroes() {
        let mem = crate::mm::AnonMemory::new(8).unwrap();
        use crate::mm::{FrameAccess, MachineMemory};
        mem.fill_frame(2, 0xaa).unwrap();
        mem.fill_frame(3, 0xbb).unwrap();
        let flush = HostTlbFlush::new(mem.host_base(), mem.nr_frames()).with_discard_freed();
        flush.flush_frames(&[f(2, FlushReason::Zapped), f(3, FlushReason::Freed)]);
        let mut b = [0u8; 1];
        mem.read_frame(2, 100, &mut b).unwrap();
        assert_eq!(b[0], 0xaa);
        mem.read_frame(3, 100, &mut b).unwrap();
        assert_eq!(b[0], 0);
        // Still writable after the toggle.
        mem.fill_frame(2, 1).unwrap();
        let s = flush.stats().snapshot();
        assert_eq!((s.mprotect_calls, s.dontneed_calls, s.errors), (1, 1, 0));
        assert_eq!(s.frames, 2);
    }
}
