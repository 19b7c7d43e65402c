//! The one fixture every integration test shares (crosvm's habit): the
//! KVM skip rule, running the `shadowvm` binary (in one paging mode or
//! both), its `--json` output, waiting for an event, the counter guest on a
//! live VM, guest code written as assembly, and the proptest settings.
//!
//! Without a usable /dev/kvm the KVM tests print "skipping: /dev/kvm not
//! available" and pass, unless `CI=true` or `SHADOWVM_REQUIRE_KVM=1`, in
//! which case they fail: CI must really boot guests.

#![allow(dead_code, unused_macros, unused_imports)]

pub mod counter;
pub mod elf;
pub mod mmu_guest;
pub mod scenario;
pub mod vm;

use std::fs::OpenOptions;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use counter::CounterGuest;
pub(crate) use elf::guest_code;
pub use elf::{temp_file, tiny_elf};

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether a skip is a failure: `CI=true` or `SHADOWVM_REQUIRE_KVM=1`.
pub fn skips_fail() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SHADOWVM_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Skips the test (says so, returns false) when `missing` names what it
/// needs and lacks; panics instead when skips are failures.
fn require(missing: Option<String>) -> bool {
    let Some(what) = missing else {
        return true;
    };
    assert!(
        !skips_fail(),
        "{what}, but CI=true or SHADOWVM_REQUIRE_KVM=1 requires it"
    );
    eprintln!("skipping: {what}");
    false
}

/// True if the test may use KVM; false (after saying so) if it must skip.
/// Panics when KVM is missing but required.
pub fn require_kvm() -> bool {
    require((!kvm_usable()).then(|| "/dev/kvm is not available".to_string()))
}

/// True if the built-in guests exist (the build had a gcc); false (after
/// saying so) if the test must skip. Panics when skips are failures.
pub fn require_guests() -> bool {
    require(
        shadowvm::vmm::guests::unavailable_reason()
            .map(|r| format!("the built-in guests are missing ({r})")),
    )
}

/// [`require_kvm`] and the built-in guest `name`.
pub fn require_kvm_and_guest(name: &str) -> bool {
    require_kvm()
        && require_guests()
        && require(
            shadowvm::vmm::guests::find(name)
                .is_none()
                .then(|| format!("the built-in guest `{name}` is missing")),
        )
}

/// The result of one `shadowvm` run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panic with the whole run if `cond` is false.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
    }

    /// The `--json` object: the last stderr line that starts with `{`.
    pub fn json(&self) -> serde_json::Value {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The report `shadowvm stress --json` prints: stdout's last line.
    pub fn stdout_json(&self) -> serde_json::Value {
        let line = self.stdout.lines().last().unwrap_or_default();
        let v = serde_json::from_str(line);
        self.check(v.is_ok(), "stdout ends with the JSON report");
        v.unwrap_or_default()
    }

    /// The `--json` object, which must be stderr's last line.
    pub fn json_at_end(&self) -> serde_json::Value {
        let line = self.stderr.lines().last().unwrap_or_default();
        let v = serde_json::from_str(line);
        self.check(v.is_ok(), "stderr ends with the --json object");
        v.unwrap_or_default()
    }
}

/// Runs the real `shadowvm` binary with `args` (and extra `env`).
pub fn shadowvm_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shadowvm"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run shadowvm");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs the real `shadowvm` binary with `args`.
pub fn shadowvm(args: &[&str]) -> Run {
    shadowvm_env(args, &[])
}

/// Runs the command line `line` (`shadowvm` left out; words split at
/// whitespace, no quoting): a test reads as the command a user would type.
pub fn shadowvm_line(line: &str) -> Run {
    shadowvm(&line.split_whitespace().collect::<Vec<_>>())
}

/// Runs `args` with `--paging mode` and `options` inserted before any
/// `--` (options go before the guest's command line).
pub fn shadowvm_in(mode: &str, args: &[&str], options: &[&str]) -> Run {
    let mut a: Vec<&str> = args.to_vec();
    let at = a.iter().position(|s| *s == "--").unwrap_or(a.len());
    let inserted: Vec<&str> = ["--paging", mode].iter().chain(options).copied().collect();
    a.splice(at..at, inserted);
    shadowvm(&a)
}

/// Runs `args` (with `options`) in kvm mode, then in shadow mode.
pub fn both_modes(args: &[&str], options: &[&str]) -> (Run, Run) {
    (
        shadowvm_in("kvm", args, options),
        shadowvm_in("shadow", args, options),
    )
}

pub use shadowvm::scenario::poll;

/// Polls `f` until it returns `Some`; fails the test after 10 s, naming
/// `what` it waited for.
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll(Duration::from_secs(10), f).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Cases of a proptest run: `PROPTEST_CASES`, else 512.
pub fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
}

/// The proptest settings every property test uses: [`proptest_cases`]
/// cases, no failure files written into the tree.
pub fn proptest_config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: proptest_cases(),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// Runs `test` on values of `strategy` with [`proptest_config`]; fails
/// with the shrunk counterexample.
pub fn proptest_run<S: proptest::strategy::Strategy>(
    strategy: &S,
    test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
) {
    proptest_run_cases(strategy, proptest_cases(), test);
}

/// [`proptest_run`] with `cases` cases (a test that scales
/// [`proptest_cases`] for costlier scenarios).
pub fn proptest_run_cases<S: proptest::strategy::Strategy>(
    strategy: &S,
    cases: u32,
    test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
) {
    let config = proptest::test_runner::Config {
        cases,
        ..proptest_config()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(strategy, test) {
        panic!("{e}");
    }
}
