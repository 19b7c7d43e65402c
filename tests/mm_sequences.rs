//! The exact notifier callbacks each host mm operation makes, in order,
//! with the right event (what Linux's `mm/` calls, see each test).

use std::sync::Arc;

use shadowvm::mm::{Access, Mm, MmError, MmapFlags, PAGE_SIZE, Prot, Pte};
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
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(r),
            Recorded::InvalidateRange {
                start: r.start,
                end: r.end
            },
            Recorded::InvalidateRangeEnd(r),
            Recorded::InvalidateRange {
                start: f.base + PAGE_SIZE,
                end: f.base + 2 * PAGE_SIZE
            },
        ]
    );
    assert_eq!(f.mm.pte(f.base + PAGE_SIZE), None);
    // Nothing populated: the range is still notified, but no flush follows.
    f.mm.madvise_dontneed(f.base, 4 * PAGE_SIZE).unwrap();
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(r),
            Recorded::InvalidateRange {
                start: r.start,
                end: r.end
            },
            Recorded::InvalidateRangeEnd(r),
        ]
    );
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
    let flush_first = Recorded::InvalidateRange {
        start: f.base,
        end: f.base + PAGE_SIZE,
    };
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(r),
            Recorded::InvalidateRange {
                start: r.start,
                end: r.end
            },
            Recorded::InvalidateRangeEnd(r),
            flush_first,
        ]
    );
    assert!(matches!(
        f.mm.read(f.base, &mut [0]),
        Err(MmError::NoVma(_))
    ));
    // Over a hole and past the end of the mapping: the range is not clipped.
    let wide = MmuNotifierRange::new(MmuNotifyEvent::Unmap, f.base, f.base + 8 * PAGE_SIZE);
    f.mm.munmap(f.base, 8 * PAGE_SIZE).unwrap();
    assert_eq!(
        f.rec.take(),
        vec![
            Recorded::InvalidateRangeStart(wide),
            Recorded::InvalidateRange {
                start: wide.start,
                end: wide.end
            },
            Recorded::InvalidateRangeEnd(wide),
        ]
    );
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
    let pair = vec![
        Recorded::InvalidateRangeStart(r),
        Recorded::InvalidateRange {
            start: r.start,
            end: r.end,
        },
        Recorded::InvalidateRangeEnd(r),
    ];
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
    let flush = |h: u64| Recorded::InvalidateRange {
        start: h,
        end: h + PAGE_SIZE,
    };
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
    assert_eq!(
        f.rec.take(),
        vec![Recorded::ClearFlushYoung {
            start: h,
            end: h + PAGE_SIZE
        }]
    );
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
    assert_eq!(
        f.rec.take(),
        vec![Recorded::ClearFlushYoung {
            start: h,
            end: h + PAGE_SIZE
        }]
    );

    f.rec.set_young(false);
    let r = f.mm.reclaim(1).unwrap();
    assert_eq!((r.evicted, r.swapped_out), (1, 1));
    // shrink_page_list: page_referenced, then try_to_unmap_one: start
    // (CLEAR), the young recheck inside the range, the swap PTE and its
    // invalidate_range, the end (with invalidate_range again).
    let unmap = page_range(MmuNotifyEvent::Clear, h);
    let young = Recorded::ClearFlushYoung {
        start: h,
        end: h + PAGE_SIZE,
    };
    let flush = Recorded::InvalidateRange {
        start: h,
        end: h + PAGE_SIZE,
    };
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
