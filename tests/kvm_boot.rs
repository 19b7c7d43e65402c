//! Boots every built-in guest on real KVM through the `shadowvm` binary and
//! checks its console output and exit status, plus the failure modes:
//! triple fault, timeout, unknown port.

mod common;

use common::elf::{exit5, halt};
use common::{require_kvm, shadowvm, temp_file, tiny_elf};

#[test]
fn hello_boots_and_exits_zero() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "hello", "--", "greeting=yes"]);
    r.check(r.code == Some(0), "hello exits 0");
    for line in [
        "Hello from shadowvm!",
        // Shadow paging is the default.
        "vCPUs: 1, memory: 64 MiB, paging: shadow, cmdline: \"greeting=yes\"",
        "hello from ring 3",
        "back in ring 1",
        "bye",
    ] {
        r.check(r.stdout.contains(line), &format!("stdout has {line:?}"));
    }
    r.check(r.stderr.is_empty(), "nothing on stderr");
}

#[test]
fn hello_on_two_vcpus() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "hello", "--vcpus", "2", "--mem", "16M"]);
    r.check(r.code == Some(0), "hello exits 0");
    r.check(r.stdout.contains("vCPU 1: hello"), "the second vCPU ran");
    r.check(r.stdout.contains("vCPUs: 2, memory: 16 MiB"), "boot info");
}

#[test]
fn memtest_in_user_mode() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "memtest", "--mem", "32M", "--", "size=4M"]);
    r.check(r.code == Some(0), "memtest exits 0");
    r.check(
        r.stdout.contains("memtest: 4096 KiB, 4 patterns, 0 errors"),
        "no errors",
    );
    r.check(r.stdout.contains("reads back as zero"), "balloon");
}

#[test]
fn memtest_reports_too_little_memory() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "memtest", "--mem", "4M", "--", "size=8M"]);
    r.check(r.code == Some(2), "memtest exits 2");
    r.check(r.stdout.contains("cannot allocate"), "says why");
}

#[test]
fn pagetable_checks_pass() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "pagetable", "--mem", "8M"]);
    r.check(r.code == Some(0), "pagetable exits 0");
    r.check(r.stdout.contains(" checks, 0 failures"), "no failures");
    r.check(!r.stdout.contains("FAIL"), "no FAIL line");
}

#[test]
fn hypercall_abi() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "test-hypercalls", "--mem", "8M"]);
    r.check(r.code == Some(0), "all hypercall checks pass");
    r.check(r.stdout.contains("PRINT hypercall works"), "PRINT");
}

#[test]
fn exit_port_sets_exit_status() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "test-exitport", "--", "code=7"]);
    r.check(r.code == Some(7), "exit status 7");
}

#[test]
fn triple_fault_is_reported_with_registers() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "test-triplefault"]);
    r.check(r.code == Some(125), "exit status 125");
    r.check(r.stdout.contains("about to triple fault"), "guest ran");
    r.check(
        r.stderr
            .contains("vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)"),
        "names the failure",
    );
    r.check(
        r.stderr.contains("rip=") && r.stderr.contains("cr3="),
        "dumps registers",
    );
    r.check(!r.stderr.contains("panicked"), "no panic");
}

#[test]
fn timeout_stops_a_spinning_guest() {
    if !require_kvm() {
        return;
    }
    let start = std::time::Instant::now();
    let r = shadowvm(&["run", "test-spin", "--timeout", "1s"]);
    r.check(r.code == Some(124), "exit status 124");
    r.check(r.stderr.contains("timed out"), "says it timed out");
    r.check(
        r.stderr.contains("cpl=3"),
        "the guest was spinning in ring 3",
    );
    r.check(
        start.elapsed() < std::time::Duration::from_secs(10),
        "stopped promptly",
    );
}

#[test]
fn unknown_port_is_an_error() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "test-badport"]);
    r.check(r.code == Some(125), "exit status 125");
    r.check(
        r.stderr
            .contains("write to unknown I/O port 0xf5 (1 byte, value 0x42)"),
        "names the port",
    );
    r.check(r.stderr.contains("rdx=00000000000000f5"), "dumps registers");
}

#[test]
fn json_stats() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "hello", "--json"]);
    r.check(r.code == Some(0), "hello exits 0");
    let v = r.json();
    assert!(v["exits"]["io"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["hypercalls"]["exit"], 1, "{v}");
    assert!(
        v["first_serial_byte_us"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
    );
    assert!(
        v["time_in_guest_us"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
    );
    assert!(v["io_exits"]["serial"].as_u64().unwrap_or(0) > 0, "{v}");
}

#[test]
fn human_stats() {
    if !require_kvm() {
        return;
    }
    let r = shadowvm(&["run", "hello", "--stats"]);
    r.check(r.code == Some(0), "hello exits 0");
    r.check(
        r.stderr.contains("first serial byte") && r.stderr.contains("time in guest"),
        "stats printed",
    );
}

#[test]
fn elf_file_guest() {
    if !require_kvm() {
        return;
    }
    // The built-in hello, written out and run as a file.
    if !common::require_kvm_and_guest("hello") {
        return;
    }
    let Some(hello) = shadowvm::vmm::guests::find("hello") else {
        unreachable!("require_kvm_and_guest checked it")
    };
    let path = temp_file("hello.elf", hello.elf);
    let r = shadowvm(&["run", path.to_str().unwrap()]);
    r.check(r.code == Some(0), "exits 0");
    r.check(r.stdout.contains("Hello from shadowvm!"), "greets");
}

#[test]
fn bare_elf_guests_without_the_runtime() {
    if !require_kvm() {
        return;
    }
    // hlt on both vCPUs: every vCPU halted, exit status 0.
    let halt = temp_file("halt.elf", &tiny_elf(halt(), halt().len() as u64));
    let r = shadowvm(&["run", halt.to_str().unwrap(), "--vcpus", "2"]);
    r.check(r.code == Some(0), "all vCPUs halted: exit status 0");

    let code = exit5();
    let exit5 = temp_file("exit5.elf", &tiny_elf(code, code.len() as u64));
    let r = shadowvm(&["run", exit5.to_str().unwrap()]);
    r.check(r.code == Some(5), "exit port: status 5");
    r.check(r.stdout == "!", "one serial byte");
}
