//! The shadow MMU without KVM: faults, guest TLB operations, and every
//! notifier callback keeping the shadow tables coherent, with the coherence
//! checker after each step.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::mmu_guest::*;
use shadowvm::mm::{Access, FrameAccess, FrameOwner, MmError, MmapFlags, PAGE_SIZE, Prot};
use shadowvm::mmu::walk::FaultKind;
use shadowvm::mmu::{
    FaultOutcome, FlushReason, MmuError, PfErrorCode, RecordingFlush, ShadowMmuConfig,
};
use shadowvm::notifier::{MmuNotifierOps, MmuNotifierRange, NotifierError};

const GVA: u64 = 0x40_0000;
const GPA: u64 = 0x10_000;

/// A guest whose `n` pages from GVA on map the `n` pages from GPA on,
/// present, writable, user and dirty.
fn mapped(n: u64) -> Guest {
    let mut g = Guest::new(64, 128);
    for i in 0..n {
        g.map(GVA + i * PAGE_SIZE, GPA + i * PAGE_SIZE, P | RW | US | D);
    }
    g
}

/// Asserts that the spte of `gva` maps the host frame behind `gpa`.
#[track_caller]
fn assert_spte_maps(g: &Guest, gva: u64, gpa: u64, what: &str) {
    let spte = g
        .spte(gva)
        .unwrap_or_else(|| panic!("no spte at {gva:#x}: {what}"));
    assert_eq!(spte_pfn(spte), g.host_pfn(gpa).unwrap(), "{what}");
}

/// A read fault on `gva` is fixed with an spte to `gpa`'s frame, and the
/// shadow tables stay coherent.
#[track_caller]
fn read_fault_maps(g: &Guest, gva: u64, gpa: u64) {
    assert_eq!(g.read_fault(gva), FaultOutcome::Fixed);
    let what = format!("the read fault at {gva:#x} maps gpa {gpa:#x}");
    assert_spte_maps(g, gva, gpa, &what);
    g.check();
}

#[test]
fn read_then_write_fault_sets_guest_a_then_d() {
    let mut g = Guest::new(64, 128);
    g.map(GVA, GPA, P | RW | US);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    let spte = g.spte(GVA).expect("spte installed");
    assert_eq!(spte_pfn(spte), g.host_pfn(GPA).unwrap());
    assert_eq!(
        spte & RW,
        0,
        "clean guest PTE: the spte must not be writable"
    );
    let leaf = g.pte_gpa(g.cr3, GVA, 1);
    assert_eq!(g.read_u64(leaf) & (A | D), A, "a read sets A only");
    g.check();

    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    let spte = g.spte(GVA).unwrap();
    assert_ne!(spte & RW, 0);
    assert_eq!(g.read_u64(leaf) & (A | D), A | D, "a write sets D");
    let s = g.mmu.stats();
    assert_eq!(s.pf_fixed, 2);
    g.check();
}

#[test]
fn guest_faults_are_reported_with_the_architectural_error_code() {
    let mut g = Guest::new(64, 128);
    // Not present.
    match g.read_fault(GVA) {
        FaultOutcome::Guest(pf) => {
            assert_eq!(pf.error_code, PfErrorCode::empty());
            assert_eq!(pf.address, GVA);
        }
        o => panic!("{o:?}"),
    }
    // Supervisor page, user write.
    g.map(GVA, GPA, P | RW);
    match g.fault(GVA, PfErrorCode::WRITE | PfErrorCode::USER) {
        FaultOutcome::Guest(pf) => {
            assert_eq!(
                pf.error_code,
                PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER
            );
            assert_eq!(pf.kind, FaultKind::Protection);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(g.spte(GVA), None, "a guest fault installs nothing");
    assert_eq!(g.mmu.stats().pf_guest, 2);
    g.check();
}

#[test]
fn a_gpa_outside_the_memslots_is_mmio_never_a_mapping() {
    let mut g = Guest::new(64, 128);
    g.map(GVA, 0x1_0000_0000, P | RW | D);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Mmio { gpa: 0x1_0000_0000 });
    assert_eq!(g.spte(GVA), None);
    g.check();
}

#[test]
fn dontneed_zaps_the_spte_and_flushes_before_returning() {
    let g = mapped(1);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    g.mm.write(g.hva(GPA), b"old").unwrap();
    let old = g.host_pfn(GPA).unwrap();
    g.flush.take();
    g.mm.madvise_dontneed(g.hva(GPA), PAGE_SIZE).unwrap();
    assert_eq!(g.spte(GVA), None);
    assert!(g.flush.flushed(old), "the zapped frame was not flushed");
    assert_eq!(g.mm.frames().owner(old).unwrap(), FrameOwner::Free);
    g.check();
    // The refault maps the new zero page.
    read_fault_maps(&g, GVA, GPA);
    let mut b = [1u8; 3];
    g.mm.read(g.hva(GPA), &mut b).unwrap();
    assert_eq!(b, [0; 3]);
    g.check();
}

/// A notifier registered before the MMU runs after it (newest first), so at
/// its `invalidate_range_start` the MMU's must have flushed already.
struct FlushedBefore {
    flush: Arc<RecordingFlush>,
    frame: AtomicUsize,
    ok: AtomicBool,
}

impl MmuNotifierOps for FlushedBefore {
    fn invalidate_range_start(&self, _r: &MmuNotifierRange) -> Result<(), NotifierError> {
        let f = self.frame.load(Ordering::SeqCst) as u64;
        self.ok.store(self.flush.flushed(f), Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn flush_is_done_before_invalidate_range_start_returns() {
    let mut g = mapped(1);
    // Unregister and register again so the checker notifier is older.
    let checker = Arc::new(FlushedBefore {
        flush: g.flush.clone(),
        frame: AtomicUsize::new(usize::MAX),
        ok: AtomicBool::new(false),
    });
    let mm = g.mm.clone();
    let reg = mm.mmu_notifier_register(checker.clone()).unwrap();
    // Re-create the MMU so it is newer than the checker.
    let slots = g.mmu.memslots().clone();
    g.mmu.unregister();
    g.mmu = shadowvm::mmu::ShadowMmu::new(
        mm.clone(),
        slots,
        g.flush.clone(),
        ShadowMmuConfig::default(),
    )
    .unwrap();
    g.mmu.load_cr3(0, g.cr3).unwrap();
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    let frame = g.host_pfn(GPA).unwrap();
    checker.frame.store(frame as usize, Ordering::SeqCst);
    g.flush.take();
    mm.mprotect(g.hva(GPA), PAGE_SIZE, Prot::READ).unwrap();
    assert!(
        checker.ok.load(Ordering::SeqCst),
        "frame {frame} not flushed when the MMU's start returned"
    );
    reg.unregister();
    g.check();
}

#[test]
fn mprotect_read_only_host_page_gives_read_only_spte_and_host_fault_on_write() {
    let g = mapped(1);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    g.mm.mprotect(g.hva(GPA), PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(g.spte(GVA), None);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(
        g.spte(GVA).unwrap() & RW,
        0,
        "host read-only: spte read-only"
    );
    g.check();
    match g.write_fault(GVA) {
        FaultOutcome::HostFault {
            gpa,
            error: MmError::Access { .. },
        } => assert_eq!(gpa, GPA),
        o => panic!("{o:?}"),
    }
    g.check();
}

#[test]
fn ksm_merge_repoints_or_zaps_and_cow_gives_a_private_frame() {
    let g = mapped(2);
    let (g1, g2) = (GPA, GPA + PAGE_SIZE);
    let content = vec![0x77u8; PAGE_SIZE as usize];
    g.mm.write(g.hva(g1), &content).unwrap();
    g.mm.write(g.hva(g2), &content).unwrap();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(g.read_fault(GVA + PAGE_SIZE), FaultOutcome::Fixed);
    for _ in 0..4 {
        g.mm.ksm_scan(1000).unwrap();
    }
    let st = g.mm.ksm_stats();
    assert!(st.pages_sharing >= 1, "{st:?}");
    assert_eq!(g.host_pfn(g1), g.host_pfn(g2));
    g.check();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(g.read_fault(GVA + PAGE_SIZE), FaultOutcome::Fixed);
    let s1 = g.spte(GVA).unwrap();
    let s2 = g.spte(GVA + PAGE_SIZE).unwrap();
    assert_eq!(spte_pfn(s1), spte_pfn(s2), "both gvas map the shared frame");
    assert_eq!(s1 & RW, 0, "a shared frame is mapped read-only");
    g.check();
    // The guest writes: host COW, the spte gets a private frame.
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    let s1 = g.spte(GVA).unwrap();
    assert_ne!(spte_pfn(s1), spte_pfn(s2));
    assert_ne!(s1 & RW, 0);
    assert_eq!(spte_pfn(s1), g.host_pfn(g1).unwrap());
    g.check();
}

#[test]
fn aging_reads_and_clears_spte_accessed_bits() {
    let g = mapped(1);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    let h = g.hva(GPA);
    g.mm.clear_flush_young(h).unwrap(); // clears host and spte A
    g.flush.take();
    // Host bit clear; the spte A bit was cleared too, so nothing is young.
    assert!(!g.mm.test_young(h).unwrap());
    // The CPU sets A on the next access; model it through the refault of
    // an invlpg'd translation.
    g.mmu.invlpg(0, GVA).unwrap();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    g.mm.clear_young(h).unwrap(); // clear the host bit only... and the spte's
    assert!(!g.mm.test_young(h).unwrap());
    assert_eq!(g.spte(GVA).unwrap() & A, 0);
    g.mmu.invlpg(0, GVA).unwrap();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    g.flush.take();
    let young = g.mm.age_range(h, h + PAGE_SIZE, true).unwrap();
    assert_eq!(young.young, vec![h]);
    assert!(
        g.flush
            .calls()
            .iter()
            .flatten()
            .any(|f| f.reason == FlushReason::AccessedCleared),
        "clear_flush_young must flush the frame whose A bit it cleared"
    );
    let s = g.mmu.stats();
    assert!(s.mn_clear_flush_young >= 2 && s.mn_clear_young >= 1 && s.mn_test_young >= 1);
    g.check();
}

#[test]
fn reclaim_zaps_and_swap_in_refaults_the_same_bytes() {
    let g = mapped(1);
    g.mm.write(g.hva(GPA), b"precious").unwrap();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    // Two clock turns: the first clears young bits, the second evicts.
    g.mm.reclaim(1000).unwrap();
    g.mm.reclaim(1000).unwrap();
    assert!(matches!(
        g.mm.pte(g.hva(GPA)),
        Some(shadowvm::mm::Pte::Swap(_))
    ));
    assert_eq!(g.spte(GVA), None);
    g.check();
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    let f = spte_pfn(g.spte(GVA).unwrap());
    let mut b = [0u8; 8];
    shadowvm::mm::FrameAccess::read_frame(g.mm.memory().as_ref(), f, 0, &mut b).unwrap();
    assert_eq!(&b, b"precious");
    g.check();
}

#[test]
fn exit_releases_every_shadow_page_and_frame() {
    let g = mapped(8);
    for i in 0..8 {
        assert_eq!(g.write_fault(GVA + i * PAGE_SIZE), FaultOutcome::Fixed);
    }
    assert!(g.mmu.nr_shadow_pages() >= 4);
    g.mm.exit_mmap();
    assert_eq!(g.mmu.stats().mn_release, 1);
    assert_eq!(g.mmu.nr_shadow_pages(), 0);
    assert_eq!(g.mm.frames().nr_free(), g.mm.frames().nr_frames());
    assert_eq!(
        g.mmu.page_fault(0, GVA, PfErrorCode::empty()),
        Err(MmuError::Released)
    );
}

#[test]
fn root_cache_is_bounded_and_recycles_the_oldest() {
    let cfg = ShadowMmuConfig {
        max_roots: 3,
        ..Default::default()
    };
    let mut g = Guest::with_config(64, 256, cfg, MmapFlags::empty());
    let mut cr3s = vec![g.cr3];
    for _ in 0..5 {
        let t = g.alloc_table();
        cr3s.push(t);
    }
    for (i, &c) in cr3s.iter().enumerate() {
        g.map_in(c, GVA, GPA + i as u64 * PAGE_SIZE, P | RW | US | D);
    }
    for &c in &cr3s {
        g.mmu.load_cr3(0, c).unwrap();
        assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
        g.check();
    }
    assert_eq!(g.mmu.nr_roots(), 3);
    assert_eq!(g.mmu.stats().mmu_recycled, 3);
    // Back to a cached root: its sptes are still there.
    let c = cr3s[5];
    g.mmu.load_cr3(0, c).unwrap();
    assert!(g.spte(GVA).is_some());
    assert_eq!(g.mmu.paging(0).unwrap().cr3, c);
    assert_eq!(
        g.mmu.load_cr3(0, 1 << 50),
        Err(MmuError::InvalidCr3(1 << 50))
    );
    g.check();
}

/// A write that bypasses the sptes (a device's DMA into a guest page
/// table) is not caught by write protection: a flush keeps the synced shadow
/// of the old entry until `track_write` drops it (`kvm_mmu_track_write`).
#[test]
fn a_device_write_to_a_guest_table_takes_effect_after_track_write() {
    let mut g = mapped(1);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    let leaf_gpa = g.pte_gpa(g.cr3, GVA, 1);
    // The device writes the PTE straight into the frame.
    g.write_u64(leaf_gpa, (GPA + PAGE_SIZE) | P | RW | US | D);
    g.mmu.flush_tlb(0).unwrap();
    assert_spte_maps(
        &g,
        GVA,
        GPA,
        "write protection did not see the device's write",
    );
    // Other gfns (data, not tables) change nothing.
    let zapped = g.mmu.stats().spte_zapped;
    g.mmu
        .track_write(GPA / PAGE_SIZE..GPA / PAGE_SIZE + 4)
        .unwrap();
    assert_eq!(g.mmu.stats().spte_zapped, zapped);
    assert!(g.spte(GVA).is_some());
    g.mmu
        .track_write(leaf_gpa / PAGE_SIZE..leaf_gpa / PAGE_SIZE + 1)
        .unwrap();
    assert_eq!(g.spte(GVA), None, "the table's shadow page went");
    g.check();
    read_fault_maps(&g, GVA, GPA + PAGE_SIZE);
}

#[test]
fn guest_pte_change_is_seen_after_invlpg_and_table_writes_unprotect() {
    let mut g = mapped(1);
    assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
    // The leaf table's page is write-protected: a guest mapping of it is
    // read-only, and a write through it unprotects.
    let leaf_gpa = g.pte_gpa(g.cr3, GVA, 1);
    let table = leaf_gpa & ADDR;
    let win = 0x80_0000;
    g.map(win, table, P | RW | D);
    assert_eq!(g.read_fault(win), FaultOutcome::Fixed);
    assert_eq!(
        g.spte(win).unwrap() & RW,
        0,
        "a guest page table is mapped read-only"
    );
    g.check();
    assert_eq!(g.write_fault(win), FaultOutcome::Fixed);
    assert_ne!(g.spte(win).unwrap() & RW, 0);
    assert!(g.mmu.stats().mmu_unsync >= 1);
    // The shadow of the old leaf table went with it.
    assert_eq!(g.spte(GVA), None);
    g.check();
    // Remap the gva (as the guest would through the window) and invlpg.
    g.write_u64(leaf_gpa, (GPA + PAGE_SIZE) | P | RW | US | D);
    g.mmu.invlpg(0, GVA).unwrap();
    read_fault_maps(&g, GVA, GPA + PAGE_SIZE);
}

#[test]
fn large_guest_pages_are_shadowed_by_4k_sptes() {
    let mut g = Guest::new(1024, 2048);
    // A 2 MiB guest page at gva 0x20_0000 → gpa 0 (RAM is 4 MiB).
    let pde = g.pte_gpa(g.cr3, 0x20_0000, 2);
    g.write_u64(pde, PS | P | RW | US | D);
    read_fault_maps(&g, 0x20_0000 + 5 * PAGE_SIZE, 5 * PAGE_SIZE);
}

#[test]
fn the_fault_invalidate_race_is_detected_and_retried() {
    let g = mapped(1);
    let mm = g.mm.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    // The invalidation lands between the sequence read + hva → frame and
    // the spte install: the frame the fault looked up is freed.
    g.mmu.set_race_hook(Some(Arc::new(move |hva| {
        if !f2.swap(true, Ordering::SeqCst) {
            mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
        }
    })));
    let before = g.mmu.stats().pf_retry;
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(
        g.mmu.stats().pf_retry,
        before + 1,
        "the racing attempt must be dropped"
    );
    assert_spte_maps(
        &g,
        GVA,
        GPA,
        "the spte maps the live frame, not the freed one",
    );
    g.mmu.set_race_hook(None);
    g.check();
}

/// The checker is only worth something if it fails: corrupt a leaf spte
/// in machine memory (as a bug would) and it must say so.
#[test]
fn the_checker_catches_sptes_to_shadow_pages_free_frames_and_wrong_frames() {
    let g = mapped(2);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(g.write_fault(GVA + PAGE_SIZE), FaultOutcome::Fixed);
    g.check();
    // Find the level-1 shadow table and the leaf word for GVA.
    let mem = g.mm.memory().clone();
    let mut table = g.mmu.root(0).unwrap();
    for level in (2..=4u32).rev() {
        let idx = ((GVA >> (12 + 9 * (level - 1))) & 511) as usize;
        table = spte_pfn(mem.frame_word(table, idx).unwrap().load(Ordering::SeqCst));
    }
    let leaf = mem.frame_word(table, ((GVA >> 12) & 511) as usize).unwrap();
    let good = leaf.load(Ordering::SeqCst);
    let with_frame = |f: u64| (good & !ADDR) | (f << 12);

    leaf.store(with_frame(g.mmu.root(0).unwrap()), Ordering::SeqCst); // a shadow page
    assert!(
        g.mmu.check_coherence().is_err(),
        "spte to a shadow page not caught"
    );
    let free = (0..g.mm.frames().nr_frames())
        .find(|&f| g.mm.frames().owner(f).unwrap() == FrameOwner::Free)
        .unwrap();
    leaf.store(with_frame(free), Ordering::SeqCst);
    assert!(
        g.mmu.check_coherence().is_err(),
        "spte to a free frame not caught"
    );
    leaf.store(
        with_frame(g.host_pfn(GPA + PAGE_SIZE).unwrap()),
        Ordering::SeqCst,
    );
    assert!(
        g.mmu.check_coherence().is_err(),
        "spte to another guest frame not caught"
    );
    leaf.store(good, Ordering::SeqCst);
    g.check();
    let _ = Access::Read;
}

#[test]
fn change_pte_repoints_read_only_or_zaps_and_flushes_before_returning() {
    use shadowvm::notifier::NotifierPte;
    let g = mapped(2);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(g.read_fault(GVA + PAGE_SIZE), FaultOutcome::Fixed);
    let old = g.host_pfn(GPA).unwrap();
    let other = g.host_pfn(GPA + PAGE_SIZE).unwrap();
    g.flush.take();
    // Dispatch change_pte straight through the mm's notifier list, as the mm
    // does between start and end: a read-only new PTE repoints the spte.
    g.mm.notifiers().change_pte(
        g.hva(GPA),
        NotifierPte {
            frame: other,
            writable: false,
        },
    );
    let s = g.spte(GVA).unwrap();
    assert_eq!(spte_pfn(s), other);
    assert_eq!(s & RW, 0, "a repointed spte is read-only");
    assert!(
        g.flush
            .calls()
            .iter()
            .flatten()
            .any(|f| f.pfn == old && f.reason == FlushReason::Repointed),
        "the old frame must be flushed before change_pte returns"
    );
    // A writable new PTE zaps instead.
    g.mm.notifiers().change_pte(
        g.hva(GPA),
        NotifierPte {
            frame: old,
            writable: true,
        },
    );
    assert_eq!(g.spte(GVA), None);
    assert_eq!(g.mmu.stats().mn_change_pte, 2);
}
