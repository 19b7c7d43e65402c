//! The shadow MMU (`arch/x86/kvm/mmu/`): real x86-64 4-level shadow page
//! tables in machine memory, built from the guest's page tables and the host
//! mm, and kept coherent with the host by the MMU notifier.
//!
//! * [`pte`]: x86-64 paging-entry bits, address masks and reserved-bit masks.
//! * [`walk`]: the guest page-table walker (`paging_tmpl.h`
//!   `walk_addr_generic`), with A/D emulation.
//! * `spte.rs`: the shadow PTE format; `shadow_page.rs`: shadow pages, the
//!   page hash, the rmap and write protection of guest tables.
//! * `fault.rs`: the fault path with KVM's invalidation-sequence retry, and
//!   2 MiB sptes over host huge PMDs (`kvm_mmu_hugepage_adjust`).
//! * `prefetch.rs`: sptes for a fault's neighbours (`FNAME(pte_prefetch)`).
//! * `prefault.rs`: populating a guest range on request
//!   (`KVM_PRE_FAULT_MEMORY`); `translate.rs`: the guest RAM such a range
//!   maps, for populating the host memory first.
//! * `notifier.rs`: the `MmuNotifierOps` implementation.
//! * [`tlb`]: the flush the MMU requests, by frame.
//! * `check.rs`: the coherence checker (docs/design.md rules 1 and 5).
//! * `snapshot.rs`: a read-only look at the Accessed bits for observers.

mod check;
mod fault;
mod guest_mem;
mod invalidate;
pub mod memslot;
mod notifier;
mod prefault;
mod prefetch;
pub mod pte;
#[cfg(feature = "test-hooks")]
mod scan;
mod shadow_page;
mod snapshot;
mod spte;
pub mod stats;
pub mod tlb;
pub mod translate;
pub mod walk;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use crate::mm::{FrameAccess, Mm, MmError, Pfn};
use crate::notifier::MmuNotifier;

pub use check::CoherenceError;
pub use fault::FaultOutcome;
pub use memslot::{Memslot, MemslotError, Memslots};
pub use prefault::PrefaultResult;
pub use prefetch::PTE_PREFETCH_NUM;
pub use stats::{MmuStats, MmuStatsSnapshot};
pub use tlb::{FlushFrame, FlushReason, NoFlush, RecordingFlush, TlbFlush, TlbFlushError};
pub use translate::{GpaRun, Translated, accessed_runs};
pub use walk::{Access, PagingState, PfErrorCode};

use invalidate::Invalidations;
use pte::{PT_BASE_ADDR_MASK, PT64_ROOT_4LEVEL, PteAccess, pt_index};
use shadow_page::{Ctx, MmuState, Role, RootEntry};
use stats::inc;

/// Errors of the shadow MMU (the VMM's problems, never the guest's: a guest
/// mistake is a [`FaultOutcome`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmuError {
    #[error(
        "no shadow page could be allocated: machine memory is exhausted and no root can be recycled"
    )]
    OutOfShadowPages,
    #[error("host memory: {0}")]
    Memory(MmError),
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    #[error("vCPU {0} has no root yet: load a CR3 first")]
    NoRoot(usize),
    #[error("CR3 {0:#x} sets bits beyond the physical-address width")]
    InvalidCr3(u64),
    #[error("the address space has been released")]
    Released,
    #[error("a fault was retried {0} times because of concurrent invalidations")]
    TooManyRetries(u32),
    #[error("guest range {gva:#x} + {len:#x} wraps around the address space")]
    InvalidRange { gva: u64, len: u64 },
    #[error("registering on the host mm: {0}")]
    Register(MmError),
    #[error(transparent)]
    TlbFlush(#[from] TlbFlushError),
    /// A shadow-page frame the MMU owns could not be read or written.
    #[error("shadow page {0:#x} is not a frame of machine memory")]
    BadShadowPage(Pfn),
    /// An earlier error nobody could be told about directly (inside a
    /// notifier callback): the MMU no longer installs anything.
    #[error("the shadow MMU stopped after an error: {0}")]
    Stopped(Box<MmuError>),
}

/// Called once with the first error the MMU meets where it cannot return it
/// (inside a notifier callback, or a flush on an error path): the VMM stops
/// the VM, because a translation may be stale.
pub type FatalHandler = Arc<dyn Fn(&MmuError) + Send + Sync>;

/// The first fatal error, and who to tell.
#[derive(Default)]
pub(crate) struct Fatal {
    error: Mutex<Option<MmuError>>,
    handler: Mutex<Option<FatalHandler>>,
}

impl Fatal {
    /// Records `e` if it is the first; tells the handler (outside the lock).
    pub(crate) fn raise(&self, e: MmuError) {
        {
            let mut first = self.error.lock();
            if first.is_some() {
                return;
            }
            tracing::error!("shadow MMU: {e}");
            *first = Some(e.clone());
        }
        let handler = self.handler.lock().clone();
        if let Some(h) = handler {
            h(&e);
        }
    }

    fn check(&self) -> Result<(), MmuError> {
        match &*self.error.lock() {
            Some(e) => Err(MmuError::Stopped(Box::new(e.clone()))),
            None => Ok(()),
        }
    }
}

/// A PML4 slot the VMM keeps for itself (the switcher, docs/guest-abi.md):
/// every root holds `entry` there, which links tables the VMM owns, nothing
/// ever zaps it, and the MMU builds no guest mapping under it: a fault
/// there is the guest's, whatever its own tables say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedSlot {
    /// The PML4 index.
    pub index: usize,
    /// The root entry (a non-leaf entry to VMM-owned tables).
    pub entry: u64,
}

impl ReservedSlot {
    /// Whether `gva` lies under the slot.
    pub fn contains(&self, gva: u64) -> bool {
        pt_index(gva, PT64_ROOT_4LEVEL) == self.index
    }
}

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct ShadowMmuConfig {
    pub nr_vcpus: usize,
    /// Root cache size (one root per guest CR3 value).
    pub max_roots: usize,
    /// Guest CPUID's physical-address width.
    pub maxphyaddr: u8,
    /// The PML4 slot the VMM keeps, if any.
    pub reserved: Option<ReservedSlot>,
    /// Sptes a fault considers for prefetch: the aligned group of this many
    /// around the faulting one (KVM's `PTE_PREFETCH_NUM`, 8); a power of
    /// two up to 512, 0 or 1 for none. 16 is a 64 KiB folio's worth.
    pub pte_prefetch: usize,
}

impl Default for ShadowMmuConfig {
    fn default() -> Self {
        Self {
            nr_vcpus: 1,
            max_roots: 8,
            maxphyaddr: 40,
            reserved: None,
            pte_prefetch: 0,
        }
    }
}

/// A test hook run by the fault path between translating hva → frame and
/// taking the MMU lock: the race window of rule 2. Exists only with the
/// `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub type RaceHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Everything the notifier callbacks share with the fault path.
pub(crate) struct Inner {
    mm: Arc<Mm>,
    slots: Memslots,
    tlb: Arc<dyn TlbFlush>,
    cfg: ShadowMmuConfig,
    state: Mutex<MmuState>,
    /// Per-vCPU guest paging state (CR3 included).
    paging: Mutex<Vec<PagingState>>,
    /// The invalidations in progress and those that ended recently, by
    /// range (`invalidate.rs`).
    inv: Invalidations,
    stats: MmuStats,
    fatal: Fatal,
    #[cfg(feature = "test-hooks")]
    race_hook: Mutex<Option<RaceHook>>,
}

impl Inner {
    fn ctx<'a>(&'a self, st: &'a mut MmuState) -> Ctx<'a> {
        Ctx {
            st,
            mem: self.mm.memory().as_ref(),
            frames: self.mm.frames().as_ref(),
            stats: &self.stats,
            flush: Vec::new(),
            tlb: self.tlb.as_ref(),
            fatal: &self.fatal,
            reserved: self.cfg.reserved,
            quarantine: Vec::new(),
            kicked: false,
        }
    }
}

/// The shadow MMU of one VM, registered as an MMU notifier on its host mm.
pub struct ShadowMmu {
    inner: Arc<Inner>,
    registration: Mutex<Option<MmuNotifier>>,
}

impl ShadowMmu {
    /// Builds the MMU for guest memory `slots` of `mm` and registers it on
    /// the mm (`kvm_init_mmu_notifier`). Shadow pages come from the mm's
    /// frame allocator, owned as `FrameOwner::External`.
    pub fn new(
        mm: Arc<Mm>,
        slots: Memslots,
        tlb: Arc<dyn TlbFlush>,
        cfg: ShadowMmuConfig,
    ) -> Result<Self, MmuError> {
        let nr = cfg.nr_vcpus.max(1);
        let state = MmuState {
            vcpu_roots: vec![None; nr],
            ..Default::default()
        };
        let inner = Arc::new(Inner {
            mm: mm.clone(),
            slots,
            tlb,
            cfg: ShadowMmuConfig {
                nr_vcpus: nr,
                max_roots: cfg.max_roots.max(1),
                pte_prefetch: match cfg.pte_prefetch {
                    0 | 1 => 0,
                    n => n.next_power_of_two().min(pte::PT_ENTRIES),
                },
                ..cfg
            },
            state: Mutex::new(state),
            paging: Mutex::new(vec![PagingState::new(0, cfg.maxphyaddr); nr]),
            inv: Invalidations::default(),
            stats: MmuStats::default(),
            fatal: Fatal::default(),
            #[cfg(feature = "test-hooks")]
            race_hook: Mutex::new(None),
        });
        let reg = mm
            .mmu_notifier_register(inner.clone())
            .map_err(MmuError::Register)?;
        Ok(Self {
            inner,
            registration: Mutex::new(Some(reg)),
        })
    }

    pub fn mm(&self) -> &Arc<Mm> {
        &self.inner.mm
    }

    pub fn memslots(&self) -> &Memslots {
        &self.inner.slots
    }

    pub fn stats(&self) -> MmuStatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// `remote_tlb_flush` alone: what the VMM's per-fault checks read, without
    /// copying every counter.
    pub fn remote_tlb_flushes(&self) -> u64 {
        self.inner.stats.remote_tlb_flush.load(Ordering::Relaxed)
    }

    /// Leaf sptes zapped, shadow pages zapped and tables changed so far:
    /// moves whenever a vCPU may have lost a path to a page.
    pub fn zap_generation(&self) -> u64 {
        let s = &self.inner.stats;
        [&s.spte_zapped, &s.mmu_shadow_zapped, &s.mmu_table_changed]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// `mmu_invalidate_seq` now.
    pub fn invalidate_seq(&self) -> u64 {
        self.inner.inv.read_seq()
    }

    /// Sets who is told of the first error the MMU cannot return (see
    /// [`FatalHandler`]).
    pub fn set_fatal_handler(&self, handler: FatalHandler) {
        *self.inner.fatal.handler.lock() = Some(handler);
    }

    /// The first such error, if one happened.
    pub fn fatal_error(&self) -> Option<MmuError> {
        self.inner.fatal.error.lock().clone()
    }

    /// Number of shadow pages.
    pub fn nr_shadow_pages(&self) -> usize {
        self.inner.state.lock().pages.len()
    }

    /// Number of present leaf sptes (4 KiB and 2 MiB).
    pub fn nr_sptes(&self) -> usize {
        let st = self.inner.state.lock();
        st.rmap.values().map(Vec::len).sum::<usize>()
            + st.rmap_large.values().map(Vec::len).sum::<usize>()
    }

    /// Number of present 2 MiB sptes (KVM's `pages_2m`).
    pub fn nr_large_sptes(&self) -> usize {
        self.inner
            .state
            .lock()
            .rmap_large
            .values()
            .map(Vec::len)
            .sum()
    }

    /// The configuration in force (`pte_prefetch` rounded as applied).
    pub fn config(&self) -> ShadowMmuConfig {
        self.inner.cfg
    }

    /// Number of cached roots.
    pub fn nr_roots(&self) -> usize {
        self.inner.state.lock().roots.len()
    }

    /// Installs (or removes) the race-window hook, for tests.
    #[cfg(feature = "test-hooks")]
    pub fn set_race_hook(&self, hook: Option<RaceHook>) {
        *self.inner.race_hook.lock() = hook;
    }

    fn check_vcpu(&self, vcpu: usize) -> Result<(), MmuError> {
        if vcpu < self.inner.cfg.nr_vcpus {
            Ok(())
        } else {
            Err(MmuError::NoSuchVcpu(vcpu))
        }
    }

    /// The guest paging state of a vCPU.
    pub fn paging(&self, vcpu: usize) -> Result<PagingState, MmuError> {
        self.check_vcpu(vcpu)?;
        Ok(self.inner.paging.lock()[vcpu])
    }

    /// Sets CR0.WP / CR4 / EFER of a vCPU (`kvm_mmu_reset_context`). The
    /// shadow pages of the old mode stay (other vCPUs may be in it): pages
    /// are keyed by a role that includes the mode. The vCPU leaves its root
    /// (`kvm_mmu_unload`); the next [`ShadowMmu::load_cr3`] finds or builds
    /// the root of its CR3 in the new mode.
    pub fn set_paging_mode(&self, vcpu: usize, mut mode: PagingState) -> Result<(), MmuError> {
        self.check_vcpu(vcpu)?;
        {
            let mut p = self.inner.paging.lock();
            mode.cr3 = p[vcpu].cr3;
            if p[vcpu] == mode {
                return Ok(());
            }
            p[vcpu] = mode;
        }
        self.inner.state.lock().vcpu_roots[vcpu] = None;
        Ok(())
    }

    /// Load CR3 (a hypercall in shadow mode): switches the vCPU to the
    /// cached root for `cr3`, creating it if needed (recycling the least
    /// recently used root when the cache is full), and drops unsync pages,
    /// as the TLB flush of a CR3 load requires. Returns the frame of the
    /// shadow root, which becomes the vCPU's real CR3.
    pub fn load_cr3(&self, vcpu: usize, cr3: u64) -> Result<Pfn, MmuError> {
        self.check_vcpu(vcpu)?;
        let maxphy = self.inner.cfg.maxphyaddr;
        let addr = cr3 & PT_BASE_ADDR_MASK;
        if maxphy < 52 && addr >> maxphy != 0 {
            return Err(MmuError::InvalidCr3(cr3));
        }
        let gfn = addr >> pte::PAGE_SHIFT;
        self.inner.fatal.check()?;
        let mode = self.inner.paging.lock()[vcpu];
        let role = Role::new(PT64_ROOT_4LEVEL, PteAccess::all().bits(), false, &mode);
        let mut st = self.inner.state.lock();
        if st.released {
            return Err(MmuError::Released);
        }
        let mut ctx = self.inner.ctx(&mut st);
        ctx.st.tick += 1;
        let tick = ctx.st.tick;
        let cached = ctx
            .st
            .roots
            .iter_mut()
            .find(|r| r.cr3_gfn == gfn && r.role == role);
        let root = match cached {
            Some(r) => {
                r.last_used = tick;
                r.sp
            }
            None => {
                // The vCPU leaves its old root: it may be recycled now.
                ctx.st.vcpu_roots[vcpu] = None;
                while ctx.st.roots.len() >= self.inner.cfg.max_roots {
                    if !ctx.recycle_root()? {
                        break;
                    }
                }
                let sp = ctx.get_page(gfn, role, true)?;
                if let Some(p) = ctx.st.pages.get_mut(&sp) {
                    p.root_count += 1;
                }
                ctx.st.roots.push(RootEntry {
                    cr3_gfn: gfn,
                    role,
                    sp,
                    last_used: tick,
                });
                sp
            }
        };
        ctx.st.vcpu_roots[vcpu] = Some(root);
        ctx.resync_root(root)?;
        ctx.sync_unsync()?;
        ctx.flush_now(self.inner.tlb.as_ref())?;
        drop(ctx);
        drop(st);
        self.inner.paging.lock()[vcpu].cr3 = cr3;
        Ok(root)
    }

    /// The shadow root a vCPU runs on.
    pub fn root(&self, vcpu: usize) -> Result<Pfn, MmuError> {
        self.check_vcpu(vcpu)?;
        self.inner.state.lock().vcpu_roots[vcpu].ok_or(MmuError::NoRoot(vcpu))
    }

    /// invlpg (a hypercall in shadow mode): drops the leaf spte of `gva` (a
    /// 2 MiB one too) and, where the path goes through an unsync page, the
    /// stale entry there (`FNAME(invlpg)`).
    pub fn invlpg(&self, vcpu: usize, gva: u64) -> Result<(), MmuError> {
        self.check_vcpu(vcpu)?;
        inc(&self.inner.stats.invlpg);
        let mut st = self.inner.state.lock();
        let Some(mut sp) = st.vcpu_roots[vcpu] else {
            return Ok(());
        };
        let mut ctx = self.inner.ctx(&mut st);
        for level in (1..=PT64_ROOT_4LEVEL).rev() {
            let idx = pt_index(gva, level);
            let Some(page) = ctx.st.pages.get(&sp) else {
                break;
            };
            if level == 1 || page.unsync {
                ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
                break;
            }
            let e = ctx.word(sp, idx)?.load(Ordering::Acquire);
            if !spte::is_present(e) {
                break;
            }
            if spte::is_large(e) {
                // A 2 MiB leaf (`is_last_spte` above level 1).
                ctx.zap_entry(sp, idx, FlushReason::Zapped)?;
                break;
            }
            sp = spte::pfn(e);
        }
        ctx.flush_now(self.inner.tlb.as_ref())?;
        Ok(())
    }

    /// Flush the guest TLB (a hypercall in shadow mode): drops every unsync
    /// page and resyncs the vCPU's root (`kvm_vcpu_flush_tlb_guest` →
    /// `kvm_mmu_sync_roots`). Synced pages are coherent by write protection.
    pub fn flush_tlb(&self, vcpu: usize) -> Result<(), MmuError> {
        self.check_vcpu(vcpu)?;
        inc(&self.inner.stats.tlb_flush);
        let mut st = self.inner.state.lock();
        let root = st.vcpu_roots[vcpu];
        let mut ctx = self.inner.ctx(&mut st);
        if let Some(r) = root {
            ctx.resync_root(r)?;
        }
        ctx.sync_unsync()?;
        ctx.flush_now(self.inner.tlb.as_ref())?;
        Ok(())
    }

    /// Guest RAM `gfns` was written other than by a vCPU through its sptes
    /// (a device's DMA): drops the shadow pages derived from every guest
    /// table there, as a vCPU's write to a write-protected table would
    /// (`kvm_mmu_track_write`, `kvm_mmu_unprotect_page`). Synced pages are
    /// coherent only by write protection, which a device write bypasses;
    /// without this a flush would keep translations from the old entries.
    pub fn track_write(&self, gfns: std::ops::Range<u64>) -> Result<(), MmuError> {
        let mut st = self.inner.state.lock();
        let mut ctx = self.inner.ctx(&mut st);
        for gfn in gfns {
            if ctx.is_protected(gfn) {
                inc(&self.inner.stats.mmu_unsync);
                ctx.unprotect_gfn(gfn, FlushReason::Zapped)?;
            }
        }
        ctx.flush_now(self.inner.tlb.as_ref())
    }

    /// The leaf spte mapping `gva` under the vCPU's root (a software walk of
    /// the shadow tables), for tests and tracing. A 2 MiB spte is returned
    /// as it is (`PS` set, the frame of the range's start).
    pub fn lookup_spte(&self, vcpu: usize, gva: u64) -> Result<Option<u64>, MmuError> {
        Ok(self.leaf_at(vcpu, gva)?.map(|l| l.0))
    }

    /// The leaf spte mapping `gva` and its level (1, or 2 for 2 MiB).
    pub fn leaf_at(&self, vcpu: usize, gva: u64) -> Result<Option<(u64, u8)>, MmuError> {
        self.check_vcpu(vcpu)?;
        let st = self.inner.state.lock();
        let Some(mut sp) = st.vcpu_roots[vcpu] else {
            return Ok(None);
        };
        let mem = self.inner.mm.memory();
        for level in (1..=PT64_ROOT_4LEVEL).rev() {
            let e = mem
                .frame_word(sp, pt_index(gva, level))
                .map_err(MmuError::Memory)?
                .load(Ordering::Acquire);
            if !spte::is_present(e) {
                return Ok(None);
            }
            if level == 1 || spte::is_large(e) {
                return Ok(Some((e, level)));
            }
            sp = spte::pfn(e);
        }
        Ok(None)
    }

    /// Unregisters from the mm (running `release` if exit has not).
    pub fn unregister(&self) {
        if let Some(reg) = self.registration.lock().take() {
            reg.unregister();
            // Let the retired notifier-list snapshot (which holds our state
            // and, through it, the mm) go now, on this thread, rather than
            // from the SRCU worker later.
            self.inner.mm.notifiers().synchronize();
        }
    }
}

impl Drop for ShadowMmu {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Shadow-PTE helpers re-exported for tests and the VMM.
pub mod spte_bits {
    pub use super::spte::{is_accessed, is_large, is_present, is_writable, pfn};
}
