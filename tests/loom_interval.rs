//! Loom model of the `mmu_interval_notifier` sequence protocol
//! (`src/notifier/interval_core.rs`).
//!
//! The real protocol is compiled here against a `sync` module of the same
//! shape as `src/sync.rs` but backed by loom, so loom explores the thread
//! interleavings of the code the library runs.
//!
//! Every model has the shape of a secondary MMU against the host: a "host
//! PTE" names one of three pages; the host changes it only between an
//! invalidation's start and end and frees the old page after the end, as
//! `zap_page_range` does. A device mirrors the PTE into its own table under
//! its lock, through `read_begin` / lookup / lock / `read_retry` / install,
//! and is invalidated by a callback that takes its lock, calls `set_seq` and
//! drops the mapping. The device "DMAs" into the page it maps under its
//! lock. Each page's storage is a loom `UnsafeCell` that freeing writes, so
//! a DMA that does not happen-before the free is a reported race; the
//! `freed` flag and the final check catch a device left mapping a page the
//! host no longer maps.
//!
//! Broken variants at the end (a `read_begin` that does not wait, an insert
//! during an invalidation that does not take the running sequence, and two
//! driver bugs: no `set_seq`, no `read_retry`) must fail. Mutating the real
//! protocol the same way (dropping the wait in `read_begin` or in `remove`,
//! or giving an insert during an invalidation an idle sequence) makes the
//! models of the real protocol fail too.

use loom::cell::UnsafeCell;
use loom::model::Builder;
use loom::sync::Arc;
use loom::thread;

/// `crate::sync` for the protocol, backed by loom.
mod sync {
    #![allow(unused_imports)]
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
    pub use loom::sync::{Condvar, Mutex, MutexGuard};
}

#[path = "common/must_fail.rs"]
mod must_fail;

#[path = "../src/notifier/interval_core.rs"]
#[allow(dead_code)]
mod interval_core;

use interval_core::{ItreeCore, MmuInterval};
use sync::{AtomicBool, AtomicUsize, Mutex, Ordering};

const PAGE: u64 = 4096;

/// Which ingredient of the protocol (or of the driver's use of it) a model
/// runs with.
#[derive(Clone, Copy)]
struct Knobs {
    /// `read_begin` waits while an invalidation of the interval runs.
    read_begin_waits: bool,
    /// An insert during an invalidation takes the running (odd) sequence.
    insert_takes_running_seq: bool,
    /// The driver's `invalidate` calls `set_seq`.
    set_seq: bool,
    /// The driver's fault path checks `read_retry` before installing.
    read_retry: bool,
}

const REAL: Knobs = Knobs {
    read_begin_waits: true,
    insert_takes_running_seq: true,
    set_seq: true,
    read_retry: true,
};

struct Page {
    freed: AtomicBool,
    memory: UnsafeCell<u32>,
}

struct Shared {
    core: ItreeCore<()>,
    /// The host PTE: an index into `pages`.
    pte: AtomicUsize,
    pages: [Page; 3],
    /// The device lock and the device's one translation (`dmirror->mutex`
    /// and its page table).
    device: Mutex<Option<usize>>,
    /// The driver's own state, freed after `remove` returns.
    driver_state: UnsafeCell<u32>,
    knobs: Knobs,
}

impl Shared {
    fn new(knobs: Knobs) -> Arc<Self> {
        Arc::new(Self {
            core: ItreeCore::new(),
            pte: AtomicUsize::new(0),
            pages: std::array::from_fn(|_| Page {
                freed: AtomicBool::new(false),
                memory: UnsafeCell::new(0),
            }),
            device: Mutex::new(None),
            driver_state: UnsafeCell::new(0),
            knobs,
        })
    }

    fn insert(&self) -> std::sync::Arc<MmuInterval> {
        let sub = self.core.insert(0, PAGE, ());
        if !self.knobs.insert_takes_running_seq {
            // As if inserted idle: odd, one below the mm's even sequence.
            let even = self.core.snapshot().invalidate_seq & !1;
            sub.set_seq(even - 1);
        }
        sub
    }

    fn read_begin(&self, sub: &MmuInterval) -> u64 {
        if self.knobs.read_begin_waits {
            self.core.read_begin(sub)
        } else {
            sub.seq()
        }
    }

    /// The device's `invalidate` callback.
    fn invalidate_cb(&self, sub: &MmuInterval, cur_seq: u64) -> bool {
        let mut spte = self.device.lock().unwrap();
        if self.knobs.set_seq {
            sub.set_seq(cur_seq);
        }
        *spte = None;
        // The driver uses its own state inside the callback.
        self.driver_state.with(|_| ());
        true
    }

    /// The host changes its PTE to `new` between start and end, then frees
    /// the old page (`zap_page_range`, `replace_page`, reclaim).
    fn host_replace(&self, new: usize) {
        let r = self
            .core
            .invalidate(0, PAGE, true, |sub, _, cur| self.invalidate_cb(sub, cur));
        assert!(r.is_ok());
        let old = self.pte.swap(new, Ordering::AcqRel);
        self.core.inv_end();
        let page = &self.pages[old];
        page.freed.store(true, Ordering::Relaxed);
        page.memory.with_mut(|_| ());
    }

    /// A DMA into the page the device maps, under the device lock.
    fn dma(&self, spte: &Option<usize>) {
        if let Some(p) = *spte {
            let page = &self.pages[p];
            assert!(
                !page.freed.load(Ordering::Relaxed),
                "DMA into freed page {p}"
            );
            page.memory.with(|_| ());
        }
    }

    /// The fault path (`dmirror_range_fault`): bounded, as loom needs.
    fn fault(&self, sub: &MmuInterval) {
        for _ in 0..2 {
            let seq = self.read_begin(sub);
            let p = self.pte.load(Ordering::Acquire); // hva_to_pfn
            let mut spte = self.device.lock().unwrap();
            if self.knobs.read_retry && sub.read_retry(seq) {
                continue;
            }
            *spte = Some(p);
            self.dma(&spte);
            return;
        }
    }

    /// After every thread joined: the device maps nothing, or what the host
    /// maps.
    fn check(&self) {
        let spte = self.device.lock().unwrap();
        if let Some(p) = *spte {
            assert_eq!(
                p,
                self.pte.load(Ordering::Acquire),
                "stale translation: the device maps page {p}"
            );
        }
        self.dma(&spte);
    }
}

fn builder(preemption_bound: Option<usize>) -> Builder {
    let mut b = Builder::new();
    b.preemption_bound = preemption_bound;
    b
}

/// A device fault against one host invalidation of its interval.
fn fault_vs_invalidation(knobs: Knobs) {
    builder(None).check(move || {
        let s = Shared::new(knobs);
        let sub = s.insert();
        let host = {
            let s = s.clone();
            thread::spawn(move || s.host_replace(1))
        };
        s.fault(&sub);
        {
            let spte = s.device.lock().unwrap();
            s.dma(&spte); // a second DMA later on
        }
        host.join().unwrap();
        s.check();
    });
}

/// The device subscribes while the host invalidates: the insert is deferred
/// or takes the running sequence, so the first fault waits for the end.
fn insert_during_invalidation(knobs: Knobs) {
    builder(None).check(move || {
        let s = Shared::new(knobs);
        let host = {
            let s = s.clone();
            thread::spawn(move || s.host_replace(1))
        };
        let sub = s.insert();
        s.fault(&sub);
        host.join().unwrap();
        s.check();
    });
}

#[test]
fn fault_never_installs_a_page_an_invalidation_replaced() {
    fault_vs_invalidation(REAL);
}

#[test]
fn insert_during_an_invalidation_waits_for_its_end() {
    insert_during_invalidation(REAL);
}

/// Two invalidations of the interval in a row against one fault: the
/// sequence stays odd across both if they overlap, and every install is of
/// the page the host maps.
#[test]
fn fault_vs_two_invalidations() {
    builder(Some(3)).check(|| {
        let s = Shared::new(REAL);
        let sub = s.insert();
        let host = {
            let s = s.clone();
            thread::spawn(move || {
                s.host_replace(1);
                s.host_replace(2);
            })
        };
        s.fault(&sub);
        host.join().unwrap();
        s.check();
    });
}

/// Two hosts invalidate concurrently (nested ranges, the sequence odd
/// across both) while the device faults.
#[test]
fn fault_vs_concurrent_invalidations() {
    builder(Some(2)).check(|| {
        let s = Shared::new(REAL);
        let sub = s.insert();
        // Each host thread only invalidates (start ... end) without
        // changing the PTE: what matters is that the sequence is odd until
        // the last end and that the fault's read_begin waits for it.
        let hosts: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    let r = s
                        .core
                        .invalidate(0, PAGE, true, |sub, _, cur| s.invalidate_cb(sub, cur));
                    assert!(r.is_ok());
                    s.core.inv_end();
                })
            })
            .collect();
        s.fault(&sub);
        for h in hosts {
            h.join().unwrap();
        }
        let snap = s.core.snapshot();
        assert_eq!(snap.invalidate_seq % 2, 0);
        assert_eq!(snap.active_invalidate_ranges, 0);
        s.check();
    });
}

/// Once `remove` returns no callback runs: the driver frees its state then,
/// and a callback still touching it would race with the free.
#[test]
fn remove_waits_for_the_running_callback() {
    builder(None).check(|| {
        let s = Shared::new(REAL);
        let sub = s.insert();
        let host = {
            let s = s.clone();
            thread::spawn(move || s.host_replace(1))
        };
        s.core.remove(&sub);
        s.driver_state.with_mut(|_| ()); // kfree(dmirror)
        host.join().unwrap();
        assert_eq!(s.core.snapshot().nr_intervals, 0);
    });
}

/// Runs a model that must fail, and checks that it failed the way a
/// protocol bug fails.
fn assert_model_fails(model: fn(Knobs), knobs: Knobs) {
    must_fail::assert_fails_with(
        move || model(knobs),
        &[
            "stale translation",
            "DMA into freed page",
            "Causality violation",
        ],
    );
}

#[test]
fn broken_read_begin_that_does_not_wait_fails() {
    assert_model_fails(
        fault_vs_invalidation,
        Knobs {
            read_begin_waits: false,
            ..REAL
        },
    );
}

#[test]
fn broken_insert_with_an_idle_sequence_fails() {
    assert_model_fails(
        insert_during_invalidation,
        Knobs {
            insert_takes_running_seq: false,
            ..REAL
        },
    );
}

#[test]
fn broken_driver_without_set_seq_fails() {
    assert_model_fails(
        fault_vs_invalidation,
        Knobs {
            set_seq: false,
            ..REAL
        },
    );
}

#[test]
fn broken_driver_without_read_retry_fails() {
    assert_model_fails(
        fault_vs_invalidation,
        Knobs {
            read_retry: false,
            ..REAL
        },
    );
}
