//! Which host ranges are being invalidated, and which were since a fault
//! read the sequence: KVM's `mmu_invalidate_seq`,
//! `mmu_invalidate_in_progress` and `mmu_invalidate_range_start/end`
//! (`kvm_mmu_invalidate_begin`, `kvm_mmu_invalidate_range_add`,
//! `kvm_mmu_invalidate_end`, `mmu_invalidate_retry_gfn`).
//!
//! KVM keeps one merged range for the invalidations in progress but still
//! retries a fault whenever the sequence moved, whatever range the finished
//! invalidation covered; under a storm of invalidations elsewhere a fault can
//! then retry without end. Here both are kept per range: the ranges in
//! progress, and a log of the ranges that ended with the sequence each end
//! produced, so a fault retries only if an invalidation overlapping a page
//! it relied on was in progress at the check or ended after its sequence
//! read. What a fault relies on is a set of host ranges: the 4 KiB page of
//! each guest table the walk read and of the leaf, the whole 2 MiB of a
//! large spte, or (for a prefetched spte) that spte's own page.
//! Each fault in flight holds a [`SeqRead`] naming the sequence it
//! read, and the log keeps every range a fault in flight may still need (so
//! a fault descheduled for a long time still gets an exact answer); only
//! past [`ENDED_LOG_MAX`] ranges does it forget, and a fault older than
//! what it remembers retries.
//!
//! Ordering: `begin` runs before the invalidation takes the MMU lock to zap,
//! and the fault checks under the MMU lock after translating, so either the
//! fault's spte is installed before the zap (and zapped by it) or the check
//! sees the range. `end` logs the range and publishes the new sequence under
//! the tracker's lock; a fault that read sequence `s` finds every range
//! ended after `s` in the log.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::mm::{Hva, PAGE_SIZE};

/// At most this many ended ranges are remembered, whatever faults are in
/// flight (a bound on memory, reached only by a fault stuck for millions of
/// invalidations).
pub(crate) const ENDED_LOG_MAX: usize = 1 << 20;

#[derive(Default)]
struct Tracker {
    /// `[start, end)` of each invalidation between begin and end (a
    /// multiset: equal ranges may overlap in time).
    active: Vec<(Hva, Hva)>,
    /// `(sequence after it ended, start, end)`, oldest first.
    ended: VecDeque<(u64, Hva, Hva)>,
    /// Sequences read by faults in flight, with their counts.
    readers: BTreeMap<u64, u32>,
    /// Faults sleeping until an invalidation of their pages ends.
    waiters: u32,
}

impl Tracker {
    /// Drops the ranges no fault in flight can need: those that ended at or
    /// before the oldest sequence read.
    fn prune(&mut self, now: u64) {
        let oldest = self.readers.keys().next().copied().unwrap_or(now);
        while self.ended.front().is_some_and(|e| e.0 <= oldest) {
            self.ended.pop_front();
        }
        while self.ended.len() > ENDED_LOG_MAX {
            self.ended.pop_front();
        }
    }
}

/// The invalidation tracker of one shadow MMU.
#[derive(Default)]
pub(crate) struct Invalidations {
    /// `mmu_invalidate_seq`: bumped at the end of every invalidation.
    seq: AtomicU64,
    tracker: Mutex<Tracker>,
    /// Where faults wait for an overlapping invalidation to end.
    ended_cv: Condvar,
}

/// A host range `[start, end)` a fault relies on.
pub(crate) type HostRange = (Hva, Hva);

/// The host page at `hva` as a range.
pub(crate) fn page_range(hva: Hva) -> HostRange {
    let p = hva & !(PAGE_SIZE - 1);
    (p, p.saturating_add(PAGE_SIZE))
}

/// Whether `[s, e)` overlaps one of the `ranges`.
fn overlaps(ranges: &[HostRange], s: Hva, e: Hva) -> bool {
    ranges.iter().any(|&(a, b)| a < e && b > s)
}

impl Invalidations {
    /// `mmu_invalidate_seq` now.
    pub fn read_seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// A fault reads the sequence before translating (`mmu_seq =
    /// kvm->mmu_invalidate_seq; smp_rmb()`); the log keeps what it may need
    /// until the returned guard is dropped.
    pub fn begin_read(&self) -> SeqRead<'_> {
        let mut t = self.tracker.lock();
        let seq = self.seq.load(Ordering::Acquire);
        *t.readers.entry(seq).or_default() += 1;
        SeqRead { inv: self, seq }
    }

    /// `kvm_mmu_invalidate_begin` + `kvm_mmu_invalidate_range_add`.
    pub fn begin(&self, start: Hva, end: Hva) {
        self.tracker.lock().active.push((start, end));
    }

    /// `kvm_mmu_invalidate_end`: the range leaves the set in progress and
    /// enters the log with the new sequence.
    pub fn end(&self, start: Hva, end: Hva) {
        let mut t = self.tracker.lock();
        if let Some(i) = t.active.iter().position(|&r| r == (start, end)) {
            t.active.swap_remove(i);
        }
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        t.ended.push_back((seq, start, end));
        t.prune(seq);
        self.seq.store(seq, Ordering::Release);
        if t.waiters > 0 {
            self.ended_cv.notify_all();
        }
    }

    /// Sleeps until no invalidation in progress overlaps `pages`. A fault
    /// that raced one waits here instead of retrying while it runs (the
    /// retry would only meet it again; KVM lets the guest spin on
    /// `RET_PF_RETRY` instead). The caller holds no lock an invalidation
    /// needs.
    /// `before_sleeping` runs (once, under the tracker's lock) if it is
    /// about to sleep.
    pub fn wait_for(&self, pages: &[HostRange], before_sleeping: impl FnOnce()) {
        let mut t = self.tracker.lock();
        let mut before = Some(before_sleeping);
        while t.active.iter().any(|&(s, e)| overlaps(pages, s, e)) {
            if let Some(f) = before.take() {
                f();
            }
            t.waiters += 1;
            self.ended_cv.wait(&mut t);
            t.waiters -= 1;
        }
    }

    /// Invalidations between begin and end.
    pub fn in_progress(&self) -> usize {
        self.tracker.lock().active.len()
    }

    /// `mmu_invalidate_retry_gfn` for a fault that read sequence `seq` and
    /// relied on the host ranges `pages` (the leaf and every guest table the
    /// walk read): whether an invalidation of one of them is in progress or
    /// ended since.
    fn retry(&self, seq: u64, pages: &[HostRange]) -> bool {
        let t = self.tracker.lock();
        if t.active.iter().any(|&(s, e)| overlaps(pages, s, e)) {
            return true;
        }
        let now = self.seq.load(Ordering::Acquire);
        if now == seq {
            return false;
        }
        match t.ended.front() {
            // The log lost ranges that ended after `seq`: assume the worst.
            Some(&(oldest, _, _)) if oldest <= seq + 1 => {}
            _ => return true,
        }
        t.ended
            .iter()
            .rev()
            .take_while(|&&(s, _, _)| s > seq)
            .any(|&(_, s, e)| overlaps(pages, s, e))
    }
}

/// A sequence read by a fault in flight (see [`Invalidations::begin_read`]).
pub(crate) struct SeqRead<'a> {
    inv: &'a Invalidations,
    seq: u64,
}

impl SeqRead<'_> {
    /// Whether the fault must retry: see [`Invalidations::retry`].
    pub fn retry(&self, pages: &[HostRange]) -> bool {
        self.inv.retry(self.seq, pages)
    }
}

impl Drop for SeqRead<'_> {
    fn drop(&mut self) {
        let mut t = self.inv.tracker.lock();
        if let Some(n) = t.readers.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                t.readers.remove(&self.seq);
            }
        }
        let now = self.inv.seq.load(Ordering::Relaxed);
        t.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Hva = PAGE_SIZE;

    #[test]
    fn retries_only_for_overlapping_ranges() {
        let inv = Invalidations::default();
        let read = inv.begin_read();
        inv.begin(10 * P, 20 * P);
        assert!(
            read.retry(&[page_range(15 * P)]),
            "in progress over the page"
        );
        assert!(
            !read.retry(&[page_range(5 * P), page_range(20 * P)]),
            "in progress elsewhere"
        );
        inv.end(10 * P, 20 * P);
        assert_eq!(inv.in_progress(), 0);
        assert!(
            read.retry(&[page_range(19 * P)]),
            "ended after the sequence read"
        );
        assert!(!read.retry(&[page_range(9 * P)]), "ended elsewhere");
        assert!(
            !inv.begin_read().retry(&[page_range(19 * P)]),
            "ended before the read"
        );
    }

    #[test]
    fn equal_ranges_in_progress_are_counted_each() {
        let inv = Invalidations::default();
        inv.begin(0, P);
        inv.begin(0, P);
        inv.end(0, P);
        assert!(inv.begin_read().retry(&[page_range(0)]));
        inv.end(0, P);
        assert!(!inv.begin_read().retry(&[page_range(0)]));
    }

    #[test]
    fn the_log_keeps_what_faults_in_flight_need_and_no_more() {
        let inv = Invalidations::default();
        let old = inv.begin_read();
        inv.begin(7 * P, 8 * P);
        inv.end(7 * P, 8 * P);
        for _ in 0..5000 {
            inv.begin(100 * P, 101 * P);
            inv.end(100 * P, 101 * P);
        }
        // The old fault still sees the range that ended first, exactly.
        assert!(old.retry(&[page_range(7 * P)]));
        assert!(!old.retry(&[page_range(0)]));
        assert_eq!(inv.tracker.lock().ended.len(), 5001);
        drop(old);
        assert!(inv.tracker.lock().ended.is_empty(), "nobody needs the log");
        let recent = inv.begin_read();
        inv.begin(100 * P, 101 * P);
        inv.end(100 * P, 101 * P);
        assert!(!recent.retry(&[page_range(0)]));
        assert!(recent.retry(&[page_range(100 * P)]));
    }

    #[test]
    fn a_range_is_hit_by_any_invalidation_inside_it() {
        let inv = Invalidations::default();
        let read = inv.begin_read();
        let huge = [(512 * P, 1024 * P)];
        inv.begin(700 * P, 701 * P);
        assert!(read.retry(&huge), "in progress inside the 2 MiB");
        inv.end(700 * P, 701 * P);
        assert!(read.retry(&huge), "ended inside the 2 MiB");
        assert!(!read.retry(&[page_range(699 * P)]));
        let other = inv.begin_read();
        inv.begin(1024 * P, 1025 * P);
        inv.end(1024 * P, 1025 * P);
        assert!(!other.retry(&huge), "just past its end");
    }

    #[test]
    fn a_fault_older_than_the_bounded_log_retries() {
        let inv = Invalidations::default();
        let old = inv.begin_read();
        for _ in 0..=ENDED_LOG_MAX {
            inv.begin(100 * P, 101 * P);
            inv.end(100 * P, 101 * P);
        }
        assert!(old.retry(&[page_range(0)]), "lost track: retry");
    }
}
