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
//! `tests/shadow_stale.rs`), and a VMM thread writing it (setting A/D bits
//! in a guest table, copying a frame) takes SIGSEGV; with `PROT_EXEC` the
//! frame stays writable throughout (40 of 40 runs clean, and the guest
//! still never reaches a zapped frame). There is no read-only fallback: if
//! the toggle fails, the memslot bounce covers it, and if that fails the
//! flush fails and the VM stops.
//!
//! The window: between the two `mprotect` calls (tens of microseconds per
//! flush) the flushed frames are executable *in the VMM process*. Guest
//! bytes become code the VMM could run only if a VMM thread were
//! redirected there (a control-flow hijack), which no code path does; the
//! window is closed before `flush_frames` returns. A method without it
//! would change the VMA's protection key (`pkey_mprotect`, keeping
//! read-write) instead of its execute bit, but our hosts have no PKU; the
//! memslot bounce has no window but costs 0.5–1 ms and kicks every vCPU.
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
use crate::mmu::{FlushFrame, FlushReason, TlbFlush, TlbFlushError};
use crate::trace::ShootdownMethod;
use crate::vmm::kvm::memslot::MemslotBounce;

/// At most this many `mprotect` pairs per flush: beyond it, the closest
/// runs are merged over the frames between them (toggling a frame that did
/// not need it costs ~0.3 µs and changes nothing but the host's cached
/// translations of it; a call costs ~30–50 µs).
pub const MAX_TOGGLE_CALLS: usize = 16;

/// Flushes bounce the memslot only when asked ([`HostTlbFlush::set_bounce_runs`])
/// or as the fallback of a refused toggle. Measured under load, a memslot
/// delete + re-add took 20–130 ms and at times ~1 s (the host waits for an
/// SRCU grace period and drops every translation of the slot), against
/// ~0.5–1 ms idle: as the routine bulk flush of every aging pass it starved
/// the guest (a 10 s stress run took 69 s).
pub const DEFAULT_BOUNCE_RUNS: usize = usize::MAX;

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

/// Merges protect-toggle runs over the smallest gaps until at most
/// `max_calls` remain (discard runs are never widened: that would drop
/// live data). Runs stay sorted by first frame.
pub fn merge_toggles(runs: Vec<FrameRun>, max_calls: usize) -> Vec<FrameRun> {
    let (mut toggles, discards): (Vec<FrameRun>, Vec<FrameRun>) =
        runs.into_iter().partition(|r| !r.discard);
    if toggles.len() > max_calls.max(1) {
        let mut gaps: Vec<(u64, usize)> = toggles
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].first - (w[0].first + w[0].count), i))
            .collect();
        gaps.sort_unstable();
        let mut close = vec![false; toggles.len()];
        for &(_, i) in gaps.iter().take(toggles.len() - max_calls.max(1)) {
            close[i] = true;
        }
        let mut merged: Vec<FrameRun> = Vec::with_capacity(max_calls);
        for (i, r) in toggles.iter().enumerate() {
            match merged.last_mut() {
                Some(m) if close[i - 1] => m.count = r.first + r.count - m.first,
                _ => merged.push(*r),
            }
        }
        toggles = merged;
    }
    toggles.extend(discards);
    toggles.sort_unstable_by_key(|r| r.first);
    toggles
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
    /// Told of a flush that failed, before `flush_frames` returns it: the
    /// VMM stops the VM and keeps every vCPU out of the guest (fail-stop).
    on_failure: std::sync::OnceLock<FlushFailureHandler>,
    #[cfg(feature = "test-hooks")]
    fault: parking_lot::Mutex<Option<FlushFault>>,
}

/// See [`HostTlbFlush::on_failure`].
pub type FlushFailureHandler = Box<dyn Fn(&TlbFlushError) + Send + Sync>;

/// A fault the tests inject into the host flush (only with the
/// `test-hooks` feature): what a host refusing `mprotect`, or a VMM that
/// forgot a shootdown, would do.
#[cfg(feature = "test-hooks")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushFault {
    /// Every flush after the first `n` fails with `EIO`, as if the host
    /// refused the toggle and the memslot bounce.
    FailAfter(u64),
    /// Flushes of zapped or freed frames invalidate nothing: the missing
    /// shootdown the stress run's negative control must catch.
    SkipZapped,
}

/// A `--test-flush-fault` value that is neither `fail-after=N` nor
/// `skip-zapped`.
#[cfg(feature = "test-hooks")]
#[derive(Debug, thiserror::Error)]
pub enum FlushFaultParseError {
    /// `fail-after=` with something other than a count.
    #[error("fail-after={0}: not a count")]
    Count(String, #[source] std::num::ParseIntError),
    /// Another name.
    #[error("unknown flush fault '{0}' (fail-after=N or skip-zapped)")]
    Unknown(String),
}

#[cfg(feature = "test-hooks")]
impl std::str::FromStr for FlushFault {
    type Err = FlushFaultParseError;
    fn from_str(s: &str) -> Result<Self, FlushFaultParseError> {
        match s.split_once('=') {
            Some(("fail-after", n)) => n
                .parse()
                .map(FlushFault::FailAfter)
                .map_err(|e| FlushFaultParseError::Count(n.to_string(), e)),
            None if s == "skip-zapped" => Ok(FlushFault::SkipZapped),
            _ => Err(FlushFaultParseError::Unknown(s.to_string())),
        }
    }
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
            on_failure: std::sync::OnceLock::new(),
            #[cfg(feature = "test-hooks")]
            fault: parking_lot::Mutex::new(None),
        }
    }

    /// Flushes of more than [`HostTlbFlush::set_bounce_runs`] runs (none by
    /// default) bounce the memslot through `bounce` instead, and a refused
    /// toggle falls back to it.
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

    /// Sets who is told of a failed flush before the error is returned
    /// (once; later calls change nothing). The handler must leave no vCPU
    /// able to run on a translation the flush was to remove.
    pub fn on_failure(&self, handler: FlushFailureHandler) {
        if self.on_failure.set(handler).is_err() {
            tracing::warn!("the host flush's failure handler was already set");
        }
    }

    /// Injects `fault` into every later flush (tests only).
    #[cfg(feature = "test-hooks")]
    pub fn set_fault(&self, fault: Option<FlushFault>) {
        *self.fault.lock() = fault;
    }

    /// The counters.
    pub fn stats(&self) -> &HostFlushStats {
        &self.stats
    }

    /// Invalidates one run.
    fn invalidate(&self, run: FrameRun) -> Result<(), TlbFlushError> {
        if run.first >= self.nr_frames {
            return Ok(());
        }
        let count = run.count.min(self.nr_frames - run.first);
        let addr = (self.base + (run.first * PAGE_SIZE) as usize) as *mut libc::c_void;
        let len = (count * PAGE_SIZE) as usize;
        let failed = |method: &'static str| TlbFlushError {
            method,
            first: run.first,
            count,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        };
        let result = if run.discard {
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
            if r == 0 {
                Ok(())
            } else {
                Err(failed("madvise"))
            }
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
            // No read-only fallback: a VMM thread writing the range (setting
            // A/D bits in a guest table) would take SIGSEGV meanwhile.
            let r1 = unsafe { libc::mprotect(addr, len, rwx) };
            let e1 = (r1 != 0).then(|| failed("mprotect"));
            // SAFETY: as above; restores read-write (also after a failure,
            // which changed nothing).
            let r2 = unsafe { libc::mprotect(addr, len, libc::PROT_READ | libc::PROT_WRITE) };
            let e2 = (r2 != 0).then(|| failed("mprotect"));
            self.stats
                .mprotect_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.mprotect_calls.fetch_add(1, Ordering::Relaxed);
            self.stats
                .mprotect_frames
                .fetch_add(count, Ordering::Relaxed);
            match e1.or(e2) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        if let Err(e) = &result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("{e}");
        }
        result
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

    fn flush_frames_timed(&self, frames: &[FlushFrame]) -> Result<(), TlbFlushError> {
        // A changed shadow table: KVM must drop every shadow page it built
        // from ours, which only the memslot bounce does (its MMU notifier
        // zaps leaves only). Without a bouncer no KVM caches our tables.
        if let Some(t) = frames
            .iter()
            .find(|f| f.reason == FlushReason::TableChanged)
            && self.bounce.is_some()
        {
            if self.try_bounce(frames.len()) {
                crate::trace::emit!(Shootdown {
                    frames: frames.len(),
                    runs: 0,
                    method: ShootdownMethod::MemslotBounce,
                });
                return Ok(());
            }
            return Err(TlbFlushError {
                method: "memslot_bounce",
                first: t.pfn,
                count: frames.len() as u64,
                errno: libc::EIO,
            });
        }
        let frames: Vec<FlushFrame> = frames
            .iter()
            .copied()
            .filter(|f| f.reason != FlushReason::TableChanged)
            .collect();
        let frames = &frames[..];
        if frames.is_empty() {
            return Ok(());
        }
        let runs = merge_toggles(coalesce(frames, self.discard_freed), MAX_TOGGLE_CALLS);
        if runs.len() > self.bounce_runs.load(Ordering::Relaxed)
            && runs.iter().all(|r| !r.discard)
            && self.try_bounce(frames.len())
        {
            crate::trace::emit!(Shootdown {
                frames: frames.len(),
                runs: runs.len(),
                method: ShootdownMethod::MemslotBounce,
            });
            return Ok(());
        }
        let method = if runs.iter().any(|r| r.discard) {
            ShootdownMethod::Discard
        } else {
            ShootdownMethod::ProtectToggle
        };
        let _slice = crate::trace::slice!(Shootdown {
            frames: frames.len(),
            runs: runs.len(),
            method,
        });
        let mut first_error = None;
        for run in runs {
            if let Err(e) = self.invalidate(run) {
                first_error.get_or_insert(e);
            }
        }
        // Rule 3 must hold whatever the host refused: bounce the memslot;
        // if that fails too, the flush fails and the VM must stop.
        match first_error {
            Some(e) if !self.try_bounce(frames.len()) => Err(e),
            _ => Ok(()),
        }
    }
}

impl TlbFlush for HostTlbFlush {
    fn flush_frames(&self, frames: &[FlushFrame]) -> Result<(), TlbFlushError> {
        if frames.is_empty() {
            return Ok(());
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if !self.enabled {
            let _slice = crate::trace::slice!(Shootdown {
                frames: frames.len(),
                runs: 0,
                method: ShootdownMethod::Disabled,
            });
            return Ok(());
        }
        #[cfg(feature = "test-hooks")]
        let kept: Vec<FlushFrame>;
        #[cfg(feature = "test-hooks")]
        let frames = match *self.fault.lock() {
            Some(FlushFault::FailAfter(n)) if self.stats.flushes.load(Ordering::Relaxed) > n => {
                let e = TlbFlushError {
                    method: "injected",
                    first: frames[0].pfn,
                    count: frames.len() as u64,
                    errno: libc::EIO,
                };
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(h) = self.on_failure.get() {
                    h(&e);
                }
                return Err(e);
            }
            Some(FlushFault::SkipZapped) => {
                kept = frames
                    .iter()
                    .copied()
                    .filter(|f| !matches!(f.reason, FlushReason::Zapped | FlushReason::Freed))
                    .collect();
                if kept.is_empty() {
                    return Ok(());
                }
                &kept[..]
            }
            _ => frames,
        };
        let t = Instant::now();
        let result = self.flush_frames_timed(frames);
        self.stats
            .flush_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let (Err(e), Some(h)) = (&result, self.on_failure.get()) {
            h(e);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pfn: Pfn, reason: FlushReason) -> FlushFrame {
        FlushFrame { pfn, reason }
    }

    fn run(first: u64, count: u64, discard: bool) -> FrameRun {
        FrameRun {
            first,
            count,
            discard,
        }
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
            vec![run(5, 3, false), run(9, 2, true), run(12, 1, false)]
        );
        assert!(coalesce(&[], true).is_empty());
        // Without discarding, one run of protect-toggles per contiguous range.
        assert_eq!(
            coalesce(&all, false),
            vec![run(5, 3, false), run(9, 2, false), run(12, 1, false)]
        );
    }

    #[test]
    fn many_runs_merge_over_the_smallest_gaps_and_discards_stay() {
        let runs = vec![
            run(0, 1, false),
            run(2, 1, false),   // gap 1
            run(10, 2, false),  // gap 7
            run(13, 1, true),   // a discard run between: never widened
            run(20, 1, false),  // gap 8 from 12
            run(100, 1, false), // gap 79
        ];
        assert_eq!(merge_toggles(runs.clone(), 10), runs);
        assert_eq!(
            merge_toggles(runs.clone(), 3),
            vec![
                run(0, 12, false),
                run(13, 1, true),
                run(20, 1, false),
                run(100, 1, false)
            ]
        );
        assert_eq!(
            merge_toggles(runs, 1),
            vec![run(0, 101, false), run(13, 1, true)]
        );
        // Many scattered frames: at most MAX_TOGGLE_CALLS calls.
        let scattered: Vec<FlushFrame> = (0..1000)
            .map(|i| f(i * 3, FlushReason::AccessedCleared))
            .collect();
        let merged = merge_toggles(coalesce(&scattered, false), MAX_TOGGLE_CALLS);
        assert_eq!(merged.len(), MAX_TOGGLE_CALLS);
        for fr in &scattered {
            assert!(
                merged
                    .iter()
                    .any(|r| (r.first..r.first + r.count).contains(&fr.pfn))
            );
        }
    }

    #[test]
    fn protect_toggle_keeps_contents_and_discard_zeroes() {
        let mem = crate::mm::AnonMemory::new(8).unwrap();
        use crate::mm::{FrameAccess, MachineMemory};
        mem.fill_frame(2, 0xaa).unwrap();
        mem.fill_frame(3, 0xbb).unwrap();
        let flush = HostTlbFlush::new(mem.host_base(), mem.nr_frames()).with_discard_freed();
        flush
            .flush_frames(&[f(2, FlushReason::Zapped), f(3, FlushReason::Freed)])
            .unwrap();
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
