//! The driver the model-based property tests (`mm_proptest`,
//! `mmu_proptest`) share: a harness built from a generated scenario applies
//! its steps with the invariants checked after each, then ends the case;
//! and the coverage counters summed over the cases.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::TestCaseError;

/// A property test's harness: the system under test and its model.
pub trait ScenarioHarness: Sized {
    type Scenario: std::fmt::Debug;

    /// Builds the system and the model `s` starts from.
    fn new(s: &Self::Scenario) -> Result<Self, TestCaseError>;

    /// Applies `s`'s steps, checking the invariants after each.
    fn run(&mut self, s: &Self::Scenario) -> Result<(), TestCaseError>;

    /// Ends the case as `s` says, with the final checks, and counts it.
    fn end(self, s: &Self::Scenario) -> Result<(), TestCaseError>;
}

/// Runs `cases` scenarios of `strategy`, each on a fresh harness; fails
/// with the shrunk counterexample.
pub fn run_scenarios<H: ScenarioHarness>(strategy: impl Strategy<Value = H::Scenario>, cases: u32) {
    super::proptest_run_cases(&strategy, cases, |s| {
        let mut h = H::new(&s)?;
        h.run(&s)?;
        h.end(&s)
    });
}

/// Adds `n` to a coverage counter.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// `cov!(field, n)`: adds `n` to counter `field` of the calling test's
/// thread-local `COVERAGE` (per test thread: the tests run side by side).
macro_rules! cov {
    ($f:ident, $n:expr $(,)?) => {{
        let n = $n;
        COVERAGE.with(|c| $crate::common::scenario::bump(&c.$f, n))
    }};
}
pub(crate) use cov;

/// A coverage counter's value.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
