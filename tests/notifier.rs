//! The guarantees of the MMU notifier (`mm/mmu_notifier.c` semantics), each
//! with a test; the concurrent ones run real threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use shadowvm::mm::{Mm, MmError, MmapFlags, PAGE_SIZE, Prot};
use shadowvm::notifier::recorder::{Recorded, RecordingNotifier};
use shadowvm::notifier::{
    Callbacks, MmuNotifierMm, MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent, NotifierError,
    NotifierPte,
};

fn list() -> Arc<MmuNotifierMm> {
    Arc::new(MmuNotifierMm::new())
}

fn pin() -> Arc<dyn std::any::Any + Send + Sync> {
    Arc::new(())
}

fn rec(name: &'static str) -> Arc<RecordingNotifier> {
    Arc::new(RecordingNotifier::new(name))
}

fn range(start: u64, end: u64) -> MmuNotifierRange {
    MmuNotifierRange::new(MmuNotifyEvent::Clear, start, end)
}

/// How long a thread that must be blocked is given to (wrongly) finish.
/// Waits until `blocked()` says the other thread is waiting where it must,
/// or `done()` says it went through (the bug these tests look for); a minute
/// of neither is a hang. Event-driven: nothing here depends on timing.
fn until_blocked_or_done(blocked: impl Fn() -> bool, done: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !blocked() && !done() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "neither blocked nor done"
        );
        thread::yield_now();
    }
}

#[test]
fn young_results_are_ored_and_every_notifier_is_asked() {
    let l = list();
    let (a, b) = (rec("a"), rec("b"));
    let _ra = l.register_locked(a.clone(), pin());
    let _rb = l.register_locked(b.clone(), pin());
    assert!(!l.clear_flush_young(0, 4096));
    a.set_young(true);
    assert!(l.clear_flush_young(0, 4096));
    assert!(l.clear_young(0, 4096));
    // Both were asked both times, young or not.
    for r in [&a, &b] {
        let log = r.log();
        assert_eq!(
            log.iter()
                .filter(|e| matches!(e, Recorded::ClearFlushYoung { .. }))
                .count(),
            2
        );
        assert_eq!(
            log.iter()
                .filter(|e| matches!(e, Recorded::ClearYoung { .. }))
                .count(),
            1
        );
    }
}

#[test]
fn test_young_stops_at_the_first_young_notifier() {
    let l = list();
    let (old, new) = (rec("old"), rec("new"));
    let _ro = l.register_locked(old.clone(), pin());
    let _rn = l.register_locked(new.clone(), pin()); // hlist_add_head: asked first
    new.set_young(true);
    assert!(l.test_young(0x5000));
    assert_eq!(new.log(), vec![Recorded::TestYoung { address: 0x5000 }]);
    assert!(
        old.log().is_empty(),
        "dispatch went on after a young answer"
    );
    new.set_young(false);
    assert!(!l.test_young(0x5000));
    assert_eq!(old.log(), vec![Recorded::TestYoung { address: 0x5000 }]);
}

#[test]
fn invalidate_range_start_calls_every_notifier_after_a_failure() {
    let l = list();
    let refuses = rec("refuses");
    let also_refuses = rec("also");
    let fine = Arc::new(RecordingNotifier::new("fine").non_blocking());
    let _r1 = l.register_locked(refuses.clone(), pin());
    let _r2 = l.register_locked(fine.clone(), pin());
    let _r3 = l.register_locked(also_refuses.clone(), pin());
    let r = range(0, 8192).nonblocking();
    assert_eq!(l.invalidate_range_start(&r), Err(NotifierError::Again));
    for n in [&refuses, &fine, &also_refuses] {
        assert_eq!(
            n.log(),
            vec![Recorded::InvalidateRangeStart(r)],
            "{}",
            n.name()
        );
    }
    // A blockable range never fails.
    assert_eq!(l.invalidate_range_start(&range(0, 8192)), Ok(()));
}

#[test]
fn invalidate_range_end_calls_invalidate_range_first_unless_only_end() {
    let l = list();
    let a = rec("a");
    let _r = l.register_locked(a.clone(), pin());
    let r = range(0x1000, 0x3000);
    l.invalidate_range_end(&r, false);
    assert_eq!(
        a.take(),
        vec![
            Recorded::InvalidateRange {
                start: 0x1000,
                end: 0x3000
            },
            Recorded::InvalidateRangeEnd(r)
        ]
    );
    l.invalidate_range_end(&r, true);
    assert_eq!(a.take(), vec![Recorded::InvalidateRangeEnd(r)]);
    l.invalidate_range(0x1000, 0x2000);
    assert_eq!(
        a.take(),
        vec![Recorded::InvalidateRange {
            start: 0x1000,
            end: 0x2000
        }]
    );
    let pte = NotifierPte {
        frame: 7,
        writable: false,
    };
    l.change_pte(0x1000, pte);
    assert_eq!(
        a.take(),
        vec![Recorded::ChangePte {
            address: 0x1000,
            pte
        }]
    );
}

#[test]
fn callbacks_not_provided_are_skipped_like_null_pointers() {
    let l = list();
    let only_young = Arc::new(RecordingNotifier::with_callbacks(
        "young",
        Callbacks::CLEAR_YOUNG,
    ));
    let _r = l.register_locked(only_young.clone(), pin());
    l.invalidate_range_start(&range(0, 4096)).unwrap();
    l.invalidate_range_end(&range(0, 4096), false);
    l.change_pte(
        0,
        NotifierPte {
            frame: 1,
            writable: true,
        },
    );
    l.clear_young(0, 4096);
    assert_eq!(
        only_young.log(),
        vec![Recorded::ClearYoung {
            start: 0,
            end: 4096
        }]
    );
    // No invalidate callback at all: not a blockable invalidate notifier.
    assert!(!l.has_blockable_invalidate_notifiers());
}

#[test]
fn has_blockable_invalidate_notifiers_follows_the_flag() {
    let l = list();
    assert!(!l.has_blockable_invalidate_notifiers());
    let nb = l.register_locked(Arc::new(RecordingNotifier::new("nb").non_blocking()), pin());
    assert!(!l.has_blockable_invalidate_notifiers());
    let b = l.register_locked(rec("b"), pin());
    assert!(l.has_blockable_invalidate_notifiers());
    b.unregister();
    assert!(!l.has_blockable_invalidate_notifiers());
    nb.unregister();
}

fn mm_with_page() -> (Arc<Mm>, u64) {
    let mm = Mm::new_anonymous(64).unwrap();
    let hva = mm
        .mmap(
            None,
            4 * PAGE_SIZE,
            Prot::READ | Prot::WRITE,
            MmapFlags::empty(),
        )
        .unwrap();
    mm.write(hva, b"data").unwrap();
    (mm, hva)
}

#[test]
fn release_runs_once_when_exit_comes_first() {
    let (mm, _) = mm_with_page();
    let a = rec("a");
    let reg = mm.mmu_notifier_register(a.clone()).unwrap();
    mm.exit_mmap();
    assert_eq!(a.releases(), 1);
    assert!(!reg.is_registered());
    reg.unregister();
    assert_eq!(a.releases(), 1);
    // release was the first and only callback: exit zaps after it.
    assert_eq!(a.log(), vec![Recorded::Release]);
}

#[test]
fn release_runs_once_when_unregister_comes_first() {
    let (mm, hva) = mm_with_page();
    let a = rec("a");
    let reg = mm.mmu_notifier_register(a.clone()).unwrap();
    reg.unregister();
    assert_eq!(a.take(), vec![Recorded::Release]);
    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
    mm.exit_mmap();
    assert!(
        a.log().is_empty(),
        "callbacks after unregister: {:?}",
        a.log()
    );
}

#[test]
fn exit_racing_unregister_releases_exactly_once() {
    for _ in 0..200 {
        let (mm, _) = mm_with_page();
        let a = rec("a");
        let reg = mm.mmu_notifier_register(a.clone()).unwrap();
        let go = Arc::new(Barrier::new(2));
        let (g, m) = (go.clone(), mm.clone());
        let exit = thread::spawn(move || {
            g.wait();
            m.exit_mmap();
        });
        go.wait();
        reg.unregister();
        exit.join().unwrap();
        assert_eq!(a.releases(), 1, "log: {:?}", a.log());
        assert_eq!(mm.frames().nr_free(), mm.frames().nr_frames());
    }
}

#[test]
fn unregister_waits_for_a_callback_in_flight() {
    let (mm, hva) = mm_with_page();
    let a = rec("a");
    let reg = mm.mmu_notifier_register(a.clone()).unwrap();
    a.close_gate();
    let m = mm.clone();
    let op = thread::spawn(move || m.madvise_dontneed(hva, PAGE_SIZE));
    a.wait_blocked(); // invalidate_range_start is running

    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let unreg = thread::spawn(move || {
        reg.unregister();
        d.store(true, Ordering::SeqCst);
    });
    // Unregister blocks in its own ->release (at the same gate) or in the
    // grace period that waits for the callback in flight.
    until_blocked_or_done(
        || mm.notifiers().nr_synchronizing() > 0 || a.nr_blocked() > 1,
        || done.load(Ordering::SeqCst),
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "unregister returned while a callback was running"
    );
    a.open_gate();
    unreg.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    op.join().unwrap().unwrap();
    assert_eq!(a.releases(), 1);
}

#[test]
fn exit_waits_for_a_release_started_by_unregister() {
    let (mm, _) = mm_with_page();
    let a = rec("a");
    let reg = mm.mmu_notifier_register(a.clone()).unwrap();
    a.close_gate();
    let unreg = thread::spawn(move || reg.unregister());
    a.wait_blocked(); // ->release from unregister is running
    let done = Arc::new(AtomicBool::new(false));
    let (d, m) = (done.clone(), mm.clone());
    let exit = thread::spawn(move || {
        m.exit_mmap();
        d.store(true, Ordering::SeqCst);
    });
    // unregister's own synchronize is one waiter; exit's is the second.
    until_blocked_or_done(
        || mm.notifiers().nr_synchronizing() > 1,
        || done.load(Ordering::SeqCst),
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "exit_mmap freed pages while ->release ran"
    );
    a.open_gate();
    exit.join().unwrap();
    unreg.join().unwrap();
    assert_eq!(a.releases(), 1);
}

#[test]
fn register_during_a_dispatch_is_not_called_by_it() {
    let l = list();
    let a = rec("a");
    let _ra = l.register_locked(a.clone(), pin());
    a.close_gate();
    let l2 = l.clone();
    let r = range(0, 4096);
    let dispatch = thread::spawn(move || l2.invalidate_range_start(&r));
    a.wait_blocked();

    // Registration does not wait for the dispatch in flight...
    let b = rec("b");
    let (tx, rx) = mpsc::channel();
    let l3 = l.clone();
    let b2 = b.clone();
    thread::spawn(move || tx.send(l3.register_locked(b2, pin())).unwrap());
    let rb = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("register blocked on a dispatch");
    a.open_gate();
    dispatch.join().unwrap().unwrap();
    // ...and that dispatch, which started before, does not call it.
    assert!(b.log().is_empty());
    // The next one does.
    l.invalidate_range_start(&r).unwrap();
    assert_eq!(b.log(), vec![Recorded::InvalidateRangeStart(r)]);
    drop(rb);
}

#[test]
fn mm_register_is_serialized_against_mm_operations() {
    let (mm, hva) = mm_with_page();
    let a = rec("a");
    let _ra = mm.mmu_notifier_register(a.clone()).unwrap();
    a.close_gate();
    let m = mm.clone();
    let op = thread::spawn(move || m.munmap(hva, PAGE_SIZE));
    a.wait_blocked(); // munmap holds the mmap lock, inside a callback
    let done = Arc::new(AtomicBool::new(false));
    let (d, m) = (done.clone(), mm.clone());
    let b = rec("b");
    let b2 = b.clone();
    let reg = thread::spawn(move || {
        let r = m.mmu_notifier_register(b2).unwrap();
        d.store(true, Ordering::SeqCst);
        r
    });
    until_blocked_or_done(
        || mm.stats().mmap_lock_wait > 0,
        || done.load(Ordering::SeqCst),
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "register ran inside an mm operation"
    );
    a.open_gate();
    op.join().unwrap().unwrap();
    let rb = reg.join().unwrap();
    // Registered after munmap completed: it saw none of it.
    assert!(b.log().is_empty());
    rb.unregister();
}

#[test]
fn registration_pins_the_mm_until_unregister() {
    let (mm, _) = mm_with_page();
    let weak = Arc::downgrade(&mm);
    let reg = mm.mmu_notifier_register(rec("a")).unwrap();
    drop(mm);
    assert!(
        weak.upgrade().is_some(),
        "the mm went away under a registered notifier"
    );
    reg.unregister();
    assert!(weak.upgrade().is_none(), "unregister did not drop the pin");
}

#[test]
fn unregister_no_release_skips_release_and_stops_callbacks() {
    let (mm, hva) = mm_with_page();
    let a = rec("a");
    let reg = mm.mmu_notifier_register(a.clone()).unwrap();
    reg.unregister_no_release();
    // Wait out any callback in flight, as the caller must.
    mm.notifiers().synchronize_callbacks();
    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
    mm.exit_mmap();
    assert!(a.log().is_empty());
}

#[test]
fn call_srcu_runs_after_callbacks_in_flight() {
    let l = list();
    let a = rec("a");
    let _ra = l.register_locked(a.clone(), pin());
    a.close_gate();
    let l2 = l.clone();
    let dispatch = thread::spawn(move || l2.clear_young(0, 4096));
    a.wait_blocked();
    let ran = Arc::new(AtomicBool::new(false));
    let r2 = ran.clone();
    l.call_srcu(Box::new(move || r2.store(true, Ordering::SeqCst)));
    until_blocked_or_done(|| l.nr_synchronizing() > 0, || ran.load(Ordering::SeqCst));
    assert!(
        !ran.load(Ordering::SeqCst),
        "call_srcu ran during a read-side section"
    );
    a.open_gate();
    dispatch.join().unwrap();
    l.synchronize(); // srcu_barrier
    assert!(ran.load(Ordering::SeqCst));
}

#[test]
fn non_blockable_invalidation_failure_reaches_the_oom_reaper() {
    let (mm, hva) = mm_with_page();
    let blocking = rec("blocking");
    let reg = mm.mmu_notifier_register(blocking.clone()).unwrap();
    assert!(mm.has_blockable_invalidate_notifiers());
    assert_eq!(mm.oom_reap(), Err(MmError::Notifier(NotifierError::Again)));
    // Nothing was zapped: the data is still there.
    let mut b = [0u8; 4];
    mm.read(hva, &mut b).unwrap();
    assert_eq!(&b, b"data");
    // Every notifier that saw start also saw end.
    let log = blocking.take();
    assert!(matches!(log.first(), Some(Recorded::InvalidateRangeStart(r)) if !r.blockable()));
    assert!(matches!(log.last(), Some(Recorded::InvalidateRangeEnd(_))));
    reg.unregister();

    let nb = Arc::new(RecordingNotifier::new("nb").non_blocking());
    let _r = mm.mmu_notifier_register(nb).unwrap();
    assert!(!mm.has_blockable_invalidate_notifiers());
    assert_eq!(mm.oom_reap(), Ok(1));
    mm.read(hva, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}

#[test]
fn stress_dispatch_register_unregister() {
    // Dispatch threads hammer the list while others register and unregister;
    // every callback received must come from a registered notifier and each
    // notifier is released exactly once.
    struct Counting(std::sync::atomic::AtomicU64, AtomicBool);
    impl MmuNotifierOps for Counting {
        fn invalidate_range_start(&self, _: &MmuNotifierRange) -> Result<(), NotifierError> {
            assert!(
                !self.1.load(Ordering::SeqCst),
                "callback after unregister returned"
            );
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
    let l = list();
    let stop = Arc::new(AtomicBool::new(false));
    let mut dispatchers = Vec::new();
    for _ in 0..2 {
        let (l, stop) = (l.clone(), stop.clone());
        dispatchers.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                l.invalidate_range_start(&range(0, 4096)).unwrap();
            }
        }));
    }
    for _ in 0..300 {
        let n = Arc::new(Counting(Default::default(), AtomicBool::new(false)));
        let reg = l.register_locked(n.clone(), pin());
        thread::yield_now();
        reg.unregister();
        n.1.store(true, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    for d in dispatchers {
        d.join().unwrap();
    }
    assert!(l.is_empty());
}
