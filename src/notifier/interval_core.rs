//! The sequence protocol of `mmu_interval_notifier` (Linux 5.5+,
//! `mm/mmu_notifier.c`): the per-mm `invalidate_seq`, the interval tree of
//! subscriptions, the deferred list, and the wait queue of
//! `mmu_interval_read_begin` and `mmu_interval_notifier_remove`.
//!
//! This file uses nothing but `std::sync::Arc`, the `iset` interval tree and
//! `crate::sync`: `tests/loom_interval.rs` compiles this very file against a
//! `sync` module backed by `loom`.
//!
//! # The protocol
//!
//! A collision-retry "lock" like a seqcount whose write side many
//! invalidations may hold at once. `invalidate_seq` is even while no
//! invalidation that hits an interval runs, odd while one does:
//!
//! * `mn_itree_inv_start_range` counts the range in `active_invalidate_ranges`
//!   and, if some interval overlaps it, makes `invalidate_seq` odd (`|= 1`);
//!   each overlapping subscription's `invalidate` callback then stores that
//!   odd value in the subscription (`mmu_interval_set_seq`) under the
//!   driver's own lock, before it drops its mappings.
//! * `mn_itree_inv_end` makes it even again (`++`) when the last active range
//!   ends, applies the deferred inserts and removes, and wakes the waiters.
//! * A driver's fault path reads the subscription's sequence
//!   (`mmu_interval_read_begin`, which first waits while an invalidation of
//!   this very interval runs), looks the page up without its lock, then takes
//!   its lock and installs only if `mmu_interval_read_retry` says the
//!   subscription's sequence has not moved. Both the store (in `invalidate`)
//!   and the check happen under the driver's lock, so one of them sees the
//!   other: no barrier is needed here.
//!
//! A subscription's own sequence is always odd, and never equal to the mm's
//! sequence unless an invalidation of it is running: inserted idle it starts
//! at `invalidate_seq - 1`.
//!
//! # Why inserts and removes are deferred
//!
//! While `invalidate_seq` is odd, invalidations walk the tree without holding
//! the lock across their callbacks (here: they take a snapshot of the
//! overlapping subscriptions), so the tree must not change. Rather than make
//! insert or remove wait (a livelock risk under a stream of invalidations),
//! they are queued on `deferred_list` and applied by the `mn_itree_inv_end`
//! that makes the sequence even (like `rtnl_unlock`). A subscription inserted
//! meanwhile takes the current odd sequence, so its first `read_begin` waits
//! for that end: an invalidation that began before the insert may cover its
//! range without having called it. A remove returns only after that end, so
//! no callback runs on the subscription once it returns.

use std::sync::Arc;

use iset::IntervalMap;

use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// The first value of the mm's sequence (`subscriptions->invalidate_seq = 2`
/// in `__mmu_notifier_register`).
const INITIAL_SEQ: u64 = 2;

/// One subscription as the protocol sees it: the fields of Linux's
/// `struct mmu_interval_notifier` that are not list or tree linkage.
#[derive(Debug)]
pub struct MmuInterval {
    start: u64,
    /// One past the last address (Linux keeps the inclusive `last`).
    end: u64,
    /// `interval_sub->invalidate_seq`: written by `set_seq` under the
    /// driver's lock, read by `read_retry` under that lock and by
    /// `read_begin` under the mm's lock (`READ_ONCE`).
    invalidate_seq: AtomicU64,
}

impl MmuInterval {
    /// First address of the interval.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last address of the interval.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The subscription's sequence as last set (`interval_sub->invalidate_seq`),
    /// for checkers and models; a fault path uses `read_begin` instead.
    pub fn seq(&self) -> u64 {
        self.invalidate_seq.load(Ordering::Relaxed)
    }

    /// `mmu_interval_set_seq`: called by the `invalidate` callback, under the
    /// lock the driver's fault path holds for `read_retry`, with the
    /// `cur_seq` the callback received, before it drops any mapping.
    pub fn set_seq(&self, cur_seq: u64) {
        // WRITE_ONCE: the driver's lock orders it against read_retry.
        self.invalidate_seq.store(cur_seq, Ordering::Relaxed);
    }

    /// `mmu_interval_read_retry`: whether the mappings looked up since the
    /// `read_begin` that returned `seq` may be stale. Call it under the lock
    /// `invalidate` takes around `set_seq`; install only on `false`.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.invalidate_seq.load(Ordering::Relaxed) != seq
    }

    /// `mmu_interval_check_retry`: the same test without the driver's lock,
    /// to give up early on a long lookup. `false` proves nothing; only
    /// `read_retry` under the lock does.
    pub fn check_retry(&self, seq: u64) -> bool {
        // READ_ONCE, pairs with the store in set_seq.
        self.invalidate_seq.load(Ordering::Relaxed) != seq
    }
}

/// A subscription in the tree, with what the caller attached to it (its
/// callbacks).
pub struct Entry<T> {
    pub sub: Arc<MmuInterval>,
    pub payload: T,
}

impl<T: Clone> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Self {
            sub: Arc::clone(&self.sub),
            payload: self.payload.clone(),
        }
    }
}

/// A tree update queued while an invalidation runs (`deferred_item`; Linux
/// tells the two apart by `RB_EMPTY_NODE`).
enum Deferred<T> {
    Insert(Entry<T>),
    Remove(Arc<MmuInterval>),
}

/// The fields of `struct mmu_notifier_subscriptions` that its `lock`
/// protects, interval half.
struct State<T> {
    invalidate_seq: u64,
    active_invalidate_ranges: u64,
    itree: IntervalMap<u64, Entry<T>>,
    deferred_list: Vec<Deferred<T>>,
    /// Threads sleeping on `wq` (diagnostics, and an event tests wait for).
    waiters: usize,
}

impl<T> State<T> {
    /// `mn_itree_is_invalidating`.
    fn is_invalidating(&self) -> bool {
        self.invalidate_seq & 1 == 1
    }
}

/// A consistent view of the protocol state, for checkers and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItreeSnapshot {
    pub invalidate_seq: u64,
    pub active_invalidate_ranges: u64,
    /// Subscriptions in the tree (deferred inserts not counted).
    pub nr_intervals: usize,
    pub nr_deferred: usize,
    pub nr_waiters: usize,
}

/// A non-blockable invalidation was refused by a callback (`-EAGAIN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WouldBlock;

/// The interval half of Linux's `struct mmu_notifier_subscriptions`: `lock`,
/// `invalidate_seq`, `active_invalidate_ranges`, `itree`, `wq`,
/// `deferred_list`.
pub struct ItreeCore<T> {
    state: Mutex<State<T>>,
    /// `subscriptions->wq`: woken when the sequence becomes even.
    wq: Condvar,
}

impl<T: Clone> Default for ItreeCore<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> ItreeCore<T> {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                invalidate_seq: INITIAL_SEQ,
                active_invalidate_ranges: 0,
                itree: IntervalMap::new(),
                deferred_list: Vec::new(),
                waiters: 0,
            }),
            wq: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A callback never runs under this lock, so poisoning means a bug in
        // this file; the state is still consistent between statements.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps on `wq` until the mm's sequence is no longer `seq`
    /// (`wait_event(subscriptions->wq, invalidate_seq != seq)`).
    fn wait_seq_change<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<T>>,
        seq: u64,
    ) -> MutexGuard<'a, State<T>> {
        st.waiters += 1;
        while st.invalidate_seq == seq {
            st = self.wq.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.waiters -= 1;
        st
    }

    /// The locked part of `__mmu_interval_notifier_insert` for
    /// `[start, end)` (`start < end`, checked by the caller).
    pub fn insert(&self, start: u64, end: u64, payload: T) -> Arc<MmuInterval> {
        debug_assert!(start < end);
        let sub = Arc::new(MmuInterval {
            start,
            end,
            invalidate_seq: AtomicU64::new(0),
        });
        let entry = Entry {
            sub: Arc::clone(&sub),
            payload,
        };
        let mut st = self.lock();
        if st.active_invalidate_ranges != 0 {
            // Some invalidation runs and we do not know its range: assume it
            // covers ours, so read_begin waits for its end.
            if st.is_invalidating() {
                st.deferred_list.push(Deferred::Insert(entry));
            } else {
                st.invalidate_seq |= 1;
                st.itree.force_insert(start..end, entry);
            }
            sub.set_seq(st.invalidate_seq);
        } else {
            debug_assert!(!st.is_invalidating());
            // Odd, not the current sequence, and the mm's sequence will not
            // wrap to it any time soon.
            sub.set_seq(st.invalidate_seq - 1);
            st.itree.force_insert(start..end, entry);
        }
        sub
    }

    /// `mmu_interval_notifier_remove`: once this returns, no callback runs
    /// on `sub` and none will. Must not be called from a callback, nor with
    /// a lock a callback takes held (it may wait for the invalidation).
    pub fn remove(&self, sub: &Arc<MmuInterval>) {
        let mut st = self.lock();
        if st.is_invalidating() {
            let pending_insert = st
                .deferred_list
                .iter()
                .position(|d| matches!(d, Deferred::Insert(e) if Arc::ptr_eq(&e.sub, sub)));
            if let Some(i) = pending_insert {
                // Removed before the deferred insert was applied: it never
                // was in the tree, so no callback can be running on it.
                st.deferred_list.swap_remove(i);
            } else {
                st.deferred_list.push(Deferred::Remove(Arc::clone(sub)));
                let seq = st.invalidate_seq;
                // The running invalidation may be inside our callback.
                drop(self.wait_seq_change(st, seq));
            }
        } else {
            let removed = st
                .itree
                .remove_where(sub.start..sub.end, |e| Arc::ptr_eq(&e.sub, sub));
            debug_assert!(removed.is_some(), "removing an interval not in the tree");
        }
    }

    /// `mmu_interval_read_begin`: the sequence to hand to `read_retry`.
    /// Waits while an invalidation of this interval is running (its
    /// callback has already set our sequence to the mm's odd one). Must not
    /// be called with the lock `invalidate` takes held.
    pub fn read_begin(&self, sub: &MmuInterval) -> u64 {
        let st = self.lock();
        // Pairs with the store in set_seq.
        let seq = sub.invalidate_seq.load(Ordering::Relaxed);
        if seq == st.invalidate_seq {
            drop(self.wait_seq_change(st, seq));
        }
        // read_retry may already be true: no loop here, so the caller keeps
        // a bound on its retries.
        seq
    }

    /// `mn_itree_inv_start_range` + `mn_itree_inv_next`: counts the range
    /// as active and returns the subscriptions overlapping `[start, end)`
    /// with the sequence their callbacks must record. The tree cannot change
    /// until the matching `inv_end`, so the snapshot is what Linux's walk
    /// would visit.
    pub fn inv_start_range(&self, start: u64, end: u64) -> (Vec<Entry<T>>, u64) {
        let mut st = self.lock();
        st.active_invalidate_ranges += 1;
        let hits: Vec<Entry<T>> = if start < end {
            st.itree.values(start..end).cloned().collect()
        } else {
            Vec::new()
        };
        if !hits.is_empty() {
            st.invalidate_seq |= 1;
        }
        (hits, st.invalidate_seq)
    }

    /// `mn_itree_invalidate`: calls `invalidate(sub, payload, cur_seq)` on
    /// every subscription overlapping `[start, end)`. A callback that
    /// refuses (`false`) a non-blockable range stops the walk with
    /// `WouldBlock`; in a blockable one a refusal is the callback's bug and
    /// the walk goes on (Linux: `WARN_ON`). Either way the range stays
    /// active until the caller's `inv_end`.
    pub fn invalidate(
        &self,
        start: u64,
        end: u64,
        blockable: bool,
        mut invalidate: impl FnMut(&MmuInterval, &T, u64) -> bool,
    ) -> Result<(), WouldBlock> {
        let (hits, cur_seq) = self.inv_start_range(start, end);
        for e in &hits {
            if !invalidate(&e.sub, &e.payload, cur_seq) && !blockable {
                return Err(WouldBlock);
            }
        }
        Ok(())
    }

    /// `mn_itree_inv_end`: ends one active range; the last one makes the
    /// sequence even, applies the deferred inserts and removes, and wakes
    /// `read_begin` and `remove`.
    pub fn inv_end(&self) {
        let mut st = self.lock();
        debug_assert!(
            st.active_invalidate_ranges != 0,
            "mn_itree_inv_end without a start"
        );
        st.active_invalidate_ranges = st.active_invalidate_ranges.saturating_sub(1);
        if st.active_invalidate_ranges != 0 || !st.is_invalidating() {
            return;
        }
        st.invalidate_seq += 1;
        for d in std::mem::take(&mut st.deferred_list) {
            match d {
                Deferred::Insert(e) => {
                    let (s, en) = (e.sub.start, e.sub.end);
                    st.itree.force_insert(s..en, e);
                }
                Deferred::Remove(sub) => {
                    let removed = st
                        .itree
                        .remove_where(sub.start..sub.end, |e| Arc::ptr_eq(&e.sub, &sub));
                    debug_assert!(removed.is_some(), "deferred remove of a missing interval");
                }
            }
        }
        // Waiters count themselves under the lock before they sleep, so
        // none can be missed; skipping the wake-up saves a futex call on
        // every invalidation nobody waits for.
        let wake = st.waiters != 0;
        drop(st);
        if wake {
            self.wq.notify_all();
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> ItreeSnapshot {
        let st = self.lock();
        ItreeSnapshot {
            invalidate_seq: st.invalidate_seq,
            active_invalidate_ranges: st.active_invalidate_ranges,
            nr_intervals: st.itree.len(),
            nr_deferred: st.deferred_list.len(),
            nr_waiters: st.waiters,
        }
    }

    /// The intervals in the tree overlapping `[start, end)`, as
    /// `(start, end)` in tree order (for checkers and tests).
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        self.lock()
            .itree
            .values(start..end)
            .map(|e| (e.sub.start, e.sub.end))
            .collect()
    }
}
