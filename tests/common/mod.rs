//! Helpers for the tests that boot guests on /dev/kvm.
//!
//! Without a usable /dev/kvm these tests print "skipping: /dev/kvm not
//! available" and pass, unless `CI=true` or `SHADOWVM_REQUIRE_KVM=1`, in
//! which case they fail: CI must really boot guests.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::process::{Command, Output};

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// True if the test may use KVM; false (after saying so) if it must skip.
/// Panics when KVM is missing but required.
pub fn require_kvm() -> bool {
    if kvm_usable() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let required = std::env::var("SHADOWVM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    assert!(
        !(ci || required),
        "/dev/kvm is not available, but CI=true or SHADOWVM_REQUIRE_KVM=1 requires it"
    );
    eprintln!("skipping: /dev/kvm not available");
    false
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

/// A minimal guest image: an x86-64 ELF executable with one RWX segment at
/// 2 MiB holding `code` (the entry point), `memsz` bytes long in memory.
pub fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[6] = 1; // version
    e[16] = 2; // ET_EXEC
    e[18] = 62; // x86-64
    e[20] = 1;
    e[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52] = 64; // ehsize
    e[54] = 56; // phentsize
    e[56] = 1; // phnum
    e[64] = 1; // PT_LOAD
    e[68] = 7; // R W X
    e[72..80].copy_from_slice(&120u64.to_le_bytes()); // offset
    e[80..88].copy_from_slice(&0x20_0000u64.to_le_bytes()); // vaddr
    e[88..96].copy_from_slice(&0x20_0000u64.to_le_bytes()); // paddr
    e[96..104].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
    e[104..112].copy_from_slice(&memsz.max(code.len() as u64).to_le_bytes());
    e.extend_from_slice(code);
    e
}

/// Writes `bytes` to a fresh file in a per-process temporary directory.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shadowvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}
