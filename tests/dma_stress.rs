//! The DMA device under a host that invalidates at full rate.
//!
//! * Every host operation that invalidates is run *inside* the fault
//!   window (between `hva_to_pfn` and the device lock, through the race
//!   hook): the fault must retry and install what the host maps now.
//! * A DMA thread and a "vCPU" thread share every word of a buffer (the
//!   device owns bytes 0..4 of each word, the CPU bytes 4..8) while a host
//!   thread runs DONTNEED, mprotect, KSM, reclaim, aging and the OOM
//!   reaper: 0 corrupted bytes, no DMA into a frame the mm does not own,
//!   and the coherence checkers hold throughout.
//! * Two pages churned at full rate (drop, refill with a tagged value): the
//!   device never sees the other page's tag through a recycled frame.
//! * Exit while the device is busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use shadowvm::dma::{DmaConfig, DmaDevice, DmaError};
use shadowvm::mm::{FrameOwner, Mm, MmError, MmapFlags, PAGE_SIZE, POISON_FREE, Prot, Pte};

const CHECKED: DmaConfig = DmaConfig { check_frames: true };

/// A fresh mm of `frames` frames with one read-write mapping of `len` bytes.
fn anon(frames: u64, len: u64, flags: MmapFlags) -> (Arc<Mm>, u64) {
    let mm = Mm::new_anonymous(frames).unwrap();
    let hva = mm.mmap(None, len, Prot::READ | Prot::WRITE, flags).unwrap();
    (mm, hva)
}

fn pfn(mm: &Mm, hva: u64) -> Option<u64> {
    match mm.pte(hva) {
        Some(Pte::Present(p)) => Some(p.pfn),
        _ => None,
    }
}

/// A host operation run inside the device's fault window, and the first
/// word the device must read afterwards.
#[derive(Clone, Copy, Debug)]
enum InWindow {
    /// The page is dropped and its frame handed to another page at once.
    DontneedAndRecycle,
    /// The VMA is replaced by a new one (MAP_FIXED) at the same address.
    MunmapAndMmapFixed,
    /// The page is written to swap and freed.
    Reclaim,
    /// The page is merged with an identical one.
    KsmMerge,
    /// The page is made read-only and writable again.
    Mprotect,
    /// The mm goes away.
    Exit,
}

#[test]
fn every_host_operation_in_the_fault_window_makes_the_fault_retry() {
    for op in [
        InWindow::DontneedAndRecycle,
        InWindow::MunmapAndMmapFixed,
        InWindow::Reclaim,
        InWindow::KsmMerge,
        InWindow::Mprotect,
        InWindow::Exit,
    ] {
        fault_window(op);
    }
}

fn fault_window(op: InWindow) {
    let mm = Mm::new_anonymous(64).unwrap();
    let flags = MmapFlags::MERGEABLE;
    let hva = mm
        .mmap(None, 3 * PAGE_SIZE, Prot::READ | Prot::WRITE, flags)
        .unwrap();
    let data = 0x0123_4567_89ab_cdefu64;
    mm.write(hva, &data.to_le_bytes()).unwrap();
    mm.write(hva + 2 * PAGE_SIZE, &data.to_le_bytes()).unwrap(); // KSM twin
    let dev = Arc::new(DmaDevice::attach(&mm, hva, PAGE_SIZE, CHECKED).unwrap());
    let fired = Arc::new(AtomicBool::new(false));
    let old = pfn(&mm, hva).unwrap();
    {
        let (mm, fired) = (mm.clone(), fired.clone());
        dev.set_race_hook(Some(Arc::new(move |_iova| {
            if fired.swap(true, Ordering::SeqCst) {
                return;
            }
            match op {
                InWindow::DontneedAndRecycle => {
                    mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
                    // LIFO allocator: page 1 gets the frame just freed.
                    mm.write(hva + PAGE_SIZE, &[0xee; 8]).unwrap();
                    assert_eq!(pfn(&mm, hva + PAGE_SIZE), Some(old));
                }
                InWindow::MunmapAndMmapFixed => {
                    mm.munmap(hva, PAGE_SIZE).unwrap();
                    mm.mmap(
                        Some(hva),
                        PAGE_SIZE,
                        Prot::READ | Prot::WRITE,
                        MmapFlags::empty(),
                    )
                    .unwrap();
                }
                InWindow::Reclaim => {
                    let r = mm.reclaim(16).unwrap();
                    assert!(r.evicted >= 1, "{r:?}");
                }
                InWindow::KsmMerge => {
                    for _ in 0..4 {
                        mm.ksm_scan(16).unwrap();
                    }
                    assert_eq!(pfn(&mm, hva), pfn(&mm, hva + 2 * PAGE_SIZE));
                }
                InWindow::Mprotect => {
                    mm.mprotect(hva, PAGE_SIZE, Prot::READ).unwrap();
                    mm.mprotect(hva, PAGE_SIZE, Prot::READ | Prot::WRITE)
                        .unwrap();
                }
                InWindow::Exit => mm.exit_mmap(),
            }
        })));
    }
    let got = dev.read_u64(0);
    assert!(fired.load(Ordering::SeqCst), "{op:?}: the hook did not run");
    let s = dev.stats();
    assert!(
        s.fault_retries >= 1,
        "{op:?}: the collision went unnoticed: {s:?}"
    );
    match op {
        InWindow::Exit => {
            assert!(
                matches!(
                    got,
                    Err(DmaError::HostFault {
                        source: MmError::Exited,
                        ..
                    })
                ),
                "{op:?}: {got:?}"
            );
            assert_eq!(dev.nr_mapped(), 0);
        }
        _ => {
            let want = match op {
                InWindow::DontneedAndRecycle | InWindow::MunmapAndMmapFixed => 0,
                _ => data,
            };
            assert_eq!(got.unwrap(), want, "{op:?}");
            let e = dev.iotlb_entries()[0].1;
            assert_eq!(Some(e.pfn), pfn(&mm, hva), "{op:?}: stale install");
        }
    }
    assert!(dev.check_coherence().is_ok(), "{op:?}");
    assert_eq!(dev.stats().freed_frame_accesses, 0);
}

/// Sets a flag when a thread ends, even by a panic, so the threads waiting
/// for it (spinning on the flag) end too instead of hanging the scope.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits until `counter` moved past `seen` (or its thread is gone);
/// returns its new value.
fn wait_progress(counter: &AtomicU64, seen: u64, gone: &AtomicBool) -> u64 {
    loop {
        let now = counter.load(Ordering::Relaxed);
        if now != seen || gone.load(Ordering::SeqCst) {
            return now;
        }
        thread::yield_now();
    }
}

/// A deterministic generator (xorshift) so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whether a 4-byte value read back is acceptable: what was written, or 0
/// if a content-destroying operation ran since (`gen` moved).
fn bad_bytes(read: u32, wrote: u32, destroyed: bool) -> u64 {
    if read == wrote || (destroyed && read == 0) {
        return 0;
    }
    let (r, w) = (read.to_le_bytes(), wrote.to_le_bytes());
    (0..4)
        .filter(|&i| r[i] != w[i] && !(destroyed && r[i] == 0))
        .count() as u64
}

/// Never 0, never the free poison, distinct per writer and iteration.
fn value(tag: u32, i: u64) -> u32 {
    let v = (tag << 24) | (i as u32 & 0x00ff_ffff) | 0x0010_0000;
    assert_ne!(v.to_le_bytes(), [POISON_FREE; 4]);
    v
}

#[test]
fn dma_and_vcpu_writes_survive_full_rate_invalidations() {
    const PAGES: u64 = 8;
    const HOST_OPS: u64 = 1000;
    // Few words per page, so the device and the vCPU often write the two
    // halves of the same word at once.
    const HOT_WORDS: u64 = 4;
    let (mm, hva) = anon(256, PAGES * PAGE_SIZE, MmapFlags::MERGEABLE);
    let dev = DmaDevice::attach(&mm, hva, PAGES * PAGE_SIZE, CHECKED).unwrap();
    // Bumped before and after every operation that destroys contents; a
    // check whose two readings differ accepts zeroes.
    let destroy_gen = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let worker_gone = AtomicBool::new(false);
    let corrupted = AtomicU64::new(0);
    let (dma_ops, cpu_ops, denied) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    thread::scope(|s| {
        // The device: 4-byte writes into bytes 0..4 of a word (the partial
        // word path), then a read back.
        s.spawn(|| {
            let _gone = SetOnDrop(&worker_gone);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let iova = rng.below(PAGES) * PAGE_SIZE + rng.below(HOT_WORDS) * 8;
                let v = value(0xd0, i);
                let g0 = destroy_gen.load(Ordering::SeqCst);
                match dev.write(iova, &v.to_le_bytes()) {
                    Ok(()) => {}
                    Err(DmaError::HostFault {
                        source: MmError::Access { .. },
                        ..
                    }) => {
                        denied.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => panic!("DMA write: {e}"),
                }
                let mut b = [0u8; 4];
                dev.read(iova, &mut b).unwrap();
                let g1 = destroy_gen.load(Ordering::SeqCst);
                let bad = bad_bytes(u32::from_le_bytes(b), v, g0 != g1 || g0 % 2 == 1);
                corrupted.fetch_add(bad, Ordering::Relaxed);
                dma_ops.fetch_add(1, Ordering::Relaxed);
            }
        });
        // The vCPU: bytes 4..8 of the same words, through the mm.
        s.spawn(|| {
            let _gone = SetOnDrop(&worker_gone);
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let at = hva + rng.below(PAGES) * PAGE_SIZE + rng.below(HOT_WORDS) * 8 + 4;
                let v = value(0xc0, i);
                let g0 = destroy_gen.load(Ordering::SeqCst);
                match mm.write(at, &v.to_le_bytes()) {
                    Ok(()) => {}
                    Err(MmError::Access { .. }) => continue,
                    Err(e) => panic!("vCPU write: {e}"),
                }
                let mut b = [0u8; 4];
                mm.read(at, &mut b).unwrap();
                let g1 = destroy_gen.load(Ordering::SeqCst);
                let bad = bad_bytes(u32::from_le_bytes(b), v, g0 != g1 || g0 % 2 == 1);
                corrupted.fetch_add(bad, Ordering::Relaxed);
                cpu_ops.fetch_add(1, Ordering::Relaxed);
            }
        });
        // The host.
        s.spawn(|| {
            let _stop = SetOnDrop(&stop); // also when a check panics
            let mut rng = Rng(0xdead_beef_cafe_f00d);
            let (mut dma_seen, mut cpu_seen) = (0, 0);
            for k in 0..HOST_OPS {
                if k % 4 == 0 {
                    // Interleave for sure: every few operations, wait until
                    // both the device and the vCPU got further.
                    dma_seen = wait_progress(&dma_ops, dma_seen, &worker_gone);
                    cpu_seen = wait_progress(&cpu_ops, cpu_seen, &worker_gone);
                }
                let page = hva + rng.below(PAGES) * PAGE_SIZE;
                match rng.below(7) {
                    0 => {
                        destroy_gen.fetch_add(1, Ordering::SeqCst);
                        mm.madvise_dontneed(page, PAGE_SIZE).unwrap();
                        destroy_gen.fetch_add(1, Ordering::SeqCst);
                    }
                    1 => {
                        mm.mprotect(page, PAGE_SIZE, Prot::READ).unwrap();
                        mm.mprotect(page, PAGE_SIZE, Prot::READ | Prot::WRITE)
                            .unwrap();
                    }
                    2 => {
                        mm.ksm_scan(4).unwrap();
                    }
                    3 => {
                        mm.reclaim(4).unwrap();
                    }
                    4 => {
                        mm.age_range(hva, hva + PAGES * PAGE_SIZE, true).unwrap();
                    }
                    5 => {
                        destroy_gen.fetch_add(1, Ordering::SeqCst);
                        // Refused while the device holds its lock: fine.
                        let _ = mm.oom_reap();
                        destroy_gen.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        // The device checker holds at any time (the mm's
                        // own checker needs a quiet mm: it runs at the end).
                        if let Err(e) = dev.check_coherence() {
                            panic!("device coherence: {e}");
                        }
                    }
                }
            }
        });
    });
    let s = dev.stats();
    eprintln!(
        "dma stress: {} DMA checks, {} vCPU checks, {} DMA writes denied by mprotect, {s:?}",
        dma_ops.load(Ordering::Relaxed),
        cpu_ops.load(Ordering::Relaxed),
        denied.load(Ordering::Relaxed)
    );
    assert_eq!(corrupted.load(Ordering::Relaxed), 0, "corrupted bytes");
    assert_eq!(s.freed_frame_accesses, 0);
    assert!(dma_ops.load(Ordering::Relaxed) > 0 && cpu_ops.load(Ordering::Relaxed) > 0);
    assert!(s.invalidations > 0);
    dev.check_coherence().unwrap();
    mm.check_consistency().unwrap();
    mm.exit_mmap();
    assert_eq!(dev.nr_mapped(), 0);
    assert_eq!(
        mm.frames().count(mm.frame_owner()),
        0,
        "every frame came back"
    );
}

#[test]
fn a_recycled_frame_never_shows_the_device_another_pages_data() {
    let (mm, hva) = anon(64, 2 * PAGE_SIZE, MmapFlags::empty());
    let (a, b) = (hva, hva + PAGE_SIZE);
    const TAG_B: u64 = 0xbbbb_0000_0000_0000;
    mm.write(a, &1u64.to_le_bytes()).unwrap();
    mm.write(b, &(TAG_B | 1).to_le_bytes()).unwrap();
    // The device sees page A only.
    let dev = DmaDevice::attach(&mm, a, PAGE_SIZE, CHECKED).unwrap();
    let stop = AtomicBool::new(false);
    let reader_gone = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            let _stop = SetOnDrop(&stop);
            // Drop a page and refill it, alternately: the allocator hands
            // the frame just freed to the other page.
            let mut seen = 0;
            for k in 2..8_000u64 {
                if k % 32 == 0 {
                    seen = wait_progress(&reads, seen, &reader_gone);
                }
                let (page, v) = if k % 2 == 0 { (a, k) } else { (b, TAG_B | k) };
                mm.madvise_dontneed(page, PAGE_SIZE).unwrap();
                mm.write(page, &v.to_le_bytes()).unwrap();
            }
        });
        s.spawn(|| {
            let _gone = SetOnDrop(&reader_gone);
            let mut last = 0;
            while !stop.load(Ordering::SeqCst) {
                let v = dev.read_u64(0).unwrap();
                assert_eq!(v & TAG_B, 0, "the device read page B's data: {v:#x}");
                assert_ne!(v.to_le_bytes(), [POISON_FREE; 8], "a freed frame");
                // Page A only grows between drops (a drop reads as 0).
                assert!(v == 0 || v >= last, "went back from {last} to {v}");
                if v != 0 {
                    last = v;
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    let s = dev.stats();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(s.freed_frame_accesses, 0);
    assert!(s.invalidations > 0 && s.faults > 1, "{s:?}");
    dev.check_coherence().unwrap();
}

#[test]
fn exit_while_the_device_is_busy_leaves_no_frame_behind() {
    let (mm, hva) = anon(64, 4 * PAGE_SIZE, MmapFlags::empty());
    let dev = DmaDevice::attach(&mm, hva, 4 * PAGE_SIZE, CHECKED).unwrap();
    let dmas = AtomicU64::new(0);
    let result = thread::scope(|s| {
        let device = s.spawn(|| {
            let mut i = 0u64;
            loop {
                i += 1;
                let iova = (i % 4) * PAGE_SIZE + (i % 500) * 8;
                if let Err(e) = dev.write_u64(iova, i) {
                    return e;
                }
                dmas.fetch_add(1, Ordering::SeqCst);
            }
        });
        while dmas.load(Ordering::SeqCst) < 1000 {
            thread::yield_now();
        }
        mm.exit_mmap();
        device.join().unwrap()
    });
    assert!(
        matches!(
            result,
            DmaError::HostFault {
                source: MmError::Exited,
                ..
            }
        ),
        "{result}"
    );
    assert_eq!(dev.nr_mapped(), 0);
    assert_eq!(dev.stats().freed_frame_accesses, 0);
    assert_eq!(mm.frames().count(mm.frame_owner()), 0);
    assert_eq!(mm.frames().count(FrameOwner::Free), 64);
}
