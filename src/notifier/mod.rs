//! A Rust port of Linux's MMU notifier (`mm/mmu_notifier.c`, 4.19), with the
//! range struct of 5.0–5.2 and the 5.5 `mmu_interval_notifier`.
//!
//! A secondary MMU (our shadow MMU, like KVM's) implements [`MmuNotifierOps`]
//! and registers on a host mm; the mm calls [`MmuNotifierMm`]'s dispatch
//! functions around every change of its page table. Dispatch runs under SRCU
//! ([`srcu::Srcu`]) so callbacks may sleep and unregister can wait for them.
//!
//! Guarantees (each has a test in `tests/notifier.rs`):
//! * young results are OR'ed; `test_young` stops at the first young notifier;
//! * `invalidate_range_start` calls every notifier even after one fails;
//! * `invalidate_range_end` calls `invalidate_range` first unless `only_end`;
//! * `release` runs exactly once per notifier, from exit or unregister;
//! * unregister returns only after every callback in flight has returned;
//! * a registration pins the mm until it is unregistered.
//!
//! Interval subscriptions ([`MmuIntervalNotifier`], Linux 5.5+) live on the
//! same [`MmuNotifierMm`] and are invalidated first; their sequence protocol
//! (`mmu_interval_read_begin` / `mmu_interval_read_retry`, deferred inserts
//! and removes) is in `interval_core.rs`, tested in `tests/interval.rs`,
//! `tests/interval_proptest.rs` and `tests/loom_interval.rs`.

mod interval;
mod interval_core;
mod list;
mod ops;
pub mod recorder;
pub mod srcu;
pub(crate) mod srcu_core;

pub use interval::MmuIntervalNotifier;
pub use interval_core::{ItreeSnapshot, MmuInterval};
pub use list::{MmuNotifier, MmuNotifierMm};
pub use ops::{
    Callbacks, MmuIntervalNotifierOps, MmuNotifierOps, MmuNotifierRange, MmuNotifyEvent,
    NotifierPte, RangeFlags,
};
pub use srcu::Srcu;

/// Errors of the notifier layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// `-EAGAIN`: a callback would have to sleep in a non-blockable range.
    #[error("a notifier would have to block in a non-blockable invalidation")]
    Again,
    /// `-EOVERFLOW`: an interval of length zero or past the end of the
    /// address space.
    #[error("the interval is empty or runs past the end of the address space")]
    Overflow,
}
