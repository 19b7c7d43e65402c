//! The DMA device (`src/dma/`), in the spirit of Linux's
//! `tools/testing/selftests/mm/hmm-tests.c`: device reads and writes of a
//! buffer, its mappings taken away by munmap, MADV_DONTNEED, mprotect, a KSM
//! merge, reclaim and exit, a non-blockable invalidation refused while the
//! device is busy, and one host operation invalidating both the shadow MMU
//! and the device. The coherence checker runs after every step.

mod common;

use std::sync::Arc;

use shadowvm::dma::{DmaConfig, DmaDevice, DmaDone, DmaEngine, DmaError, DmaOp};
use shadowvm::mm::{FrameOwner, Mm, MmError, MmapFlags, PAGE_SIZE, POISON_FREE, Prot, Pte};
use shadowvm::notifier::NotifierError;

const CHECKED: DmaConfig = DmaConfig { check_frames: true };

/// A fresh mm of `frames` frames with one read-write mapping of `len` bytes.
fn anon(frames: u64, len: u64, flags: MmapFlags) -> (Arc<Mm>, u64) {
    let mm = Mm::new_anonymous(frames).unwrap();
    let hva = mm.mmap(None, len, Prot::READ | Prot::WRITE, flags).unwrap();
    (mm, hva)
}

/// An mm with a `pages`-page buffer filled with a per-page pattern, and a
/// device attached to it.
fn setup(pages: u64) -> (Arc<Mm>, u64, DmaDevice) {
    let (mm, hva) = anon(256, pages * PAGE_SIZE, MmapFlags::MERGEABLE);
    for p in 0..pages {
        mm.write(hva + p * PAGE_SIZE, &pattern(p, PAGE_SIZE as usize))
            .unwrap();
    }
    let dev = DmaDevice::attach(&mm, hva, pages * PAGE_SIZE, CHECKED).unwrap();
    (mm, hva, dev)
}

fn pattern(page: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (page as usize * 31 + i * 7 + 1) as u8)
        .collect()
}

fn pfn(mm: &Mm, hva: u64) -> Option<u64> {
    match mm.pte(hva) {
        Some(Pte::Present(p)) => Some(p.pfn),
        _ => None,
    }
}

#[test]
fn attach_refuses_bad_buffers() {
    let mm = Mm::new_anonymous(16).unwrap();
    for (hva, len) in [(0x1001, PAGE_SIZE), (0x1000, 0), (!0xfff, PAGE_SIZE)] {
        let r = DmaDevice::attach(&mm, hva, len, CHECKED);
        assert!(matches!(r, Err(DmaError::InvalidBuffer { .. })), "{r:?}");
    }
}

#[test]
fn read_faults_pages_in_once_and_returns_the_buffer() {
    let (_mm, _hva, dev) = setup(4);
    assert_eq!(dev.nr_mapped(), 0, "nothing is mapped before the first DMA");
    let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    for p in 0..4u64 {
        let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
        assert_eq!(buf[r], pattern(p, PAGE_SIZE as usize)[..]);
    }
    let s = dev.stats();
    assert_eq!((s.faults, s.fault_retries, dev.nr_mapped()), (4, 0, 4));
    dev.read(100, &mut buf[..5000]).unwrap(); // unaligned, spans two pages
    assert_eq!(dev.stats().faults, 4, "mapped pages do not fault again");
    assert_eq!(dev.check_coherence(), Ok(4));
    // The process wrote every page, so the host PTEs are writable and a
    // read fault maps them writable too (hva_to_pfn reports it).
    assert!(dev.iotlb_entries().iter().all(|(_, e)| e.writable));
}

#[test]
fn write_is_seen_by_the_process_and_partial_words_keep_their_neighbours() {
    let (mm, hva, dev) = setup(2);
    dev.write(PAGE_SIZE - 3, b"across").unwrap();
    let mut got = [0u8; 8];
    mm.read(hva + PAGE_SIZE - 4, &mut got).unwrap();
    let p0 = pattern(0, PAGE_SIZE as usize);
    let p1 = pattern(1, 4);
    assert_eq!(got, [p0[4092], b'a', b'c', b'r', b'o', b's', b's', p1[3]]);
    dev.write_u64(8, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(mm.read_u64(hva + 8).unwrap(), 0x1122_3344_5566_7788);
    // And the process's writes are seen by the device.
    mm.write(hva + 16, &[0xab; 8]).unwrap();
    assert_eq!(dev.read_u64(16).unwrap(), 0xabab_abab_abab_abab);
    assert!(matches!(dev.read_u64(3), Err(DmaError::Unaligned(3))));
    let mut big = [0u8; 16];
    assert!(matches!(
        dev.read(2 * PAGE_SIZE - 8, &mut big),
        Err(DmaError::OutOfRange { .. })
    ));
    assert_eq!(dev.check_coherence(), Ok(2));
}

#[test]
fn a_read_only_host_page_is_mapped_read_only_and_a_write_upgrades_it() {
    let (mm, hva) = anon(16, PAGE_SIZE, MmapFlags::empty());
    let dev = DmaDevice::attach(&mm, hva, PAGE_SIZE, CHECKED).unwrap();
    assert_eq!(dev.read_u64(0).unwrap(), 0); // demand-zero, read fault
    assert!(!dev.iotlb_entries()[0].1.writable);
    dev.write_u64(0, 5).unwrap(); // faults again for write
    assert!(dev.iotlb_entries()[0].1.writable);
    assert_eq!(dev.stats().faults, 2);
    assert_eq!(mm.read_u64(hva).unwrap(), 5);
    assert_eq!(dev.check_coherence(), Ok(1));
}

#[test]
fn munmap_invalidates_and_later_dma_faults_on_the_hole() {
    let (mm, hva, dev) = setup(4);
    let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    let frames: Vec<u64> = (0..4)
        .map(|p| pfn(&mm, hva + p * PAGE_SIZE).unwrap())
        .collect();
    mm.munmap(hva + PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    assert_eq!(dev.nr_mapped(), 2);
    assert_eq!(dev.stats().iotlb_invalidated, 2);
    for f in &frames[1..3] {
        assert_eq!(mm.frames().owner(*f).unwrap(), FrameOwner::Free);
    }
    assert_eq!(dev.check_coherence(), Ok(2));
    let r = dev.read_u64(PAGE_SIZE);
    assert!(
        matches!(
            r,
            Err(DmaError::HostFault {
                source: MmError::NoVma(_),
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(
        dev.read_u64(3 * PAGE_SIZE).unwrap(),
        u64::from_le_bytes(pattern(3, 8).try_into().unwrap())
    );
}

#[test]
fn madvise_dontneed_invalidates_and_the_device_reads_zeroes() {
    let (mm, hva, dev) = setup(2);
    let mut buf = vec![0u8; 2 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    let old = pfn(&mm, hva).unwrap();
    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
    assert_eq!(dev.nr_mapped(), 1);
    assert_eq!(mm.frames().owner(old).unwrap(), FrameOwner::Free);
    let mut page = vec![0xffu8; PAGE_SIZE as usize];
    dev.read(0, &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "a dropped anonymous page reads as zero"
    );
    assert!(!page.contains(&POISON_FREE));
    assert_eq!(dev.check_coherence(), Ok(2));
}

#[test]
fn mprotect_read_only_takes_writes_away_until_it_is_lifted() {
    let (mm, hva, dev) = setup(2);
    dev.write(0, &[1; 16]).unwrap();
    dev.write(PAGE_SIZE, &[2; 16]).unwrap();
    mm.mprotect(hva, 2 * PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(dev.nr_mapped(), 0, "ProtectionVma drops the whole range");
    assert_eq!(dev.read_u64(0).unwrap(), 0x0101_0101_0101_0101);
    assert!(!dev.iotlb_entries()[0].1.writable);
    let r = dev.write_u64(0, 9);
    assert!(
        matches!(
            r,
            Err(DmaError::HostFault {
                source: MmError::Access { .. },
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(dev.check_coherence(), Ok(1));
    mm.mprotect(hva, 2 * PAGE_SIZE, Prot::READ | Prot::WRITE)
        .unwrap();
    dev.write_u64(0, 9).unwrap();
    assert_eq!(mm.read_u64(hva).unwrap(), 9);
    assert_eq!(dev.check_coherence(), Ok(1));
}

#[test]
fn ksm_merge_invalidates_and_a_device_write_breaks_the_sharing() {
    let (mm, hva) = anon(64, 2 * PAGE_SIZE, MmapFlags::MERGEABLE);
    mm.write(hva, &[7; 64]).unwrap();
    mm.write(hva + PAGE_SIZE, &[7; 64]).unwrap();
    let dev = DmaDevice::attach(&mm, hva, 2 * PAGE_SIZE, CHECKED).unwrap();
    let mut buf = vec![0u8; 2 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    assert_eq!(dev.nr_mapped(), 2);
    for _ in 0..4 {
        mm.ksm_scan(16).unwrap();
    }
    let shared = pfn(&mm, hva).unwrap();
    assert_eq!(pfn(&mm, hva + PAGE_SIZE), Some(shared), "merged");
    assert_eq!(
        dev.nr_mapped(),
        0,
        "write-protect and merge invalidated both"
    );
    dev.read(0, &mut buf).unwrap();
    let e = dev.iotlb_entries();
    assert!(e.iter().all(|(_, e)| e.pfn == shared && !e.writable));
    assert_eq!(dev.check_coherence(), Ok(2));
    // A device write to one page breaks COW through the host fault path.
    dev.write(0, &[9; 8]).unwrap();
    let private = pfn(&mm, hva).unwrap();
    assert_ne!(private, shared);
    assert_eq!(pfn(&mm, hva + PAGE_SIZE), Some(shared));
    let mut b = [0u8; 9];
    mm.read(hva, &mut b).unwrap();
    assert_eq!(b, [9, 9, 9, 9, 9, 9, 9, 9, 7]);
    mm.read(hva + PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [7; 9]);
    assert_eq!(dev.check_coherence(), Ok(2));
}

#[test]
fn reclaim_invalidates_and_the_device_swaps_the_page_back_in() {
    let (mm, hva, dev) = setup(4);
    let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    let r = mm.reclaim(64).unwrap();
    assert!(r.evicted > 0, "{r:?}");
    assert_eq!(dev.nr_mapped() as u64, 4 - r.evicted);
    assert!(dev.check_coherence().is_ok());
    let mut again = vec![0u8; 4 * PAGE_SIZE as usize];
    dev.read(0, &mut again).unwrap();
    assert_eq!(again, buf, "swap-in preserves every byte");
    assert!(mm.stats().pswpin > 0);
    let _ = hva;
    assert_eq!(dev.check_coherence(), Ok(4));
}

#[test]
fn exit_while_the_device_holds_mappings_drops_them_before_the_frames_go() {
    let (mm, _hva, dev) = setup(4);
    let mut buf = vec![0u8; 4 * PAGE_SIZE as usize];
    dev.read(0, &mut buf).unwrap();
    let frames: Vec<u64> = dev.iotlb_entries().iter().map(|(_, e)| e.pfn).collect();
    mm.exit_mmap();
    assert_eq!(dev.nr_mapped(), 0);
    for f in frames {
        assert_eq!(mm.frames().owner(f).unwrap(), FrameOwner::Free);
    }
    assert_eq!(mm.frames().count(mm.frame_owner()), 0);
    let r = dev.read_u64(0);
    assert!(
        matches!(
            r,
            Err(DmaError::HostFault {
                source: MmError::Exited,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(dev.check_coherence(), Ok(0));
    assert_eq!(dev.stats().freed_frame_accesses, 0);
    dev.detach();
}

#[test]
fn a_busy_device_refuses_the_oom_reaper_and_keeps_its_pages() {
    let (mm, hva, dev) = setup(2);
    dev.read_u64(0).unwrap();
    let present = mm.nr_present();
    let r = dev.quiesce(|| mm.oom_reap());
    assert_eq!(r, Err(MmError::Notifier(NotifierError::Again)));
    assert_eq!(mm.nr_present(), present);
    assert_eq!(dev.stats().invalidations_refused, 1);
    assert_eq!(dev.check_coherence(), Ok(1));
    // Idle, it lets the reaper through.
    assert_eq!(mm.oom_reap(), Ok(2));
    assert_eq!(dev.nr_mapped(), 0);
    let _ = hva;
}

#[test]
fn the_engine_thread_runs_dma_requests() {
    let (mm, hva, dev) = setup(2);
    let dev = Arc::new(dev);
    let engine = DmaEngine::spawn(dev.clone()).unwrap();
    let done = engine
        .run(DmaOp::Write {
            iova: 10,
            data: b"from the device".to_vec(),
        })
        .unwrap();
    assert_eq!(done, DmaDone::Written(15));
    let mut b = [0u8; 15];
    mm.read(hva + 10, &mut b).unwrap();
    assert_eq!(&b, b"from the device");
    mm.write(hva + PAGE_SIZE, b"from the cpu").unwrap();
    let done = engine
        .run(DmaOp::Read {
            iova: PAGE_SIZE,
            len: 12,
        })
        .unwrap();
    assert_eq!(done, DmaDone::Read(b"from the cpu".to_vec()));
    let r = engine.run(DmaOp::Read {
        iova: 2 * PAGE_SIZE,
        len: 1,
    });
    assert!(matches!(r, Err(DmaError::OutOfRange { .. })));

    // A copy across the page boundary, overlapping itself (memmove), and a
    // fill; a copy whose destination leaves the buffer writes nothing.
    mm.write(hva + PAGE_SIZE - 4, b"abcdefgh").unwrap();
    let copy = DmaOp::Copy {
        src: PAGE_SIZE - 4,
        dst: PAGE_SIZE - 2,
        len: 8,
    };
    assert_eq!(engine.run(copy).unwrap(), DmaDone::Written(8));
    let mut b = [0u8; 10];
    mm.read(hva + PAGE_SIZE - 4, &mut b).unwrap();
    assert_eq!(&b, b"ababcdefgh");
    let fill = DmaOp::Fill {
        iova: PAGE_SIZE - 1,
        len: 2,
        byte: b'z',
    };
    assert_eq!(engine.run(fill).unwrap(), DmaDone::Written(2));
    mm.read(hva + PAGE_SIZE - 4, &mut b).unwrap();
    assert_eq!(&b, b"abazzdefgh");
    let mut before = [0u8; 4];
    mm.read(hva + 2 * PAGE_SIZE - 4, &mut before).unwrap();
    let reads = dev.stats().dma_reads;
    let r = engine.run(DmaOp::Copy {
        src: 0,
        dst: 2 * PAGE_SIZE - 4,
        len: 8,
    });
    assert!(matches!(r, Err(DmaError::OutOfRange { .. })));
    mm.read(hva + 2 * PAGE_SIZE - 4, &mut b[..4]).unwrap();
    assert_eq!(b[..4], before);
    assert_eq!(dev.stats().dma_reads, reads, "nothing read either");
    drop(engine);
    assert_eq!(
        Arc::strong_count(&dev),
        1,
        "the engine let go of the device"
    );
}

#[test]
fn detach_removes_the_interval_and_the_mm_pin() {
    let (mm, hva, dev) = setup(1);
    dev.read_u64(0).unwrap();
    assert_eq!(mm.notifiers().interval_snapshot().nr_intervals, 1);
    dev.detach();
    assert_eq!(mm.notifiers().interval_snapshot().nr_intervals, 0);
    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap(); // nobody to call
    assert_eq!(Arc::strong_count(&mm), 1);
}

/// One host operation invalidates both secondary MMUs on the mm: the shadow
/// MMU (list API) and the device (interval API).
#[test]
fn one_host_operation_invalidates_the_shadow_mmu_and_the_device() {
    use common::mmu_guest::{Guest, P, RW, US};
    let mut g = Guest::new(16, 256);
    let gva = 0x40_0000;
    let gpa = 3 * PAGE_SIZE;
    g.map(gva, gpa, P | RW | US);
    let hva = g.hva(gpa);
    g.mm.write(hva, &[0x5a; 8]).unwrap();
    assert!(matches!(
        g.write_fault(gva),
        shadowvm::mmu::FaultOutcome::Fixed
    ));
    assert!(g.spte(gva).is_some());
    let dev = DmaDevice::attach(&g.mm, hva, PAGE_SIZE, CHECKED).unwrap();
    assert_eq!(dev.read_u64(0).unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
    let frame = pfn(&g.mm, hva).unwrap();
    assert_eq!(dev.iotlb_entries()[0].1.pfn, frame);
    let mmu_before = g.mmu.stats();
    g.flush.take();

    g.mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();

    assert_eq!(g.spte(gva), None, "the shadow MMU dropped its spte");
    assert!(g.mmu.stats().mn_invalidate_range_start > mmu_before.mn_invalidate_range_start);
    assert!(
        g.flush.take().iter().flatten().any(|f| f.pfn == frame),
        "the shadow MMU flushed the frame"
    );
    assert_eq!(dev.nr_mapped(), 0, "the device dropped its entry");
    assert_eq!(dev.stats().invalidations, 1);
    assert_eq!(g.mm.frames().owner(frame).unwrap(), FrameOwner::Free);
    g.check();
    assert_eq!(dev.check_coherence(), Ok(0));
    // Both fault back in to the same new zero page.
    assert_eq!(dev.read_u64(0).unwrap(), 0);
    assert!(matches!(
        g.read_fault(gva),
        shadowvm::mmu::FaultOutcome::Fixed
    ));
    let new = pfn(&g.mm, hva).unwrap();
    assert_eq!(dev.iotlb_entries()[0].1.pfn, new);
    assert_eq!(common::mmu_guest::spte_pfn(g.spte(gva).unwrap()), new);
}
