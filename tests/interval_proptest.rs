//! Property test of `mmu_interval_notifier` against a naive model.
//!
//! Random sequences of inserts, removes, invalidation starts and ends, and
//! `read_begin`s over a small address space run on a real
//! [`MmuNotifierMm`]; a model written straight from Linux's rules (a list of
//! intervals, a deferred list, the mm's sequence, each subscription's
//! sequence) predicts every step. After every step the real state must equal
//! the model's: sequence, active ranges, tree contents, deferred count, each
//! subscription's sequence, which callbacks ran with which `cur_seq`, and
//! `read_retry` of every sequence a `read_begin` returned. A remove that
//! must wait runs on a helper thread, which must still be waiting until the
//! model's last end and must finish after it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use shadowvm::notifier::{
    MmuInterval, MmuIntervalNotifier, MmuIntervalNotifierOps, MmuNotifierMm, MmuNotifierRange,
    MmuNotifyEvent,
};

/// Address space: 32 units (the protocol does not care about page size).
const SPACE: u64 = 32;

#[derive(Clone, Debug)]
enum Op {
    Insert {
        start: u64,
        len: u64,
    },
    /// Removes the `n % live`-th live subscription.
    Remove(usize),
    Start {
        start: u64,
        len: u64,
    },
    End,
    /// `read_begin` on the `n % live`-th live subscription, when the model
    /// says it will not sleep.
    ReadBegin(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SPACE, 1..8u64).prop_map(|(start, len)| Op::Insert { start, len }),
        2 => any::<usize>().prop_map(Op::Remove),
        3 => (0..SPACE, 1..12u64).prop_map(|(start, len)| Op::Start { start, len }),
        3 => Just(Op::End),
        2 => any::<usize>().prop_map(Op::ReadBegin),
    ]
}

/// The driver of subscription `id`: logs `(id, cur_seq)` and sets the
/// sequence under its lock.
struct Driver {
    id: u64,
    log: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl MmuIntervalNotifierOps for Driver {
    fn invalidate(&self, interval: &MmuInterval, _r: &MmuNotifierRange, cur_seq: u64) -> bool {
        let mut log = self.log.lock();
        interval.set_seq(cur_seq);
        log.push((self.id, cur_seq));
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Insert,
    Remove,
}

/// Linux's rules, written as plainly as possible.
#[derive(Default)]
struct Model {
    /// `has_itree`: nothing is dispatched to the tree before the first
    /// insert.
    enabled: bool,
    seq: u64,
    active: u64,
    /// In the tree: id → (start, end).
    tree: BTreeMap<u64, (u64, u64)>,
    deferred: Vec<(u64, Pending, (u64, u64))>,
    sub_seq: BTreeMap<u64, u64>,
}

impl Model {
    fn invalidating(&self) -> bool {
        self.seq % 2 == 1
    }

    fn insert(&mut self, id: u64, iv: (u64, u64)) {
        self.enabled = true;
        if self.active != 0 {
            if self.invalidating() {
                self.deferred.push((id, Pending::Insert, iv));
            } else {
                self.seq |= 1;
                self.tree.insert(id, iv);
            }
            self.sub_seq.insert(id, self.seq);
        } else {
            self.sub_seq.insert(id, self.seq - 1);
            self.tree.insert(id, iv);
        }
    }

    /// Returns whether the remove must wait for the last end.
    fn remove(&mut self, id: u64, iv: (u64, u64)) -> bool {
        if self.invalidating() {
            if let Some(i) = self
                .deferred
                .iter()
                .position(|d| d.0 == id && d.1 == Pending::Insert)
            {
                self.deferred.remove(i);
                false
            } else {
                self.deferred.push((id, Pending::Remove, iv));
                true
            }
        } else {
            self.tree.remove(&id);
            false
        }
    }

    /// The callbacks `[start, end)` must run, with their `cur_seq`.
    fn start(&mut self, start: u64, end: u64) -> BTreeSet<(u64, u64)> {
        if !self.enabled {
            return BTreeSet::new();
        }
        self.active += 1;
        let hits: Vec<u64> = self
            .tree
            .iter()
            .filter(|(_, (s, e))| *s < end && start < *e)
            .map(|(id, _)| *id)
            .collect();
        if !hits.is_empty() {
            self.seq |= 1;
        }
        for id in &hits {
            self.sub_seq.insert(*id, self.seq);
        }
        hits.into_iter().map(|id| (id, self.seq)).collect()
    }

    /// Returns whether this end made the sequence even (waking waiters).
    fn end(&mut self) -> bool {
        if !self.enabled {
            return false;
        }
        self.active -= 1;
        if self.active != 0 || !self.invalidating() {
            return false;
        }
        self.seq += 1;
        for (id, p, iv) in std::mem::take(&mut self.deferred) {
            match p {
                Pending::Insert => {
                    self.tree.insert(id, iv);
                }
                Pending::Remove => {
                    self.tree.remove(&id);
                }
            }
        }
        true
    }
}

struct Live {
    id: u64,
    iv: (u64, u64),
    sub: MmuIntervalNotifier,
    /// Sequences `read_begin` returned, to check `read_retry` against.
    begun: Vec<u64>,
}

static DEFERRED_INSERTS: AtomicU64 = AtomicU64::new(0);
static WAITING_REMOVES: AtomicU64 = AtomicU64::new(0);
static CANCELLED_INSERTS: AtomicU64 = AtomicU64::new(0);

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let l = Arc::new(MmuNotifierMm::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut m = Model {
        seq: 2,
        ..Model::default()
    };
    let mut live: Vec<Live> = Vec::new();
    let mut removers: Vec<JoinHandle<()>> = Vec::new();
    let mut open: Vec<MmuNotifierRange> = Vec::new();
    let mut next_id = 0;
    for op in ops {
        match *op {
            // Turning the tree on needs every lock of the mm, so no range is
            // open then (Mm::mmu_interval_notifier_insert ensures it).
            Op::Insert { start, len } if m.enabled || open.is_empty() => {
                let id = next_id;
                next_id += 1;
                let d = Arc::new(Driver {
                    id,
                    log: log.clone(),
                });
                let sub = l
                    .mmu_interval_notifier_insert_locked(start, len, d, Arc::new(()))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if m.invalidating() {
                    DEFERRED_INSERTS.fetch_add(1, Ordering::Relaxed);
                }
                m.insert(id, (start, start + len));
                live.push(Live {
                    id,
                    iv: (start, start + len),
                    sub,
                    begun: Vec::new(),
                });
            }
            Op::Remove(n) if !live.is_empty() => {
                let lv = live.remove(n % live.len());
                let pending_insert = m.deferred.iter().any(|d| d.0 == lv.id);
                if m.remove(lv.id, lv.iv) {
                    WAITING_REMOVES.fetch_add(1, Ordering::Relaxed);
                    let want = l.interval_snapshot().nr_waiters + 1;
                    removers.push(thread::spawn(move || lv.sub.remove()));
                    while l.interval_snapshot().nr_waiters != want {
                        thread::yield_now();
                    }
                } else {
                    if pending_insert {
                        CANCELLED_INSERTS.fetch_add(1, Ordering::Relaxed);
                    }
                    lv.sub.remove();
                }
            }
            Op::Start { start, len } => {
                let r = MmuNotifierRange::new(MmuNotifyEvent::Clear, start, start + len);
                let want = m.start(r.start, r.end);
                log.lock().clear();
                l.invalidate_range_start(&r)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let got: BTreeSet<(u64, u64)> = log.lock().iter().copied().collect();
                prop_assert_eq!(got, want, "callbacks of {:?}", r);
                open.push(r);
            }
            Op::End => {
                if let Some(r) = open.pop() {
                    let woke = m.end();
                    l.invalidate_range_end(&r, false);
                    if woke {
                        for h in removers.drain(..) {
                            h.join()
                                .map_err(|_| TestCaseError::fail("remover panicked"))?;
                        }
                    }
                }
            }
            Op::ReadBegin(n) if !live.is_empty() => {
                let lv = {
                    let i = n % live.len();
                    &mut live[i]
                };
                let s = m.sub_seq[&lv.id];
                if s != m.seq {
                    prop_assert_eq!(lv.sub.read_begin(), s);
                    lv.begun.push(s);
                }
            }
            _ => {}
        }
        check(&l, &m, &live, removers.len())?;
    }
    // Close what is open: every remover must finish.
    while let Some(r) = open.pop() {
        m.end();
        l.invalidate_range_end(&r, false);
    }
    for h in removers.drain(..) {
        h.join()
            .map_err(|_| TestCaseError::fail("remover panicked"))?;
    }
    check(&l, &m, &live, 0)
}

fn check(l: &MmuNotifierMm, m: &Model, live: &[Live], waiting: usize) -> Result<(), TestCaseError> {
    let snap = l.interval_snapshot();
    prop_assert_eq!(snap.invalidate_seq, m.seq);
    prop_assert_eq!(snap.active_invalidate_ranges, m.active);
    prop_assert_eq!(snap.nr_deferred, m.deferred.len());
    prop_assert_eq!(snap.nr_waiters, waiting);
    let mut tree = l.intervals_overlapping(0, u64::MAX);
    tree.sort_unstable();
    let mut want: Vec<(u64, u64)> = m.tree.values().copied().collect();
    want.sort_unstable();
    prop_assert_eq!(tree, want);
    for lv in live {
        let s = m.sub_seq[&lv.id];
        prop_assert_eq!(lv.sub.interval().seq(), s, "sequence of {}", lv.id);
        prop_assert_eq!(s % 2, 1, "a subscription's sequence is odd");
        for &b in &lv.begun {
            prop_assert_eq!(lv.sub.read_retry(b), b != s);
        }
    }
    Ok(())
}

#[test]
fn random_interval_operations_follow_linux_rules() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| run(&ops));
    if let Err(e) = result {
        panic!("{e}");
    }
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "interval_proptest coverage: {} deferred inserts, {} waiting removes, {} cancelled inserts",
        get(&DEFERRED_INSERTS),
        get(&WAITING_REMOVES),
        get(&CANCELLED_INSERTS)
    );
    assert!(get(&DEFERRED_INSERTS) > 0 && get(&WAITING_REMOVES) > 0 && get(&CANCELLED_INSERTS) > 0);
}
