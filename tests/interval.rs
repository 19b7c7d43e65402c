//! `mmu_interval_notifier` (Linux 5.5+ semantics): the sequence protocol,
//! deferred inserts and removes, non-blockable refusal, dispatch order with
//! the list API, and the events and ranges the simulated mm reports. The
//! concurrent tests run real threads and wait for events (a callback parked
//! at a gate, a thread counted as a waiter), never for time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use parking_lot::{Condvar, Mutex};
use shadowvm::mm::{Mm, MmError, MmapFlags, PAGE_SIZE, Prot, Pte};
use shadowvm::notifier::{
    MmuInterval, MmuIntervalNotifier, MmuIntervalNotifierOps, MmuNotifierMm, MmuNotifierOps,
    MmuNotifierRange, MmuNotifyEvent, NotifierError,
};

fn list() -> Arc<MmuNotifierMm> {
    Arc::new(MmuNotifierMm::new())
}

fn pin() -> Arc<dyn std::any::Any + Send + Sync> {
    Arc::new(())
}

fn clear(start: u64, end: u64) -> MmuNotifierRange {
    MmuNotifierRange::new(MmuNotifyEvent::Clear, start, end)
}

/// One `invalidate` call as the callback saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Call {
    interval: (u64, u64),
    range: MmuNotifierRange,
    cur_seq: u64,
}

/// An interval driver: records every call, sets the sequence under its own
/// lock (the driver lock of Linux's protocol), can refuse non-blockable
/// ranges, and can park inside the callback until released.
#[derive(Default)]
struct Driver {
    lock: Mutex<Vec<Call>>,
    refuse_nonblocking: AtomicBool,
    refuse_always: AtomicBool,
    gate: Mutex<(bool, bool)>, // (closed, parked)
    gate_cv: Condvar,
}

impl Driver {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    fn calls(&self) -> Vec<Call> {
        self.lock.lock().clone()
    }
    fn close_gate(&self) {
        *self.gate.lock() = (true, false);
    }
    fn wait_parked(&self) {
        let mut g = self.gate.lock();
        while !g.1 {
            self.gate_cv.wait(&mut g);
        }
    }
    fn open_gate(&self) {
        self.gate.lock().0 = false;
        self.gate_cv.notify_all();
    }
}

impl MmuIntervalNotifierOps for Driver {
    fn invalidate(&self, interval: &MmuInterval, range: &MmuNotifierRange, cur_seq: u64) -> bool {
        if self.refuse_always.load(Ordering::SeqCst)
            || (!range.blockable() && self.refuse_nonblocking.load(Ordering::SeqCst))
        {
            return false;
        }
        {
            let mut calls = self.lock.lock();
            interval.set_seq(cur_seq);
            calls.push(Call {
                interval: (interval.start(), interval.end()),
                range: *range,
                cur_seq,
            });
        }
        let mut g = self.gate.lock();
        if g.0 {
            g.1 = true;
            self.gate_cv.notify_all();
            while g.0 {
                self.gate_cv.wait(&mut g);
            }
        }
        true
    }
}

fn insert(l: &MmuNotifierMm, start: u64, len: u64, d: &Arc<Driver>) -> MmuIntervalNotifier {
    l.mmu_interval_notifier_insert_locked(start, len, d.clone(), pin())
        .unwrap()
}

/// Waits until `n` threads sleep in `read_begin` or `remove`.
fn wait_waiters(l: &MmuNotifierMm, n: usize) {
    while l.interval_snapshot().nr_waiters != n {
        thread::yield_now();
    }
}

#[test]
fn idle_insert_starts_odd_and_unequal_and_read_retry_is_false() {
    let l = list();
    assert!(!l.has_notifiers());
    let d = Driver::new();
    let n = insert(&l, 0x1000, 0x3000, &d);
    assert!(
        l.has_notifiers(),
        "an interval alone must make dispatch run"
    );
    let snap = l.interval_snapshot();
    assert_eq!(snap.invalidate_seq % 2, 0);
    assert_eq!(snap.nr_intervals, 1);
    let seq = n.read_begin();
    assert_eq!(seq % 2, 1);
    assert_ne!(seq, snap.invalidate_seq);
    assert!(!n.read_retry(seq));
    assert!(!n.check_retry(seq));
    assert_eq!((n.start(), n.end()), (0x1000, 0x4000));
}

#[test]
fn empty_or_wrapping_intervals_are_refused() {
    let l = list();
    let d = Driver::new();
    for (start, len) in [(0x1000, 0), (u64::MAX - 0xfff, 0x1000), (u64::MAX, 1)] {
        let r = l.mmu_interval_notifier_insert_locked(start, len, d.clone(), pin());
        assert_eq!(r.unwrap_err(), NotifierError::Overflow);
    }
    assert!(!l.has_itree(), "a refused insert must not turn the tree on");
    let ok = l.mmu_interval_notifier_insert_locked(u64::MAX - 0x1000, 0x1000, d, pin());
    assert!(ok.is_ok());
}

#[test]
fn only_overlapping_intervals_are_called_with_the_whole_range() {
    let l = list();
    let (a, b, c) = (Driver::new(), Driver::new(), Driver::new());
    let _na = insert(&l, 0x0000, 0x2000, &a); // [0, 2000)
    let _nb = insert(&l, 0x2000, 0x1000, &b); // [2000, 3000): touches the range end
    let _nc = insert(&l, 0x1000, 0x1000, &c); // [1000, 2000)
    let r = clear(0x1000, 0x2000);
    l.invalidate_range_start(&r).unwrap();
    let seq = l.interval_snapshot().invalidate_seq;
    assert_eq!(seq % 2, 1, "odd while an invalidation of an interval runs");
    l.invalidate_range_end(&r, false);
    assert_eq!(l.interval_snapshot().invalidate_seq, seq + 1);
    for (d, want) in [(&a, 1), (&b, 0), (&c, 1)] {
        let calls = d.calls();
        assert_eq!(calls.len(), want);
        for call in calls {
            // Linux passes the mm's range, not its intersection.
            assert_eq!(call.range, r);
            assert_eq!(call.cur_seq, seq);
        }
    }
}

#[test]
fn a_range_hitting_no_interval_keeps_the_sequence_even() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0x10000, 0x1000, &d);
    let before = l.interval_snapshot().invalidate_seq;
    let seq = n.read_begin();
    let r = clear(0, 0x10000);
    l.invalidate_range_start(&r).unwrap();
    let snap = l.interval_snapshot();
    assert_eq!(snap.invalidate_seq, before);
    assert_eq!(snap.active_invalidate_ranges, 1);
    l.invalidate_range_end(&r, false);
    assert_eq!(l.interval_snapshot().active_invalidate_ranges, 0);
    assert!(d.calls().is_empty());
    assert!(!n.read_retry(seq));
}

#[test]
fn identical_intervals_are_all_called_and_removed_one_by_one() {
    let l = list();
    let (a, b) = (Driver::new(), Driver::new());
    let na = insert(&l, 0x4000, 0x1000, &a);
    let _nb = insert(&l, 0x4000, 0x1000, &b);
    let r = clear(0x4000, 0x5000);
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    assert_eq!((a.calls().len(), b.calls().len()), (1, 1));
    na.remove();
    assert_eq!(l.interval_snapshot().nr_intervals, 1);
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    assert_eq!((a.calls().len(), b.calls().len()), (1, 2));
}

#[test]
fn invalidation_after_read_begin_makes_read_retry_true() {
    let l = list();
    let d = Driver::new();
    let n = &insert(&l, 0, 0x1000, &d);
    let d = &d;
    let (begun_tx, begun_rx) = std::sync::mpsc::channel();
    let (inv_tx, inv_rx) = std::sync::mpsc::channel::<()>();
    thread::scope(|s| {
        let reader = s.spawn(move || {
            let seq = n.read_begin();
            begun_tx.send(()).unwrap();
            inv_rx.recv().unwrap();
            // The driver's lock around read_retry, as a fault path takes it.
            let _guard = d.lock.lock();
            n.read_retry(seq)
        });
        begun_rx.recv().unwrap();
        let r = clear(0, 0x1000);
        l.invalidate_range_start(&r).unwrap();
        l.invalidate_range_end(&r, false);
        inv_tx.send(()).unwrap();
        assert!(reader.join().unwrap(), "the collision went unnoticed");
    });
}

#[test]
fn read_begin_waits_for_a_running_invalidation_of_its_interval() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0, 0x2000, &d);
    let r = clear(0x1000, 0x2000);
    l.invalidate_range_start(&r).unwrap(); // callback ran: seq set, range open
    let cur = l.interval_snapshot().invalidate_seq;
    let returned = AtomicBool::new(false);
    thread::scope(|s| {
        let reader = s.spawn(|| {
            let seq = n.read_begin();
            returned.store(true, Ordering::SeqCst);
            seq
        });
        wait_waiters(&l, 1);
        // It sleeps until the sequence moves; nothing but our end moves it.
        assert!(!returned.load(Ordering::SeqCst));
        l.invalidate_range_end(&r, false);
        let seq = reader.join().unwrap();
        assert_eq!(seq, cur, "read_begin returns the sequence it waited on");
        assert!(!n.read_retry(seq), "no invalidation since the end");
    });
}

#[test]
fn nested_invalidations_keep_the_sequence_odd_until_the_last_end() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0, 0x4000, &d);
    let (r1, r2) = (clear(0, 0x2000), clear(0x1000, 0x4000));
    l.invalidate_range_start(&r1).unwrap();
    l.invalidate_range_start(&r2).unwrap();
    let calls = d.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].cur_seq, calls[1].cur_seq,
        "one odd sequence for both"
    );
    l.invalidate_range_end(&r1, false);
    let snap = l.interval_snapshot();
    assert_eq!(
        (snap.invalidate_seq % 2, snap.active_invalidate_ranges),
        (1, 1)
    );
    thread::scope(|s| {
        let reader = s.spawn(|| n.read_begin());
        wait_waiters(&l, 1);
        l.invalidate_range_end(&r2, false);
        let seq = reader.join().unwrap();
        assert!(!n.read_retry(seq));
    });
    assert_eq!(l.interval_snapshot().invalidate_seq % 2, 0);
}

#[test]
fn remove_waits_for_the_invalidation_in_progress() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0, 0x1000, &d);
    let r = clear(0, 0x1000);
    d.close_gate();
    let removed = AtomicBool::new(false);
    thread::scope(|s| {
        let inv = s.spawn(|| l.invalidate_range_start(&r));
        d.wait_parked(); // our callback is running
        let remover = s.spawn(|| {
            n.remove();
            removed.store(true, Ordering::SeqCst);
        });
        wait_waiters(&l, 1);
        assert_eq!(l.interval_snapshot().nr_deferred, 1, "remove is deferred");
        d.open_gate();
        inv.join().unwrap().unwrap();
        // The callback has returned but the range is still open: remove
        // still waits, for mn_itree_inv_end.
        assert_eq!(l.interval_snapshot().nr_waiters, 1);
        assert!(!removed.load(Ordering::SeqCst));
        l.invalidate_range_end(&r, false);
        remover.join().unwrap();
    });
    assert!(removed.load(Ordering::SeqCst));
    let snap = l.interval_snapshot();
    assert_eq!((snap.nr_intervals, snap.nr_deferred), (0, 0));
    // Gone for good: later invalidations do not call it.
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    assert_eq!(d.calls().len(), 1);
}

#[test]
fn remove_while_no_invalidation_runs_returns_at_once() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0, 0x1000, &d);
    // An active range that hits nothing leaves the sequence even: the tree
    // may change.
    let r = clear(0x8000, 0x9000);
    l.invalidate_range_start(&r).unwrap();
    n.remove();
    assert_eq!(l.interval_snapshot().nr_intervals, 0);
    l.invalidate_range_end(&r, false);
}

#[test]
fn insert_during_an_invalidation_is_deferred_and_takes_effect_after() {
    let l = list();
    let (a, late) = (Driver::new(), Driver::new());
    let _na = insert(&l, 0, 0x4000, &a);
    let r = clear(0, 0x4000);
    l.invalidate_range_start(&r).unwrap();
    let n = insert(&l, 0x1000, 0x1000, &late);
    let snap = l.interval_snapshot();
    assert_eq!((snap.nr_intervals, snap.nr_deferred), (1, 1));
    // A second invalidation of the same range does not see it yet.
    l.invalidate_range_start(&r).unwrap();
    assert!(late.calls().is_empty());
    l.invalidate_range_end(&r, false);
    let end_seq = thread::scope(|s| {
        // Its first read_begin waits: the running invalidations may cover
        // its range without having called it.
        let reader = s.spawn(|| n.read_begin());
        wait_waiters(&l, 1);
        l.invalidate_range_end(&r, false);
        reader.join().unwrap()
    });
    assert!(!n.read_retry(end_seq));
    let snap = l.interval_snapshot();
    assert_eq!((snap.nr_intervals, snap.nr_deferred), (2, 0));
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    assert_eq!(late.calls().len(), 1, "in the tree after the last end");
    assert!(n.read_retry(end_seq));
}

#[test]
fn insert_while_a_range_hitting_nothing_runs_goes_in_but_waits_for_its_end() {
    let l = list();
    let (a, late) = (Driver::new(), Driver::new());
    let _na = insert(&l, 0x10000, 0x1000, &a);
    let r = clear(0, 0x4000);
    l.invalidate_range_start(&r).unwrap(); // active, sequence even
    let n = insert(&l, 0, 0x1000, &late);
    let snap = l.interval_snapshot();
    assert_eq!(
        snap.nr_intervals, 2,
        "inserted at once: the tree may change"
    );
    assert_eq!(snap.invalidate_seq % 2, 1, "but that range may cover it");
    thread::scope(|s| {
        let reader = s.spawn(|| n.read_begin());
        wait_waiters(&l, 1);
        l.invalidate_range_end(&r, false);
        reader.join().unwrap();
    });
    assert_eq!(l.interval_snapshot().invalidate_seq % 2, 0);
}

#[test]
fn removing_a_deferred_insert_cancels_it_without_waiting() {
    let l = list();
    let (a, late) = (Driver::new(), Driver::new());
    let _na = insert(&l, 0, 0x1000, &a);
    let r = clear(0, 0x1000);
    l.invalidate_range_start(&r).unwrap();
    let n = insert(&l, 0, 0x1000, &late);
    assert_eq!(l.interval_snapshot().nr_deferred, 1);
    n.remove(); // would deadlock here if it waited for our end
    assert_eq!(l.interval_snapshot().nr_deferred, 0);
    l.invalidate_range_end(&r, false);
    let snap = l.interval_snapshot();
    assert_eq!(snap.nr_intervals, 1);
}

#[test]
fn a_non_blockable_refusal_fails_the_start_and_the_end_balances_it() {
    let l = list();
    let (a, b) = (Driver::new(), Driver::new());
    let _na = insert(&l, 0, 0x1000, &a);
    let _nb = insert(&l, 0x1000, 0x1000, &b);
    b.refuse_nonblocking.store(true, Ordering::SeqCst);
    a.refuse_nonblocking.store(true, Ordering::SeqCst);
    let list_mn = Arc::new(shadowvm::notifier::recorder::RecordingNotifier::new("list"));
    let _reg = l.register_locked(list_mn.clone(), pin());
    let r = clear(0, 0x2000).nonblocking();
    assert_eq!(l.invalidate_range_start(&r), Err(NotifierError::Again));
    // The list notifiers still got their start: the caller ends the range.
    assert_eq!(list_mn.take().len(), 1);
    assert_eq!(l.interval_snapshot().active_invalidate_ranges, 1);
    l.invalidate_range_end(&r, false);
    let snap = l.interval_snapshot();
    assert_eq!(
        (snap.active_invalidate_ranges, snap.invalidate_seq % 2),
        (0, 0)
    );
    // A blockable range is never refused by these drivers.
    let r = clear(0, 0x2000);
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    assert_eq!((a.calls().len(), b.calls().len()), (1, 1));
}

#[test]
fn a_blockable_refusal_is_a_driver_bug_and_the_walk_goes_on() {
    let l = list();
    let (a, b) = (Driver::new(), Driver::new());
    let _na = insert(&l, 0, 0x1000, &a);
    let _nb = insert(&l, 0, 0x1000, &b);
    a.refuse_always.store(true, Ordering::SeqCst);
    let r = clear(0, 0x1000);
    assert_eq!(l.invalidate_range_start(&r), Ok(()));
    l.invalidate_range_end(&r, false);
    assert_eq!(b.calls().len(), 1);
}

/// A list notifier that records the interval protocol's state when each of
/// its callbacks runs, to show the order of the two APIs.
struct OrderWitness {
    l: Arc<MmuNotifierMm>,
    driver: Arc<Driver>,
    seen: Mutex<Vec<(&'static str, u64, usize)>>,
}

impl MmuNotifierOps for OrderWitness {
    fn release(&self) {
        self.note("release");
    }
    fn invalidate_range_start(&self, _r: &MmuNotifierRange) -> Result<(), NotifierError> {
        self.note("start");
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &MmuNotifierRange) {
        self.note("end");
    }
}

impl OrderWitness {
    fn note(&self, what: &'static str) {
        let seq = self.l.interval_snapshot().invalidate_seq;
        self.seen
            .lock()
            .push((what, seq % 2, self.driver.calls().len()));
    }
}

#[test]
fn the_interval_tree_is_dispatched_before_the_list_as_in_linux() {
    let l = list();
    let d = Driver::new();
    let _n = insert(&l, 0, 0x1000, &d);
    let w = Arc::new(OrderWitness {
        l: l.clone(),
        driver: d.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let _reg = l.register_locked(w.clone(), pin());
    let r = clear(0, 0x1000);
    l.invalidate_range_start(&r).unwrap();
    l.invalidate_range_end(&r, false);
    l.release();
    let seen = w.seen.lock().clone();
    assert_eq!(
        seen,
        vec![
            // mn_itree_invalidate ran (odd, called) before the list's start
            ("start", 1, 1),
            // mn_itree_inv_end ran (even) before the list's end
            ("end", 0, 1),
            // mn_itree_release ran (called again, ended) before ->release
            ("release", 0, 2),
        ]
    );
    let release = d.calls()[1];
    assert_eq!(release.range.event, MmuNotifyEvent::Release);
    assert_eq!((release.range.start, release.range.end), (0, u64::MAX));
}

// --- Through the simulated mm -------------------------------------------

fn mm_with(pages: u64) -> (Arc<Mm>, u64) {
    let (mm, hva) = anon(64, pages * PAGE_SIZE, MmapFlags::MERGEABLE);
    for p in 0..pages {
        mm.write(hva + p * PAGE_SIZE, &[p as u8 + 1; 8]).unwrap();
    }
    (mm, hva)
}

/// A fresh mm of `frames` frames with one read-write mapping of `len` bytes.
fn anon(frames: u64, len: u64, flags: MmapFlags) -> (Arc<Mm>, u64) {
    let mm = Mm::new_anonymous(frames).unwrap();
    let hva = mm.mmap(None, len, Prot::READ | Prot::WRITE, flags).unwrap();
    (mm, hva)
}

fn events(d: &Driver) -> Vec<(MmuNotifyEvent, u64, u64)> {
    d.calls()
        .iter()
        .map(|c| (c.range.event, c.range.start, c.range.end))
        .collect()
}

#[test]
fn mm_insert_turns_dispatch_on_and_refuses_an_exited_mm() {
    let (mm, hva) = mm_with(4);
    assert!(!mm.notifiers().has_notifiers());
    let d = Driver::new();
    let n = mm
        .mmu_interval_notifier_insert(hva, 4 * PAGE_SIZE, d.clone())
        .unwrap();
    assert!(mm.notifiers().has_notifiers());
    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
    assert_eq!(
        events(&d),
        vec![(MmuNotifyEvent::Clear, hva, hva + PAGE_SIZE)]
    );
    drop(n);
    // has_itree stays set (Linux's subscriptions stay allocated).
    assert!(mm.notifiers().has_notifiers());
    let guard = mm.mmap_write_lock();
    let locked = mm.mmu_interval_notifier_insert_locked(&guard, hva, PAGE_SIZE, d.clone());
    drop(guard);
    drop(locked.unwrap());
    mm.exit_mmap();
    let r = mm.mmu_interval_notifier_insert(hva, PAGE_SIZE, d);
    assert_eq!(r.unwrap_err(), MmError::Exited);
}

#[test]
fn mm_operations_report_linux_events_and_ranges() {
    let (mm, hva) = mm_with(8);
    let d = Driver::new();
    // Pages 1..7 only: operations on page 0 or 7 alone must not call it.
    let _n = mm
        .mmu_interval_notifier_insert(hva + PAGE_SIZE, 6 * PAGE_SIZE, d.clone())
        .unwrap();
    let page = |i: u64| hva + i * PAGE_SIZE;

    mm.madvise_dontneed(page(0), PAGE_SIZE).unwrap();
    assert!(d.calls().is_empty(), "page 0 is outside the interval");
    mm.madvise_dontneed(page(0), 3 * PAGE_SIZE).unwrap();
    mm.mprotect(page(2), PAGE_SIZE, Prot::READ).unwrap();
    mm.mprotect(page(2), PAGE_SIZE, Prot::READ | Prot::WRITE)
        .unwrap(); // change_protection runs for an upgrade too
    mm.write(page(2), &[9; 8]).unwrap(); // write fault on a read-only PTE: reuse, no event
    let before = d.calls().len();
    // Two turns of the clock: the first clears young bits, the second
    // evicts the cold pages one by one.
    assert!(mm.reclaim(64).unwrap().evicted > 0);
    let reclaim_events: Vec<_> = events(&d)[before..].to_vec();
    assert!(!reclaim_events.is_empty());
    for (e, s, en) in &reclaim_events {
        assert!(
            *e == MmuNotifyEvent::Clear && en - s == PAGE_SIZE,
            "reclaim (try_to_unmap_one, MMU_NOTIFY_CLEAR) unmaps one page at a time: {reclaim_events:?}"
        );
    }
    mm.munmap(page(5), 4 * PAGE_SIZE).unwrap(); // not clipped to the VMA end
    let ev = events(&d);
    assert_eq!(ev[0], (MmuNotifyEvent::Clear, page(0), page(3)));
    assert_eq!(ev[1], (MmuNotifyEvent::ProtectionVma, page(2), page(3)));
    assert_eq!(ev[2], (MmuNotifyEvent::ProtectionVma, page(2), page(3)));
    assert_eq!(ev[3..before], []);
    assert_eq!(
        *ev.last().unwrap(),
        (MmuNotifyEvent::Unmap, page(5), page(9))
    );
}

#[test]
fn mm_ksm_merge_and_cow_break_invalidate_the_interval() {
    let (mm, hva) = anon(64, 2 * PAGE_SIZE, MmapFlags::MERGEABLE);
    mm.write(hva, &[7; 16]).unwrap();
    mm.write(hva + PAGE_SIZE, &[7; 16]).unwrap();
    let d = Driver::new();
    let _n = mm
        .mmu_interval_notifier_insert(hva, 2 * PAGE_SIZE, d.clone())
        .unwrap();
    for _ in 0..4 {
        mm.ksm_scan(16).unwrap();
    }
    let pfn = |a| match mm.pte(a) {
        Some(Pte::Present(p)) => Some(p.pfn),
        _ => None,
    };
    assert!(pfn(hva).is_some());
    assert_eq!(pfn(hva), pfn(hva + PAGE_SIZE), "KSM merged the two pages");
    let ev = events(&d);
    assert!(ev.contains(&(MmuNotifyEvent::ProtectionPage, hva, hva + PAGE_SIZE)));
    assert!(ev.iter().any(|e| e.0 == MmuNotifyEvent::KsmMerge));
    mm.write(hva, &[8; 1]).unwrap();
    assert_eq!(
        *events(&d).last().unwrap(),
        (MmuNotifyEvent::CowBreak, hva, hva + PAGE_SIZE)
    );
}

#[test]
fn mm_exit_releases_intervals_first_then_unmaps_everything() {
    let (mm, hva) = mm_with(2);
    let d = Driver::new();
    let n = mm
        .mmu_interval_notifier_insert(hva, 2 * PAGE_SIZE, d.clone())
        .unwrap();
    mm.exit_mmap();
    let ev = events(&d);
    // mn_itree_release, then exit_mmap's unmap_vmas(0, -1), which the
    // interval (still in the tree) sees whole.
    assert_eq!(ev[0], (MmuNotifyEvent::Release, 0, u64::MAX));
    assert_eq!(ev[1], (MmuNotifyEvent::Unmap, 0, u64::MAX));
    // The subscription outlives the exit and is removed by its owner.
    assert_eq!(mm.notifiers().interval_snapshot().nr_intervals, 1);
    n.remove();
    assert_eq!(mm.notifiers().interval_snapshot().nr_intervals, 0);
}

#[test]
fn mm_oom_reap_skips_a_range_whose_interval_refuses() {
    let (mm, hva) = mm_with(2);
    let d = Driver::new();
    d.refuse_nonblocking.store(true, Ordering::SeqCst);
    let _n = mm
        .mmu_interval_notifier_insert(hva, 2 * PAGE_SIZE, d.clone())
        .unwrap();
    let present = mm.nr_present();
    assert_eq!(mm.oom_reap(), Err(MmError::Notifier(NotifierError::Again)));
    assert_eq!(mm.nr_present(), present, "nothing zapped after a refusal");
    let snap = mm.notifiers().interval_snapshot();
    assert_eq!(
        (snap.active_invalidate_ranges, snap.invalidate_seq % 2),
        (0, 0)
    );
    d.refuse_nonblocking.store(false, Ordering::SeqCst);
    assert_eq!(mm.oom_reap(), Ok(2));
}

#[test]
fn an_interval_pins_its_mm_until_removed() {
    let (mm, hva) = mm_with(1);
    let d = Driver::new();
    let n = mm.mmu_interval_notifier_insert(hva, PAGE_SIZE, d).unwrap();
    let weak = Arc::downgrade(&mm);
    drop(mm);
    assert!(weak.upgrade().is_some(), "the subscription must pin the mm");
    n.remove();
    // The tree entry (and with it the driver) is dropped with the removal;
    // nothing else holds the mm.
    assert!(weak.upgrade().is_none());
}

/// Invalidations at full rate on one thread, `read_begin`/`read_retry`
/// lookups of a "page" on another: a lookup that installs must have seen the
/// current page. `page` is bumped only inside start/end, as the mm changes
/// PTEs.
#[test]
fn stress_lookups_never_install_a_page_changed_by_an_invalidation() {
    let l = list();
    let d = Driver::new();
    let n = insert(&l, 0, 0x1000, &d);
    let page = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let installs = AtomicU64::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            let r = clear(0, 0x1000);
            let mut seen = 0;
            for i in 0..5_000 {
                if i % 16 == 0 {
                    // Let the reader through now and then (it may be off
                    // the CPU for the whole run otherwise).
                    while installs.load(Ordering::Relaxed) == seen {
                        thread::yield_now();
                    }
                    seen = installs.load(Ordering::Relaxed);
                }
                l.invalidate_range_start(&r).unwrap();
                page.fetch_add(1, Ordering::SeqCst);
                l.invalidate_range_end(&r, false);
            }
            stop.store(true, Ordering::SeqCst);
        });
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let seq = n.read_begin();
                let seen = page.load(Ordering::SeqCst);
                let guard = d.lock.lock();
                if n.read_retry(seq) {
                    continue;
                }
                // Installed under the driver lock: nothing changed it since.
                assert_eq!(page.load(Ordering::SeqCst), seen, "stale install");
                drop(guard);
                installs.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    assert!(installs.load(Ordering::Relaxed) > 0);
}
