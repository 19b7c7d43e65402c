//! The exact notifier callbacks each host mm operation makes, in order,
//! with the right event (what Linux's `mm/` calls, see each test).

use std::sync::Arc;

use shadowvm::mm::{Access, Mm, MmError, MmapFlags, PAGE_SIZE, Prot, Pte, ThpConfig, ThpEnabled};
use shadowvm::notifier::recorder::{Recorded, RecordingNotifier};
use shadowvm::notifier::{MmuNotifier, MmuNotifierRange, MmuNotifyEvent, NotifierPte};

const RW: Prot = Prot::READ.union(Prot::WRITE);

struct Fixture {
    mm: Arc<Mm>,
    rec: Arc<RecordingNotifier>,
    _reg: MmuNotifier,
    base: u64,
}

fn fixture(pages: u64, flags: MmapFlags) -> Fixture {
    let mm = Mm::new_anonymous(64).unwrap();
    let base = mm.mmap(None, pages * PAGE_SIZE, RW, flags).unwrap();
    registered(mm, base)
}

/// `mm` with a recording notifier registered.
fn registered(mm: Arc<Mm>, base: u64) -> Fixture {
    let rec = Arc::new(RecordingNotifier::new("rec"));
    let reg = mm.mmu_notifier_register(rec.clone()).unwrap();
    Fixture {
        mm,
        rec,
        _reg: reg,
        base,
    }
}

fn page_range(event: MmuNotifyEvent, hva: u64) -> MmuNotifierRange {
    MmuNotifierRange::new(event, hva, hva + PAGE_SIZE)
}

/// `invalidate_range_start` of event `e` over `[s, end)`.
fn start(e: MmuNotifyEvent, s: u64, end: u64) -> Recorded {
    Recorded::InvalidateRangeStart(MmuNotifierRange::new(e, s, end))
}

/// `invalidate_range_end` of event `e` over `[s, end)`.
fn end(e: MmuNotifyEvent, s: u64, end: u64) -> Recorded {
    Recorded::InvalidateRangeEnd(MmuNotifierRange::new(e, s, end))
}

/// `invalidate_range` (a TLB flush) over `[start, end)`.
fn ir(start: u64, end: u64) -> Recorded {
    Recorded::InvalidateRange { start, end }
}

/// One range notified around PTE changes: start, then the end, which calls
/// `invalidate_range` first (`mmu_notifier_invalidate_range_end`).
fn notified(r: MmuNotifierRange) -> Vec<Recorded> {
    vec![
        Recorded::InvalidateRangeStart(r),
        ir(r.start, r.end),
        Recorded::InvalidateRangeEnd(r),
    ]
}

/// `clear_flush_young` over `[start, end)`.
fn flush_young(start: u64, end: u64) -> Recorded {
    Recorded::ClearFlushYoung { start, end }
}

fn pfn(mm: &Mm, hva: u64) -> u64 {
    match mm.pte(hva) {
        Some(Pte::Present(p)) => p.pfn,
        other => panic!("no present PTE at {hva:#x}: {other:?}"),
    }
}

#[test]
fn faults_never_notify() {
    let f = fixture(2, MmapFlags::empty());
    let mut b = [0u8; 1];
    f.mm.read(f.base, &mut b).unwrap(); // demand-zero, read-only
    f.mm.write(f.base, b"x").unwrap(); // write fault: reuse in place
    f.mm.handle_mm_fault(f.base + PAGE_SIZE, Access::Write)
        .unwrap();
    assert!(f.rec.log().is_empty(), "{:?}", f.rec.log());
    f.mm.check_consistency().unwrap();
}

#[test]
fn madvise_dontneed_clears_inside_start_end() {
    // 4.19 zap_page_range: start(CLEAR); PTEs cleared; end (which calls
    // invalidate_range first); then tlb_finish_mmu flushes the range of the
    // PTEs it cleared (tlb_flush_mmu_tlbonly → invalidate_range) and frees.
    let f = fixture(4, MmapFlags::empty());
    f.mm.write(f.base + PAGE_SIZE, b"x").unwrap();
    f.mm.madvise_dontneed(f.base, 4 * PAGE_SIZE).unwrap();
    let r = MmuNotifierRange::new(MmuNotifyEvent::Clear, f.base, f.base + 4 * PAGE_SIZE);
    let mut want = notified(r);
    want.push(ir(f.base + PAGE_SIZE, f.base + 2 * PAGE_SIZE));
    assert_eq!(f.rec.take(), want);
    assert_eq!(f.mm.pte(f.base + PAGE_SIZE), None);
    // Nothing populated: the range is still notified, but no flush follows.
    f.mm.madvise_dontneed(f.base, 4 * PAGE_SIZE).unwrap();
    assert_eq!(f.rec.take(), notified(r));
    f.mm.check_consistency().unwrap();
}

#[test]
fn madvise_dontneed_zaps_vma_by_vma_and_stops_at_a_locked_one() {
    // madvise(): one zap_page_range per VMA, clipped to it, in order; a
    // VM_LOCKED VMA fails with EINVAL after the VMAs before it were zapped;
    // a hole is ENOMEM after every VMA was done.
    let f = fixture(4, MmapFlags::empty());
    let (b, p) = (f.base, PAGE_SIZE);
    f.mm.mprotect(b + p, p, Prot::READ).unwrap(); // splits the VMA in three
    f.mm.mlock(b + 3 * p, p).unwrap();
    f.mm.write(b, b"x").unwrap();
    f.rec.take();
    assert_eq!(
        f.mm.madvise_dontneed(b, 4 * p),
        Err(MmError::Locked(b + 3 * p))
    );
    let clear = |s: u64, e: u64| MmuNotifierRange::new(MmuNotifyEvent::Clear, s, e);
    let starts: Vec<MmuNotifierRange> = f
        .rec
        .take()
        .into_iter()
        .filter_map(|r| match r {
            Recorded::InvalidateRangeStart(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        starts,
        vec![
            clear(b, b + p),
            clear(b + p, b + 2 * p),
            clear(b + 2 * p, b + 3 * p)
        ]
    );
    assert_eq!(
        f.mm.pte(b),
        None,
        "the VMA before the locked one was zapped"
    );

    f.mm.munmap(b + p, p).unwrap();
    f.rec.take();
    assert_eq!(f.mm.madvise_dontneed(b, 3 * p), Err(MmError::NoMemory));
    let starts = f
        .rec
        .take()
        .into_iter()
        .filter(|r| matches!(r, Recorded::InvalidateRangeStart(_)))
        .count();
    assert_eq!(starts, 2, "both VMAs around the hole are zapped");
    f.mm.check_consistency().unwrap();
}

#[test]
fn munmap_unmaps_inside_start_end() {
    // unmap_region → unmap_vmas: start(UNMAP) and end over the whole range
    // asked for, holes included; then tlb_finish_mmu's flush.
    let f = fixture(4, MmapFlags::empty());
    f.mm.write(f.base, b"x").unwrap();
    f.mm.munmap(f.base, 2 * PAGE_SIZE).unwrap();
    let r = MmuNotifierRange::new(MmuNotifyEvent::Unmap, f.base, f.base + 2 * PAGE_SIZE);
    let mut want = notified(r);
    want.push(ir(f.base, f.base + PAGE_SIZE));
    assert_eq!(f.rec.take(), want);
    assert!(matches!(
        f.mm.read(f.base, &mut [0]),
        Err(MmError::NoVma(_))
    ));
    // Over a hole and past the end of the mapping: the range is not clipped.
    let wide = MmuNotifierRange::new(MmuNotifyEvent::Unmap, f.base, f.base + 8 * PAGE_SIZE);
    f.mm.munmap(f.base, 8 * PAGE_SIZE).unwrap();
    assert_eq!(f.rec.take(), notified(wide));
    // Nothing mapped at all: no callback.
    f.mm.munmap(f.base, 8 * PAGE_SIZE).unwrap();
    assert!(f.rec.take().is_empty());
    f.mm.check_consistency().unwrap();
}

#[test]
fn mprotect_notifies_only_over_populated_page_tables() {
    // mprotect_fixup → change_protection: nothing when the protection does
    // not change; otherwise one start/end per populated PUD, from the first
    // populated PMD to the end of the PUD's part of the range
    // (change_pmd_range), for upgrades too. A downgrade write-protects.
    let f = fixture(2, MmapFlags::empty());
    f.mm.write(f.base, b"x").unwrap();
    f.mm.mprotect(f.base, 2 * PAGE_SIZE, Prot::READ).unwrap();
    let r = MmuNotifierRange::new(
        MmuNotifyEvent::ProtectionVma,
        f.base,
        f.base + 2 * PAGE_SIZE,
    );
    let pair = notified(r);
    assert_eq!(f.rec.take(), pair);
    assert!(matches!(f.mm.pte(f.base), Some(Pte::Present(p)) if !p.writable));
    assert!(matches!(
        f.mm.write(f.base, b"y"),
        Err(MmError::Access { .. })
    ));
    f.mm.mprotect(f.base, 2 * PAGE_SIZE, Prot::READ).unwrap();
    assert!(
        f.rec.take().is_empty(),
        "same protection: no change_protection"
    );
    f.mm.mprotect(f.base, 2 * PAGE_SIZE, RW).unwrap();
    assert_eq!(f.rec.take(), pair, "an upgrade runs change_protection too");
    // The PTE stays read-only; the next write upgrades it in place.
    assert!(matches!(f.mm.pte(f.base), Some(Pte::Present(p)) if !p.writable));
    let before = pfn(&f.mm, f.base);
    f.mm.write(f.base, b"y").unwrap();
    assert_eq!(pfn(&f.mm, f.base), before);
    assert!(f.rec.take().is_empty());
    f.mm.check_consistency().unwrap();
}

#[test]
fn mprotect_ranges_follow_the_populated_pmds_and_puds() {
    const PMD: u64 = 2 << 20;
    const PUD: u64 = 1 << 30;
    let mm = Mm::new_anonymous(64).unwrap();
    // Two PUDs' worth at a PUD-aligned address.
    let base = mm
        .mmap(Some(0x7f00_0000_0000), 2 * PUD, RW, MmapFlags::empty())
        .unwrap();
    let rec = Arc::new(RecordingNotifier::new("rec"));
    let _reg = mm.mmu_notifier_register(rec.clone()).unwrap();
    // Nothing populated: no callback at all.
    mm.mprotect(base, 2 * PUD, Prot::READ).unwrap();
    assert!(rec.take().is_empty());
    // Populate the third PMD of the first PUD and the first of the second.
    mm.handle_mm_fault(base + 2 * PMD + 5 * PAGE_SIZE, Access::Read)
        .unwrap();
    mm.handle_mm_fault(base + PUD + PAGE_SIZE, Access::Read)
        .unwrap();
    let start = base + PAGE_SIZE;
    mm.mprotect(start, 2 * PUD - 2 * PAGE_SIZE, RW).unwrap();
    let starts: Vec<(u64, u64)> = rec
        .take()
        .into_iter()
        .filter_map(|r| match r {
            Recorded::InvalidateRangeStart(r) => Some((r.start - base, r.end - base)),
            _ => None,
        })
        .collect();
    assert_eq!(
        starts,
        vec![(2 * PMD, PUD), (PUD, 2 * PUD - PAGE_SIZE)],
        "from the first populated PMD (or the start) to the PUD's end"
    );
    mm.check_consistency().unwrap();
}

#[test]
fn mprotect_over_a_hole_applies_up_to_it() {
    // do_mprotect_pkey: the VMAs before the hole change, then ENOMEM.
    let f = fixture(4, MmapFlags::empty());
    let p = PAGE_SIZE;
    f.mm.munmap(f.base + 2 * p, p).unwrap();
    assert_eq!(
        f.mm.mprotect(f.base, 4 * p, Prot::READ),
        Err(MmError::NoMemory)
    );
    assert_eq!(f.mm.find_vma(f.base).unwrap().prot, Prot::READ);
    assert_eq!(f.mm.find_vma(f.base + 3 * p).unwrap().prot, RW);
    // A range that starts in a hole changes nothing.
    assert_eq!(
        f.mm.mprotect(f.base + 2 * p, 2 * p, Prot::READ),
        Err(MmError::NoMemory)
    );
    assert_eq!(f.mm.find_vma(f.base + 3 * p).unwrap().prot, RW);
    f.mm.check_consistency().unwrap();
}

#[test]
fn ksm_merge_write_protects_then_change_ptes_and_cow_breaks() {
    let f = fixture(2, MmapFlags::MERGEABLE);
    let (a, b) = (f.base, f.base + PAGE_SIZE);
    let content = vec![0x5a; PAGE_SIZE as usize];
    f.mm.write(a, &content).unwrap();
    f.mm.write(b, &content).unwrap();
    let (pfn_a, pfn_b) = (pfn(&f.mm, a), pfn(&f.mm, b));
    // Pass 1 sees both pages for the first time (volatile); pass 2 puts a
    // in the unstable tree and finds b identical.
    f.mm.ksm_scan(2).unwrap();
    assert!(f.rec.take().is_empty(), "the first pass must not merge");
    let res = f.mm.ksm_scan(2).unwrap();
    assert_eq!(res.merged, 1);
    // try_to_merge_two_pages: b becomes the KSM page (write_protect_page:
    // start, set_pte_at_notify of the read-only PTE, end with its
    // invalidate_range), then a is write-protected the same way and
    // replace_page points it at b's frame (start, set_pte_at_notify, end).
    let wp = |h| page_range(MmuNotifyEvent::ProtectionPage, h);
    let merge = page_range(MmuNotifyEvent::KsmMerge, a);
    let flush = |h: u64| ir(h, h + PAGE_SIZE);
    let ro = |address: u64, frame: u64| Recorded::ChangePte {
        address,
        pte: NotifierPte {
            frame,
            writable: false,
        },
    };
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(wp(b)),
            ro(b, pfn_b),
            flush(b),
            Recorded::InvalidateRangeEnd(wp(b)),
            Recorded::InvalidateRangeStart(wp(a)),
            ro(a, pfn_a),
            flush(a),
            Recorded::InvalidateRangeEnd(wp(a)),
            Recorded::InvalidateRangeStart(merge),
            ro(a, pfn_b),
            flush(a),
            Recorded::InvalidateRangeEnd(merge),
        ]
    );
    assert_eq!(pfn(&f.mm, a), pfn_b);
    let st = f.mm.ksm_stats();
    assert_eq!((st.pages_shared, st.pages_sharing), (1, 1));
    f.mm.check_consistency().unwrap();

    // A write breaks the sharing by COW: change_pte to the private copy.
    f.mm.write(a, b"!").unwrap();
    let new = pfn(&f.mm, a);
    assert_ne!(new, pfn_b);
    let cow = page_range(MmuNotifyEvent::CowBreak, a);
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(cow),
            flush(a),
            Recorded::ChangePte {
                address: a,
                pte: NotifierPte {
                    frame: new,
                    writable: true
                }
            },
            Recorded::InvalidateRangeEnd(cow),
        ]
    );
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    f.mm.read(b, &mut buf).unwrap();
    assert_eq!(buf, content);
    f.mm.read(a, &mut buf).unwrap();
    assert_eq!(buf[0], b'!');
    assert_eq!(&buf[1..], &content[1..]);
    let st = f.mm.ksm_stats();
    assert_eq!((st.pages_shared, st.pages_sharing), (1, 0));
    f.mm.check_consistency().unwrap();
}

#[test]
fn aging_asks_secondary_mmus_and_combines_with_the_host_bit() {
    let f = fixture(1, MmapFlags::empty());
    let h = f.base;
    f.mm.write(h, b"x").unwrap(); // host young
    assert!(f.mm.clear_flush_young(h).unwrap());
    assert_eq!(f.rec.take(), vec![flush_young(h, h + PAGE_SIZE)]);
    // Host bit now clear; only the secondary MMU can make the page young.
    assert!(!f.mm.clear_young(h).unwrap());
    assert_eq!(
        f.rec.take(),
        vec![Recorded::ClearYoung {
            start: h,
            end: h + PAGE_SIZE
        }]
    );
    f.rec.set_young(true);
    assert!(f.mm.test_young(h).unwrap());
    assert_eq!(f.rec.take(), vec![Recorded::TestYoung { address: h }]);
    assert!(f.mm.clear_young(h).unwrap());
    f.rec.take();
}

#[test]
fn reclaim_keeps_young_pages_and_swaps_cold_dirty_ones() {
    let f = fixture(2, MmapFlags::empty());
    let h = f.base;
    f.mm.write(h, b"swap me").unwrap();
    f.rec.set_young(true); // the secondary MMU says the page is in use
    f.mm.clear_flush_young(h).unwrap(); // clear the host bit
    f.rec.take();
    let r = f.mm.reclaim(1).unwrap();
    assert_eq!((r.evicted, r.kept_young), (0, 1));
    assert_eq!(f.rec.take(), vec![flush_young(h, h + PAGE_SIZE)]);

    f.rec.set_young(false);
    let r = f.mm.reclaim(1).unwrap();
    assert_eq!((r.evicted, r.swapped_out), (1, 1));
    // shrink_page_list: page_referenced, then try_to_unmap_one: start
    // (CLEAR), the young recheck inside the range, the swap PTE and its
    // invalidate_range, the end (with invalidate_range again).
    let unmap = page_range(MmuNotifyEvent::Clear, h);
    let young = flush_young(h, h + PAGE_SIZE);
    let flush = ir(h, h + PAGE_SIZE);
    assert_eq!(
        f.rec.take(),
        vec![
            young.clone(),
            Recorded::InvalidateRangeStart(unmap),
            young,
            flush.clone(),
            flush,
            Recorded::InvalidateRangeEnd(unmap),
        ]
    );
    assert!(matches!(f.mm.pte(h), Some(Pte::Swap(_))));
    f.mm.check_consistency().unwrap();
    let mut b = [0u8; 7];
    f.mm.read(h, &mut b).unwrap(); // swap-in: no callback
    assert_eq!(&b, b"swap me");
    assert!(f.rec.take().is_empty());
    assert_eq!(f.mm.stats().pswpin, 1);
    f.mm.check_consistency().unwrap();
}

#[test]
fn exit_releases_first_and_returns_every_frame() {
    let f = fixture(8, MmapFlags::empty());
    for i in 0..8 {
        f.mm.write(f.base + i * PAGE_SIZE, &[i as u8 + 1]).unwrap();
    }
    f.mm.reclaim(3).unwrap();
    f.rec.take();
    f.mm.exit_mmap();
    assert_eq!(f.rec.take(), vec![Recorded::Release]);
    assert_eq!(f.mm.frames().nr_free(), f.mm.frames().nr_frames());
    assert_eq!(f.mm.swap_used(), 0);
    assert_eq!(f.mm.munmap(f.base, PAGE_SIZE), Err(MmError::Exited));
    assert!(matches!(
        f.mm.mmu_notifier_register(f.rec.clone()),
        Err(MmError::Exited)
    ));
}

#[test]
fn bad_calls_get_linux_errors() {
    let f = fixture(2, MmapFlags::empty());
    let mm = &f.mm;
    assert!(matches!(
        mm.munmap(f.base + 1, PAGE_SIZE),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.munmap(f.base, 0),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.munmap(!0xfff, 2 * PAGE_SIZE),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.madvise_dontneed(f.base, u64::MAX),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.mprotect(f.base + 8, PAGE_SIZE, Prot::READ),
        Err(MmError::InvalidArgument(_))
    ));
    assert_eq!(
        mm.mprotect(f.base, 3 * PAGE_SIZE, Prot::READ),
        Err(MmError::NoMemory)
    );
    assert_eq!(
        mm.madvise_dontneed(f.base, 3 * PAGE_SIZE),
        Err(MmError::NoMemory)
    );
    assert!(matches!(
        mm.mmap(None, 0, RW, MmapFlags::empty()),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.mmap(Some(0x1001), 4096, RW, MmapFlags::empty()),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.read(0x1000, &mut [0]),
        Err(MmError::NoVma(0x1000))
    ));
    let locked = mm.mmap(None, PAGE_SIZE, RW, MmapFlags::LOCKED).unwrap();
    assert!(matches!(
        mm.madvise_dontneed(locked, PAGE_SIZE),
        Err(MmError::Locked(_))
    ));
    let ro = mm
        .mmap(None, PAGE_SIZE, Prot::READ, MmapFlags::empty())
        .unwrap();
    assert!(matches!(
        mm.write(ro, b"x"),
        Err(MmError::Access {
            access: "write",
            ..
        })
    ));
    let none = mm
        .mmap(None, PAGE_SIZE, Prot::NONE, MmapFlags::empty())
        .unwrap();
    assert!(matches!(
        mm.read(none, &mut [0]),
        Err(MmError::Access { access: "read", .. })
    ));
    mm.check_consistency().unwrap();
}

#[test]
fn out_of_frames_is_an_error_not_a_crash() {
    let mm = Mm::new_anonymous(4).unwrap();
    let base = mm.mmap(None, 8 * PAGE_SIZE, RW, MmapFlags::LOCKED).unwrap();
    for i in 0..4 {
        mm.write(base + i * PAGE_SIZE, b"x").unwrap();
    }
    // Locked pages cannot be reclaimed: the fifth page has no frame.
    assert_eq!(
        mm.write(base + 4 * PAGE_SIZE, b"x"),
        Err(MmError::OutOfFrames)
    );
    mm.check_consistency().unwrap();
}

#[test]
fn direct_reclaim_makes_room_under_pressure() {
    let mm = Mm::new_anonymous(8).unwrap();
    let base = mm
        .mmap(None, 32 * PAGE_SIZE, RW, MmapFlags::empty())
        .unwrap();
    for i in 0..32u64 {
        mm.write(base + i * PAGE_SIZE, &i.to_le_bytes()).unwrap();
    }
    for i in 0..32u64 {
        let mut b = [0u8; 8];
        mm.read(base + i * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), i);
    }
    assert!(mm.stats().pswpout > 0 && mm.stats().pswpin > 0);
    mm.check_consistency().unwrap();
}

// ---------------------------------------------------------------------------
// Large folios: faults, splits and what they tell the notifier
// ---------------------------------------------------------------------------

const THP: u64 = 2 << 20;
/// A 2 MiB-aligned place for THP tests.
const THP_BASE: u64 = 0x7f00_0000_0000;

fn thp_fixture(cfg: ThpConfig, bytes: u64, flags: MmapFlags) -> Fixture {
    let mm = Mm::new_anonymous(2048).unwrap();
    mm.set_thp_config(cfg);
    let base = mm.mmap(Some(THP_BASE), bytes, RW, flags).unwrap();
    registered(mm, base)
}

/// THP `always`, `bytes` at `THP_BASE`.
fn thp_always(bytes: u64) -> Fixture {
    thp_fixture(
        ThpConfig::pmd(ThpEnabled::Always),
        bytes,
        MmapFlags::empty(),
    )
}

/// `__split_huge_pmd`: start and `invalidate_range_only_end` over the PMD.
fn split_pmd(haddr: u64) -> Vec<Recorded> {
    vec![
        start(MmuNotifyEvent::Clear, haddr, haddr + THP),
        end(MmuNotifyEvent::Clear, haddr, haddr + THP),
    ]
}

/// `unmap_folio` of one VMA part `[s, e)`: start, end (with its flush).
fn unmap_folio(s: u64, e: u64) -> Vec<Recorded> {
    notified(MmuNotifierRange::new(MmuNotifyEvent::Clear, s, e))
}

#[test]
fn a_thp_fault_maps_a_huge_pmd_and_notifies_nobody() {
    let f = thp_always(2 * THP);
    let free = f.mm.frames().nr_free();
    f.mm.write(f.base + 5 * PAGE_SIZE, b"x").unwrap();
    assert!(f.rec.take().is_empty());
    assert_eq!(f.mm.stats().thp_fault_alloc, 1);
    assert_eq!(free - f.mm.frames().nr_free(), 512);
    let pmd = f.mm.huge_pmd(f.base + 77 * PAGE_SIZE).expect("a huge PMD");
    assert_eq!(pmd.haddr, f.base);
    assert!(pmd.pfn.is_multiple_of(512) && pmd.writable && pmd.dirty);
    for i in [0, 5, 511] {
        assert_eq!(pfn(&f.mm, f.base + i * PAGE_SIZE), pmd.pfn + i);
    }
    // A read fault never gets a large folio (Linux maps the huge zero page).
    let mut b = [0u8; 1];
    f.mm.read(f.base + THP, &mut b).unwrap();
    assert!(f.mm.huge_pmd(f.base + THP).is_none());
    assert_eq!(f.mm.stats().thp_fault_alloc, 1);
    let mthp = f.mm.mthp_stats();
    assert_eq!(
        mthp.last().map(|s| (s.size_kb, s.anon_fault_alloc)),
        Some((2048, 1))
    );
    f.mm.check_consistency().unwrap();
}

#[test]
fn thp_policy_madvise_needs_madv_hugepage_and_nohugepage_refuses() {
    let f = thp_fixture(
        ThpConfig::pmd(ThpEnabled::Madvise),
        3 * THP,
        MmapFlags::empty(),
    );
    f.mm.write(f.base, b"x").unwrap();
    assert!(f.mm.huge_pmd(f.base).is_none());
    f.mm.madvise_hugepage(f.base + THP, THP).unwrap();
    f.mm.write(f.base + THP, b"x").unwrap();
    assert!(f.mm.huge_pmd(f.base + THP).is_some());
    f.mm.madvise_nohugepage(f.base + 2 * THP, THP).unwrap();
    let mut always = f.mm.thp_config();
    always.enabled = ThpEnabled::Always;
    f.mm.set_thp_config(always);
    f.mm.write(f.base + 2 * THP, b"x").unwrap();
    assert!(f.mm.huge_pmd(f.base + 2 * THP).is_none());
    assert!(f.rec.take().is_empty(), "flags on whole VMAs split nothing");
    f.mm.check_consistency().unwrap();
}

#[test]
fn partial_dontneed_of_a_thp_splits_the_pmd_inside_the_zap_then_the_folio() {
    // zap_pmd_range: __split_huge_pmd nested in zap_page_range's range
    // (start, only_end over the 2 MiB), the PTE cleared, then the folio,
    // now partly mapped, is split (deferred_split_scan → split_folio →
    // unmap_folio: start/end over its range in the VMA).
    let f = thp_always(THP);
    let b = f.base;
    f.mm.write(b, &[7u8; 4096]).unwrap();
    f.mm.write(b + 4 * PAGE_SIZE, b"keep").unwrap();
    let head = pfn(&f.mm, b);
    let free = f.mm.frames().nr_free();
    f.rec.take();
    let p = PAGE_SIZE;
    f.mm.madvise_dontneed(b + 3 * p, p).unwrap();
    let mut want = vec![start(MmuNotifyEvent::Clear, b + 3 * p, b + 4 * p)];
    want.extend(split_pmd(b));
    want.extend([
        ir(b + 3 * p, b + 4 * p),
        end(MmuNotifyEvent::Clear, b + 3 * p, b + 4 * p),
        ir(b + 3 * p, b + 4 * p),
    ]);
    want.extend(unmap_folio(b, b + THP));
    assert_eq!(f.rec.take(), want);
    let st = f.mm.stats();
    assert_eq!(
        (
            st.thp_split_pmd,
            st.thp_deferred_split_page,
            st.thp_split_page
        ),
        (1, 1, 1)
    );
    // The unmapped page went back; the others stay where they were.
    assert_eq!(f.mm.frames().nr_free(), free + 1);
    assert_eq!(f.mm.pte(b + 3 * p), None);
    assert_eq!(pfn(&f.mm, b + 4 * p), head + 4);
    assert_eq!(f.mm.page_meta(head + 4).map(|m| m.order), Some(0));
    let mut buf = [0u8; 4];
    f.mm.read(b + 4 * p, &mut buf).unwrap();
    assert_eq!(&buf, b"keep");
    f.mm.read(b + 3 * p, &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
    f.mm.check_consistency().unwrap();
}

#[test]
fn munmap_of_part_of_a_thp_splits_the_pmd_at_the_vma_split() {
    // do_munmap → __split_vma → vma_adjust_trans_huge: the PMD across the
    // new boundary is split before the unmap's own range; the folio is
    // split after it, over its part in the VMA that is left.
    let f = thp_always(2 * THP);
    let (b, p) = (f.base, PAGE_SIZE);
    f.mm.write(b, b"x").unwrap();
    f.rec.take();
    let (s, e) = (b + 510 * p, b + 514 * p);
    f.mm.munmap(s, e - s).unwrap();
    let mut want = split_pmd(b);
    want.extend(notified(MmuNotifierRange::new(MmuNotifyEvent::Unmap, s, e)));
    want.push(ir(s, b + THP));
    want.extend(unmap_folio(b, s));
    assert_eq!(f.rec.take(), want);
    assert_eq!(f.mm.stats().thp_split_page, 1);
    f.mm.check_consistency().unwrap();
}

#[test]
fn mprotect_of_part_of_a_thp_splits_the_pmd_not_the_folio() {
    // mprotect_fixup → split_vma splits the PMD; change_protection then
    // write-protects the one PTE. The folio stays whole, PTE-mapped.
    let f = thp_always(THP);
    let (b, p) = (f.base, PAGE_SIZE);
    f.mm.write(b, b"x").unwrap();
    f.rec.take();
    f.mm.mprotect(b + 2 * p, p, Prot::READ).unwrap();
    let mut want = split_pmd(b);
    want.extend(notified(MmuNotifierRange::new(
        MmuNotifyEvent::ProtectionVma,
        b + 2 * p,
        b + 3 * p,
    )));
    assert_eq!(f.rec.take(), want);
    assert!(matches!(f.mm.pte(b + 2 * p), Some(Pte::Present(x)) if !x.writable));
    assert!(matches!(f.mm.pte(b + 3 * p), Some(Pte::Present(x)) if x.writable));
    let st = f.mm.stats();
    assert_eq!((st.thp_split_pmd, st.thp_split_page), (1, 0));
    assert_eq!(f.mm.page_meta(pfn(&f.mm, b)).map(|m| m.order), Some(9));
    // A whole-PMD mprotect keeps it huge and write-protects it whole.
    f.mm.write(b + THP - p, b"y").unwrap();
    f.mm.check_consistency().unwrap();
}

#[test]
fn mprotect_of_a_whole_thp_keeps_the_huge_pmd() {
    let f = thp_always(THP);
    f.mm.write(f.base, b"x").unwrap();
    f.rec.take();
    f.mm.mprotect(f.base, THP, Prot::READ).unwrap();
    let r = MmuNotifierRange::new(MmuNotifyEvent::ProtectionVma, f.base, f.base + THP);
    assert_eq!(f.rec.take(), notified(r));
    let pmd = f.mm.huge_pmd(f.base).expect("still huge");
    assert!(!pmd.writable);
    f.mm.mprotect(f.base, THP, RW).unwrap();
    f.rec.take();
    // do_huge_pmd_wp_page: the write reuses the whole PMD.
    f.mm.write(f.base + 9 * PAGE_SIZE, b"y").unwrap();
    assert!(f.rec.take().is_empty());
    assert!(f.mm.huge_pmd(f.base).is_some_and(|p| p.writable));
    f.mm.check_consistency().unwrap();
}

#[test]
fn mthp_partial_dontneed_splits_the_folio_after_the_zap() {
    let mut cfg = ThpConfig::off();
    cfg.enable_sizes("16K").unwrap();
    let f = thp_fixture(cfg, 8 * PAGE_SIZE, MmapFlags::empty());
    let (b, p) = (f.base, PAGE_SIZE);
    f.mm.write(b + 2 * p, b"x").unwrap();
    let head = pfn(&f.mm, b);
    assert!(head.is_multiple_of(4));
    for i in 0..4 {
        assert_eq!(pfn(&f.mm, b + i * p), head + i, "one 16K folio");
    }
    assert_eq!(f.mm.pte(b + 4 * p), None);
    f.rec.take();
    f.mm.madvise_dontneed(b + p, p).unwrap();
    let mut want = notified(page_range(MmuNotifyEvent::Clear, b + p));
    want.push(ir(b + p, b + 2 * p));
    want.extend(unmap_folio(b, b + 4 * p));
    assert_eq!(f.rec.take(), want);
    let s16 = f.mm.mthp_stats()[1];
    assert_eq!(
        (
            s16.size_kb,
            s16.anon_fault_alloc,
            s16.split_deferred,
            s16.split
        ),
        (16, 1, 1, 1)
    );
    // A pinned folio cannot be split: it stays queued until the pin goes.
    f.mm.write(b + 4 * p, b"x").unwrap();
    let pin = f.mm.get_user_page(b + 5 * p, Access::Read).unwrap();
    f.rec.take();
    f.mm.madvise_dontneed(b + 6 * p, p).unwrap();
    assert_eq!(f.mm.mthp_stats()[1].split_failed, 1);
    f.mm.check_consistency().unwrap();
    drop(pin);
    assert_eq!(f.mm.deferred_split_scan(), Ok(1));
    f.mm.check_consistency().unwrap();
}

#[test]
fn ksm_splits_a_large_folio_before_it_merges_a_page_of_it() {
    // try_to_merge_one_page: split_huge_page under the page lock, then the
    // merge of a small page (write-protect, replace).
    let mut cfg = ThpConfig::off();
    cfg.enable_sizes("16K").unwrap();
    let f = thp_fixture(cfg, 4 * PAGE_SIZE, MmapFlags::MERGEABLE);
    let (b, p) = (f.base, PAGE_SIZE);
    let page = vec![0x5a_u8; PAGE_SIZE as usize];
    f.mm.write(b, &page).unwrap();
    f.mm.write(b + p, &page).unwrap();
    f.mm.write(b + 2 * p, b"other").unwrap();
    f.mm.write(b + 3 * p, b"third").unwrap();
    f.rec.take();
    for _ in 0..3 {
        f.mm.ksm_scan(4).unwrap();
    }
    let log = f.rec.take();
    let split = log
        .iter()
        .position(|r| *r == start(MmuNotifyEvent::Clear, b, b + 4 * p))
        .expect("the folio's unmap range");
    let wp = log
        .iter()
        .position(|r| matches!(r, Recorded::InvalidateRangeStart(x) if x.event == MmuNotifyEvent::ProtectionPage))
        .expect("a write-protect");
    assert!(split < wp, "{log:?}");
    assert_eq!(f.mm.ksm_stats().pages_sharing, 1);
    assert_eq!(f.mm.mthp_stats()[1].split, 1);
    f.mm.check_consistency().unwrap();
}

#[test]
fn reclaim_splits_a_cold_thp_before_swapping_a_page_of_it() {
    let f = thp_always(THP);
    let b = f.base;
    f.mm.write(b, b"x").unwrap();
    f.rec.take();
    // First look: young (the fault set it), cleared over the whole PMD,
    // and the hand moves past the folio.
    let r = f.mm.reclaim(1).unwrap();
    assert_eq!(r.kept_young, 1);
    assert_eq!(f.rec.take(), vec![flush_young(b, b + THP)]);
    // Second look: cold: split (PMD, then folio), then the page goes.
    let r = f.mm.reclaim(1).unwrap();
    assert_eq!(r.swapped_out, 1, "{r:?}");
    let mut want = vec![flush_young(b, b + THP)];
    want.extend(split_pmd(b));
    want.extend(unmap_folio(b, b + THP));
    // try_to_unmap_one: inside its range, the young bits once more.
    want.extend([
        start(MmuNotifyEvent::Clear, b, b + PAGE_SIZE),
        flush_young(b, b + PAGE_SIZE),
        ir(b, b + PAGE_SIZE),
        ir(b, b + PAGE_SIZE),
        end(MmuNotifyEvent::Clear, b, b + PAGE_SIZE),
    ]);
    assert_eq!(f.rec.take(), want);
    assert!(matches!(f.mm.pte(b), Some(Pte::Swap(_))));
    let mut buf = [0u8; 1];
    f.mm.read(b, &mut buf).unwrap();
    assert_eq!(&buf, b"x");
    f.mm.check_consistency().unwrap();
}

#[test]
fn populate_write_faults_the_range_in_and_fails_as_linux() {
    let f = thp_always(2 * THP);
    let (b, p) = (f.base, PAGE_SIZE);
    // Small pages in the second 2 MiB.
    f.mm.madvise_nohugepage(b + THP, THP).unwrap();
    assert!(matches!(
        f.mm.madvise_populate_write(b + 1, p),
        Err(MmError::InvalidArgument(_))
    ));
    assert_eq!(f.mm.madvise_populate_write(b, 0), Ok(()));
    f.mm.madvise_populate_write(b, THP + 3 * p).unwrap();
    assert!(f.rec.take().is_empty(), "populating notifies nobody");
    let st = f.mm.stats();
    assert_eq!(st.thp_fault_alloc, 1);
    assert!(f.mm.huge_pmd(b).is_some_and(|x| x.writable));
    assert!(matches!(f.mm.pte(b + THP + 2 * p), Some(Pte::Present(x)) if x.writable));
    assert_eq!(f.mm.pte(b + THP + 3 * p), None);
    assert_eq!(st.populate_fault, 4, "one THP fault and three small ones");
    assert_eq!(st.populate_present, 511);
    // Not writable: EINVAL; a hole: ENOMEM after what comes before it.
    f.mm.mprotect(b + THP + 8 * p, p, Prot::READ).unwrap();
    assert!(matches!(
        f.mm.madvise_populate_write(b + THP + 6 * p, 4 * p),
        Err(MmError::InvalidArgument(_))
    ));
    assert!(matches!(f.mm.pte(b + THP + 7 * p), Some(Pte::Present(x)) if x.writable));
    f.mm.munmap(b + THP + 20 * p, p).unwrap();
    assert_eq!(
        f.mm.madvise_populate_write(b + THP + 18 * p, 4 * p),
        Err(MmError::NoMemory)
    );
    assert!(matches!(f.mm.pte(b + THP + 19 * p), Some(Pte::Present(_))));
    assert_eq!(f.mm.pte(b + THP + 21 * p), None);
    f.mm.check_consistency().unwrap();
}

#[test]
fn a_write_fault_falls_back_to_small_folios_when_no_run_is_free() {
    // 600 frames, most of them taken one by one: no aligned 2 MiB run is
    // left, so the fault falls back (thp_fault_fallback) to one page.
    let mm = Mm::new_anonymous(600).unwrap();
    let mut cfg = ThpConfig::pmd(ThpEnabled::Always);
    cfg.enable_sizes("64K").unwrap();
    mm.set_thp_config(cfg);
    let small = mm
        .mmap(None, 100 * PAGE_SIZE, RW, MmapFlags::empty())
        .unwrap();
    for i in 0..100 {
        mm.read(small + i * PAGE_SIZE, &mut [0u8; 1]).unwrap();
    }
    let base = mm
        .mmap(Some(THP_BASE), THP, RW, MmapFlags::empty())
        .unwrap();
    mm.write(base, b"x").unwrap();
    let st = mm.stats();
    assert_eq!((st.thp_fault_alloc, st.thp_fault_fallback), (0, 1));
    assert_eq!(mm.mthp_stats()[3].anon_fault_alloc, 1, "64K instead");
    mm.check_consistency().unwrap();
}
