//! `mmu_interval_notifier_insert` on the simulated mm: the locking around
//! the notifier layer's insert.

use std::sync::Arc;

use crate::notifier::{MmuIntervalNotifier, MmuIntervalNotifierOps};

use super::{Hva, Mm, MmError, MmapWriteGuard};

impl Mm {
    /// `mmu_interval_notifier_insert`: subscribes `ops` to
    /// `[start, start + length)`. The first insert on the mm takes every
    /// lock of the mm (`mmu_notifier_register(NULL, mm)`), since it changes
    /// what `has_notifiers` answers; later ones take none. The subscription
    /// pins the mm until it is removed (dropped).
    pub fn mmu_interval_notifier_insert(
        self: &Arc<Self>,
        start: Hva,
        length: u64,
        ops: Arc<dyn MmuIntervalNotifierOps>,
    ) -> Result<MmuIntervalNotifier, MmError> {
        self.check_alive()?;
        if !self.notifiers.has_itree() {
            // Lock order as in mmu_notifier_register: KSM, then mmap.
            let _ksm = self.ksm.lock();
            let guard = self.mmap_write_lock();
            return self.mmu_interval_notifier_insert_locked(&guard, start, length, ops);
        }
        Ok(self
            .notifiers
            .mmu_interval_notifier_insert_locked(start, length, ops, self.clone())?)
    }

    /// `mmu_interval_notifier_insert_locked`: the caller holds the mmap lock
    /// for writing.
    pub fn mmu_interval_notifier_insert_locked(
        self: &Arc<Self>,
        _mmap_locked: &MmapWriteGuard<'_>,
        start: Hva,
        length: u64,
        ops: Arc<dyn MmuIntervalNotifierOps>,
    ) -> Result<MmuIntervalNotifier, MmError> {
        self.check_alive()?;
        let _pt = self.pt.lock(); // mm_take_all_locks
        Ok(self
            .notifiers
            .mmu_interval_notifier_insert_locked(start, length, ops, self.clone())?)
    }
}
