//! The grace-period engine of SRCU (sleepable RCU): Linux's classic
//! two-counter SRCU (`srcu_read_lock`, `srcu_read_unlock`,
//! `synchronize_srcu`), without callbacks. [`super::srcu::Srcu`] builds the
//! RAII guard, `call_srcu` and `srcu_barrier` on top of it.
//!
//! This file uses nothing but `core` and `crate::sync`: `tests/loom_srcu.rs`
//! compiles this very file against a `sync` module backed by `loom`, so the
//! model checker explores the code the library runs.
//!
//! # Algorithm
//!
//! As in Linux 3.3–4.x SRCU (Lai Jiangshan's `wait_idx`/`srcu_flip` scheme),
//! there are two reader counters and an index, `completed & 1`, naming the
//! current one. A reader increments the current counter on entry and
//! decrements the same counter on exit. `synchronize_srcu` waits for the
//! non-current counter to drain, flips the index, then waits for the
//! previously current counter to drain.
//!
//! Where Linux keeps per-CPU counters (4.19 even splits them into lock and
//! unlock counts so that summing them is safe), there is one global atomic
//! counter per index here, cache-padded: a single load reads it exactly, so no
//! summing or recheck is needed, at the cost of the readers of one domain
//! sharing a cache line.
//!
//! # Why two waits (the straggler)
//!
//! A reader may load the index, be preempted, and increment the counter only
//! after a writer has flipped the index and found that counter empty. With a
//! single "flip, wait for the old counter" (pre-3.3 SRCU without
//! `synchronize_sched()`), the *next* grace period would flip back and wait
//! only on the other counter, returning while that straggler is still inside
//! its critical section, possibly holding a pointer that grace period was
//! meant to retire. Waiting for the non-current counter first catches it.
//! `tests/loom_srcu.rs` shows the single-wait variant failing in exactly this
//! way.
//!
//! # Memory ordering
//!
//! The guarantee: for every reader R and every `synchronize()` call W, either
//! W returns only after R's `read_unlock` (and everything R did in its
//! critical section happens-before W's return), or every load R makes after
//! `read_lock` returns sees every store W's caller made before the call.
//!
//! Reader:  `inc(c[i])` ; fence **B** ; critical section ; `dec(c[i])` (Release)
//! Writer:  caller's updates ; fence **A** ; `load(c[j])` (Acquire) until 0
//!
//! The two SeqCst fences are totally ordered. If B precedes A, A's counter
//! loads see R's increment (or a later value), so W waits until it reads a
//! value mo-after R's decrement; the decrement heads a release sequence (every
//! later change to the counter is an RMW), so R's critical section
//! happens-before W's return. If A precedes B, R's loads after B see the
//! caller's updates. This is the store-buffering pattern: without *both*
//! fences each side could miss the other. A fence precedes each of the two
//! waits, and W waits on both counters, so this holds whichever index R
//! picked: the index only decides progress (new readers go to the counter W
//! is not waiting on), never safety, and is loaded Relaxed.
//!
//! Loom models `fence(SeqCst)` but treats SeqCst *accesses* as AcqRel, which
//! is one more reason the argument above uses fences and weaker accesses.

use crate::sync::{AtomicUsize, Mutex, Ordering, fence, spin_wait};

/// Keeps a hot atomic on its own cache line (128 bytes: x86's adjacent-line
/// prefetcher pairs lines).
#[repr(align(128))]
struct CachePadded<T>(T);

/// An SRCU domain without callbacks (Linux `struct srcu_struct`).
pub struct SrcuCore {
    /// Readers inside a critical section, per index (`srcu_lock_count[]`
    /// minus `srcu_unlock_count[]` in Linux). Written by every reader.
    counts: [CachePadded<AtomicUsize>; 2],
    /// Number of index flips (`sp->completed`); `completed & 1` is the index
    /// new readers use. Written only under `gp_lock`, read by every reader.
    completed: CachePadded<AtomicUsize>,
    /// Serializes grace periods (`sp->mutex`).
    gp_lock: Mutex<()>,
    /// Times a grace period found readers and had to wait for them (an
    /// event tests wait for; never read by the algorithm).
    reader_waits: AtomicUsize,
}

impl Default for SrcuCore {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for SrcuCore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SrcuCore")
            .field("completed", &self.completed.0.load(Ordering::Relaxed))
            .field("readers", &[self.readers(0), self.readers(1)])
            .finish()
    }
}

impl SrcuCore {
    /// `init_srcu_struct`.
    pub fn new() -> Self {
        Self {
            counts: [
                CachePadded(AtomicUsize::new(0)),
                CachePadded(AtomicUsize::new(0)),
            ],
            completed: CachePadded(AtomicUsize::new(0)),
            gp_lock: Mutex::new(()),
            reader_waits: AtomicUsize::new(0),
        }
    }

    /// `srcu_read_lock`: enters a read-side critical section and returns the
    /// index to hand to [`read_unlock`](Self::read_unlock). Never blocks;
    /// sections may nest and may sleep.
    #[inline]
    pub fn read_lock(&self) -> usize {
        // READ_ONCE(sp->completed) & 1. Relaxed: a stale index is the
        // straggler case, which synchronize() handles by waiting on both
        // counters; the index only steers new readers away from the counter
        // a grace period is draining.
        let idx = self.completed.0.load(Ordering::Relaxed) & 1;
        self.counts[idx].0.fetch_add(1, Ordering::Relaxed);
        // smp_mb() B, pairs with A in wait_idx(): either the writer's counter
        // load sees this increment, or our critical section sees the
        // writer's updates. Keeps critical-section loads from being hoisted
        // above the increment.
        fence(Ordering::SeqCst);
        idx
    }

    /// `srcu_read_unlock`: leaves the critical section entered by the
    /// [`read_lock`](Self::read_lock) that returned `idx`.
    #[inline]
    pub fn read_unlock(&self, idx: usize) {
        debug_assert!(idx < 2, "srcu_read_unlock: bad index {idx}");
        // smp_mb() C in Linux; Release suffices: the writer's Acquire load
        // that finds the counter at zero reads from this decrement's release
        // sequence, so the whole critical section (its loads included)
        // happens-before the end of the grace period.
        let prev = self.counts[idx].0.fetch_sub(1, Ordering::Release);
        debug_assert!(prev != 0, "srcu_read_unlock without srcu_read_lock");
    }

    /// `synchronize_srcu`: returns once every reader that entered its
    /// critical section before the call has left it. Readers that enter
    /// after the call began are not waited for, so a stream of new readers
    /// cannot starve it. Sleeps (spins, then yields, then sleeps); must not
    /// be called inside a read-side critical section of the same domain.
    /// Concurrent callers are serialized, and a caller that finds two index
    /// flips completed while it waited for the lock returns at once.
    pub fn synchronize(&self) {
        // smp_mb() at the start of the grace period: orders the caller's
        // updates before the snapshot below. Needed for the shortcut: if we
        // read `snap`, the flip to snap + 1 is followed by a SeqCst fence
        // (wait_idx) that comes after this one in the fence order, and so
        // does every fence of the grace period that flips to snap + 2.
        fence(Ordering::SeqCst);
        let snap = self.completed.0.load(Ordering::Relaxed);
        let _gp = self.gp_lock.lock().unwrap_or_else(|e| e.into_inner());
        let completed = self.completed.0.load(Ordering::Relaxed);
        // As in the old synchronize_srcu(): two flips, not one. The flip to
        // snap + 1 may belong to a grace period whose first wait ran before
        // our call; the one that flipped to snap + 2 took `gp_lock` after
        // that flip, so it ran entirely after our call, and our lock
        // acquisition happens after its waits saw the counters at zero.
        if completed.wrapping_sub(snap) >= 2 {
            return;
        }
        let idx = completed & 1;
        // Readers on the non-current counter are stragglers that loaded the
        // index before the previous flip; drain them first (see module doc).
        self.wait_idx(idx ^ 1);
        // srcu_flip(): new readers now go to idx ^ 1. Relaxed: safety does
        // not depend on which counter a reader picks, and the flip reaches
        // later grace periods through `gp_lock`.
        self.completed
            .0
            .store(completed.wrapping_add(1), Ordering::Relaxed);
        self.wait_idx(idx);
    }

    /// `wait_idx`: waits until counter `idx` reads zero.
    fn wait_idx(&self, idx: usize) {
        // smp_mb() A, pairs with B in read_lock(); see the module doc.
        fence(Ordering::SeqCst);
        let mut iteration = 0u32;
        // Acquire: pairs with the Release decrement in read_unlock().
        while self.counts[idx].0.load(Ordering::Acquire) != 0 {
            if iteration == 0 {
                self.reader_waits.fetch_add(1, Ordering::Relaxed);
            }
            spin_wait(iteration);
            iteration = iteration.saturating_add(1);
        }
    }

    /// How many times a grace period has found readers and waited for them.
    pub fn nr_reader_waits(&self) -> usize {
        self.reader_waits.load(Ordering::Relaxed)
    }

    /// Readers currently counted on index `idx` (a racy snapshot, for
    /// diagnostics).
    fn readers(&self, idx: usize) -> usize {
        self.counts[idx].0.load(Ordering::Relaxed)
    }
}
