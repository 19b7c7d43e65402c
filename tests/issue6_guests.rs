//! Issue 6's guests (`ksm`, `wss`, `balloon`, `verify`) in `--paging kvm`
//! and `--paging shadow`: each exits 0, prints its summary, and prints the
//! same lines in both modes (lines that depend on timing are left out of the
//! comparison). Sizes are small so the whole file runs in a few seconds.

mod common;

use common::{Run, both_modes, require_kvm};

/// stdout without the lines containing any of `timing`.
fn deterministic(r: &Run, timing: &[&str]) -> String {
    r.stdout
        .lines()
        .filter(|l| !timing.iter().any(|t| l.contains(t)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs `args` in both modes; both must exit with `code`, print every line
/// of `expect`, and print the same deterministic output. Returns the shadow
/// run.
fn both(args: &[&str], code: i32, expect: &[&str], timing: &[&str]) -> Run {
    let (kvm, shadow) = both_modes(args, &["--timeout", "20s"]);
    for (mode, r) in [("kvm", &kvm), ("shadow", &shadow)] {
        r.check(
            r.code == Some(code),
            &format!("{args:?} in {mode} mode exits {code}"),
        );
        r.check(!r.stderr.contains("panicked"), "no panic");
        for line in expect {
            r.check(
                r.stdout.lines().any(|l| l == *line),
                &format!("{args:?} in {mode} mode prints {line:?}"),
            );
        }
    }
    shadow.check(
        deterministic(&kvm, timing) == deterministic(&shadow, timing),
        &format!("{args:?}: same output as kvm mode:\n{}", kvm.stdout),
    );
    shadow
}

#[test]
fn ksm_guest_in_both_modes() {
    if !require_kvm() {
        return;
    }
    both(
        &[
            "run",
            "ksm",
            "--mem",
            "16M",
            "--",
            "pages=256",
            "patterns=3",
            "wait_ms=50",
        ],
        0,
        &[
            "ksm: verify before writes: 0 errors",
            "ksm: wrote 1 byte in 128 pages",
            "ksm: verify after writes: 0 errors",
            "ksm: 256 pages, 3 patterns, 0 errors",
        ],
        &[],
    );
    // The defaults, with the wait cut short.
    both(
        &["run", "ksm", "--", "wait_ms=0"],
        0,
        &["ksm: 1024 pages, 4 patterns, 0 errors"],
        &[],
    );
}

#[test]
fn wss_guest_in_both_modes() {
    if !require_kvm() {
        return;
    }
    let s = both(
        &[
            "run",
            "wss",
            "--mem",
            "16M",
            "--",
            "hot=16",
            "cold=256",
            "duration_ms=100",
            "phases=4",
        ],
        0,
        &[
            "wss: 16 hot pages, 256 cold pages, 100 ms in 4 phases",
            "wss: cold phase: 256 pages touched once",
            "wss: 16 hot pages, 256 cold pages, 0 errors",
        ],
        &[" rounds, "],
    );
    for p in 1..=4 {
        let prefix = format!("wss: hot phase {p}: ");
        s.check(
            s.stdout.lines().any(|l| l.starts_with(&prefix)),
            &format!("prints {prefix:?}"),
        );
    }
}

#[test]
fn balloon_guest_in_both_modes() {
    if !require_kvm() {
        return;
    }
    both(
        &[
            "run", "balloon", "--mem", "16M", "--", "pages=96", "chunk=8",
        ],
        0,
        &[
            "balloon: ballooned 48 pages in 6 calls of up to 8 pages",
            "balloon: ballooned pages read as zero, the others kept their pattern",
            "balloon: reused the ballooned pages: 0 bad words",
            "balloon: 5 of 5 invalid calls rejected with EINVAL",
            "balloon: 96 pages, 48 ballooned, 0 failures",
        ],
        &[],
    );
}

#[test]
fn verify_guest_in_both_modes() {
    if !require_kvm() {
        return;
    }
    let args = ["pages=512", "rounds=10"];
    let one = both(
        &["run", "verify", "--mem", "16M", "--", args[0], args[1]],
        0,
        &[
            "verify: 512 pages on 1 vCPUs, 10 rounds",
            "verify: 0 page checksums wrong, 10 pages rewritten",
            "verify: 512 pages x 10 rounds, 0 corrupted bytes",
        ],
        &[],
    );
    // Two vCPUs, each on its own half: the same result, twice the rewrites.
    let two = both(
        &[
            "run", "verify", "--vcpus", "2", "--mem", "16M", "--", args[0], args[1],
        ],
        0,
        &[
            "verify: 512 pages on 2 vCPUs, 10 rounds",
            "verify: 0 page checksums wrong, 20 pages rewritten",
            "verify: 512 pages x 10 rounds, 0 corrupted bytes",
        ],
        &[],
    );
    two.check(
        one.stdout.lines().last() == two.stdout.lines().last(),
        "same summary with 1 and 2 vCPUs",
    );
}

/// The reporter itself: a byte flipped behind the checksum's back is found
/// in every round until its page is rewritten, and the guest fails.
#[test]
fn verify_guest_reports_corruption() {
    if !require_kvm() {
        return;
    }
    both(
        &[
            "run",
            "verify",
            "--vcpus",
            "2",
            "--mem",
            "16M",
            "--",
            "pages=64",
            "rounds=3",
            "inject=50",
        ],
        1,
        &[
            "verify: corrupted byte: page 49 offset 123: expected 0xed, got 0xad",
            "verify: 3 page checksums wrong, 6 pages rewritten",
            "verify: 64 pages x 3 rounds, 3 corrupted bytes",
        ],
        &[],
    );
}
