//! Interleavings of the host mm forced with its test hooks (`Mm::set_test_hook`):
//! the page lock (`PG_locked`) between KSM, write faults and reclaim, and
//! the invalidate_range_end every caller owes a notifier.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shadowvm::mm::{Mm, MmHookPoint, MmapFlags, PAGE_SIZE, Prot, Pte};
use shadowvm::notifier::recorder::{Recorded, RecordingNotifier};

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// Waits until `cond` holds; a minute without it is a hang, not slowness.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::yield_now();
    }
}

fn pfn(mm: &Mm, hva: u64) -> u64 {
    match mm.pte(hva) {
        Some(Pte::Present(p)) => p.pfn,
        other => panic!("no present PTE at {hva:#x}: {other:?}"),
    }
}

fn two_identical_mergeable_pages() -> (Arc<Mm>, u64, u64) {
    let mm = Mm::new_anonymous(64).unwrap();
    let base = mm
        .mmap(None, 2 * PAGE_SIZE, RW, MmapFlags::MERGEABLE)
        .unwrap();
    let content = vec![0x5a; PAGE_SIZE as usize];
    mm.write(base, &content).unwrap();
    mm.write(base + PAGE_SIZE, &content).unwrap();
    // The first pass records checksums; the second merges.
    assert_eq!(mm.ksm_scan(2).unwrap().merged, 0);
    (mm, base, base + PAGE_SIZE)
}

/// The race of issue 9: KSM write-protects a page, and before it marks it
/// KSM a write fault finds it "not KSM, mapped once" and would reuse it in
/// place, making the KSM page writable. Under the page lock the write waits
/// until the page is KSM and then copies it. Without the lock the write
/// completes inside the window and the merge fails (or, worse, a KSM page
/// is left writable): this test then fails on `page_lock_wait` or `merged`.
#[test]
fn a_write_in_the_ksm_merge_window_waits_for_the_page_lock_and_copies() {
    let (mm, a, b) = two_identical_mergeable_pages();
    let fired = Arc::new(AtomicBool::new(false));
    let writer_done = Arc::new(AtomicBool::new(false));
    let writer: Arc<parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>> = Default::default();
    {
        let (mm2, fired, writer_done, writer) = (
            mm.clone(),
            fired.clone(),
            writer_done.clone(),
            writer.clone(),
        );
        mm.set_test_hook(Some(Arc::new(move |point, hva| {
            if point != MmHookPoint::KsmWriteProtected || fired.swap(true, Ordering::SeqCst) {
                return;
            }
            // The page at hva is write-protected and page-locked, not KSM yet.
            let waits = mm2.stats().page_lock_wait;
            let (mm3, done) = (mm2.clone(), writer_done.clone());
            *writer.lock() = Some(std::thread::spawn(move || {
                mm3.write(hva, b"written in the window").unwrap();
                done.store(true, Ordering::SeqCst);
            }));
            wait_until("the write blocks on the page lock or completes", || {
                mm2.stats().page_lock_wait > waits || writer_done.load(Ordering::SeqCst)
            });
        })));
    }
    let res = mm.ksm_scan(2).unwrap();
    mm.set_test_hook(None);
    writer.lock().take().expect("the hook ran").join().unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(
        mm.stats().page_lock_wait,
        1,
        "the write waited for KSM's page lock"
    );
    assert_eq!(res.merged, 1, "the merge completed");
    mm.check_consistency().unwrap();
    // One page kept the shared frame; the written one got a private copy.
    let (pa, pb) = (pfn(&mm, a), pfn(&mm, b));
    assert_ne!(pa, pb);
    assert_eq!(mm.stats().pgcow, 1);
    let shared = if mm.page_meta(pa).unwrap().ksm { a } else { b };
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    mm.read(shared, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a), "the KSM page never changed");
    let written = if shared == a { b } else { a };
    mm.read(written, &mut buf[..21]).unwrap();
    assert_eq!(&buf[..21], b"written in the window");
}

/// Reclaim holds the page lock (and a reference) from before its
/// invalidation until the page is gone: KSM scanning meanwhile skips the
/// page (`trylock_page` fails) instead of merging a page being evicted.
#[test]
fn ksm_skips_a_page_reclaim_holds_locked() {
    let (mm, a, b) = two_identical_mergeable_pages();
    // Cold host bits, so reclaim evicts rather than keeps.
    mm.clear_flush_young(a).unwrap();
    mm.clear_flush_young(b).unwrap();
    let merged_inside = Arc::new(AtomicUsize::new(usize::MAX));
    {
        let (mm2, merged_inside) = (mm.clone(), merged_inside.clone());
        mm.set_test_hook(Some(Arc::new(move |point, _hva| {
            if point != MmHookPoint::ReclaimPageLocked
                || merged_inside.load(Ordering::SeqCst) != usize::MAX
            {
                return;
            }
            let mm3 = mm2.clone();
            let merged = std::thread::spawn(move || mm3.ksm_scan(4).unwrap().merged)
                .join()
                .unwrap();
            merged_inside.store(merged as usize, Ordering::SeqCst);
        })));
    }
    let r = mm.reclaim(1).unwrap();
    mm.set_test_hook(None);
    assert_eq!(
        merged_inside.load(Ordering::SeqCst),
        0,
        "KSM left the locked page alone"
    );
    assert_eq!(r.evicted, 1);
    mm.check_consistency().unwrap();
}

/// A notifier that fails a blockable `invalidate_range_start` (which 4.19
/// ignores) still gets its `invalidate_range_end` from every caller: zap,
/// mprotect, KSM's write-protect and replace, copy-on-write and reclaim.
#[test]
fn a_failed_blockable_start_is_still_ended_on_every_path() {
    let (mm, a, b) = two_identical_mergeable_pages();
    let rec = Arc::new(RecordingNotifier::new("failing"));
    let _reg = mm.mmu_notifier_register(rec.clone()).unwrap();
    rec.set_fail_starts(true);
    assert_eq!(mm.ksm_scan(2).unwrap().merged, 1); // write-protect + replace
    mm.write(a, b"cow").unwrap(); // copy-on-write of the KSM page
    mm.mprotect(a, PAGE_SIZE, Prot::READ).unwrap();
    mm.mprotect(a, PAGE_SIZE, RW).unwrap();
    mm.clear_flush_young(b).unwrap();
    rec.set_young(false);
    let r = mm.reclaim(4).unwrap();
    assert!(r.evicted >= 1, "{r:?}");
    mm.madvise_dontneed(a, 2 * PAGE_SIZE).unwrap();
    mm.write(a, b"x").unwrap();
    mm.munmap(a, 2 * PAGE_SIZE).unwrap();
    let log = rec.take();
    let starts: Vec<_> = log
        .iter()
        .filter_map(|r| match r {
            Recorded::InvalidateRangeStart(r) => Some(*r),
            _ => None,
        })
        .collect();
    let ends: Vec<_> = log
        .iter()
        .filter_map(|r| match r {
            Recorded::InvalidateRangeEnd(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert!(starts.len() >= 8, "{log:?}");
    assert_eq!(starts, ends, "every failed start got its end, in order");
    assert_eq!(mm.stats().mn_start_failed, starts.len() as u64);
    mm.check_consistency().unwrap();
}

/// A split needs the folio lock (Linux's `__split_huge_pmd` takes it since
/// the fix of CVE-2020-29368): reclaim holds the lock of a THP it is about
/// to split and swap, and a DONTNEED of another page of it must wait in
/// `split_huge_pmd` instead of splitting under reclaim. Its reference then
/// makes reclaim's split fail (the folio is pinned), reclaim skips the
/// page, and the DONTNEED splits the PMD and zaps its page.
#[test]
fn a_pmd_split_waits_for_the_folio_lock_reclaim_holds() {
    use shadowvm::mm::{ThpConfig, ThpEnabled};
    let mm = Mm::new_anonymous(2048).unwrap();
    mm.set_thp_config(ThpConfig::pmd(ThpEnabled::Always));
    let base = mm
        .mmap(Some(0x7f00_0000_0000), 2 << 20, RW, MmapFlags::empty())
        .unwrap();
    mm.write(base, b"head").unwrap();
    mm.write(base + 9 * PAGE_SIZE, b"nine").unwrap();
    assert!(mm.huge_pmd(base).is_some());
    let fired = Arc::new(AtomicBool::new(false));
    let zapper: Arc<parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>> = Default::default();
    {
        let (mm2, fired, zapper) = (mm.clone(), fired.clone(), zapper.clone());
        mm.set_test_hook(Some(Arc::new(move |point, _hva| {
            if point != MmHookPoint::ReclaimPageLocked || fired.swap(true, Ordering::SeqCst) {
                return;
            }
            let waits = mm2.stats().page_lock_wait;
            let mm3 = mm2.clone();
            *zapper.lock() = Some(std::thread::spawn(move || {
                mm3.madvise_dontneed(base + 5 * PAGE_SIZE, PAGE_SIZE)
                    .unwrap();
            }));
            wait_until("the split waits for the folio lock", || {
                mm2.stats().page_lock_wait > waits
            });
            assert!(mm2.huge_pmd(base).is_some(), "split under the lock");
        })));
    }
    // The fault left it young: the first look clears that, the second
    // takes the lock.
    mm.reclaim(1).unwrap();
    let r = mm.reclaim(1).unwrap();
    mm.set_test_hook(None);
    zapper.lock().take().expect("the hook ran").join().unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!((r.evicted, r.skipped), (0, 1), "{r:?}");
    let st = mm.stats();
    // Reclaim's split failed on the zapper's reference. The zapper's own
    // folio split after its zap may also meet reclaim's reference (dropped
    // just after the lock) and then queues the folio: both are right.
    assert_eq!(st.thp_split_pmd, 1);
    assert!(
        (1..=2).contains(&st.thp_split_page_failed),
        "{}",
        st.thp_split_page_failed
    );
    assert_eq!(mm.pte(base + 5 * PAGE_SIZE), None);
    let mut b = [0u8; 4];
    mm.read(base + 9 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(&b, b"nine");
    mm.check_consistency().unwrap();
}
