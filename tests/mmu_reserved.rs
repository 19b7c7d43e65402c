//! The PML4 slot the VMM keeps for the switcher (`ShadowMmuConfig::reserved`,
//! docs/guest-abi.md §3): every root holds the VMM's entry there, no zap,
//! flush, invalidation or root recycling removes it, no guest mapping is
//! ever built under it whatever the guest's tables say, and the coherence
//! checker notices if the entry changes. No KVM needed.

mod common;

use std::sync::atomic::Ordering;

use common::mmu_guest::*;
use shadowvm::mm::{FrameAccess, MmapFlags, PAGE_SIZE};
use shadowvm::mmu::walk::FaultKind;
use shadowvm::mmu::{FaultOutcome, PfErrorCode, ReservedSlot, ShadowMmuConfig};

const GVA: u64 = 0x40_0000;
const GPA: u64 = 0x10_000;
const FRAMES: u64 = 256;
/// The switcher's slot: PML4 entry 511.
const SLOT_GVA: u64 = 0xffff_ff80_0000_0000;
/// The VMM's entry: present, read-only, supervisor, Accessed, pointing at
/// the last frame (which the allocator hands out last).
const ENTRY: u64 = ((FRAMES - 1) << 12) | P | A;

fn guest(max_roots: usize) -> Guest {
    let cfg = ShadowMmuConfig {
        max_roots,
        reserved: Some(ReservedSlot {
            index: 511,
            entry: ENTRY,
        }),
        ..ShadowMmuConfig::default()
    };
    Guest::with_config(64, FRAMES, cfg, MmapFlags::empty())
}

/// Entry 511 of the vCPU's current root.
fn root_entry(g: &Guest) -> u64 {
    let root = g.mmu.root(0).unwrap();
    g.mm.memory()
        .frame_word(root, 511)
        .unwrap()
        .load(Ordering::Acquire)
}

#[test]
fn every_root_holds_the_reserved_entry_and_nothing_zaps_it() {
    let mut g = guest(3);
    assert_eq!(root_entry(&g), ENTRY);
    g.map(GVA, GPA, P | RW | US | D);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    g.mmu.invlpg(0, SLOT_GVA).unwrap();
    g.mmu.invlpg(0, GVA).unwrap();
    g.mmu.flush_tlb(0).unwrap();
    assert_eq!(root_entry(&g), ENTRY, "after invlpg and flush");
    g.check();

    // The guest writes its own PML4 through a mapping of it: the root is
    // unprotected (emptied, unsync) and resynced at the next flush.
    let win = 0x80_0000;
    g.map(win, g.cr3, P | RW | D);
    assert_eq!(g.write_fault(win), FaultOutcome::Fixed);
    assert_eq!(root_entry(&g), ENTRY, "after the root was unprotected");
    g.mmu.flush_tlb(0).unwrap();
    assert_eq!(root_entry(&g), ENTRY, "after the root was resynced");
    g.check();

    // New roots, recycled roots.
    let mut cr3s = vec![g.cr3];
    for _ in 0..6 {
        cr3s.push(g.alloc_table());
    }
    for (i, &c) in cr3s.iter().enumerate() {
        g.map_in(c, GVA, GPA + i as u64 * PAGE_SIZE, P | RW | US | D);
    }
    for &c in cr3s.iter().chain(cr3s.iter()) {
        g.mmu.load_cr3(0, c).unwrap();
        assert_eq!(root_entry(&g), ENTRY, "root of CR3 {c:#x}");
        assert_eq!(g.read_fault(GVA), FaultOutcome::Fixed);
        g.check();
    }
    assert!(g.mmu.stats().mmu_recycled > 0);

    // The host takes all of guest RAM away.
    g.mm.madvise_dontneed(g.ram_hva, g.ram_pages * PAGE_SIZE)
        .unwrap();
    assert_eq!(root_entry(&g), ENTRY, "after the host invalidated RAM");
    g.check();
}

#[test]
fn the_guest_cannot_map_over_the_reserved_slot() {
    let mut g = guest(8);
    // The guest's own tables map the slot, user and writable.
    for gva in [SLOT_GVA, SLOT_GVA + PAGE_SIZE, SLOT_GVA + (1 << 30)] {
        g.map(gva, GPA, P | RW | US | A | D);
    }
    let root = g.mmu.root(0).unwrap();
    for gva in [SLOT_GVA, SLOT_GVA + PAGE_SIZE, SLOT_GVA + (1 << 30)] {
        for ec in [
            PfErrorCode::empty(),
            PfErrorCode::WRITE,
            PfErrorCode::USER,
            PfErrorCode::USER | PfErrorCode::WRITE,
            PfErrorCode::FETCH,
            PfErrorCode::PRESENT | PfErrorCode::WRITE,
        ] {
            let FaultOutcome::Guest(pf) = g.fault(gva, ec) else {
                panic!("{gva:#x} {ec:?}: the MMU built a mapping in the reserved slot");
            };
            assert_eq!(pf.kind, FaultKind::Reserved);
            assert_eq!(pf.address, gva);
            // The protection fault the VMM's read-only supervisor mapping
            // gives: P, and the access's W/U/I (I because EFER.NX is set).
            let want = PfErrorCode::PRESENT | (ec & !PfErrorCode::PRESENT);
            assert_eq!(pf.error_code, want, "{gva:#x} {ec:?}");
        }
    }
    assert_eq!(g.mmu.root(0).unwrap(), root);
    assert_eq!(root_entry(&g), ENTRY);
    // Nothing of the guest's was installed: the only shadow page is the root.
    assert_eq!(g.mmu.nr_sptes(), 0);
    assert_eq!(g.mmu.nr_shadow_pages(), 1);
    g.check();
}

#[test]
fn the_checker_catches_a_changed_reserved_entry() {
    let g = guest(8);
    g.check();
    let root = g.mmu.root(0).unwrap();
    let word = g.mm.memory().frame_word(root, 511).unwrap();
    word.store(ENTRY | RW | US, Ordering::Release);
    let e = g.mmu.check_coherence().unwrap_err();
    assert!(
        e.to_string().contains("not the VMM's reserved entry"),
        "{e}"
    );
    word.store(0, Ordering::Release);
    assert!(g.mmu.check_coherence().is_err(), "a missing entry too");
}

/// A pre-fault or a populate (the POPULATE hypercall) never maps under the
/// slot either, whatever the guest's tables say there, Accessed and Dirty
/// at every level; the translation the VMM populates host memory from
/// skips it too.
#[test]
fn pre_fault_and_populate_skip_the_reserved_slot() {
    let mut g = guest(8);
    let cr3 = g.cr3;
    for i in 0..4 {
        let gva = SLOT_GVA + i * PAGE_SIZE;
        g.map(gva, GPA + i * PAGE_SIZE, P | RW | US | A | D);
        for level in 2..=4 {
            let e = g.pte_gpa(cr3, gva, level);
            let v = g.read_u64(e);
            g.write_u64(e, v | A);
        }
    }
    let len = 4 * PAGE_SIZE;
    let r = g.mmu.pre_fault(0, SLOT_GVA, len).unwrap();
    assert_eq!((r.mapped, r.skipped), (0, 4));
    let r = g.mmu.populate(0, SLOT_GVA, len).unwrap();
    assert_eq!((r.mapped, r.skipped), (0, 4));
    let t = g.mmu.accessed_runs(0, SLOT_GVA, len).unwrap();
    assert!(t.runs.is_empty(), "{t:?}");
    assert_eq!(t.skipped, 4);
    // The last pages of the address space: no overflow at 2^64.
    let top = u64::MAX - PAGE_SIZE + 1;
    let r = g.mmu.populate(0, top - PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!((r.mapped, r.skipped), (0, 1));
    assert_eq!(root_entry(&g), ENTRY);
    assert_eq!(g.mmu.nr_sptes(), 0, "nothing mapped");
    g.check();
}
