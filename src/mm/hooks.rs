//! Test hooks: named points in the mm where a test runs code of its own to
//! force one interleaving of two threads. Built only with the `test-hooks`
//! feature (the crate's tests enable it); without it the `mm_hook!` calls
//! compile to nothing, so the production paths carry no hook.

use std::sync::Arc;

use parking_lot::RwLock;

use super::{Hva, Mm};

/// Where a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmHookPoint {
    /// `try_to_merge_one_page` has write-protected the page at the hva and
    /// holds its page lock, but has not made it a KSM page yet.
    KsmWriteProtected,
    /// `try_to_unmap_one` holds the page lock of the page at the hva and
    /// has not started the invalidation yet.
    ReclaimPageLocked,
}

/// A hook: called with the point and the page's hva.
pub type MmHook = Arc<dyn Fn(MmHookPoint, Hva) + Send + Sync>;

#[derive(Default)]
pub(super) struct HookSlot(RwLock<Option<MmHook>>);

impl Mm {
    /// Installs (or with `None` removes) the test hook.
    pub fn set_test_hook(&self, hook: Option<MmHook>) {
        *self.hook.0.write() = hook;
    }

    pub(super) fn run_hook(&self, point: MmHookPoint, hva: Hva) {
        let hook = self.hook.0.read().clone();
        if let Some(h) = hook {
            h(point, hva);
        }
    }
}
