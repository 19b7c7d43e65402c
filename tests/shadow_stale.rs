//! Stale shadow translations (docs/design.md rule 3, "TLB shootdown"): a ring-3
//! guest loop increments a counter on its own page while this test, as the
//! host, ages, discards and write-protects that page through the host mm.
//! Once the host operation returns, the guest must never write the old
//! frame again, and cleared Accessed bits must be set afresh.
//!
//! With the real flush (`HostTlbFlush`: mprotect / MADV_DONTNEED of the
//! frames in the host) every check holds. With the flush replaced by a
//! no-op (`VmConfig::host_tlb_flush = false`) the host KVM's own shadow of
//! our tables keeps the old translation on our `kvm_pvm` machines, and the
//! guest keeps writing the old frame: the second test shows it.

mod common;

use std::time::Duration;

use common::{CounterGuest as Guest, poll, wait_for};
use shadowvm::mm::{Access, Pfn, Prot};
use shadowvm::vmm::Outcome;

/// How long the checks below poll for the guest's reaction.
const POLL: Duration = Duration::from_secs(5);

/// Boots test-counter in shadow mode and waits until it counts.
fn start(host_tlb_flush: bool) -> Option<Guest> {
    start_on(host_tlb_flush, 1, 0)
}

/// Boots test-counter on `vcpus` vCPUs; the test works on vCPU `cpu`'s page.
fn start_on(host_tlb_flush: bool, vcpus: u32, cpu: u32) -> Option<Guest> {
    let g = Guest::start(cpu, |config| {
        config.host_tlb_flush = host_tlb_flush;
        config.vcpus = vcpus;
    })?;
    // Counting: the page is present and its counter moves.
    let pfn = wait_for("the counter page", || g.pfn());
    let v = g.read(pfn);
    wait_for("the counter to move", || (g.read(pfn) != v).then_some(()));
    Some(g)
}

/// Counter increments that show the guest ran long enough to have used a
/// stale translation, had there been one (the ring-3 loop does millions a
/// second).
const PROGRESS: u64 = 100_000;

/// What the tests below do to the counter page. Every wait is for an event
/// (the guest's counter moving, its fault line): a claim that the guest did
/// NOT do something is checked only once it has demonstrably run on.
impl Guest {
    /// Clears the page's young bits everywhere (with the secondary-MMU
    /// flush) and waits until the guest's writes set them again.
    fn young_again(&self) -> bool {
        self.mm
            .clear_flush_young(self.hva)
            .expect("clear_flush_young");
        poll(POLL, || {
            self.mm
                .test_young(self.hva)
                .expect("test_young")
                .then_some(())
        })
        .is_some()
    }

    /// Discards the page (MADV_DONTNEED) while holding a reference to its
    /// frame, so the old frame stays allocated and untouched by the host;
    /// returns it.
    fn discard_pinned(&self) -> (Pfn, shadowvm::mm::PagePin) {
        let pin = self
            .mm
            .get_user_page(self.hva, Access::Read)
            .expect("pin the page");
        let old = pin.pfn();
        self.mm
            .madvise_dontneed(self.hva, 4096)
            .expect("madvise(DONTNEED)");
        (old, pin)
    }
}

#[test]
fn the_guest_never_reaches_a_zapped_frame() {
    let Some(g) = start(true) else { return };
    let s = never_reaches_a_zapped_frame(g);
    assert!(s.host_invalidate.mprotect_calls >= 3, "{s:?}");
    assert_eq!(s.host_invalidate.memslot_bounces, 0, "{s:?}");
}

/// The same with every flush done as a memslot bounce (the bulk path):
/// every vCPU kicked out, the memslot deleted and re-added.
#[test]
fn the_guest_never_reaches_a_zapped_frame_with_memslot_bounces() {
    let Some(g) = start(true) else { return };
    g.vm.shadow().unwrap().host_flush().set_bounce_runs(0);
    let s = never_reaches_a_zapped_frame(g);
    assert!(s.host_invalidate.memslot_bounces >= 3, "{s:?}");
    assert_eq!(s.host_invalidate.mprotect_calls, 0, "{s:?}");
}

/// Two vCPUs counting; the host works on vCPU 1's page while vCPU 0 keeps
/// running, so every shootdown (protection toggles, then bounces) must
/// reach the other vCPU's thread too.
#[test]
fn two_vcpus_never_reach_a_zapped_frame() {
    let Some(g) = start_on(true, 2, 1) else {
        return;
    };
    let s = never_reaches_a_zapped_frame(g);
    assert!(s.host_invalidate.mprotect_calls >= 3, "{s:?}");
    let Some(g) = start_on(true, 2, 1) else {
        return;
    };
    g.vm.shadow().unwrap().host_flush().set_bounce_runs(0);
    let s = never_reaches_a_zapped_frame(g);
    assert!(s.host_invalidate.memslot_bounces >= 3, "{s:?}");
}

fn never_reaches_a_zapped_frame(g: Guest) -> shadowvm::vmm::paging::shadow::ShadowStats {
    // Aging: the Accessed bit cleared in the spte is set again.
    assert!(
        g.young_again(),
        "the guest's writes set the Accessed bit again"
    );

    // DONTNEED: the old frame never changes again; the guest counts on a
    // new one. Checked once the guest has counted far on the new frame.
    let (old, pin) = g.discard_pinned();
    let frozen = g.read(old);
    let Some(new) = poll(POLL, || g.pfn()) else {
        g.vm.stop();
        let report = g.vm.wait(Some(Duration::from_secs(5)));
        panic!(
            "the guest did not fault the page back: {}\nconsole: {}\n{:?}",
            report.outcome,
            g.console.text(),
            report.stats.shadow
        );
    };
    assert_ne!(new, old);
    g.progress_on(new, PROGRESS);
    assert_eq!(
        g.read(old),
        frozen,
        "the guest wrote the discarded frame {old:#x} after MADV_DONTNEED returned"
    );
    drop(pin);

    // mprotect read-only: no write lands after mprotect returns; the
    // guest's next write faults (a host refusal: its own #PF), and it says
    // so on the console.
    g.mm.mprotect(g.hva, 4096, Prot::READ).expect("mprotect");
    let frozen = g.read(new);
    let line = format!("counter {}: fault vector 14", g.cpu);
    wait_for("the guest's write fault on the read-only page", || {
        g.console.text().contains(&line).then_some(())
    });
    assert_eq!(
        g.read(new),
        frozen,
        "the guest wrote a write-protected frame after mprotect returned"
    );
    // One vCPU: main returns 3 and the VM exits; two: stop the other one.
    g.vm.stop();
    let report = g.vm.wait(Some(Duration::from_secs(10)));
    assert!(
        matches!(
            report.outcome,
            Outcome::Exited { code: 3, .. } | Outcome::Stopped
        ),
        "{}\n{}",
        report.outcome,
        g.console.text()
    );
    let s = report.stats.shadow.expect("shadow stats");
    assert_eq!(s.host_invalidate.errors, 0, "{s:?}");
    s
}

/// The same host operations with the host flush turned off: the host KVM
/// keeps its translation of the zapped spte and the guest keeps writing the
/// old frame. This is what the flush is for.
#[test]
fn without_the_host_flush_the_guest_writes_a_zapped_frame() {
    let Some(g) = start(false) else { return };

    // The guest counts on and on, yet the cleared Accessed bit stays clear:
    // the host KVM still uses its translation of the old spte.
    let pfn = g.pfn().expect("the counter page is present");
    g.mm.clear_flush_young(g.hva).expect("clear_flush_young");
    g.progress_on(pfn, PROGRESS);
    assert!(
        !g.mm.test_young(g.hva).expect("test_young"),
        "without a flush the Accessed bit should stay clear (stale host translation)"
    );
    let (old, pin) = g.discard_pinned();
    let v = g.read(old);
    assert!(
        poll(POLL, || (g.read(old) != v).then_some(())).is_some(),
        "without a flush the guest should keep writing the discarded frame"
    );
    drop(pin);
    g.vm.stop();
    let report = g.vm.wait(Some(Duration::from_secs(10)));
    assert!(
        matches!(report.outcome, Outcome::Stopped),
        "{}",
        report.outcome
    );
    let s = report.stats.shadow.expect("shadow stats");
    assert_eq!(s.host_invalidate.mprotect_calls, 0, "{s:?}");
    assert!(s.host_invalidate.frames >= 2, "{s:?}");
}
