//! `mmu_interval_notifier` (Linux 5.5+): subscriptions to a range of an mm,
//! found through an interval tree, invalidated through one callback and a
//! sequence protocol instead of the `invalidate_range_start`/`end` pair.
//!
//! [`Itree`] is the per-mm half [`super::MmuNotifierMm`] dispatches to
//! (`mn_itree_invalidate`, `mn_itree_inv_end`, `mn_itree_release`);
//! [`MmuIntervalNotifier`] is what a driver holds: `read_begin`,
//! `read_retry`, and remove on drop. The protocol itself is in
//! `interval_core.rs`.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::NotifierError;
use super::interval_core::{ItreeCore, ItreeSnapshot, MmuInterval, WouldBlock};
use super::ops::{MmuIntervalNotifierOps, MmuNotifierRange, MmuNotifyEvent};

type Ops = Arc<dyn MmuIntervalNotifierOps>;

/// The interval half of the per-mm notifier state.
pub(crate) struct Itree {
    core: ItreeCore<Ops>,
    /// `subscriptions->has_itree`: set once, under every lock of the mm, and
    /// never cleared, so `mm_has_notifiers` cannot change between an
    /// `invalidate_range_start` and its end.
    has_itree: AtomicBool,
}

impl Itree {
    pub(crate) fn new() -> Self {
        Self {
            core: ItreeCore::new(),
            has_itree: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.has_itree.load(Ordering::Acquire)
    }

    /// `__mmu_notifier_register(NULL, mm)`: the caller holds every lock of
    /// the mm, or the tree is already on.
    pub(crate) fn enable(&self) {
        self.has_itree.store(true, Ordering::Release);
    }

    pub(crate) fn snapshot(&self) -> ItreeSnapshot {
        self.core.snapshot()
    }

    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.core.overlapping(start, end)
    }

    /// `mn_itree_invalidate`. On a refusal the range stays active: our
    /// callers always end a range they started, failed or not (see
    /// `MmuNotifierOps::invalidate_range_start`), and that end runs
    /// `mn_itree_inv_end`. Linux 5.5 ends it here instead, because its
    /// callers must not end a range whose start failed.
    pub(crate) fn invalidate(&self, range: &MmuNotifierRange) -> Result<(), NotifierError> {
        let blockable = range.blockable();
        self.core
            .invalidate(range.start, range.end, blockable, |sub, ops, cur_seq| {
                let ok = ops.invalidate(sub, range, cur_seq);
                if !ok {
                    if blockable {
                        tracing::warn!(
                            start = sub.start(),
                            end = sub.end(),
                            "an interval notifier refused a blockable invalidation"
                        );
                    } else {
                        tracing::info!(
                            start = sub.start(),
                            end = sub.end(),
                            "an interval notifier refused a non-blockable invalidation"
                        );
                    }
                }
                ok
            })
            .map_err(|WouldBlock| NotifierError::Again)
    }

    /// `mn_itree_inv_end`.
    pub(crate) fn inv_end(&self) {
        self.core.inv_end();
    }

    /// `mn_itree_release`: one blockable `MMU_NOTIFY_RELEASE` invalidation
    /// of the whole address space. The subscriptions stay in the tree until
    /// their owners remove them.
    pub(crate) fn release(&self) {
        let range = MmuNotifierRange::new(MmuNotifyEvent::Release, 0, u64::MAX);
        // Blockable: a refusal is only warned about, never an error.
        let _blockable_never_fails = self.invalidate(&range);
        self.core.inv_end();
    }

    /// `__mmu_interval_notifier_insert` for `[start, start + length)`,
    /// turning the tree on first if needed (see `enable`). `-EOVERFLOW` for
    /// an empty range or one past the end of the address space (Linux
    /// accepts an interval ending exactly at 2^64; ours are half-open, so
    /// they cannot).
    pub(crate) fn insert(
        self: &Arc<Self>,
        start: u64,
        length: u64,
        ops: Ops,
        pin: Arc<dyn Any + Send + Sync>,
    ) -> Result<MmuIntervalNotifier, NotifierError> {
        let end = start
            .checked_add(length)
            .filter(|_| length != 0)
            .ok_or(NotifierError::Overflow)?;
        self.enable();
        let sub = self.core.insert(start, end, ops);
        Ok(MmuIntervalNotifier {
            itree: Arc::clone(self),
            sub,
            pin: Some(pin),
        })
    }
}

/// A subscription to `[start, end)` of an mm: Linux's
/// `struct mmu_interval_notifier` as its driver holds it. Dropping it
/// removes it (`mmu_interval_notifier_remove`), waiting for a running
/// invalidation; so never drop it inside its own callback, or with a lock
/// the callback takes held.
#[must_use = "dropping the subscription removes it"]
pub struct MmuIntervalNotifier {
    itree: Arc<Itree>,
    sub: Arc<MmuInterval>,
    /// The `mmgrab` pin: keeps the mm alive until remove; `None` once
    /// removed.
    pin: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for MmuIntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuIntervalNotifier")
            .field("start", &self.sub.start())
            .field("end", &self.sub.end())
            .finish()
    }
}

impl MmuIntervalNotifier {
    /// The subscription as callbacks see it (start, end, sequence).
    pub fn interval(&self) -> &MmuInterval {
        &self.sub
    }

    pub fn start(&self) -> u64 {
        self.sub.start()
    }

    pub fn end(&self) -> u64 {
        self.sub.end()
    }

    /// `mmu_interval_read_begin`: begins a lookup of translations of the
    /// interval; waits while an invalidation of it runs. Hand the result to
    /// [`read_retry`](Self::read_retry) under the driver's lock.
    pub fn read_begin(&self) -> u64 {
        self.itree.core.read_begin(&self.sub)
    }

    /// `mmu_interval_read_retry`: under the lock `invalidate` holds around
    /// `set_seq`; `true` means an invalidation collided: drop what was
    /// looked up and begin again.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.sub.read_retry(seq)
    }

    /// `mmu_interval_check_retry`: the same test without the lock, to stop a
    /// lookup early; only `read_retry` may allow an install.
    pub fn check_retry(&self, seq: u64) -> bool {
        self.sub.check_retry(seq)
    }

    /// `mmu_interval_notifier_remove`: returns once no callback runs on the
    /// subscription and none will. Then drops the mm pin.
    pub fn remove(mut self) {
        self.do_remove();
    }

    fn do_remove(&mut self) {
        if let Some(pin) = self.pin.take() {
            self.itree.core.remove(&self.sub);
            // mmdrop
            drop(pin);
        }
    }
}

impl Drop for MmuIntervalNotifier {
    fn drop(&mut self) {
        self.do_remove();
    }
}
