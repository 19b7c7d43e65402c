//! Bad input gets one line on stderr and exit status 2, never a panic.
//! None of these reach KVM, so they run everywhere.

mod common;

use common::{Run, shadowvm, shadowvm_env, temp_file, tiny_elf};

fn one_line_error(r: &Run, needle: &str) {
    r.check(r.code == Some(2), "exit status 2");
    r.check(r.stderr.lines().count() == 1, "exactly one line on stderr");
    r.check(r.stderr.starts_with("shadowvm: error: "), "prefixed");
    r.check(r.stderr.contains(needle), &format!("mentions {needle:?}"));
    r.check(!r.stderr.contains("panicked"), "no panic");
    r.check(r.stdout.is_empty(), "nothing on stdout");
}

#[test]
fn missing_file() {
    one_line_error(
        &shadowvm(&["run", "/nonexistent/guest.elf"]),
        "cannot read guest image /nonexistent/guest.elf",
    );
}

#[test]
fn unknown_builtin_name() {
    one_line_error(
        &shadowvm(&["run", "no-such-guest"]),
        "`no-such-guest` is neither a built-in guest (see `shadowvm guests`) nor an existing file",
    );
}

#[test]
fn not_an_elf() {
    let path = temp_file("notes.txt", b"just some text\n");
    one_line_error(
        &shadowvm(&["run", path.to_str().unwrap()]),
        "not an ELF file",
    );
}

#[test]
fn elf_too_big_for_mem() {
    let path = temp_file("big.elf", &tiny_elf(&[0xf4], 32 << 20));
    let r = shadowvm(&["run", path.to_str().unwrap(), "--mem", "16M"]);
    one_line_error(
        &r,
        "big.elf: the ELF needs memory up to 0x2200000 (34M) but --mem is 16M",
    );
}

#[test]
fn absurd_mem() {
    for (mem, needle) in [
        ("1T", "out of range"),
        ("0", "out of range"),
        ("99999999999999999999G", "out of range"),
        ("lots", "invalid memory size `lots`"),
        ("5M", "not a multiple of 2M"),
    ] {
        one_line_error(&shadowvm(&["run", "hello", "--mem", mem]), needle);
    }
}

#[test]
fn bad_vcpus_and_timeout() {
    one_line_error(
        &shadowvm(&["run", "hello", "--vcpus", "0"]),
        "0 vCPUs is out of range",
    );
    one_line_error(
        &shadowvm(&["run", "hello", "--vcpus", "1000"]),
        "1000 vCPUs is out of range",
    );
    one_line_error(
        &shadowvm(&["run", "hello", "--timeout", "soon"]),
        "invalid duration `soon`",
    );
}

#[test]
fn bad_machine_mem() {
    one_line_error(
        &shadowvm(&["run", "hello", "--paging", "shadow", "--machine-mem", "3M"]),
        "--machine-mem: memory size 3M is out of range",
    );
    one_line_error(
        &shadowvm(&[
            "run",
            "hello",
            "--paging",
            "shadow",
            "--machine-mem",
            "lots",
        ]),
        "--machine-mem: invalid memory size `lots`",
    );
}

#[test]
fn no_kvm_device() {
    let r = shadowvm_env(
        &["run", "hello"],
        &[("SHADOWVM_KVM_DEVICE", "/nonexistent/kvm")],
    );
    one_line_error(
        &r,
        "/nonexistent/kvm does not exist: this machine has no KVM",
    );
}

#[test]
fn help_explains_options() {
    let r = shadowvm(&["run", "--help"]);
    r.check(r.code == Some(0), "help exits 0");
    for opt in [
        "--mem",
        "--vcpus",
        "--paging",
        "--timeout",
        "--stats",
        "--json",
        "--cmdline",
    ] {
        r.check(r.stdout.contains(opt), &format!("--help mentions {opt}"));
    }
}

#[test]
fn guests_list() {
    if !common::require_guests() {
        return;
    }
    let r = shadowvm(&["guests"]);
    r.check(r.code == Some(0), "exits 0");
    for g in ["hello", "memtest", "pagetable"] {
        r.check(
            r.stdout.lines().any(|l| l.starts_with(g)),
            &format!("lists {g}"),
        );
    }
    r.check(!r.stdout.contains("test-"), "hides test guests");
    let all = shadowvm(&["guests", "--all"]);
    all.check(
        all.stdout.contains("test-triplefault"),
        "--all lists test guests",
    );
}
