//! The per-mm notifier list and its SRCU-protected dispatch.
//!
//! Mirrors `struct mmu_notifier_mm` and the `__mmu_notifier_*` functions of
//! `mm/mmu_notifier.c` (4.19). The list is published RCU-style: readers load
//! an immutable snapshot inside an SRCU read-side critical section; writers
//! (register / unregister / release) build a new snapshot under `lock`,
//! publish it, and retire the old one only after a grace period.
//!
//! The same mm carries the 5.5 interval tree ([`Itree`]); the dispatch
//! functions call it first, as `__mmu_notifier_invalidate_range_start`,
//! `__mmu_notifier_invalidate_range_end` and `__mmu_notifier_release` do.

use std::any::Any;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::NotifierError;
use super::interval::{Itree, MmuIntervalNotifier};
use super::interval_core::ItreeSnapshot;
use super::ops::{
    Callbacks, MmuIntervalNotifierOps, MmuNotifierOps, MmuNotifierRange, NotifierPte,
};
use super::srcu::Srcu;

/// One registered notifier: `struct mmu_notifier` minus the list linkage.
struct Registered {
    ops: Arc<dyn MmuNotifierOps>,
    callbacks: Callbacks,
    /// `!hlist_unhashed(&mn->hlist)`: still on the list.
    hashed: AtomicBool,
    /// `release` has been claimed. Linux can call `->release` twice when
    /// exit_mmap races unregister (both see the entry hashed); we claim it
    /// with one atomic swap so it runs exactly once.
    released: AtomicBool,
}

impl Registered {
    /// Runs `release` unless it already ran (or is running) elsewhere.
    fn release_once(&self) {
        if !self.released.swap(true, Ordering::AcqRel)
            && self.callbacks.contains(Callbacks::RELEASE)
        {
            self.ops.release();
        }
    }
}

type Snapshot = Vec<Arc<Registered>>;

/// `struct mmu_notifier_mm`: the notifiers registered on one mm.
///
/// Linux uses one global SRCU domain for every mm; each list here has its own
/// so that a notifier blocked on one mm never delays `synchronize` on another
/// (tests run many mms in parallel).
pub struct MmuNotifierMm {
    srcu: Srcu,
    /// `mmu_notifier_mm->lock`: serializes writers of `list`.
    lock: Mutex<()>,
    /// The current snapshot; never null. Old snapshots are freed by
    /// `call_srcu` once no reader can still hold them.
    list: AtomicPtr<Snapshot>,
    /// Length of the published snapshot, for the lock-free fast path.
    nr: AtomicUsize,
    /// The interval subscriptions (`itree`, `invalidate_seq`, `wq`,
    /// `deferred_list` of `struct mmu_notifier_subscriptions`).
    itree: Arc<Itree>,
}

// The snapshot pointer is only dereferenced under SRCU, and what it points to
// is `Send + Sync` (`Arc<Registered>` of `Send + Sync` ops).
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registered>();
};

impl Default for MmuNotifierMm {
    fn default() -> Self {
        Self::new()
    }
}

impl MmuNotifierMm {
    pub fn new() -> Self {
        Self {
            srcu: Srcu::new(),
            lock: Mutex::new(()),
            list: AtomicPtr::new(Box::into_raw(Box::default())),
            nr: AtomicUsize::new(0),
            itree: Arc::new(Itree::new()),
        }
    }

    /// `mm_has_notifiers`: the cheap test callers make before dispatching.
    /// True once an interval was ever inserted (`has_itree` is never
    /// cleared), as Linux's `mm->notifier_subscriptions` stays allocated.
    pub fn has_notifiers(&self) -> bool {
        self.nr.load(Ordering::Acquire) != 0 || self.itree.is_enabled()
    }

    /// `subscriptions->has_itree`: an interval was ever inserted.
    pub fn has_itree(&self) -> bool {
        self.itree.is_enabled()
    }

    /// `mmu_interval_notifier_insert_locked`: subscribes `ops` to
    /// `[start, start + length)`. The first insert on an mm turns the tree
    /// on (`__mmu_notifier_register(NULL, mm)`), which the caller must do
    /// holding every lock of the mm, as for `register_locked`: from then on
    /// `has_notifiers` is true. Later inserts need no mm lock; one made while
    /// an invalidation runs is deferred to its end, and its first
    /// `read_begin` waits for that end. `pin` keeps the mm alive until
    /// remove (`mmgrab`). `Overflow` for an empty or wrapping range.
    pub fn mmu_interval_notifier_insert_locked(
        &self,
        start: u64,
        length: u64,
        ops: Arc<dyn MmuIntervalNotifierOps>,
        pin: Arc<dyn Any + Send + Sync>,
    ) -> Result<MmuIntervalNotifier, NotifierError> {
        self.itree.insert(start, length, ops, pin)
    }

    /// The interval protocol's state (sequence, active ranges, tree size).
    pub fn interval_snapshot(&self) -> ItreeSnapshot {
        self.itree.snapshot()
    }

    /// The subscribed intervals overlapping `[start, end)`, as
    /// `(start, end)`, in address order.
    pub fn intervals_overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.itree.overlapping(start, end)
    }

    /// Number of registered (list) notifiers; intervals are counted by
    /// [`interval_snapshot`](Self::interval_snapshot).
    pub fn len(&self) -> usize {
        self.nr.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on each registered notifier inside one SRCU read-side
    /// critical section (`hlist_for_each_entry_rcu` under `srcu_read_lock`).
    /// `f` returns `false` to stop early.
    fn for_each(&self, mut f: impl FnMut(&Registered) -> bool) {
        let _guard = self.srcu.read_lock();
        let snap = self.list.load(Ordering::Acquire);
        // SAFETY: the snapshot was published with Release and is freed only
        // by a `call_srcu` callback queued after it was unpublished, which
        // waits for this read-side critical section to end.
        for reg in unsafe { &*snap }.iter() {
            if !f(reg) {
                break;
            }
        }
    }

    /// Replaces the published snapshot by `edit(old)`; the caller holds
    /// `lock`. The old snapshot is freed after a grace period.
    fn publish(&self, edit: impl FnOnce(&Snapshot) -> Snapshot) {
        let old = self.list.load(Ordering::Acquire);
        // SAFETY: writers are serialized by `lock`, so `old` is the current,
        // live snapshot and nobody else can retire it under us.
        let new = edit(unsafe { &*old });
        self.nr.store(new.len(), Ordering::Release);
        self.list
            .store(Box::into_raw(Box::new(new)), Ordering::Release);
        let old = SendPtr(old);
        self.srcu.call_srcu(Box::new(move || {
            let old = old;
            // SAFETY: `old` was unpublished before this callback was queued,
            // and call_srcu runs it after every reader that could have loaded
            // it has left its critical section; nothing else frees it.
            drop(unsafe { Box::from_raw(old.0) });
        }));
    }

    /// The body of `do_mmu_notifier_register` once the caller holds every
    /// lock of the mm (`mm_take_all_locks`). `pin` keeps the mm alive until
    /// unregister (`mmgrab`).
    pub fn register_locked(
        self: &Arc<Self>,
        ops: Arc<dyn MmuNotifierOps>,
        pin: Arc<dyn Any + Send + Sync>,
    ) -> MmuNotifier {
        let reg = Arc::new(Registered {
            callbacks: ops.callbacks(),
            ops,
            hashed: AtomicBool::new(true),
            released: AtomicBool::new(false),
        });
        {
            let _lock = self.lock.lock();
            // hlist_add_head: newest first, as Linux dispatches.
            self.publish(|old| {
                let mut v = Vec::with_capacity(old.len() + 1);
                v.push(reg.clone());
                v.extend(old.iter().cloned());
                v
            });
        }
        MmuNotifier {
            list: Some(self.clone()),
            reg,
            pin: Some(pin),
        }
    }

    /// Removes `reg` from the list if it is still there (`hlist_del_init_rcu`
    /// under `mmu_notifier_mm->lock`).
    fn unhash(&self, reg: &Arc<Registered>) {
        let _lock = self.lock.lock();
        if reg.hashed.swap(false, Ordering::AcqRel) {
            self.publish(|old| {
                old.iter()
                    .filter(|r| !Arc::ptr_eq(r, reg))
                    .cloned()
                    .collect()
            });
        }
    }

    /// `__mmu_notifier_release`: exit_mmap's call. Runs every notifier's
    /// `release` (once), empties the list, and returns only after any
    /// `release` started by a concurrent unregister has finished, so the
    /// caller may free the pages afterwards.
    pub fn release(&self) {
        let _slice = crate::trace::slice!(Release);
        // mn_itree_release, then mn_hlist_release.
        if self.itree.is_enabled() {
            self.itree.release();
        }
        {
            // SRCU here makes a concurrent unregister wait for ->release.
            let _guard = self.srcu.read_lock();
            let snap = self.list.load(Ordering::Acquire);
            // SAFETY: see `for_each`.
            for reg in unsafe { &*snap }.iter() {
                // If ->release runs before unregister it must be handled: it
                // is the only way for the secondary MMU to drop its sptes
                // before the pages are freed.
                reg.release_once();
            }
            // We arrived before unregister: it will only wait for ->release
            // and return.
            let _lock = self.lock.lock();
            let snap = self.list.load(Ordering::Acquire);
            // SAFETY: writers are serialized by `lock`.
            for reg in unsafe { &*snap }.iter() {
                reg.hashed.store(false, Ordering::Release);
            }
            self.publish(|_| Vec::new());
        }
        // Do not return to exit_mmap (which frees every page) until a
        // ->release invoked by unregister has returned.
        self.srcu.synchronize();
    }

    /// `__mmu_notifier_clear_flush_young`: young results are OR'ed.
    pub fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        crate::trace::in_slice!(crate::trace::Event::ClearFlushYoung { start, end }, {
            let mut young = false;
            self.for_each(|r| {
                if r.callbacks.contains(Callbacks::CLEAR_FLUSH_YOUNG) {
                    young |= r.ops.clear_flush_young(start, end);
                }
                true
            });
            young
        })
    }

    /// `__mmu_notifier_clear_young`: young results are OR'ed.
    pub fn clear_young(&self, start: u64, end: u64) -> bool {
        crate::trace::in_slice!(crate::trace::Event::ClearYoung { start, end }, {
            let mut young = false;
            self.for_each(|r| {
                if r.callbacks.contains(Callbacks::CLEAR_YOUNG) {
                    young |= r.ops.clear_young(start, end);
                }
                true
            });
            young
        })
    }

    /// `__mmu_notifier_test_young`: stops at the first young notifier.
    pub fn test_young(&self, address: u64) -> bool {
        crate::trace::in_slice!(crate::trace::Event::TestYoung { address }, {
            let mut young = false;
            self.for_each(|r| {
                if r.callbacks.contains(Callbacks::TEST_YOUNG) {
                    young = r.ops.test_young(address);
                }
                !young
            });
            young
        })
    }

    /// `__mmu_notifier_change_pte`.
    pub fn change_pte(&self, address: u64, pte: NotifierPte) {
        crate::trace::in_slice!(
            crate::trace::Event::ChangePte {
                address,
                frame: pte.frame,
                writable: pte.writable,
            },
            {
                self.for_each(|r| {
                    if r.callbacks.contains(Callbacks::CHANGE_PTE) {
                        r.ops.change_pte(address, pte);
                    }
                    true
                });
            }
        )
    }

    /// `__mmu_notifier_invalidate_range_start`: the interval tree first
    /// (`mn_itree_invalidate`), then the list. Every list notifier is called
    /// even after a failure, the intervals' included (the caller ends the
    /// range either way, and list notifiers balance start against end); the
    /// last failure is returned.
    pub fn invalidate_range_start(&self, range: &MmuNotifierRange) -> Result<(), NotifierError> {
        crate::trace::in_slice!(
            crate::trace::Event::InvalidateRangeStart {
                start: range.start,
                end: range.end,
                event: &range.event,
                blockable: range.blockable(),
            },
            {
                let mut ret = Ok(());
                if self.itree.is_enabled() {
                    ret = self.itree.invalidate(range);
                }
                if self.is_empty() {
                    return ret;
                }
                self.for_each(|r| {
                    if r.callbacks.contains(Callbacks::INVALIDATE_RANGE_START)
                        && let Err(e) = r.ops.invalidate_range_start(range)
                    {
                        tracing::info!(
                            ?e,
                            blockable = range.blockable(),
                            "invalidate_range_start callback failed"
                        );
                        ret = Err(e);
                    }
                    true
                });
                ret
            }
        )
    }

    /// `__mmu_notifier_invalidate_range_end`: the interval tree first
    /// (`mn_itree_inv_end`), then the list, where `invalidate_range` runs
    /// first unless `only_end` says the caller already called it under the
    /// page-table lock.
    pub fn invalidate_range_end(&self, range: &MmuNotifierRange, only_end: bool) {
        crate::trace::in_slice!(
            crate::trace::Event::InvalidateRangeEnd {
                start: range.start,
                end: range.end,
                event: &range.event,
            },
            {
                if self.itree.is_enabled() {
                    self.itree.inv_end();
                }
                if self.is_empty() {
                    return;
                }
                self.for_each(|r| {
                    if !only_end && r.callbacks.contains(Callbacks::INVALIDATE_RANGE) {
                        r.ops.invalidate_range(range.start, range.end);
                    }
                    if r.callbacks.contains(Callbacks::INVALIDATE_RANGE_END) {
                        r.ops.invalidate_range_end(range);
                    }
                    true
                });
            }
        )
    }

    /// `__mmu_notifier_invalidate_range`.
    pub fn invalidate_range(&self, start: u64, end: u64) {
        self.for_each(|r| {
            if r.callbacks.contains(Callbacks::INVALIDATE_RANGE) {
                r.ops.invalidate_range(start, end);
            }
            true
        });
    }

    /// `mm_has_blockable_invalidate_notifiers`: whether some notifier with an
    /// invalidate callback (or some interval) may sleep in it. Callers hold the mmap lock, which
    /// keeps the answer valid until they drop it.
    pub fn has_blockable_invalidate_notifiers(&self) -> bool {
        // An interval's invalidate may sleep in a blockable range.
        if self.itree.snapshot().nr_intervals != 0 {
            return true;
        }
        let mut ret = false;
        self.for_each(|r| {
            if r.callbacks.intersects(Callbacks::INVALIDATE) && !r.ops.invalidate_does_not_block() {
                ret = true;
            }
            !ret
        });
        ret
    }

    /// `mmu_notifier_call_srcu`: run `f` once every callback in flight now
    /// has returned. `f` must be quick and must not block.
    pub fn call_srcu(&self, f: Box<dyn FnOnce() + Send + 'static>) {
        self.srcu.call_srcu(f);
    }

    /// `mmu_notifier_synchronize`: wait for every callback queued with
    /// `call_srcu` (`srcu_barrier`).
    pub fn synchronize(&self) {
        self.srcu.barrier();
    }

    /// Threads waiting for a grace period of this list's SRCU domain (an
    /// unregister or an exit waiting for callbacks in flight).
    pub fn nr_synchronizing(&self) -> usize {
        self.srcu.nr_synchronizing()
    }

    /// `synchronize_srcu`: wait for every dispatch in flight to finish.
    pub fn synchronize_callbacks(&self) {
        self.srcu.synchronize();
    }
}

impl Drop for MmuNotifierMm {
    fn drop(&mut self) {
        // Retired snapshots queued on `srcu` are run by its own Drop (after
        // a grace period); calling barrier() here could run inside one of
        // those very callbacks, when it drops the last mm pin.
        let snap = self.list.swap(ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: `&mut self` means no reader and no writer is left, and the
        // current snapshot was never handed to call_srcu.
        drop(unsafe { Box::from_raw(snap) });
    }
}

/// A raw snapshot pointer moved into a `call_srcu` callback.
struct SendPtr(*mut Snapshot);
// SAFETY: the pointee is `Send + Sync` (see the assertion above) and ownership
// moves wholesale into the one callback that frees it.
unsafe impl Send for SendPtr {}

/// A registration: Linux's `struct mmu_notifier` as seen by its owner.
/// Dropping it unregisters (with `release` if it has not run yet).
#[must_use = "dropping the registration unregisters the notifier"]
pub struct MmuNotifier {
    list: Option<Arc<MmuNotifierMm>>,
    reg: Arc<Registered>,
    /// The `mmgrab` pin: keeps the mm alive until unregister.
    pin: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for MmuNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuNotifier")
            .field("hashed", &self.is_registered())
            .field("released", &self.reg.released.load(Ordering::Relaxed))
            .finish()
    }
}

impl MmuNotifier {
    /// Whether the notifier is still on the mm's list.
    pub fn is_registered(&self) -> bool {
        self.reg.hashed.load(Ordering::Acquire)
    }

    /// Whether `release` has run (from exit or unregister).
    pub fn has_released(&self) -> bool {
        self.reg.released.load(Ordering::Acquire)
    }

    /// `mmu_notifier_unregister`: runs `release` if exit has not, removes the
    /// notifier, and returns only after every callback in flight on it has
    /// returned. Then drops the mm pin.
    pub fn unregister(mut self) {
        self.do_unregister(true);
    }

    /// `mmu_notifier_unregister_no_release`: removes the notifier without
    /// calling `release` and without waiting. Callbacks may still be running;
    /// wait with `MmuNotifierMm::call_srcu` or `synchronize_callbacks` before
    /// freeing what they use.
    pub fn unregister_no_release(mut self) {
        self.do_unregister(false);
    }

    fn do_unregister(&mut self, with_release: bool) {
        let Some(list) = self.list.take() else {
            return;
        };
        if with_release {
            if self.reg.hashed.load(Ordering::Acquire) {
                // SRCU here forces exit_mmap to wait for ->release to finish
                // before freeing the pages.
                let _guard = list.srcu.read_lock();
                self.reg.release_once();
            }
            list.unhash(&self.reg);
            // Wait for any callback still running, including a ->release
            // started by exit_mmap.
            list.srcu.synchronize();
        } else {
            self.reg.released.store(true, Ordering::Release);
            list.unhash(&self.reg);
        }
        // mmdrop
        self.pin = None;
    }
}

impl Drop for MmuNotifier {
    fn drop(&mut self) {
        self.do_unregister(true);
    }
}
