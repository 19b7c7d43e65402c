//! Kicking a vCPU out of KVM_RUN from another thread (the mechanism shadow
//! mode's TLB shootdowns use), through the library API, on real KVM.

mod common;

use std::time::{Duration, Instant};

use shadowvm::vmm::{GuestSource, RunningVm, VcpuRequest, VmConfig};

#[test]
fn kick_and_wait_reaches_a_spinning_vcpu() {
    if !common::require_kvm() {
        return;
    }
    let mut config = VmConfig::new(GuestSource::Builtin("test-spin".into()));
    config.mem_size = 8 << 20;
    let vm = RunningVm::start(&config, Box::new(std::io::sink())).expect("start test-spin");
    let kick = vm.vcpu_kick(0).expect("vCPU 0").clone();

    // Wait until the guest runs (in guest mode, with exits behind it).
    common::wait_for("vCPU 0 in the guest", || {
        (kick.in_guest_mode() && kick.activity().exits > 0).then_some(())
    });

    const KICKS: u32 = 20;
    let before = kick.requests_handled();
    let mut total = Duration::ZERO;
    for _ in 0..KICKS {
        let t = Instant::now();
        let kicked = vm.kick(0, VcpuRequest::TLB_FLUSH, Some(Duration::from_secs(5)));
        total += t.elapsed();
        assert!(kicked.expect("kick"));
        // Let it re-enter before the next kick.
        common::wait_for("vCPU 0 back in the guest", || {
            kick.in_guest_mode().then_some(())
        });
    }
    eprintln!(
        "kick_and_wait: {:?} per kick (until the vCPU is out of guest mode)",
        total / KICKS
    );
    assert!(
        kick.requests_handled() >= before + u64::from(KICKS),
        "every kick was handled"
    );
    assert!(
        !vm.kick(7, VcpuRequest::TLB_FLUSH, None).unwrap(),
        "no vCPU 7"
    );

    let report = common::vm::stop_vm(vm);
    assert!(
        report.stats.vm.exits["intr"] >= u64::from(KICKS),
        "{:?}",
        report.stats.vm.exits
    );
}
