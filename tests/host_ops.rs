//! Scripted host operations (`--host-ops`, docs/host-ops.md): the hostops
//! guest sees a zero page after `dontneed`, faulting writes after
//! `mprotect ro`, working writes after `mprotect rw` and faulting accesses
//! after `munmap`; a timed `dontneed` reaches a guest polling the page; bad
//! scripts are refused with one line naming the line, status 2.

mod common;

const STEPS: &[&str] = &[
    "hostops: CHECKPOINT(65536) is -EINVAL: ok",
    "hostops: checkpoint 1 ran 1 op: ok",
    "hostops: dontneed: page A reads zero: ok",
    "hostops: dontneed: page B kept its data: ok",
    "hostops: checkpoint 2 ran 1 op: ok",
    "hostops: mprotect ro: page B reads its data: ok",
    "hostops: mprotect ro: a write to page B faults: ok",
    "hostops: mprotect ro: page B unchanged: ok",
    "hostops: checkpoint 3 ran 1 op: ok",
    "hostops: mprotect rw: a write to page B works: ok",
    "hostops: checkpoint 4 ran 1 op: ok",
    "hostops: munmap: a read of page C faults: ok",
    "hostops: munmap: a write to page C faults: ok",
    "hostops: munmap: page A still works: ok",
    "hostops: checkpoint 5 ran no op: ok",
    "hostops: all ok (0 failed)",
];

fn check_steps(run: &common::Run) {
    run.check(run.code == Some(0), "the hostops guest exits 0");
    for step in STEPS {
        run.check(run.stdout.contains(step), step);
    }
    run.check(
        run.stderr.contains("coherence check: ok"),
        "the shadow MMU is coherent after the run",
    );
}

/// The hostops guest under `--host-ops script` and the coherence check,
/// `timeout` a bound on a hang, `guest_args` after `--`.
fn run_script(script: &str, timeout: &str, guest_args: &[&str]) -> common::Run {
    let mut args = vec!["run", "hostops", "--host-ops", script];
    args.extend(["--timeout", timeout, "--check"]);
    if !guest_args.is_empty() {
        args.push("--");
        args.extend_from_slice(guest_args);
    }
    common::shadowvm(&args)
}

#[test]
fn builtin_scenario_gives_the_architectural_outcomes() {
    if !common::require_kvm() {
        return;
    }
    let run = run_script("builtin:hostops", "5s", &[]);
    check_steps(&run);
}

#[test]
fn script_file_works_like_the_builtin() {
    if !common::require_kvm() {
        return;
    }
    let script = common::temp_file(
        "hostops.txt",
        b"# the hostops guest's checkpoints\n\
          at checkpoint 1 dontneed 0x1000000 4K\n\
          \n\
          at checkpoint 2 mprotect 0x1001000 4K ro   # B read-only\n\
          at checkpoint 3 mprotect 0x1001000 4096 rw\n\
          at checkpoint 4 munmap 0x1002000 4K\n",
    );
    let run = run_script(script.to_str().unwrap(), "5s", &[]);
    check_steps(&run);
}

#[test]
fn without_a_script_checkpoints_run_nothing_and_the_guest_says_so() {
    if !common::require_kvm() {
        return;
    }
    let run = common::shadowvm(&["run", "hostops", "--timeout", "5s"]);
    run.check(run.code == Some(1), "the hostops guest fails");
    run.check(
        run.stdout
            .contains("hostops: checkpoint 1 ran 1 op: FAILED"),
        "checkpoint 1 ran nothing",
    );
}

#[test]
fn kvm_mode_checkpoint_is_eopnotsupp() {
    if !common::require_kvm() {
        return;
    }
    let run = common::shadowvm(&["run", "hostops", "--paging", "kvm", "--timeout", "5s"]);
    run.check(run.code == Some(0), "exit 0");
    run.check(
        run.stdout
            .contains("hostops: kvm mode: CHECKPOINT is -EOPNOTSUPP: ok"),
        "CHECKPOINT is -EOPNOTSUPP in kvm mode",
    );
    let run = common::shadowvm(&[
        "run",
        "hostops",
        "--paging",
        "kvm",
        "--host-ops",
        "builtin:hostops",
    ]);
    run.check(
        run.code == Some(2),
        "--host-ops with --paging kvm: status 2",
    );
    run.check(
        run.stderr.contains("--host-ops") && run.stderr.lines().count() == 1,
        "one line naming --host-ops",
    );
}

#[test]
fn timed_dontneed_reaches_a_polling_guest() {
    if !common::require_kvm() {
        return;
    }
    // The timeout bounds a hang, it is no measurement: the guest polls
    // until the dontneed lands.
    let run = run_script("builtin:hostops-timed", "60s", &["timed=1"]);
    run.check(run.code == Some(0), "exit 0");
    run.check(
        run.stdout
            .contains("hostops: timed dontneed: page D reads zero: ok"),
        "the timed dontneed zeroed page D under the polling guest",
    );
}

#[test]
fn bad_scripts_are_refused_with_one_line() {
    // No KVM needed: the script is checked before the VM is built.
    for (text, want) in [
        (
            "# ok\nat 5ms frobnicate 0x1000000 4K\n",
            ":2: unknown operation",
        ),
        ("at checkpoint 1 dontneed 0x1000800 4K\n", ":1: range"),
        (
            "at checkpoint 70000 munmap 0x1000000 4K\n",
            ":1: bad checkpoint",
        ),
        (
            "\n\nat 1ms mprotect 0x1000000 4K rx\n",
            ":3: bad protection",
        ),
        // Outside guest RAM: below 2 MiB (the VMM area) and past --mem.
        ("at 1ms munmap 0x100000 4K\n", "outside guest RAM"),
        ("at 1ms dontneed 0x3fff000 8K\n", "outside guest RAM"),
        // The image (mlocked; exception delivery needs it).
        (
            "at checkpoint 1 munmap 0x200000 4K\n",
            "overlaps the guest image",
        ),
    ] {
        let script = common::temp_file("bad.txt", text.as_bytes());
        let run = common::shadowvm(&[
            "run",
            "hostops",
            "--mem",
            "64M",
            "--host-ops",
            script.to_str().unwrap(),
        ]);
        if want.contains("image") && !common::require_kvm() {
            continue;
        }
        run.check(run.code == Some(2), "status 2");
        run.check(run.stderr.lines().count() == 1, "one line");
        run.check(run.stderr.contains(want), want);
        run.check(run.stdout.is_empty(), "the guest did not run");
    }
    let run = common::shadowvm(&["run", "hostops", "--host-ops", "builtin:nope"]);
    run.check(run.code == Some(2), "unknown builtin: status 2");
    run.check(run.stderr.contains("`nope`"), "names the scenario");
}
