//! The VM's DMA device (hypercall DMA, docs/guest-abi.md §6): the guest
//! hands the simulated device of [`crate::dma`] a buffer of its RAM and asks
//! for copies and fills. They run on the device's own thread
//! ([`DmaEngine`]), through the device's IOTLB, which the host mm
//! invalidates through an interval notifier as it invalidates the shadow
//! MMU: the device reads what the guest wrote and the guest reads what the
//! device wrote, whatever ksmd, kswapd, a balloon or a scripted host
//! operation did to the pages meanwhile. Shadow mode only: in kvm mode there
//! is no host mm of ours to attach to, and the hypercall answers
//! `EOPNOTSUPP`.
//!
//! * `mod.rs`: [`GuestDma`]: attach, copy, fill, detach, `--check`, the
//!   teardown.
//! * `errno.rs`: a failed transfer is the guest's (an errno) or the VMM's
//!   (the VM stops).
//! * `stats.rs`: the `dma` object of `--stats` / `--json`.
//!
//! **Completion**: a COPY or FILL hypercall returns when the device's thread
//! has completed the transfer (a doorbell and the wait for its completion,
//! folded into the one exit a hypercall costs anyway). The calling vCPU
//! waits outside KVM_RUN; the other vCPUs, ksmd, kswapd and the host
//! operations run meanwhile, so the device is invalidated while it works.
//!
//! Lock order: `GuestDma::state`, then the device lock (taken by the engine
//! thread while the state lock's holder waits for it). The state lock is
//! held across a transfer, so a DETACH on another vCPU waits for it; the
//! engine thread never takes it.

mod errno;
mod stats;

use std::sync::Arc;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use crate::dma::{DmaCheckError, DmaConfig, DmaDevice, DmaEngine, DmaOp, DmaStatsSnapshot};
use crate::vmm::abi::{self, PAGE_SIZE, errno::*};
use crate::vmm::host::ram::ShadowRam;
use crate::vmm::paging::PagingError;

pub use errno::GuestDmaError;
pub use stats::GuestDmaStats;

use errno::{Refusal, classify};
use stats::{Counters, add, sum};

/// Whether `[gpa, gpa + len)` may be a DMA buffer in `mem_size` bytes of
/// RAM: whole pages, not empty, at most `DMA_BUFFER_MAX`, inside RAM at or
/// above `IMAGE_MIN_GPA` (never the VMM-built area; the switcher is not
/// guest RAM at all).
pub fn buffer_ok(gpa: u64, len: u64, mem_size: u64) -> bool {
    gpa.is_multiple_of(PAGE_SIZE)
        && len.is_multiple_of(PAGE_SIZE)
        && len != 0
        && len <= abi::DMA_BUFFER_MAX
        && gpa >= abi::IMAGE_MIN_GPA
        && gpa.checked_add(len).is_some_and(|end| end <= mem_size)
}

/// Whether `len` bytes may be one COPY or FILL.
pub fn transfer_len_ok(len: u64) -> bool {
    len != 0 && len <= abi::DMA_XFER_MAX
}

/// Called with `(gpa, len)` after a transfer wrote guest RAM there: shadow
/// mode drops the shadow pages of guest tables in the range
/// (`ShadowPaging::device_wrote`), which write protection cannot catch.
pub type DeviceWrote = Arc<dyn Fn(u64, u64) -> Result<(), PagingError> + Send + Sync>;

/// An attached device and its thread.
struct Attached {
    gpa: u64,
    device: Arc<DmaDevice>,
    engine: DmaEngine,
}

/// The VM's one DMA device, attached to a buffer of guest RAM or not.
pub struct GuestDma {
    ram: Arc<ShadowRam>,
    wrote: DeviceWrote,
    state: Mutex<Option<Attached>>,
    counters: Counters,
    /// The counters of devices detached so far.
    retired: Mutex<DmaStatsSnapshot>,
    /// Tests only: the next attach leaves a stale IOTLB entry at iova 0.
    #[cfg(feature = "test-hooks")]
    stale_entry: std::sync::atomic::AtomicBool,
}

impl GuestDma {
    /// A device for the guest RAM `ram`, not attached yet; `wrote` is told
    /// what each transfer wrote.
    pub fn new(ram: Arc<ShadowRam>, wrote: DeviceWrote) -> Self {
        GuestDma {
            ram,
            wrote,
            state: Mutex::new(None),
            counters: Counters::default(),
            retired: Mutex::new(DmaStatsSnapshot::default()),
            #[cfg(feature = "test-hooks")]
            stale_entry: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Tests only: make the next ATTACH leave an IOTLB entry for iova 0
    /// pointing at a frame the host mm does not own, the trace of a missed
    /// invalidation: the first DMA there must stop the VM.
    #[cfg(feature = "test-hooks")]
    pub fn inject_stale_entry(&self) {
        self.stale_entry.store(true, Ordering::Relaxed);
    }

    /// ATTACH: subscribes a device to `[gpa, gpa + len)` of the host mm and
    /// starts its thread. `EBUSY` while one is attached, `EINVAL` for a
    /// buffer [`buffer_ok`] refuses.
    pub fn attach(&self, gpa: u64, len: u64) -> Result<i64, GuestDmaError> {
        if !buffer_ok(gpa, len, self.ram.size_bytes()) {
            return Ok(EINVAL);
        }
        let mut st = self.state.lock();
        if st.is_some() {
            add(&self.counters.busy, 1);
            return Ok(EBUSY);
        }
        // Every DMA checks that its frame is still the mm's: a device that
        // reaches a freed frame stops the VM instead of corrupting it.
        let cfg = DmaConfig { check_frames: true };
        let device = DmaDevice::attach(self.ram.mm(), self.ram.base() + gpa, len, cfg)
            .map_err(GuestDmaError::Device)?;
        let device = Arc::new(device);
        let engine = DmaEngine::spawn(device.clone()).map_err(GuestDmaError::Device)?;
        #[cfg(feature = "test-hooks")]
        if self.stale_entry.swap(false, Ordering::Relaxed) {
            self.leave_stale_entry(&device);
        }
        *st = Some(Attached {
            gpa,
            device,
            engine,
        });
        add(&self.counters.attaches, 1);
        Ok(0)
    }

    /// Points iova 0 at a frame the mm does not own: a shadow page table
    /// (the worst a stale entry could reach) or a reserved frame.
    #[cfg(feature = "test-hooks")]
    fn leave_stale_entry(&self, device: &DmaDevice) {
        use crate::mm::FrameOwner;
        let frames = self.ram.mm().frames();
        let mine = self.ram.mm().frame_owner();
        let stale = (0..frames.nr_frames()).find(|&pfn| {
            frames
                .owner(pfn)
                .is_ok_and(|o| o != mine && o != FrameOwner::Free)
        });
        if let Some(pfn) = stale {
            device.install_stale_entry(0, pfn);
        }
    }

    /// COPY: the device reads `len` bytes at iova `src` and writes them at
    /// `dst`.
    pub fn copy(&self, src: u64, dst: u64, len: u64) -> Result<i64, GuestDmaError> {
        let op = DmaOp::Copy {
            src,
            dst,
            len: len as usize,
        };
        self.transfer(op, &[(src, len), (dst, len)], dst, len, true)
    }

    /// FILL: the device writes `len` bytes of `byte` at iova `iova`.
    pub fn fill(&self, iova: u64, len: u64, byte: u8) -> Result<i64, GuestDmaError> {
        let op = DmaOp::Fill {
            iova,
            len: len as usize,
            byte,
        };
        self.transfer(op, &[(iova, len)], iova, len, false)
    }

    /// Runs `op` (touching `ranges` of the buffer, writing `len` bytes at
    /// `dst`) on the device's thread and waits for it.
    fn transfer(
        &self,
        op: DmaOp,
        ranges: &[(u64, u64)],
        dst: u64,
        len: u64,
        copy: bool,
    ) -> Result<i64, GuestDmaError> {
        let c = &self.counters;
        if !transfer_len_ok(len) {
            return Ok(EINVAL);
        }
        let st = self.state.lock();
        let Some(a) = st.as_ref() else {
            add(&c.no_device, 1);
            return Ok(ENODEV);
        };
        let size = a.device.size();
        if !ranges
            .iter()
            .all(|&(iova, n)| iova.checked_add(n).is_some_and(|end| end <= size))
        {
            add(&c.out_of_buffer, 1);
            return Ok(EINVAL);
        }
        let done = a.engine.run(op);
        let gpa = a.gpa + dst;
        drop(st);
        // Even a failed transfer may have written part of the range.
        (self.wrote)(gpa, len).map_err(GuestDmaError::PageTrack)?;
        match done {
            Ok(_) => {
                let (n, bytes) = if copy {
                    (&c.copies, &c.bytes_copied)
                } else {
                    (&c.fills, &c.bytes_filled)
                };
                add(n, 1);
                add(bytes, len);
                Ok(0)
            }
            Err(e) => {
                let refusal = classify(e)?;
                match refusal {
                    Refusal::HostRefused => add(&c.refused, 1),
                    Refusal::Again => add(&c.again, 1),
                    Refusal::Invalid => add(&c.out_of_buffer, 1),
                }
                Ok(refusal.errno())
            }
        }
    }

    /// DETACH: stops the device's thread and removes its interval notifier
    /// (`mmu_interval_notifier_remove`). `ENODEV` if none is attached.
    pub fn detach(&self) -> i64 {
        let Some(a) = self.state.lock().take() else {
            add(&self.counters.no_device, 1);
            return ENODEV;
        };
        self.retire(a);
        add(&self.counters.detaches, 1);
        0
    }

    /// Joins the device's thread, keeps its counters, and detaches it;
    /// returns the IOTLB entries it still held.
    fn retire(&self, a: Attached) -> u64 {
        let Attached { device, engine, .. } = a;
        // Transfers are synchronous under the state lock: the queue is
        // empty, and joining gives back the thread's reference.
        drop(engine);
        let left = device.nr_mapped() as u64;
        {
            let mut retired = self.retired.lock();
            *retired = sum(*retired, device.stats());
        }
        match Arc::try_unwrap(device) {
            Ok(device) => device.detach(),
            // Not reachable (the engine was the only other holder); the
            // last reference's drop removes the interval all the same.
            Err(device) => drop(device),
        }
        left
    }

    /// The attached buffer, as `(gpa, len)`.
    pub fn attached(&self) -> Option<(u64, u64)> {
        self.state.lock().as_ref().map(|a| (a.gpa, a.device.size()))
    }

    /// `--check`, at a quiescent point: every IOTLB entry of the attached
    /// device maps the frame the host maps, and the mm owns it.
    pub fn check(&self) -> Result<(), DmaCheckError> {
        match self.state.lock().as_ref() {
            Some(a) => a.device.check_coherence().map(|_| ()),
            None => Ok(()),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> GuestDmaStats {
        let live = self.state.lock().as_ref().map(|a| a.device.stats());
        let device = sum(*self.retired.lock(), live.unwrap_or_default());
        self.counters.snapshot(device)
    }

    /// The teardown, after the host mm's `exit_mmap` (which invalidated the
    /// device's whole interval): detaches a device the guest left attached
    /// and reports the counters, with the IOTLB entries it still held.
    pub fn exit(&self) -> GuestDmaStats {
        let left = self.state.lock().take().map(|a| {
            let at = [a.gpa, a.device.size()];
            (at, self.retire(a))
        });
        let mut s = self.stats();
        if let Some((at, iotlb)) = left {
            s.attached_at_exit = Some(at);
            s.iotlb_after_exit = iotlb;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{Mm, MmapFlags, Prot};

    const MEM: u64 = 4 << 20;
    const BUF: u64 = 0x20_0000;

    fn setup() -> (GuestDma, Arc<ShadowRam>) {
        let mm = Mm::new_anonymous(2048).unwrap();
        let base = mm
            .mmap(None, MEM, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .unwrap();
        let ram = Arc::new(ShadowRam::new(mm, base, MEM));
        (GuestDma::new(ram.clone(), Arc::new(|_, _| Ok(()))), ram)
    }

    fn read(ram: &ShadowRam, gpa: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        crate::vmm::kvm::memory::GuestMemWriter::read_bytes(ram, gpa, &mut b).unwrap();
        b
    }

    fn write(ram: &ShadowRam, gpa: u64, data: &[u8]) {
        let mut w = ram;
        crate::vmm::kvm::memory::GuestMemWriter::write_bytes(&mut w, gpa, data).unwrap();
    }

    #[test]
    fn buffers_and_transfer_lengths_are_validated() {
        assert!(buffer_ok(BUF, PAGE_SIZE, MEM));
        assert!(buffer_ok(BUF, MEM - BUF, MEM));
        for (gpa, len) in [
            (BUF + 8, PAGE_SIZE),
            (BUF, 100),
            (BUF, 0),
            (0x1000, PAGE_SIZE),
            (MEM - PAGE_SIZE, 2 * PAGE_SIZE),
            (MEM, PAGE_SIZE),
            (BUF, u64::MAX - PAGE_SIZE + 1),
            (u64::MAX - PAGE_SIZE + 1, PAGE_SIZE),
            (abi::SWITCHER_GVA, PAGE_SIZE),
        ] {
            assert!(!buffer_ok(gpa, len, MEM), "{gpa:#x}+{len:#x}");
        }
        assert!(!buffer_ok(BUF, abi::DMA_BUFFER_MAX + PAGE_SIZE, 1 << 40));
        assert!(transfer_len_ok(1) && transfer_len_ok(abi::DMA_XFER_MAX));
        assert!(!transfer_len_ok(0) && !transfer_len_ok(abi::DMA_XFER_MAX + 1));
    }

    #[test]
    fn the_device_sees_the_guests_writes_and_the_guest_sees_the_devices() {
        let (dma, ram) = setup();
        assert_eq!(dma.copy(0, 8, 8).unwrap(), ENODEV);
        assert_eq!(dma.detach(), ENODEV);
        assert_eq!(dma.attach(BUF, 4 * PAGE_SIZE).unwrap(), 0);
        assert_eq!(dma.attach(BUF, PAGE_SIZE).unwrap(), EBUSY);
        assert_eq!(dma.attached(), Some((BUF, 4 * PAGE_SIZE)));
        let intervals = || ram.mm().notifiers().intervals_overlapping(0, u64::MAX);
        let at = ram.base() + BUF;
        assert_eq!(intervals(), [(at, at + 4 * PAGE_SIZE)]);

        let pattern: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 1) as u8).collect();
        write(&ram, BUF + 3, &pattern);
        assert_eq!(dma.copy(3, 2 * PAGE_SIZE + 5, 5000).unwrap(), 0);
        assert_eq!(read(&ram, BUF + 2 * PAGE_SIZE + 5, 5000), pattern);
        // Overlapping: memmove.
        assert_eq!(dma.copy(3, 4, 5000).unwrap(), 0);
        assert_eq!(read(&ram, BUF + 4, 5000), pattern);
        assert_eq!(dma.fill(PAGE_SIZE - 1, 3, 0xa5).unwrap(), 0);
        assert_eq!(
            read(&ram, BUF + PAGE_SIZE - 2, 5),
            [pattern[4090], 0xa5, 0xa5, 0xa5, pattern[4094]]
        );

        // Out of the buffer, too long, overflowing: EINVAL, nothing done.
        for (src, dst, len) in [
            (0, 4 * PAGE_SIZE - 1, 2),
            (4 * PAGE_SIZE, 0, 1),
            (u64::MAX, 0, 2),
            (0, 8, 0),
            (0, 8, abi::DMA_XFER_MAX + 1),
        ] {
            assert_eq!(dma.copy(src, dst, len).unwrap(), EINVAL);
        }
        assert_eq!(dma.fill(u64::MAX - 1, 4, 1).unwrap(), EINVAL);

        let s = dma.stats();
        assert_eq!((s.copies, s.fills, s.busy, s.no_device), (2, 1, 1, 2));
        assert_eq!(s.out_of_buffer, 4);
        assert!(s.device.faults >= 4 && s.device.dma_writes == 3, "{s:?}");
        dma.check().unwrap();
        assert_eq!(dma.detach(), 0);
        assert_eq!(dma.attached(), None);
        assert_eq!(intervals(), [], "the interval notifier is removed");
        assert_eq!(dma.stats().detaches, 1);
    }

    #[test]
    fn host_operations_invalidate_the_device_and_refusals_are_errnos() {
        let (dma, ram) = setup();
        let (mm, base) = (ram.mm().clone(), ram.base());
        assert_eq!(dma.attach(BUF, 4 * PAGE_SIZE).unwrap(), 0);
        assert_eq!(dma.fill(0, 4 * PAGE_SIZE, 0x11).unwrap(), 0);

        // The balloon's DONTNEED: the device re-faults a zero page.
        mm.madvise_dontneed(base + BUF, PAGE_SIZE).unwrap();
        assert_eq!(dma.copy(0, PAGE_SIZE, 16).unwrap(), 0);
        assert_eq!(
            read(&ram, BUF + PAGE_SIZE, 17),
            [&[0; 16][..], &[0x11]].concat()
        );

        // Read-only: reads work, writes are refused.
        mm.mprotect(base + BUF + 2 * PAGE_SIZE, PAGE_SIZE, Prot::READ)
            .unwrap();
        assert_eq!(dma.fill(2 * PAGE_SIZE, 8, 1).unwrap(), EFAULT);
        assert_eq!(dma.copy(2 * PAGE_SIZE, 0, 8).unwrap(), 0);
        assert_eq!(read(&ram, BUF, 8), [0x11; 8]);

        // Unmapped: both refused.
        mm.munmap(base + BUF + 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(dma.copy(3 * PAGE_SIZE, 0, 8).unwrap(), EFAULT);
        assert_eq!(dma.fill(3 * PAGE_SIZE, 8, 1).unwrap(), EFAULT);

        let s = dma.stats();
        assert_eq!(s.refused, 3, "{s:?}");
        assert!(s.device.invalidations >= 3 && s.device.iotlb_invalidated >= 3);
        dma.check().unwrap();

        // The VM's exit: the mm's exit invalidates the device, the teardown
        // detaches it, every frame comes back.
        mm.exit_mmap();
        let s = dma.exit();
        assert_eq!(s.attached_at_exit, Some([BUF, 4 * PAGE_SIZE]));
        assert_eq!(s.iotlb_after_exit, 0);
        assert_eq!(s.device.freed_frame_accesses, 0);
        assert_eq!(dma.attached(), None);
        assert_eq!(mm.notifiers().intervals_overlapping(0, u64::MAX), []);
        assert_eq!(mm.frames().nr_free(), mm.frames().nr_frames());
    }

    /// Two vCPUs: one transfers in a loop while the other detaches and
    /// attaches again; every answer is 0 or ENODEV, never a failure, and the
    /// device counters add up.
    #[test]
    fn detach_and_attach_race_transfers_from_another_vcpu() {
        let (dma, ram) = setup();
        assert_eq!(dma.attach(BUF, 2 * PAGE_SIZE).unwrap(), 0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (ok, nodev) = std::thread::scope(|s| {
            let transfers = s.spawn(|| {
                let (mut ok, mut nodev) = (0u64, 0u64);
                while !done.load(std::sync::atomic::Ordering::Acquire) || ok == 0 {
                    match dma.fill(0, 2 * PAGE_SIZE, 0x42).unwrap() {
                        0 => ok += 1,
                        ENODEV => nodev += 1,
                        e => panic!("fill: {e}"),
                    }
                }
                (ok, nodev)
            });
            for _ in 0..200 {
                assert_eq!(dma.detach(), 0);
                assert_eq!(dma.attach(BUF, 2 * PAGE_SIZE).unwrap(), 0);
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            transfers.join().unwrap()
        });
        let s = dma.stats();
        assert_eq!((s.attaches, s.detaches), (201, 200));
        assert_eq!((s.fills, s.no_device), (ok, nodev));
        assert_eq!(s.device.dma_writes, ok);
        assert_eq!(read(&ram, BUF, 4), [0x42; 4]);
        dma.check().unwrap();
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn a_stale_entry_is_caught_before_the_device_touches_the_frame() {
        let (dma, ram) = setup();
        // A frame the mm does not own: one lent outside it.
        let frames = ram.mm().frames();
        let lent = frames.alloc(crate::mm::FrameOwner::External).unwrap();
        dma.inject_stale_entry();
        assert_eq!(dma.attach(BUF, PAGE_SIZE).unwrap(), 0);
        let e = dma.fill(0, 8, 1).unwrap_err();
        assert!(e.to_string().contains("which the mm does not own"), "{e}");
        assert_eq!(dma.stats().device.freed_frame_accesses, 1);
        frames.free(lent, crate::mm::FrameOwner::External).unwrap();
    }
}
