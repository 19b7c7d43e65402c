//! Loom model of the SRCU core (`src/notifier/srcu_core.rs`).
//!
//! The real core is compiled here against a `sync` module of the same shape
//! as `src/sync.rs` but backed by loom, so loom explores the thread
//! interleavings and weak-memory outcomes of the code the library runs.
//!
//! Every model has the shape of an RCU update: a writer publishes a new
//! "pointer" (an index into a set of objects), waits for a grace period, then
//! frees the old object; readers use, inside their critical section, the
//! object they reached. Only the SRCU core orders the two: the freed flags
//! are Relaxed, and each object's storage is a loom `UnsafeCell`, so a
//! reader's use that does not happen-before the free is a reported race.
//!
//! Two deliberately broken cores at the end show that the models catch the
//! bugs the real core's double wait and reader fence exist for. Mutating the
//! real core (dropping either wait, the reader fence, the fence that opens
//! `synchronize`, the Release/Acquire pair on the counters, or weakening the
//! two-flip shortcut to one flip) makes at least one model below fail.

use loom::cell::UnsafeCell;
use loom::model::Builder;
use loom::sync::Arc;
use loom::thread;

/// `crate::sync` for the core, backed by loom.
mod sync {
    #![allow(unused_imports)]
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
    pub use loom::sync::{Condvar, Mutex};

    /// Loom requires every wait loop to yield so it can schedule the thread
    /// being waited for.
    pub fn spin_wait(_iteration: u32) {
        loom::thread::yield_now();
    }
}

#[path = "common/must_fail.rs"]
mod must_fail;

// The diagnostics accessors of the core are not used by the models.
#[allow(dead_code)]
#[path = "../src/notifier/srcu_core.rs"]
mod srcu_core;

use srcu_core::SrcuCore;
use sync::{AtomicBool, AtomicUsize, Ordering};

/// The two operations a model needs from an SRCU implementation, so the
/// same scenarios run against the real core and the broken ones.
trait Domain: Send + Sync + 'static {
    fn new() -> Self;
    fn read_lock(&self) -> usize;
    fn read_unlock(&self, idx: usize);
    fn synchronize(&self);
}

impl Domain for SrcuCore {
    fn new() -> Self {
        SrcuCore::new()
    }
    fn read_lock(&self) -> usize {
        SrcuCore::read_lock(self)
    }
    fn read_unlock(&self, idx: usize) {
        SrcuCore::read_unlock(self, idx)
    }
    fn synchronize(&self) {
        SrcuCore::synchronize(self)
    }
}

/// An RCU-managed object. `memory` stands for its storage: readers read it,
/// and freeing writes it, so loom reports a data race ("Causality
/// violation") if a reader's access does not happen-before the free.
/// `freed` catches the other failure: a reader reaching an object freed
/// before it looked.
struct Object {
    freed: AtomicBool,
    memory: UnsafeCell<u32>,
}

/// One RCU-protected pointer: `ptr` indexes `objects`.
struct Protected {
    ptr: AtomicUsize,
    objects: [Object; 3],
}

impl Protected {
    fn new() -> Self {
        Self {
            ptr: AtomicUsize::new(0),
            objects: std::array::from_fn(|_| Object {
                freed: AtomicBool::new(false),
                memory: UnsafeCell::new(0),
            }),
        }
    }

    /// Reader side: dereference the pointer and use the object.
    fn read(&self) {
        let p = self.ptr.load(Ordering::Acquire);
        let object = &self.objects[p];
        assert!(
            !object.freed.load(Ordering::Relaxed),
            "object {p} freed while a reader holds it"
        );
        object.memory.with(|_| ());
    }

    /// Update side: publish `new`, wait for a grace period, free the old
    /// object.
    fn replace<D: Domain>(&self, srcu: &D, new: usize) {
        let old = self.ptr.swap(new, Ordering::AcqRel);
        srcu.synchronize();
        let object = &self.objects[old];
        object.freed.store(true, Ordering::Relaxed);
        object.memory.with_mut(|_| ());
    }
}

struct Shared<D> {
    srcu: D,
    a: Protected,
    b: Protected,
}

fn shared<D: Domain>() -> Arc<Shared<D>> {
    Arc::new(Shared {
        srcu: D::new(),
        a: Protected::new(),
        b: Protected::new(),
    })
}

fn reader<D: Domain>(s: &Shared<D>) {
    let idx = s.srcu.read_lock();
    s.a.read();
    s.srcu.read_unlock(idx);
}

/// Runs `f` on a new thread with its own reference to `s`.
fn spawn<D: Domain>(
    s: &Arc<Shared<D>>,
    f: impl FnOnce(&Shared<D>) + Send + 'static,
) -> thread::JoinHandle<()> {
    let s = s.clone();
    thread::spawn(move || f(&s))
}

/// `None` explores every interleaving; small models afford it.
fn builder(preemption_bound: Option<usize>) -> Builder {
    let mut b = Builder::new();
    b.preemption_bound = preemption_bound;
    b
}

/// One reader against updates of `a` to each of `new` in turn.
fn reader_vs_updates<D: Domain>(preemption_bound: Option<usize>, new: &'static [usize]) {
    builder(preemption_bound).check(move || {
        let s = shared::<D>();
        let r = spawn(&s, reader);
        for &n in new {
            s.a.replace(&s.srcu, n);
        }
        r.join().unwrap();
    });
}

/// (a) One reader, one update: the reader never sees its object freed.
fn grace_period<D: Domain>(preemption_bound: Option<usize>) {
    reader_vs_updates::<D>(preemption_bound, &[1]);
}

/// (d) The straggler: two updates in a row while one reader may load the
/// index before the first flip and increment its counter after it. The
/// second grace period must still wait for that reader.
fn straggler<D: Domain>(preemption_bound: Option<usize>) {
    reader_vs_updates::<D>(preemption_bound, &[1, 2]);
}

#[test]
fn grace_period_one_reader() {
    grace_period::<SrcuCore>(None);
}

/// (b) Two readers and one update; one reader nests a second critical
/// section inside its first.
#[test]
fn grace_period_two_readers() {
    builder(Some(3)).check(|| {
        let s = shared::<SrcuCore>();
        let r1 = spawn(&s, reader);
        let r2 = spawn(&s, |s| {
            let outer = s.srcu.read_lock();
            let inner = s.srcu.read_lock();
            s.a.read();
            s.srcu.read_unlock(inner);
            s.a.read();
            s.srcu.read_unlock(outer);
        });
        s.a.replace(&s.srcu, 1);
        r1.join().unwrap();
        r2.join().unwrap();
    });
}

/// (c) Two updaters whose grace periods run concurrently (serialized on the
/// core's mutex) and one reader of both pointers. Updater A runs two grace
/// periods, so updater B can take the "two flips already happened" shortcut.
#[test]
fn concurrent_synchronize() {
    builder(Some(4)).check(|| {
        let s = shared::<SrcuCore>();
        let r = spawn(&s, |s| {
            let idx = s.srcu.read_lock();
            s.a.read();
            s.b.read();
            s.srcu.read_unlock(idx);
        });
        let updater_b = spawn(&s, |s| s.b.replace(&s.srcu, 1));
        s.a.replace(&s.srcu, 1);
        s.srcu.synchronize();
        updater_b.join().unwrap();
        r.join().unwrap();
    });
}

#[test]
fn straggler_spans_index_flip() {
    straggler::<SrcuCore>(None);
}

/// Broken SRCU cores: the real reader and wait loop with one ingredient
/// removed each.
mod broken {
    use super::Domain;
    use super::sync::{AtomicUsize, Ordering, fence};

    pub struct Core<const DOUBLE_WAIT: bool, const READER_FENCE: bool> {
        counts: [AtomicUsize; 2],
        completed: AtomicUsize,
    }

    /// Pre-3.3 "flip, wait for the old counter" without the straggler wait.
    pub type SingleWait = Core<false, true>;
    /// Both waits, but no smp_mb() B after the reader's increment.
    pub type NoReaderFence = Core<true, false>;

    impl<const DW: bool, const RF: bool> Core<DW, RF> {
        fn wait_idx(&self, idx: usize) {
            fence(Ordering::SeqCst);
            while self.counts[idx].load(Ordering::Acquire) != 0 {
                loom::thread::yield_now();
            }
        }
    }

    impl<const DW: bool, const RF: bool> Domain for Core<DW, RF> {
        fn new() -> Self {
            Self {
                counts: [AtomicUsize::new(0), AtomicUsize::new(0)],
                completed: AtomicUsize::new(0),
            }
        }
        fn read_lock(&self) -> usize {
            let idx = self.completed.load(Ordering::Relaxed) & 1;
            self.counts[idx].fetch_add(1, Ordering::Relaxed);
            if RF {
                fence(Ordering::SeqCst);
            }
            idx
        }
        fn read_unlock(&self, idx: usize) {
            self.counts[idx].fetch_sub(1, Ordering::Release);
        }
        // Single updater thread in these models: no mutex needed.
        fn synchronize(&self) {
            fence(Ordering::SeqCst);
            let completed = self.completed.load(Ordering::Relaxed);
            let idx = completed & 1;
            if DW {
                self.wait_idx(idx ^ 1);
            }
            self.completed.store(completed + 1, Ordering::Relaxed);
            self.wait_idx(idx);
        }
    }
}

/// Runs a model that must fail, and checks that it failed the way an SRCU
/// bug fails: a reader saw a freed object, or loom found a reader's access
/// racing with the free.
fn assert_model_fails(model: fn()) {
    must_fail::assert_fails_with(
        model,
        &["freed while a reader holds it", "Causality violation"],
    );
}

#[test]
fn broken_single_wait_fails_straggler() {
    assert_model_fails(|| straggler::<broken::SingleWait>(None));
}

#[test]
fn broken_no_reader_fence_fails() {
    assert_model_fails(|| grace_period::<broken::NoReaderFence>(None));
}

/// The single-wait core is fine with one grace period: the straggler only
/// bites the *next* one, which is why model (d) runs two.
#[test]
fn broken_single_wait_passes_one_grace_period() {
    grace_period::<broken::SingleWait>(None);
}
