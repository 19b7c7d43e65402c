//! The synchronization primitives the SRCU core and the interval-notifier
//! sequence protocol are written against.
//!
//! `tests/loom_srcu.rs` and `tests/loom_interval.rs` compile
//! `src/notifier/srcu_core.rs` and `src/notifier/interval_core.rs` against a
//! module of the same shape backed by `loom`, so the model checker explores
//! the very code the library runs.

// The full set the loom shim mirrors; not every item has a user yet.
#[allow(unused_imports)]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
#[allow(unused_imports)]
pub use std::sync::{Condvar, Mutex, MutexGuard};

/// One step of a wait loop: spin briefly, then give the CPU away.
#[inline]
pub fn spin_wait(iteration: u32) {
    if iteration < 64 {
        std::hint::spin_loop();
    } else if iteration < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}
