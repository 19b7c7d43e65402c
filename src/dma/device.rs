//! The device: attach to a buffer of an mm, DMA reads and writes through
//! its IOTLB.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use crate::mm::{Access, FrameAccess, FrameOwner, Hva, MachineMemory, Mm, MmError, PAGE_SIZE, Pfn};
use crate::notifier::MmuIntervalNotifier;

use super::iotlb::{Iotlb, IotlbEntry};
use super::stats::{DmaStats, DmaStatsSnapshot, add, inc};
use super::{DmaError, MAX_FAULT_RETRIES};

/// A test hook run by the fault path between `hva_to_pfn` and taking the
/// device lock, with the faulting iova: the window a host invalidation must
/// be caught in. Exists only with the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub type RaceHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Tunables.
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaConfig {
    /// On every DMA, check that the frame is still owned by the mm (an
    /// allocator lock per page touched; for tests and stress runs).
    pub check_frames: bool,
}

/// What the `invalidate` callback shares with the fault and DMA paths.
pub(crate) struct DeviceInner {
    pub(crate) mm: Arc<Mm>,
    /// The hva of iova 0.
    pub(crate) base: Hva,
    pub(crate) size: u64,
    /// The device lock (`dmirror->mutex`): held to install, to invalidate,
    /// and across every DMA access to a frame.
    pub(crate) iotlb: Mutex<Iotlb>,
    pub(crate) stats: DmaStats,
    pub(crate) cfg: DmaConfig,
    #[cfg(feature = "test-hooks")]
    pub(crate) race_hook: Mutex<Option<RaceHook>>,
}

/// A DMA device mirroring `[base, base + size)` of an mm.
pub struct DmaDevice {
    pub(crate) inner: Arc<DeviceInner>,
    /// Dropping it removes the subscription, waiting for a running
    /// invalidation; no callback reaches the device afterwards.
    pub(crate) interval: MmuIntervalNotifier,
}

impl std::fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaDevice")
            .field("base", &self.inner.base)
            .field("size", &self.inner.size)
            .finish_non_exhaustive()
    }
}

impl DmaDevice {
    /// Attaches a device to `[hva, hva + len)` of `mm` (`len` rounded up to
    /// pages): subscribes an interval notifier over it
    /// (`mmu_interval_notifier_insert`). Nothing is mapped until the first
    /// DMA.
    pub fn attach(mm: &Arc<Mm>, hva: Hva, len: u64, cfg: DmaConfig) -> Result<Self, DmaError> {
        let size = crate::mm::page_align(len)
            .filter(|&s| s != 0 && crate::mm::is_page_aligned(hva))
            .filter(|&s| hva.checked_add(s).is_some())
            .ok_or(DmaError::InvalidBuffer { hva, len })?;
        let npages =
            usize::try_from(size / PAGE_SIZE).map_err(|_| DmaError::InvalidBuffer { hva, len })?;
        let inner = Arc::new(DeviceInner {
            mm: mm.clone(),
            base: hva,
            size,
            iotlb: Mutex::new(Iotlb::new(npages)),
            stats: DmaStats::default(),
            cfg,
            #[cfg(feature = "test-hooks")]
            race_hook: Mutex::new(None),
        });
        let interval = mm
            .mmu_interval_notifier_insert(hva, size, inner.clone())
            .map_err(DmaError::Attach)?;
        crate::trace::emit!(DmaAttach {
            start: hva,
            end: hva + size,
        });
        Ok(Self { inner, interval })
    }

    /// Detaches (`mmu_interval_notifier_remove`): returns once no
    /// invalidation runs on the device; its IOTLB goes with it.
    pub fn detach(self) {
        let Self { inner, interval } = self;
        interval.remove();
        drop(inner);
    }

    /// The hva of iova 0.
    pub fn base(&self) -> Hva {
        self.inner.base
    }

    /// Buffer size in bytes (whole pages).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn mm(&self) -> &Arc<Mm> {
        &self.inner.mm
    }

    pub fn stats(&self) -> DmaStatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Number of pages the IOTLB maps.
    pub fn nr_mapped(&self) -> usize {
        self.inner.iotlb.lock().nr_mapped()
    }

    /// Every translation, as `(iova, entry)`.
    pub fn iotlb_entries(&self) -> Vec<(u64, IotlbEntry)> {
        self.inner
            .iotlb
            .lock()
            .iter()
            .map(|(i, e)| (i as u64 * PAGE_SIZE, e))
            .collect()
    }

    /// Runs `f` with the device lock held: no DMA, install or invalidation
    /// of the device proceeds meanwhile (a paused device). A blockable
    /// invalidation waits; a non-blockable one is refused.
    pub fn quiesce<R>(&self, f: impl FnOnce() -> R) -> R {
        let _lock = self.inner.iotlb.lock();
        f()
    }

    /// Tests only: points the IOTLB entry of `iova`'s page at `pfn` behind
    /// the mm's back, the stale translation a missed invalidation would
    /// leave, so a test can watch the freed-frame check stop it.
    #[cfg(feature = "test-hooks")]
    pub fn install_stale_entry(&self, iova: u64, pfn: Pfn) {
        let page = (iova / PAGE_SIZE) as usize;
        self.inner.iotlb.lock().install(
            page,
            IotlbEntry {
                pfn,
                writable: true,
            },
        );
    }

    /// Installs (or removes) the fault path's race hook.
    #[cfg(feature = "test-hooks")]
    pub fn set_race_hook(&self, hook: Option<RaceHook>) {
        *self.inner.race_hook.lock() = hook;
    }

    /// DMA read of `buf.len()` bytes at `iova` into device memory.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.inner.mm.memory().clone();
        self.dma(iova, buf.len() as u64, Access::Read, |pfn, off, r| {
            read_words(mem.as_ref(), pfn, off, &mut buf[r])
        })?;
        inc(&self.inner.stats.dma_reads);
        add(&self.inner.stats.dma_read_bytes, buf.len() as u64);
        Ok(())
    }

    /// DMA write of `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let mem = self.inner.mm.memory().clone();
        self.dma(iova, data.len() as u64, Access::Write, |pfn, off, r| {
            write_words(mem.as_ref(), pfn, off, &data[r])
        })?;
        inc(&self.inner.stats.dma_writes);
        add(&self.inner.stats.dma_write_bytes, data.len() as u64);
        Ok(())
    }

    /// One atomic 8-byte DMA read at an 8-byte aligned `iova`.
    pub fn read_u64(&self, iova: u64) -> Result<u64, DmaError> {
        let mut b = [0u8; 8];
        self.check_aligned(iova)?;
        self.read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// One atomic 8-byte DMA write at an 8-byte aligned `iova`.
    pub fn write_u64(&self, iova: u64, v: u64) -> Result<(), DmaError> {
        self.check_aligned(iova)?;
        self.write(iova, &v.to_le_bytes())
    }

    fn check_aligned(&self, iova: u64) -> Result<(), DmaError> {
        if iova.is_multiple_of(8) {
            Ok(())
        } else {
            Err(DmaError::Unaligned(iova))
        }
    }

    /// Validates `[iova, iova + len)` against the buffer.
    pub(crate) fn check_range(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        let size = self.inner.size;
        match iova.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DmaError::OutOfRange { iova, len, size }),
        }
    }

    /// Runs `f(pfn, offset in page, range of the caller's buffer)` for each
    /// page of `[iova, iova + len)`, with the translation present (writable
    /// for a write) and the device lock held.
    fn dma(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        mut f: impl FnMut(Pfn, usize, Range<usize>) -> Result<(), MmError>,
    ) -> Result<(), DmaError> {
        self.check_range(iova, len)?;
        let mut done = 0u64;
        while done < len {
            let at = iova + done;
            let off = at % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(len - done);
            let r = done as usize..(done + n) as usize;
            self.with_translation(at, access, |pfn| f(pfn, off as usize, r))?;
            done += n;
        }
        Ok(())
    }

    /// Looks the page of `iova` up in the IOTLB, faulting it in on a miss,
    /// and runs `f` on its frame under the device lock: an invalidation
    /// (which must take that lock first) cannot free the frame meanwhile.
    fn with_translation<R>(
        &self,
        iova: u64,
        access: Access,
        f: impl FnOnce(Pfn) -> Result<R, MmError>,
    ) -> Result<R, DmaError> {
        let page = (iova / PAGE_SIZE) as usize;
        let mut f = Some(f);
        for _ in 0..MAX_FAULT_RETRIES {
            {
                let tlb = self.inner.iotlb.lock();
                if let Some(e) = tlb.get(page)
                    && (e.writable || !access.is_write())
                    && let Some(f) = f.take()
                {
                    if self.inner.cfg.check_frames {
                        self.check_frame(iova, e.pfn)?;
                    }
                    return f(e.pfn).map_err(DmaError::Memory);
                }
            }
            // Invalidated (or never mapped) since: fault and look again.
            self.fault(iova, access)?;
        }
        Err(DmaError::TooManyRetries(MAX_FAULT_RETRIES))
    }

    /// The frame a translation points at must still be the mm's.
    fn check_frame(&self, iova: u64, pfn: Pfn) -> Result<(), DmaError> {
        let owner = self
            .inner
            .mm
            .frames()
            .owner(pfn)
            .map_err(DmaError::Memory)?;
        if owner == self.inner.mm.frame_owner() {
            return Ok(());
        }
        inc(&self.inner.stats.freed_frame_accesses);
        tracing::error!(iova, pfn, ?owner, "DMA reached a frame the mm does not own");
        debug_assert!(owner != FrameOwner::Free, "DMA into freed frame {pfn}");
        Err(DmaError::FreedFrame { iova, pfn })
    }
}

/// Reads `buf.len()` bytes at `off` of frame `pfn` with 64-bit atomic loads:
/// a vCPU may write the frame meanwhile, so no `&[u8]` over it is formed.
fn read_words(
    mem: &dyn MachineMemory,
    pfn: Pfn,
    off: usize,
    buf: &mut [u8],
) -> Result<(), MmError> {
    let mut i = 0;
    while i < buf.len() {
        let at = off + i;
        let b = at % 8;
        let n = (8 - b).min(buf.len() - i);
        let w = mem
            .frame_word(pfn, at / 8)?
            .load(Ordering::Relaxed)
            .to_le_bytes();
        buf[i..i + n].copy_from_slice(&w[b..b + n]);
        i += n;
    }
    Ok(())
}

/// Writes `data` at `off` of frame `pfn`: whole words with atomic stores,
/// partial words with an atomic read-modify-write so a concurrent vCPU store
/// to the other bytes of the word is not lost (a bus write with byte
/// enables).
fn write_words(mem: &dyn MachineMemory, pfn: Pfn, off: usize, data: &[u8]) -> Result<(), MmError> {
    let mut i = 0;
    while i < data.len() {
        let at = off + i;
        let b = at % 8;
        let n = (8 - b).min(data.len() - i);
        let word = mem.frame_word(pfn, at / 8)?;
        let bytes = &data[i..i + n];
        if n == 8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(bytes);
            word.store(u64::from_le_bytes(w), Ordering::Relaxed);
        } else {
            let merge = |old: u64| {
                let mut w = old.to_le_bytes();
                w[b..b + n].copy_from_slice(bytes);
                Some(u64::from_le_bytes(w))
            };
            // The closure always returns Some: this cannot fail.
            let _always_ok = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, merge);
        }
        i += n;
    }
    Ok(())
}
