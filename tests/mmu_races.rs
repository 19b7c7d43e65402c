//! The shadow MMU under host activity: range-aware fault retry, paging-mode
//! roles, and fail-stop when the TLB shootdown fails.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::mmu_guest::{A, D, Guest, NX, P, RW, US};
use parking_lot::Mutex;
use shadowvm::mm::{MmapFlags, PAGE_SIZE};
use shadowvm::mmu::{FaultOutcome, MmuError, PfErrorCode, ShadowMmuConfig};

/// Issue 9, item 2: KVM's retry check is per range (`mmu_invalidate_retry_gfn`)
/// and ours also keeps the ranges that ended, so a fault retries only when
/// an invalidation touched a page it relied on (the log of ended ranges
/// keeps what faults in flight need, so even a fault descheduled for a long
/// time gets an exact answer). One thread invalidates pages [N, 2N) in a
/// tight loop while faults on [0, N) run: they all complete without a single
/// retry while thousands of invalidations end under them.
#[test]
fn faults_elsewhere_complete_under_an_invalidation_storm() {
    const N: u64 = 256;
    const ROUNDS: u64 = 40;
    let mut g = Guest::with_config(
        2 * N + 16,
        2 * N + 64,
        ShadowMmuConfig::default(),
        MmapFlags::empty(),
    );
    for i in 0..2 * N {
        g.map(i * PAGE_SIZE, i * PAGE_SIZE, P | RW | A | D);
        g.mm.write(g.hva(i * PAGE_SIZE), &[1]).unwrap();
    }
    assert!(
        g.first_table_page() >= 2 * N,
        "page tables stay out of the storm"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let storm = {
        let (mm, stop, base) = (g.mm.clone(), stop.clone(), g.hva(N * PAGE_SIZE));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..N {
                    mm.madvise_dontneed(base + i * PAGE_SIZE, PAGE_SIZE)
                        .unwrap();
                }
                n += N;
            }
            n
        })
    };
    // Wait for the storm to blow, then fault until it has ended many
    // invalidations under us (and at least ROUNDS passes over [0, N)).
    let seq_at_start = g.mmu.invalidate_seq();
    while g.mmu.invalidate_seq() < seq_at_start + N {
        std::thread::yield_now();
    }
    let seq0 = g.mmu.invalidate_seq();
    let mut faults = 0u64;
    while faults < ROUNDS * N || g.mmu.invalidate_seq() - seq0 < 20 * N {
        for i in 0..N {
            assert_eq!(g.write_fault(i * PAGE_SIZE), FaultOutcome::Fixed);
        }
        faults += N;
    }
    let during = g.mmu.invalidate_seq() - seq0;
    stop.store(true, Ordering::Relaxed);
    let invalidations = storm.join().unwrap();
    let s = g.mmu.stats();
    eprintln!(
        "{faults} faults on [0, {N}) under {during} invalidations of [{N}, {}): {} retries, at most {} for one fault",
        2 * N,
        s.pf_retry,
        s.pf_retry_max
    );
    assert!(
        during >= 1000 && invalidations >= during,
        "the storm ran under the faults"
    );
    assert_eq!(s.pf_retry, 0, "a fault elsewhere retried");
    g.check();
}

/// The other half: a fault on a page being invalidated does retry (the
/// storm range is what the fault relies on).
#[test]
fn a_fault_on_an_invalidated_page_retries() {
    let mut g = Guest::new(64, 128);
    g.map(0, 0, P | RW | A | D);
    let hva = g.hva(0);
    let mm = g.mm.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    g.mmu.set_race_hook(Some(Arc::new(move |h| {
        if h == hva && !f.swap(true, Ordering::SeqCst) {
            mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
        }
    })));
    assert_eq!(g.write_fault(0), FaultOutcome::Fixed);
    g.mmu.set_race_hook(None);
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(g.mmu.stats().pf_retry, 1);
    g.check();
}

/// Issue 9, item 3: shadow pages are keyed by a role that includes CR0.WP
/// and EFER.NXE (`kvm_mmu_page_role`), so two vCPUs on the same guest
/// tables in different modes each get the architectural answer.
#[test]
fn vcpus_in_different_paging_modes_share_no_shadow_page() {
    let cfg = ShadowMmuConfig {
        nr_vcpus: 2,
        ..ShadowMmuConfig::default()
    };
    let mut g = Guest::with_config(64, 256, cfg, MmapFlags::empty());
    // A read-only supervisor page, and a page whose PTE sets XD.
    g.map(0x1000, 0x1000, P | A | D);
    g.map(0x2000, 0x2000, P | RW | A | D | NX);
    let mut mode = g.mmu.paging(0).unwrap();
    assert!(mode.cr0_wp && mode.efer_nx);
    mode.cr0_wp = false;
    mode.efer_nx = false;
    g.mmu.set_paging_mode(1, mode).unwrap();
    let root1 = g.mmu.load_cr3(1, g.cr3).unwrap();
    assert_ne!(root1, g.mmu.root(0).unwrap(), "one root per (CR3, role)");

    let write = PfErrorCode::WRITE;
    let fetch = PfErrorCode::FETCH;
    let fault = |vcpu, gva, ec| g.mmu.page_fault(vcpu, gva, ec).unwrap();
    // WP=0: the supervisor write goes through (a writable, supervisor-only spte).
    assert_eq!(fault(1, 0x1000, write), FaultOutcome::Fixed);
    let spte1 = g.mmu.lookup_spte(1, 0x1000).unwrap().unwrap();
    assert!(spte1 & RW != 0 && spte1 & US == 0);
    // WP=1 on the same tables: a protection fault, and its spte stays read-only.
    for _ in 0..2 {
        match fault(0, 0x1000, write) {
            FaultOutcome::Guest(pf) => {
                assert_eq!(pf.error_code, PfErrorCode::PRESENT | PfErrorCode::WRITE)
            }
            other => panic!("WP=1 write to a read-only page: {other:?}"),
        }
    }
    assert_eq!(fault(0, 0x1000, PfErrorCode::empty()), FaultOutcome::Fixed);
    let spte0 = g.mmu.lookup_spte(0, 0x1000).unwrap().unwrap();
    assert!(spte0 & RW == 0, "vCPU 0 got vCPU 1's writable spte");
    // NXE=1: XD forbids the fetch; NXE=0: bit 63 is reserved.
    match fault(0, 0x2000, fetch) {
        FaultOutcome::Guest(pf) => assert!(pf.error_code.contains(PfErrorCode::FETCH)),
        other => panic!("NX fetch: {other:?}"),
    }
    match fault(1, 0x2000, PfErrorCode::empty()) {
        FaultOutcome::Guest(pf) => assert!(pf.error_code.contains(PfErrorCode::RSVD)),
        other => panic!("bit 63 with NXE=0: {other:?}"),
    }
    assert_eq!(fault(0, 0x2000, PfErrorCode::empty()), FaultOutcome::Fixed);
    let nx0 = g.mmu.lookup_spte(0, 0x2000).unwrap().unwrap();
    assert!(nx0 & NX != 0);
    g.check();
    // Back to vCPU 0's mode: vCPU 1 shares vCPU 0's root again.
    g.mmu.set_paging_mode(1, g.mmu.paging(0).unwrap()).unwrap();
    assert_eq!(g.mmu.load_cr3(1, g.cr3).unwrap(), g.mmu.root(0).unwrap());
}

/// Issue 9, item 4: a TLB shootdown the host refuses inside a notifier
/// callback cannot be returned to the mm; the MMU records it, tells the
/// fatal handler (the VMM stops the VM) and installs nothing more.
#[test]
fn a_failed_shootdown_stops_the_mmu_and_reaches_the_fatal_handler() {
    let mut g = Guest::new(64, 128);
    g.map(0, 0, P | RW | A | D);
    assert_eq!(g.write_fault(0), FaultOutcome::Fixed);
    let told: Arc<Mutex<Vec<String>>> = Default::default();
    let t = told.clone();
    g.mmu
        .set_fatal_handler(Arc::new(move |e| t.lock().push(e.to_string())));
    g.flush.set_fail(Some(libc::EIO));
    g.mm.madvise_dontneed(g.hva(0), PAGE_SIZE).unwrap();
    let told = told.lock().clone();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].contains("frames") && told[0].contains("Input/output error"),
        "{told:?}"
    );
    assert!(matches!(g.mmu.fatal_error(), Some(MmuError::TlbFlush(e)) if e.errno == libc::EIO));
    assert!(matches!(
        g.mmu.page_fault(0, 0, PfErrorCode::WRITE),
        Err(MmuError::Stopped(_))
    ));
    assert!(matches!(
        g.mmu.load_cr3(0, g.cr3),
        Err(MmuError::Stopped(_))
    ));
}

/// A freed shadow page's frame stays out of use until the flush that names
/// it (`TableChanged`) has returned: a host that caches our tables (KVM
/// shadowing them) could otherwise walk or prefetch through a stale link
/// into a frame already reused, for another table or for guest data.
#[test]
fn a_freed_shadow_frame_is_reused_only_after_its_flush() {
    use shadowvm::mm::{FrameAllocator, FrameOwner, Pfn};
    use shadowvm::mmu::{FlushFrame, FlushReason, TlbFlush, TlbFlushError};

    /// Checks, inside every flush, that the frames of changed tables are
    /// still lent out (not free, not reused).
    struct Checking {
        frames: Mutex<Option<Arc<FrameAllocator>>>,
        seen: Mutex<Vec<Pfn>>,
    }
    impl TlbFlush for Checking {
        fn flush_frames(&self, batch: &[FlushFrame]) -> Result<(), TlbFlushError> {
            let frames = self.frames.lock().clone();
            for f in batch
                .iter()
                .filter(|f| f.reason == FlushReason::TableChanged)
            {
                if let Some(a) = &frames {
                    assert_eq!(
                        a.owner(f.pfn),
                        Ok(FrameOwner::External),
                        "frame {:#x}",
                        f.pfn
                    );
                }
                self.seen.lock().push(f.pfn);
            }
            Ok(())
        }
    }
    let check = Arc::new(Checking {
        frames: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let cfg = ShadowMmuConfig {
        max_roots: 1,
        ..ShadowMmuConfig::default()
    };
    let mut g = Guest::with_tlb(64, 256, cfg, MmapFlags::empty(), check.clone());
    *check.frames.lock() = Some(g.mm.frames().clone());
    g.map(0x1000, 0x1000, P | RW | A | D);
    assert_eq!(g.write_fault(0x1000), FaultOutcome::Fixed);
    let old_root = g.mmu.root(0).unwrap();
    // A second CR3 with max_roots 1 recycles the first root and its tables.
    let cr3b = g.alloc_table();
    g.map_in(cr3b, 0x1000, 0x1000, P | RW | A | D);
    g.mmu.load_cr3(0, cr3b).unwrap();
    assert!(
        check.seen.lock().contains(&old_root),
        "the recycled root was named in a flush"
    );
    g.check();
}

/// Whatever unlinks or empties a table a vCPU may reach, every vCPU is
/// kicked out first: the table is named in a flush (the VMM's memslot
/// bounce, after which no vCPU enters the guest before the MMU lock is
/// released and the exception-delivery pages are back) while its entries
/// are still there. Checked at every flush that names the root, through the
/// three paths that take a root's links away from a vCPU running on it:
/// the guest writing its PML4 (the root in use is zapped), the resync of
/// that unsync root at the next FLUSH_TLB, and invlpg through the unsync
/// root. A flush only after the unlink would leave a window in which the
/// host's walk for another vCPU's exception finds its stacks unmapped.
#[test]
fn a_table_a_vcpu_may_reach_is_flushed_before_its_links_go() {
    use shadowvm::mm::{FrameAccess, MachineMemory, Pfn};
    use shadowvm::mmu::{FlushFrame, FlushReason, TlbFlush, TlbFlushError};

    /// At every flush naming `root` as a changed table: its entry `idx`.
    struct Watch {
        mem: Mutex<Option<Arc<dyn MachineMemory>>>,
        root: Mutex<Option<(Pfn, usize)>>,
        seen: Mutex<Vec<u64>>,
    }
    impl TlbFlush for Watch {
        fn flush_frames(&self, batch: &[FlushFrame]) -> Result<(), TlbFlushError> {
            let (Some(mem), Some((root, idx))) = (self.mem.lock().clone(), *self.root.lock())
            else {
                return Ok(());
            };
            if batch
                .iter()
                .any(|f| f.pfn == root && f.reason == FlushReason::TableChanged)
            {
                let e = mem.frame_word(root, idx).unwrap().load(Ordering::Acquire);
                self.seen.lock().push(e);
            }
            Ok(())
        }
    }
    /// PML4 entry 1: stands for the per-vCPU area exception delivery needs.
    const GVA: u64 = 1 << 39;
    const WIN: u64 = 0x80_0000;
    let watch = Arc::new(Watch {
        mem: Mutex::new(None),
        root: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let cfg = ShadowMmuConfig {
        nr_vcpus: 2,
        ..ShadowMmuConfig::default()
    };
    let mut g = Guest::with_tlb(64, 256, cfg, MmapFlags::empty(), watch.clone());
    *watch.mem.lock() = Some(g.mm.memory().clone());
    g.mmu.load_cr3(1, g.cr3).unwrap();
    let root = g.mmu.root(0).unwrap();
    assert_eq!(g.mmu.root(1).unwrap(), root, "both vCPUs run on one root");
    g.map(GVA, 0x1000, P | RW | A | D);
    g.map(WIN, g.cr3, P | RW | A | D);
    let entry = || {
        g.mm.memory()
            .frame_word(root, 1)
            .unwrap()
            .load(Ordering::Acquire)
    };
    // vCPU 1 uses GVA: the root links PML4 entry 1.
    let vcpu1_touches = || {
        assert_eq!(
            g.mmu.page_fault(1, GVA, PfErrorCode::empty()).unwrap(),
            FaultOutcome::Fixed
        );
        assert_ne!(entry(), 0, "vCPU 1's path is in the root");
    };
    let kicked_first = |what: &str| {
        let seen = std::mem::take(&mut *watch.seen.lock());
        assert!(!seen.is_empty(), "{what}: the root was named in a flush");
        assert_ne!(seen[0], 0, "{what}: the first flush came before the unlink");
        assert_eq!(entry(), 0, "{what}: and the link is gone");
    };
    vcpu1_touches();
    *watch.root.lock() = Some((root, 1));

    // vCPU 0 writes its PML4: the root in use is zapped (emptied, unsync).
    assert_eq!(g.write_fault(WIN), FaultOutcome::Fixed);
    kicked_first("zap of the root in use");

    // vCPU 1 runs on the unsync root again; vCPU 0's FLUSH_TLB resyncs it.
    vcpu1_touches();
    g.mmu.flush_tlb(0).unwrap();
    kicked_first("resync at FLUSH_TLB");

    // Unsync again; vCPU 0 invlpg's GVA through the unsync root.
    assert_eq!(g.write_fault(WIN), FaultOutcome::Fixed);
    watch.seen.lock().clear();
    vcpu1_touches();
    g.mmu.invlpg(0, GVA).unwrap();
    kicked_first("invlpg through the unsync root");
    g.check();
}
