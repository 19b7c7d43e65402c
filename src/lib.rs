//! shadowvm: a small KVM hypervisor whose guests run on shadow page tables
//! that the VMM builds and owns, kept coherent with a simulated host mm
//! through a Rust port of Linux's MMU notifier.
//!
//! Layers, each depending only on the ones below it (docs/design.md;
//! tests/layering.rs checks it):
//!
//! ```text
//! scenario  ->  vmm  ->  mmu  ->  mm  ->  notifier        (trace: used by all)
//!                    ->  dma  ->
//! ```
//!
//! * [`notifier`]: `mm/mmu_notifier.c` — the callback trait, SRCU-protected
//!   dispatch, register / unregister / release.
//! * [`mm`]: a simulated host `mm_struct` over real frames — VMAs, a host page
//!   table with young/dirty bits, faults, munmap, madvise, mprotect, KSM,
//!   aging, reclaim and exit, each calling the notifier where Linux does.
//! * [`mmu`]: the shadow MMU, a secondary MMU on the list API.
//! * [`dma`]: a simulated DMA device, a second secondary MMU on the
//!   interval API (`mmu_interval_notifier`).
//! * [`vmm`]: the VMM on real KVM: VM and vCPUs, devices, hypercalls, the
//!   kvm and shadow paging modes, the host side (ksmd, kswapd, scripted
//!   host operations, the TLB shootdown).
//! * [`scenario`]: the demos and the stress run, built on the VMM.
//! * [`trace`]: the typed trace events every layer emits.
//!
//! # Example
//!
//! A secondary MMU learns about a host `madvise(MADV_DONTNEED)`:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use shadowvm::mm::{Mm, MmapFlags, Prot, PAGE_SIZE};
//! use shadowvm::notifier::{MmuNotifierOps, MmuNotifierRange};
//!
//! #[derive(Default)]
//! struct Counter(AtomicUsize);
//! impl MmuNotifierOps for Counter {
//!     fn invalidate_range_start(&self, _range: &MmuNotifierRange) -> Result<(), shadowvm::notifier::NotifierError> {
//!         self.0.fetch_add(1, Ordering::SeqCst);
//!         Ok(())
//!     }
//! }
//!
//! let mm = Mm::new_anonymous(64).unwrap(); // 64 frames of machine memory
//! let hva = mm.mmap(None, 4 * PAGE_SIZE, Prot::READ | Prot::WRITE, MmapFlags::empty()).unwrap();
//! mm.write(hva, b"hello").unwrap();
//!
//! let counter = Arc::new(Counter::default());
//! let reg = mm.mmu_notifier_register(counter.clone()).unwrap();
//! mm.madvise_dontneed(hva, PAGE_SIZE).unwrap();
//! assert_eq!(counter.0.load(Ordering::SeqCst), 1);
//!
//! let mut buf = [0xffu8; 5];
//! mm.read(hva, &mut buf).unwrap();
//! assert_eq!(buf, [0; 5]); // DONTNEED on private anonymous memory reads back as zero
//! reg.unregister();
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod dma;
pub mod mm;
pub mod mmu;
pub mod notifier;
pub mod scenario;
pub(crate) mod sync;
pub mod trace;
pub mod vmm;
