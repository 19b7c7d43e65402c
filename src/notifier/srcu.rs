//! Sleepable RCU (SRCU) for notifier dispatch: Linux's `srcu_struct` API.
//!
//! [`Srcu`] adds to the grace-period engine in `srcu_core` an RAII
//! read guard, `call_srcu` (callbacks run after a grace period, on a worker
//! thread the domain spawns on first use) and `srcu_barrier`.
//!
//! Linux's `mm/mmu_notifier.c` uses one global SRCU domain for every mm; here
//! each notifier list owns its own domain, so unregistering on one mm never
//! waits for dispatch on another.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::srcu_core::SrcuCore;

/// A callback queued by [`Srcu::call_srcu`] (Linux `struct rcu_head` plus its
/// function).
type Callback = Box<dyn FnOnce() + Send + 'static>;

/// An SRCU domain (Linux `struct srcu_struct`).
///
/// Readers call [`read_lock`](Self::read_lock) and may sleep while they hold
/// the guard; updaters unpublish an object, then either wait with
/// [`synchronize`](Self::synchronize) or hand its destruction to
/// [`call_srcu`](Self::call_srcu).
///
/// Dropping the domain runs every pending callback (after a grace period)
/// and joins the worker thread, so an owner needs no `barrier()` in its own
/// `Drop`; it must not call one there if that `Drop` can run inside one of
/// the domain's callbacks (the last reference dying in a callback), since
/// `barrier()` from a callback of the same domain panics. A leaked
/// [`SrcuReadGuard`] (`mem::forget`) makes every later grace period, and so
/// the drop, wait forever.
pub struct Srcu {
    inner: Arc<Inner>,
}

/// State shared with the callback worker.
struct Inner {
    core: SrcuCore,
    /// Threads inside `synchronize_srcu` (callers and the callback worker):
    /// an event tests wait for ("the writer is waiting for the readers").
    synchronizing: std::sync::atomic::AtomicUsize,
    cbs: Mutex<Callbacks>,
    /// Signalled when a callback is queued or the domain is dropped.
    work: Condvar,
    /// Signalled when a batch of callbacks has run (`srcu_barrier` waits).
    done: Condvar,
}

/// The callback queue (Linux's `srcu_cblist`, one segment: callbacks taken
/// together share the grace period that starts after they are taken).
#[derive(Default)]
struct Callbacks {
    queue: VecDeque<Callback>,
    /// Callbacks ever queued; a callback's ticket is the value before it.
    queued: u64,
    /// Callbacks run so far. Callbacks run in queue order, so every ticket
    /// below `invoked` has run.
    invoked: u64,
    /// Set by `Drop`: the worker exits once the queue is empty.
    shutdown: bool,
    worker: Option<JoinHandle<()>>,
    worker_id: Option<ThreadId>,
}

/// An SRCU read-side critical section; `srcu_read_unlock` on drop.
#[must_use = "the read-side critical section ends when the guard is dropped"]
pub struct SrcuReadGuard<'a> {
    core: &'a SrcuCore,
    idx: usize,
}

impl SrcuReadGuard<'_> {
    /// The index `srcu_read_lock` returned (0 or 1).
    pub fn idx(&self) -> usize {
        self.idx
    }
}

impl Drop for SrcuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.core.read_unlock(self.idx);
    }
}

impl std::fmt::Debug for SrcuReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrcuReadGuard")
            .field("idx", &self.idx)
            .finish()
    }
}

impl Default for Srcu {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Srcu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srcu")
            .field("core", &self.inner.core)
            .field("nr_pending", &self.nr_pending())
            .finish()
    }
}

impl Srcu {
    /// `init_srcu_struct`. Spawns no thread until the first `call_srcu`.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                core: SrcuCore::new(),
                synchronizing: std::sync::atomic::AtomicUsize::new(0),
                cbs: Mutex::new(Callbacks::default()),
                work: Condvar::new(),
                done: Condvar::new(),
            }),
        }
    }

    /// `srcu_read_lock`: enters a read-side critical section, left when the
    /// guard drops. Cheap (two uncontended atomic RMWs and a fence), never
    /// blocks, may nest, and the holder may sleep.
    #[inline]
    pub fn read_lock(&self) -> SrcuReadGuard<'_> {
        let core = &self.inner.core;
        SrcuReadGuard {
            core,
            idx: core.read_lock(),
        }
    }

    /// `synchronize_srcu`: waits until every read-side critical section that
    /// began before the call has ended. Must not be called while holding a
    /// guard of the same domain (it would wait for itself).
    pub fn synchronize(&self) {
        self.inner.synchronize();
    }

    /// How many times a grace period found readers and waited for them.
    pub fn nr_reader_waits(&self) -> usize {
        self.inner.core.nr_reader_waits()
    }

    /// Threads waiting in `synchronize_srcu` now (the callback worker
    /// included): a grace period is waiting for readers.
    pub fn nr_synchronizing(&self) -> usize {
        self.inner
            .synchronizing
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `call_srcu`: runs `f` on this domain's worker thread after a grace
    /// period that begins after this call, i.e. once every reader that could
    /// still see what the caller unpublished has left. Never runs `f` on the
    /// caller's thread and never waits for a grace period (the first call
    /// spawns the worker). Callbacks run in the order they were queued.
    pub fn call_srcu(&self, f: Box<dyn FnOnce() + Send + 'static>) {
        let mut cbs = self.inner.cbs.lock();
        debug_assert!(!cbs.shutdown);
        cbs.queue.push_back(f);
        cbs.queued += 1;
        if cbs.worker.is_none() {
            let inner = Arc::clone(&self.inner);
            let handle = thread::Builder::new()
                .name("srcu-cb".into())
                .spawn(move || inner.worker())
                .expect("call_srcu: cannot spawn the SRCU callback thread");
            cbs.worker_id = Some(handle.thread().id());
            cbs.worker = Some(handle);
        } else {
            self.inner.work.notify_one();
        }
    }

    /// `srcu_barrier`: waits until every callback queued by `call_srcu`
    /// before this call has run.
    ///
    /// # Panics
    ///
    /// If called from a callback of this domain (it would wait for itself).
    pub fn barrier(&self) {
        let mut cbs = self.inner.cbs.lock();
        assert!(
            cbs.worker_id != Some(thread::current().id()),
            "srcu_barrier called from an SRCU callback of the same domain"
        );
        let target = cbs.queued;
        while cbs.invoked < target {
            self.inner.done.wait(&mut cbs);
        }
    }

    /// Callbacks queued but not yet run.
    pub fn nr_pending(&self) -> usize {
        let cbs = self.inner.cbs.lock();
        usize::try_from(cbs.queued - cbs.invoked).unwrap_or(usize::MAX)
    }
}

impl Inner {
    fn synchronize(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.synchronizing.fetch_add(1, SeqCst);
        self.core.synchronize();
        self.synchronizing.fetch_sub(1, SeqCst);
    }

    /// The callback thread (Linux's `srcu_invoke_callbacks` work item, with
    /// the grace period driven inline instead of by a state machine).
    fn worker(&self) {
        let mut cbs = self.cbs.lock();
        loop {
            if cbs.queue.is_empty() {
                if cbs.shutdown {
                    return;
                }
                self.work.wait(&mut cbs);
                continue;
            }
            let batch = std::mem::take(&mut cbs.queue);
            let n = batch.len() as u64;
            MutexGuard::unlocked(&mut cbs, || {
                // Every callback in `batch` was queued before we took it, so
                // this grace period began after each call_srcu returned.
                self.synchronize();
                for f in batch {
                    Self::invoke(f);
                }
            });
            cbs.invoked += n;
            self.done.notify_all();
        }
    }

    /// Runs one callback. A panic is reported and swallowed: it must not
    /// kill the worker, or every later `srcu_barrier` would hang.
    fn invoke(f: Callback) {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(f)) {
            let msg = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("<non-string panic payload>");
            tracing::error!("SRCU callback panicked: {msg}");
        }
    }
}

impl Drop for Srcu {
    /// `cleanup_srcu_struct`, preceded by the `srcu_barrier` Linux requires
    /// of its callers: pending callbacks still run, after a grace period.
    fn drop(&mut self) {
        let worker = {
            let mut cbs = self.inner.cbs.lock();
            cbs.shutdown = true;
            self.inner.work.notify_one();
            cbs.worker.take()
        };
        if let Some(handle) = worker {
            // A callback may own the last reference to its own domain; the
            // worker then exits by itself once its queue is empty.
            if handle.thread().id() == thread::current().id() {
                return;
            }
            if let Err(payload) = handle.join() {
                panic::resume_unwind(payload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Waits until a grace period has found readers and is waiting for
    /// them (`nr_reader_waits` past `before`), or `done` says it returned
    /// (the bug the caller looks for). Event-driven; a minute of neither is
    /// a hang.
    fn until_waiting_or(srcu: &Srcu, before: usize, done: impl Fn() -> bool) {
        let t = Instant::now();
        while srcu.nr_reader_waits() <= before && !done() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "neither waited nor done"
            );
            thread::yield_now();
        }
    }

    /// Starts a grace period with `start` while `srcu` has a reader, and
    /// returns `start`'s result once the grace period waits for readers (or
    /// `done` says it ended).
    fn start_under_reader<R>(srcu: &Srcu, start: impl FnOnce() -> R, done: impl Fn() -> bool) -> R {
        let before = srcu.nr_reader_waits();
        let started = start();
        until_waiting_or(srcu, before, done);
        started
    }

    /// Runs `f` while another thread holds a read lock of `srcu`; the
    /// reader leaves when `f` returns, or panics: a failure then fails
    /// instead of leaving the scope waiting for a parked thread.
    fn with_reader_on_other_thread<R>(srcu: &Srcu, f: impl FnOnce() -> R) -> R {
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            s.spawn(move || {
                let _guard = srcu.read_lock();
                locked_tx.send(()).unwrap();
                // Ends when `release_tx` is dropped.
                release_rx.recv().unwrap_err();
            });
            locked_rx.recv().unwrap();
            let result = f();
            drop(release_tx);
            result
        })
    }

    /// The writer of the grace-period tests: `synchronize`, then `done`.
    fn synchronize_and_set(srcu: &Srcu, done: &AtomicBool) {
        srcu.synchronize();
        done.store(true, Ordering::SeqCst);
    }

    const fn assert_send_sync<T: Send + Sync>() {}
    const _: () = assert_send_sync::<Srcu>();
    const _: () = assert_send_sync::<SrcuReadGuard<'static>>();

    #[test]
    fn synchronize_waits_for_preexisting_reader() {
        let srcu = Srcu::new();
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            let (writer, early) = with_reader_on_other_thread(&srcu, || {
                let writer = start_under_reader(
                    &srcu,
                    || s.spawn(|| synchronize_and_set(&srcu, &done)),
                    || done.load(Ordering::SeqCst),
                );
                (writer, done.load(Ordering::SeqCst))
            });
            writer.join().unwrap();
            assert!(!early, "synchronize returned under a reader");
            assert!(done.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn synchronize_does_not_wait_for_later_readers() {
        // Hand-over-hand readers on one thread: some reader is always inside
        // a critical section, so a grace period that waited for "no readers
        // at all" would never end. Each synchronize() must still return.
        let srcu = Srcu::new();
        let stop = AtomicBool::new(false);
        let reads = AtomicU64::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                let mut held = srcu.read_lock();
                while !stop.load(Ordering::Relaxed) {
                    let next = srcu.read_lock();
                    drop(std::mem::replace(&mut held, next));
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
            while reads.load(Ordering::Relaxed) == 0 {
                thread::yield_now();
            }
            let start = Instant::now();
            for _ in 0..100 {
                srcu.synchronize();
            }
            let took = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            assert!(
                took < Duration::from_secs(10),
                "100 grace periods took {took:?}"
            );
        });
    }

    #[test]
    fn nested_read_locks() {
        let srcu = Srcu::new();
        // Deep nesting on one thread, released out of order.
        let mut guards: Vec<_> = (0..1000).map(|_| srcu.read_lock()).collect();
        assert!(guards.iter().all(|g| g.idx() < 2));
        guards.reverse();
        let tail = guards.split_off(500);
        drop(guards);
        drop(tail);
        srcu.synchronize();

        // A grace period that starts inside the outer section waits for the
        // outer one, including while an inner section is open.
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            let outer = srcu.read_lock();
            let writer = start_under_reader(
                &srcu,
                || s.spawn(|| synchronize_and_set(&srcu, &done)),
                || done.load(Ordering::SeqCst),
            );
            let inner = srcu.read_lock();
            drop(inner);
            let early = done.load(Ordering::SeqCst);
            drop(outer);
            writer.join().unwrap();
            assert!(!early, "synchronize returned under the outer reader");
        });
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn call_srcu_runs_after_grace_period_on_worker() {
        let srcu = Srcu::new();
        let ran_on = Arc::new(Mutex::new(None));
        let guard = srcu.read_lock();
        let r = Arc::clone(&ran_on);
        // call_srcu does not block on the reader we hold; the worker's grace
        // period waits for it.
        start_under_reader(
            &srcu,
            || {
                srcu.call_srcu(Box::new(move || {
                    *r.lock() = Some(thread::current().id());
                }))
            },
            || ran_on.lock().is_some(),
        );
        assert!(ran_on.lock().is_none(), "callback ran under a reader");
        assert_eq!(srcu.nr_pending(), 1);
        drop(guard);
        srcu.barrier();
        assert_eq!(srcu.nr_pending(), 0);
        let id = ran_on.lock().expect("callback did not run");
        assert_ne!(id, thread::current().id());
    }

    #[test]
    fn call_srcu_waits_for_reader_on_other_thread() {
        let srcu = Srcu::new();
        let ran = Arc::new(AtomicBool::new(false));
        let early = with_reader_on_other_thread(&srcu, || {
            let r = Arc::clone(&ran);
            start_under_reader(
                &srcu,
                || srcu.call_srcu(Box::new(move || r.store(true, Ordering::SeqCst))),
                || ran.load(Ordering::SeqCst),
            );
            ran.load(Ordering::SeqCst)
        });
        assert!(!early, "callback ran under a reader");
        srcu.barrier();
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn barrier_waits_for_all_queued_callbacks() {
        let srcu = Srcu::new();
        srcu.barrier(); // no callbacks, no worker: returns at once
        let count = Arc::new(AtomicUsize::new(0));
        for i in 0..100 {
            let c = Arc::clone(&count);
            srcu.call_srcu(Box::new(move || {
                if i % 25 == 0 {
                    thread::sleep(Duration::from_millis(5));
                }
                c.fetch_add(1, Ordering::SeqCst);
            }));
        }
        srcu.barrier();
        assert_eq!(count.load(Ordering::SeqCst), 100);
        assert_eq!(srcu.nr_pending(), 0);
    }

    #[test]
    fn callbacks_run_in_order_and_may_requeue() {
        let srcu = Arc::new(Srcu::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..10 {
            let (l, s) = (Arc::clone(&log), Arc::clone(&srcu));
            srcu.call_srcu(Box::new(move || {
                l.lock().push(i);
                if i == 9 {
                    let l = Arc::clone(&l);
                    s.call_srcu(Box::new(move || l.lock().push(10)));
                }
            }));
        }
        srcu.barrier(); // covers 0..=9; 10 was queued after the call
        srcu.barrier();
        assert_eq!(*log.lock(), (0..=10).collect::<Vec<_>>());
    }

    #[test]
    fn panicking_callback_does_not_kill_worker() {
        let srcu = Srcu::new();
        srcu.call_srcu(Box::new(|| panic!("callback panic (expected by test)")));
        let ran = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&ran);
        srcu.call_srcu(Box::new(move || r.store(true, Ordering::SeqCst)));
        srcu.barrier();
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn drop_runs_pending_callbacks() {
        let ran = Arc::new(AtomicBool::new(false));
        {
            let srcu = Srcu::new();
            let r = Arc::clone(&ran);
            srcu.call_srcu(Box::new(move || {
                thread::sleep(Duration::from_millis(20));
                r.store(true, Ordering::SeqCst);
            }));
        }
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn drop_from_own_callback() {
        // The last reference to the domain dies inside one of its callbacks,
        // on the worker thread: Drop must neither join itself nor hang.
        let srcu = Arc::new(Srcu::new());
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&srcu);
        srcu.call_srcu(Box::new(move || {
            drop(s);
            tx.send(()).unwrap();
        }));
        drop(srcu);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("callback did not run");
    }

    /// Objects readers reach through `current`: slot `i` holds generation
    /// `gen`; `live` is cleared when the updater retires it.
    struct Slot {
        generation: AtomicU64,
        live: AtomicBool,
    }

    #[test]
    fn stress_readers_never_see_retired_object() {
        // Readers check that the slot they reached stays live and unchanged
        // for their whole critical section; one updater republishes and
        // retires after synchronize(), another through call_srcu(); a third
        // thread runs bare grace periods concurrently with both.
        const SLOTS: usize = 4;
        const RUN: Duration = Duration::from_millis(200);
        let srcu = Srcu::new();
        let sets: [Vec<Slot>; 2] = std::array::from_fn(|_| {
            (0..SLOTS)
                .map(|i| Slot {
                    generation: AtomicU64::new(i as u64),
                    live: AtomicBool::new(i == 0),
                })
                .collect()
        });
        let sets = Arc::new(sets);
        let current = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let stop = AtomicBool::new(false);
        let reads = AtomicU64::new(0);
        let updates = [AtomicU64::new(0), AtomicU64::new(0)];
        thread::scope(|s| {
            for t in 0..3 {
                let (sets, current) = (&sets, &current);
                let (srcu, stop, reads) = (&srcu, &stop, &reads);
                s.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _guard = srcu.read_lock();
                        for set in 0..2 {
                            let i = current[set].load(Ordering::Acquire);
                            let slot = &sets[set][i];
                            let generation = slot.generation.load(Ordering::Relaxed);
                            assert!(slot.live.load(Ordering::Relaxed), "reached a retired slot");
                            if (n + t).is_multiple_of(64) {
                                thread::yield_now();
                            }
                            assert!(
                                slot.live.load(Ordering::Relaxed),
                                "slot retired under reader"
                            );
                            assert_eq!(slot.generation.load(Ordering::Relaxed), generation);
                        }
                        n += 1;
                    }
                    reads.fetch_add(n, Ordering::Relaxed);
                });
            }
            // Updater 0: publish, synchronize_srcu, retire.
            s.spawn(|| {
                let set = &sets[0];
                while !stop.load(Ordering::Relaxed) {
                    let old = current[0].load(Ordering::Relaxed);
                    let new = (old + 1) % SLOTS;
                    set[new]
                        .generation
                        .fetch_add(SLOTS as u64, Ordering::Relaxed);
                    set[new].live.store(true, Ordering::Relaxed);
                    current[0].store(new, Ordering::Release);
                    srcu.synchronize();
                    set[old].live.store(false, Ordering::Relaxed);
                    updates[0].fetch_add(1, Ordering::Relaxed);
                }
            });
            // Updater 1: publish, retire from call_srcu; a slot is reused
            // only once its retirement has run.
            s.spawn(|| {
                let retired = Arc::new([const { AtomicBool::new(true) }; SLOTS]);
                retired[0].store(false, Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    let old = current[1].load(Ordering::Relaxed);
                    let new = (old + 1) % SLOTS;
                    if !retired[new].load(Ordering::Acquire) {
                        srcu.barrier();
                        continue;
                    }
                    retired[new].store(false, Ordering::Relaxed);
                    let slot = &sets[1][new];
                    slot.generation.fetch_add(SLOTS as u64, Ordering::Relaxed);
                    slot.live.store(true, Ordering::Relaxed);
                    current[1].store(new, Ordering::Release);
                    let (sets, retired) = (Arc::clone(&sets), Arc::clone(&retired));
                    srcu.call_srcu(Box::new(move || {
                        sets[1][old].live.store(false, Ordering::Relaxed);
                        retired[old].store(true, Ordering::Release);
                    }));
                    updates[1].fetch_add(1, Ordering::Relaxed);
                }
            });
            // Bare grace periods racing with updater 0's (the shortcut path).
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    srcu.synchronize();
                }
            });
            thread::sleep(RUN);
            stop.store(true, Ordering::Relaxed);
        });
        srcu.barrier();
        assert!(reads.load(Ordering::Relaxed) > 0);
        assert!(updates[0].load(Ordering::Relaxed) > 0);
        assert!(updates[1].load(Ordering::Relaxed) > 0);
    }
}
