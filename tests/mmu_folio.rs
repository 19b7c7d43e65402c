//! The shadow MMU over large folios: prefetch of a fault's neighbours
//! (`FNAME(pte_prefetch)`, `direct_pte_prefetch`), 2 MiB sptes over host
//! huge PMDs (`kvm_mmu_hugepage_adjust`, `disallow_lpage`) and what zaps
//! them, and the pre-fault (`KVM_PRE_FAULT_MEMORY`), each against the
//! coherence checker; and the races with invalidations, forced with the
//! race hook.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::mmu_guest::{A, D, Guest, P, PS, RW, US, spte_pfn};
use shadowvm::mm::{MmapFlags, PAGE_SIZE, Prot, Pte, ThpConfig, ThpEnabled};
use shadowvm::mmu::spte_bits;
use shadowvm::mmu::{FaultOutcome, GpaRun, PfErrorCode, PrefaultResult, ShadowMmuConfig};

const GVA: u64 = 0x40_0000_0000;
const M2: u64 = 2 << 20;

fn cfg(prefetch: usize) -> ShadowMmuConfig {
    ShadowMmuConfig {
        pte_prefetch: prefetch,
        ..ShadowMmuConfig::default()
    }
}

fn guest(ram_pages: u64, frames: u64, prefetch: usize, thp: ThpConfig) -> Guest {
    let g = Guest::with_config(ram_pages, frames, cfg(prefetch), MmapFlags::empty());
    g.mm.set_thp_config(thp);
    g
}

fn mthp(sizes: &str) -> ThpConfig {
    let mut c = ThpConfig::off();
    c.enable_sizes(sizes).unwrap();
    c
}

/// Maps the 2 MiB at `gva` to `gpa` with a PDE (PS).
fn map_2m(g: &mut Guest, gva: u64, gpa: u64, flags: u64) {
    let cr3 = g.cr3;
    let e = g.pte_gpa(cr3, gva, 2);
    g.write_u64(e, gpa | flags | PS);
}

/// Sets A in the entries above the leaf of `gva` (levels 4 to `leaf + 1`),
/// as a guest that builds its tables for pre-faulting does.
fn accessed_path(g: &mut Guest, gva: u64, leaf: u8) {
    let cr3 = g.cr3;
    for level in leaf + 1..=4 {
        let e = g.pte_gpa(cr3, gva, level);
        let v = g.read_u64(e);
        g.write_u64(e, v | A);
    }
}

/// Maps gva page `i` to gfn `8 + i` (accessed, dirty) for `i < n`, with
/// the host pages present.
fn map_present(g: &mut Guest, n: u64) {
    for i in 0..n {
        let gpa = (8 + i) * PAGE_SIZE;
        g.map(GVA + i * PAGE_SIZE, gpa, P | RW | US | A | D);
        g.mm.write(g.hva(gpa), b"x").unwrap();
    }
}

/// The guest's PTEs of the first `n` gva pages.
fn guest_ptes(g: &mut Guest, n: u64) -> Vec<u64> {
    let cr3 = g.cr3;
    (0..n)
        .map(|i| {
            let e = g.pte_gpa(cr3, GVA + i * PAGE_SIZE, 1);
            g.read_u64(e)
        })
        .collect()
}

fn leaf(g: &Guest, gva: u64) -> Option<(u64, u8)> {
    g.mmu.leaf_at(0, gva).unwrap()
}

// ---------------------------------------------------------------------------
// Prefetch
// ---------------------------------------------------------------------------

#[test]
fn prefetch_installs_only_what_the_rules_allow() {
    let mut g = guest(64, 256, 8, ThpConfig::off());
    let table_gfn = g.first_table_page();
    // gva i -> gfn 8 + i; the fault is on i = 0.
    let gfn = |i: u64| 8 + i;
    let flags = [
        P | RW | US,         // 0: the fault
        P | RW | US | A | D, // 1: accessed and dirty: writable
        P | RW | US | A,     // 2: accessed, clean: read-only
        P | RW | US,         // 3: never accessed: left alone
        0,                   // 4: not present
        P | RW | US | A | D, // 5: host page absent: no host fault for it
        P | RW | US | A | D, // 6: a guest page table: left to a fault
        P | US | A,          // 7: read-only for the guest
    ];
    for (i, f) in flags.iter().enumerate() {
        let i = i as u64;
        let target = if i == 6 { table_gfn } else { gfn(i) };
        g.map(GVA + i * PAGE_SIZE, target * PAGE_SIZE, *f);
    }
    for i in [1u64, 2, 3, 7] {
        g.mm.write(g.hva(gfn(i) * PAGE_SIZE), &[i as u8]).unwrap();
    }
    let ptes = guest_ptes(&mut g, 8);
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    let s1 = g.spte(GVA + PAGE_SIZE).expect("1 prefetched");
    let s2 = g.spte(GVA + 2 * PAGE_SIZE).expect("2 prefetched");
    let s7 = g.spte(GVA + 7 * PAGE_SIZE).expect("7 prefetched");
    assert!(spte_bits::is_writable(s1) && !spte_bits::is_accessed(s1));
    assert!(!spte_bits::is_writable(s2) && !spte_bits::is_accessed(s2));
    assert!(!spte_bits::is_writable(s7));
    assert_eq!(spte_pfn(s1), g.host_pfn(gfn(1) * PAGE_SIZE).unwrap());
    for i in [3u64, 4, 5, 6] {
        assert_eq!(g.spte(GVA + i * PAGE_SIZE), None, "entry {i} prefetched");
    }
    assert_eq!(
        g.host_pfn(gfn(5) * PAGE_SIZE),
        None,
        "prefetch faulted the host"
    );
    assert_eq!(g.mmu.stats().pf_prefetch, 3);
    assert_eq!(g.mmu.stats().pf_fixed, 1);
    // The guest's PTEs of the neighbours are untouched (no A or D set).
    assert_eq!(guest_ptes(&mut g, 8)[1..], ptes[1..], "guest PTEs changed");
    g.check();
    // A write through the read-only prefetched spte faults, and fixes it.
    assert_eq!(g.write_fault(GVA + 2 * PAGE_SIZE), FaultOutcome::Fixed);
    assert!(spte_bits::is_writable(g.spte(GVA + 2 * PAGE_SIZE).unwrap()));
    g.check();
}

#[test]
fn prefetch_off_installs_nothing_else() {
    let mut g = guest(64, 256, 0, ThpConfig::off());
    map_present(&mut g, 8);
    g.write_fault(GVA);
    assert_eq!(g.mmu.nr_sptes(), 1);
    assert_eq!(g.mmu.stats().pf_prefetch, 0);
}

#[test]
fn a_folio_worth_of_prefetch_maps_a_64k_folio_with_one_fault() {
    let mut g = guest(256, 512, 16, mthp("64K"));
    for i in 0..16 {
        g.map(
            GVA + i * PAGE_SIZE,
            (32 + i) * PAGE_SIZE,
            P | RW | US | A | D,
        );
    }
    assert_eq!(g.write_fault(GVA + 5 * PAGE_SIZE), FaultOutcome::Fixed);
    assert_eq!(g.mm.mthp_stats()[3].anon_fault_alloc, 1, "one 64K folio");
    assert_eq!(g.mmu.nr_sptes(), 16);
    assert_eq!(g.mmu.stats().pf_prefetch, 15);
    let head = g.host_pfn(32 * PAGE_SIZE).unwrap();
    for i in 0..16 {
        let s = g.spte(GVA + i * PAGE_SIZE).unwrap();
        assert_eq!(spte_pfn(s), head + i);
        assert!(
            spte_bits::is_writable(s),
            "dirty guest PTE, writable host PTE"
        );
    }
    g.check();
}

#[test]
fn direct_prefetch_fills_the_split_of_a_guest_large_page() {
    // A guest 2 MiB page over small host pages: 4 KiB sptes in a direct
    // shadow page, neighbours prefetched where the host has pages.
    let mut g = guest(1024, 2048, 8, ThpConfig::off());
    map_2m(&mut g, GVA, 0, P | RW | US);
    for i in 0..8 {
        g.mm.write(g.hva(i * PAGE_SIZE), b"x").unwrap();
    }
    assert_eq!(g.write_fault(GVA + 3 * PAGE_SIZE), FaultOutcome::Fixed);
    assert_eq!(g.mmu.stats().pf_prefetch, 7);
    assert_eq!(leaf(&g, GVA).map(|l| l.1), Some(1));
    // The guest PDE is dirty now (the walk set D), so they are writable.
    assert!(spte_bits::is_writable(g.spte(GVA).unwrap()));
    g.check();
}

#[test]
fn an_invalidation_racing_a_prefetch_never_leaves_a_stale_spte() {
    // The hook runs after the neighbours' host pages were looked up and
    // before the MMU lock: the host drops one of them, and the guest
    // points another at a different page. Neither may be installed.
    let mut g = guest(64, 256, 8, ThpConfig::off());
    map_present(&mut g, 8);
    let cr3 = g.cr3;
    let pte3 = g.pte_gpa(cr3, GVA + 3 * PAGE_SIZE, 1);
    let mm = g.mm.clone();
    let (ram, fired) = (g.ram_hva, Arc::new(AtomicBool::new(false)));
    let f = fired.clone();
    g.mmu.set_race_hook(Some(Arc::new(move |_hva| {
        if f.swap(true, Ordering::SeqCst) {
            return;
        }
        mm.madvise_dontneed(ram + 10 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        let v = (40 * PAGE_SIZE) | P | RW | US | A | D;
        mm.write(ram + pte3, &v.to_le_bytes()).unwrap();
    })));
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    assert!(fired.load(Ordering::SeqCst));
    g.mmu.set_race_hook(None);
    assert_eq!(
        g.spte(GVA + 2 * PAGE_SIZE),
        None,
        "invalidated page prefetched"
    );
    assert_eq!(
        g.spte(GVA + 3 * PAGE_SIZE),
        None,
        "changed guest PTE prefetched"
    );
    assert_eq!(g.mmu.stats().pf_prefetch_raced, 2);
    assert_eq!(g.mmu.stats().pf_prefetch, 5);
    g.check();
}

// ---------------------------------------------------------------------------
// 2 MiB sptes
// ---------------------------------------------------------------------------

/// 4 MiB of guest RAM (the tables at its top), THP on.
fn thp_guest() -> Guest {
    guest(1024, 2048, 0, ThpConfig::pmd(ThpEnabled::Always))
}

#[test]
fn a_large_spte_needs_a_guest_2m_page_a_host_pmd_and_no_shadowed_table() {
    let mut g = thp_guest();
    map_2m(&mut g, GVA, 0, P | RW | US);
    assert_eq!(g.write_fault(GVA + 77 * PAGE_SIZE), FaultOutcome::Fixed);
    let (s, level) = leaf(&g, GVA + 300 * PAGE_SIZE).expect("mapped");
    assert_eq!(level, 2, "a 2 MiB spte");
    assert!(spte_bits::is_large(s) && spte_bits::is_writable(s));
    let pmd = g.mm.huge_pmd(g.hva(0)).unwrap();
    assert_eq!(spte_pfn(s), pmd.pfn);
    assert_eq!(g.mmu.nr_large_sptes(), 1);
    assert_eq!(g.mmu.stats().pf_fixed_2m, 1);
    g.check();

    // A 4 KiB guest mapping of the same host PMD: a 4 KiB spte.
    g.map(GVA + M2, 5 * PAGE_SIZE, P | RW | US);
    g.write_fault(GVA + M2);
    assert_eq!(leaf(&g, GVA + M2).map(|l| l.1), Some(1));

    // A guest 2 MiB page over the range holding the guest's own tables:
    // disallowed, 4 KiB sptes (the host has a huge PMD there too).
    map_2m(&mut g, GVA + 2 * M2, M2, P | RW | US);
    g.read_fault(GVA + 2 * M2 + 5 * PAGE_SIZE);
    assert_eq!(leaf(&g, GVA + 2 * M2 + 5 * PAGE_SIZE).map(|l| l.1), Some(1));
    assert_eq!(g.mmu.nr_large_sptes(), 1);
    g.check();
}

#[test]
fn no_large_spte_over_small_host_pages() {
    let mut g = guest(1024, 2048, 0, ThpConfig::off());
    map_2m(&mut g, GVA, 0, P | RW | US);
    g.write_fault(GVA);
    assert_eq!(leaf(&g, GVA).map(|l| l.1), Some(1));
    assert_eq!(g.mmu.nr_large_sptes(), 0);
    g.check();
}

/// A guest with one 2 MiB spte over gpa 0, and the gva it maps at.
fn large_mapped(flags: MmapFlags) -> Guest {
    let mut g = Guest::with_config(1024, 2048, cfg(0), flags);
    g.mm.set_thp_config(ThpConfig::pmd(ThpEnabled::Always));
    map_2m(&mut g, GVA, 0, P | RW | US);
    g.mm.write(g.hva(0), &[0x11; 4096]).unwrap();
    g.mm.write(g.hva(PAGE_SIZE), &[0x11; 4096]).unwrap();
    assert_eq!(g.write_fault(GVA), FaultOutcome::Fixed);
    assert_eq!(g.mmu.nr_large_sptes(), 1, "set up a 2 MiB spte");
    g.flush.take();
    g
}

fn assert_large_gone(g: &Guest, what: &str) {
    assert_eq!(g.mmu.nr_large_sptes(), 0, "{what} left the 2 MiB spte");
    assert!(
        !g.flush.calls().is_empty(),
        "{what}: the 2 MiB spte's frames were not flushed"
    );
    g.check();
    // Whatever the host did, the guest can fault its pages back.
    let r = g.mmu.page_fault(0, GVA + 4 * PAGE_SIZE, PfErrorCode::WRITE);
    assert!(
        matches!(
            r,
            Ok(FaultOutcome::Fixed) | Ok(FaultOutcome::HostFault { .. })
        ),
        "{r:?}"
    );
    g.check();
}

#[test]
fn partial_host_operations_zap_the_large_spte() {
    let g = large_mapped(MmapFlags::empty());
    g.mm.madvise_dontneed(g.hva(9 * PAGE_SIZE), PAGE_SIZE)
        .unwrap();
    assert_large_gone(&g, "DONTNEED of one page");

    let g = large_mapped(MmapFlags::empty());
    g.mm.mprotect(g.hva(9 * PAGE_SIZE), PAGE_SIZE, Prot::READ)
        .unwrap();
    assert_large_gone(&g, "mprotect of one page");

    let g = large_mapped(MmapFlags::empty());
    g.mm.munmap(g.hva(511 * PAGE_SIZE), PAGE_SIZE).unwrap();
    assert_large_gone(&g, "munmap of one page");

    let g = large_mapped(MmapFlags::MERGEABLE);
    for _ in 0..4 {
        g.mm.ksm_scan(1024).unwrap();
    }
    assert!(g.mm.ksm_stats().pages_sharing > 0, "KSM merged");
    assert_large_gone(&g, "KSM");

    let g = large_mapped(MmapFlags::empty());
    for _ in 0..4 {
        g.mm.reclaim(16).unwrap();
    }
    assert!(g.mm.stats().pswpout > 0, "reclaim swapped");
    assert_large_gone(&g, "reclaim");

    // Aging keeps it: the Accessed bit of the 2 MiB spte is cleared, and
    // its 512 frames flushed.
    let g = large_mapped(MmapFlags::empty());
    assert_eq!(g.mm.clear_flush_young(g.hva(7 * PAGE_SIZE)), Ok(true));
    assert_eq!(g.mmu.nr_large_sptes(), 1);
    let flushed: usize = g.flush.take().iter().map(Vec::len).sum();
    assert_eq!(flushed, 512);
    g.check();
}

#[test]
fn a_guest_table_inside_the_range_zaps_the_large_spte() {
    let mut g = large_mapped(MmapFlags::empty());
    // The guest builds a page table in gfn 16, inside the 2 MiB the spte
    // maps, and uses it: shadowing it drops the 2 MiB spte.
    let t = 16 * PAGE_SIZE;
    g.mm.write(g.hva(t), &[0u8; 4096]).unwrap();
    let other = GVA + 8 * M2;
    let cr3 = g.cr3;
    let pde = g.pte_gpa(cr3, other, 2);
    g.write_u64(pde, t | P | RW | US);
    g.write_u64(t, (20 * PAGE_SIZE) | P | RW | US);
    g.flush.take();
    assert_eq!(g.read_fault(other), FaultOutcome::Fixed);
    assert_eq!(
        g.mmu.nr_large_sptes(),
        0,
        "a shadowed table inside the 2 MiB"
    );
    assert!(!g.flush.calls().is_empty());
    g.check();
    // And while it is shadowed, the range maps with 4 KiB sptes.
    g.write_fault(GVA + 3 * PAGE_SIZE);
    assert_eq!(leaf(&g, GVA + 3 * PAGE_SIZE).map(|l| l.1), Some(1));
    g.check();
}

#[test]
fn a_split_racing_a_large_install_makes_the_fault_retry() {
    // The hook runs between hva_to_pfn (which found the huge PMD) and the
    // MMU lock; the host splits the PMD by a DONTNEED of one page. The fault
    // must not install the 2 MiB spte: it retries and maps 4 KiB.
    let mut g = thp_guest();
    map_2m(&mut g, GVA, 0, P | RW | US);
    g.mm.write(g.hva(0), b"x").unwrap();
    assert!(g.mm.huge_pmd(g.hva(0)).is_some());
    let mm = g.mm.clone();
    let (ram, fired) = (g.ram_hva, Arc::new(AtomicBool::new(false)));
    let f = fired.clone();
    g.mmu.set_race_hook(Some(Arc::new(move |_| {
        if !f.swap(true, Ordering::SeqCst) {
            mm.madvise_dontneed(ram + 100 * PAGE_SIZE, PAGE_SIZE)
                .unwrap();
        }
    })));
    assert_eq!(g.write_fault(GVA + 5 * PAGE_SIZE), FaultOutcome::Fixed);
    g.mmu.set_race_hook(None);
    assert!(fired.load(Ordering::SeqCst));
    assert!(g.mmu.stats().pf_retry >= 1);
    assert_eq!(g.mmu.nr_large_sptes(), 0);
    assert_eq!(leaf(&g, GVA + 5 * PAGE_SIZE).map(|l| l.1), Some(1));
    g.check();
}

// ---------------------------------------------------------------------------
// Pre-fault
// ---------------------------------------------------------------------------

/// A guest whose pages 0 to 7 at `GVA` are accessed and dirty (gfns 32 to
/// 39), 8 to 15 not accessed, and 16 accessed but read-only (gfn 40); the
/// entries above them accessed, as for a pre-fault.
fn half_accessed_guest() -> Guest {
    let mut g = guest(256, 512, 0, ThpConfig::off());
    for i in 0..16 {
        let f = if i < 8 {
            P | RW | US | A | D
        } else {
            P | RW | US
        };
        g.map(GVA + i * PAGE_SIZE, (32 + i) * PAGE_SIZE, f);
    }
    g.map(GVA + 16 * PAGE_SIZE, 40 * PAGE_SIZE, P | US | A);
    accessed_path(&mut g, GVA, 1);
    g
}

/// What a pre-fault of `pages` pages leaves besides its sptes: the guest's
/// PTEs of the first `before.len()` pages unchanged, no fault counted, and
/// coherent tables.
fn check_prefaulted(g: &mut Guest, before: &[u64], pages: u64) {
    assert_eq!(
        guest_ptes(g, before.len() as u64),
        before,
        "guest PTEs changed"
    );
    let st = g.mmu.stats();
    assert_eq!((st.pf_fixed, st.prefault_pages), (0, pages));
    g.check();
}

#[test]
fn pre_fault_maps_what_the_guest_has_accessed_and_counts_apart() {
    let mut g = half_accessed_guest();
    let before = guest_ptes(&mut g, 17);
    let r = g.mmu.pre_fault(0, GVA, 20 * PAGE_SIZE).unwrap();
    assert_eq!(
        r,
        PrefaultResult {
            mapped: 9,
            skipped: 11
        }
    );
    for i in 0..8 {
        let s = g.spte(GVA + i * PAGE_SIZE).expect("pre-faulted");
        assert!(spte_bits::is_writable(s) && !spte_bits::is_accessed(s));
        assert!(
            matches!(g.mm.pte(g.hva((32 + i) * PAGE_SIZE)), Some(Pte::Present(p)) if p.writable)
        );
    }
    assert!(!spte_bits::is_writable(
        g.spte(GVA + 16 * PAGE_SIZE).unwrap()
    ));
    assert_eq!(g.spte(GVA + 8 * PAGE_SIZE), None);
    assert_eq!(g.mmu.stats().prefault_skipped, 11);
    check_prefaulted(&mut g, &before, 9);
    // Again: nothing new, the same count.
    let again = g.mmu.pre_fault(0, GVA, 20 * PAGE_SIZE).unwrap();
    assert_eq!(again, r);
    assert!(g.mmu.pre_fault(0, u64::MAX - 5, 10).is_err());
}

/// The guest RAM a range maps, as the VMM reads it to populate the host
/// memory before a POPULATE: the same pages `pre_fault` maps, in runs
/// merged where the gva and gpa both continue; the guest's tables are not
/// changed.
#[test]
fn accessed_runs_are_the_pages_pre_fault_maps() {
    let mut g = half_accessed_guest();
    // Beyond RAM: never a run.
    g.map(GVA + 17 * PAGE_SIZE, 4096 * PAGE_SIZE, P | RW | US | A | D);
    let before = guest_ptes(&mut g, 18);
    let t = g.mmu.accessed_runs(0, GVA, 20 * PAGE_SIZE).unwrap();
    assert_eq!(
        t.runs,
        vec![
            GpaRun {
                gva: GVA,
                gpa: 32 * PAGE_SIZE,
                len: 8 * PAGE_SIZE
            },
            GpaRun {
                gva: GVA + 16 * PAGE_SIZE,
                gpa: 40 * PAGE_SIZE,
                len: PAGE_SIZE
            },
        ]
    );
    assert_eq!((t.mapped(), t.skipped), (9, 11));
    assert_eq!(guest_ptes(&mut g, 18), before, "guest PTEs changed");
    assert_eq!(g.mmu.nr_sptes(), 0, "a translation maps nothing");
    let r = g.mmu.pre_fault(0, GVA, 20 * PAGE_SIZE).unwrap();
    assert_eq!((r.mapped, r.skipped), (t.mapped(), t.skipped));
    // A 2 MiB guest page is one run, however many 4 KiB pages.
    map_2m(&mut g, GVA + M2, 0, P | RW | US | A | D);
    let t = g.mmu.accessed_runs(0, GVA + M2, M2).unwrap();
    assert_eq!(
        t.runs,
        vec![GpaRun {
            gva: GVA + M2,
            gpa: 0,
            len: M2
        }]
    );
    assert!(g.mmu.accessed_runs(0, u64::MAX - 5, 10).is_err());
}

/// `populate` (the POPULATE hypercall) maps the same pages as `pre_fault`
/// but as the access the guest announced: Accessed, and Dirty where
/// writable (over a dirty guest PTE only). No fault counted.
#[test]
fn populate_makes_the_sptes_as_an_access_would() {
    let mut g = guest(256, 512, 0, ThpConfig::off());
    g.map(GVA, 32 * PAGE_SIZE, P | RW | US | A | D);
    g.map(GVA + PAGE_SIZE, 33 * PAGE_SIZE, P | RW | US | A);
    g.map(GVA + 2 * PAGE_SIZE, 34 * PAGE_SIZE, P | US | A | D);
    g.map(GVA + 3 * PAGE_SIZE, 35 * PAGE_SIZE, P | RW | US);
    accessed_path(&mut g, GVA, 1);
    let before = guest_ptes(&mut g, 4);
    let r = g.mmu.populate(0, GVA, 4 * PAGE_SIZE).unwrap();
    assert_eq!((r.mapped, r.skipped), (3, 1));
    let bits = |i: u64| {
        let s = g.spte(GVA + i * PAGE_SIZE).expect("populated");
        (
            spte_bits::is_accessed(s),
            spte_bits::is_writable(s),
            s & D != 0,
        )
    };
    assert_eq!(bits(0), (true, true, true), "dirty guest PTE");
    assert_eq!(bits(1), (true, false, false), "clean guest PTE: read-only");
    assert_eq!(bits(2), (true, false, false), "read-only guest PTE");
    assert_eq!(g.spte(GVA + 3 * PAGE_SIZE), None, "not accessed");
    assert_eq!(g.mmu.stats().prefault_calls, 1);
    check_prefaulted(&mut g, &before, 3);
}

#[test]
fn pre_fault_of_a_guest_2m_page_over_thp_is_one_large_spte() {
    let mut g = thp_guest();
    map_2m(&mut g, GVA, 0, P | RW | US | A | D);
    accessed_path(&mut g, GVA, 2);
    // A sparse range: one PDPT entry's worth that the guest mostly does
    // not map is skipped without walking every page.
    let r = g.mmu.pre_fault(0, GVA, 1 << 30).unwrap();
    assert_eq!(r.mapped, 512);
    assert_eq!(r.mapped + r.skipped, (1 << 30) / PAGE_SIZE);
    assert_eq!(g.mmu.nr_large_sptes(), 1);
    assert_eq!(g.mm.stats().thp_fault_alloc, 1);
    let (s, _) = leaf(&g, GVA + 9 * PAGE_SIZE).unwrap();
    assert!(spte_bits::is_writable(s) && !spte_bits::is_accessed(s));
    g.check();
    // The guest's first touch takes no fault: the spte is there.
    assert_eq!(g.mmu.stats().pf_fixed, 0);
}

#[test]
fn invlpg_anywhere_in_the_range_drops_the_large_spte() {
    let g = large_mapped(MmapFlags::empty());
    g.mmu.invlpg(0, GVA + 300 * PAGE_SIZE).unwrap();
    assert_eq!(g.mmu.nr_large_sptes(), 0);
    let flushed: usize = g.flush.take().iter().map(Vec::len).sum();
    assert_eq!(flushed, 512, "every frame of the 2 MiB spte");
    g.check();
}
