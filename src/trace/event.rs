//! The events themselves and how each becomes a `tracing` event.

use std::fmt;

use super::{Kind, TARGET};

/// A host memory operation (`kind` `host_op`; `op` names it).
#[derive(Clone, Copy, Debug)]
pub enum HostOp<'a> {
    /// `madvise(MADV_DONTNEED)`.
    MadviseDontneed {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// `madvise(MADV_MERGEABLE)`.
    MadviseMergeable {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// `munmap`.
    Munmap {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// `mprotect`.
    Mprotect {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
        /// The new protection.
        prot: &'a dyn fmt::Debug,
    },
    /// One wake-up of ksmd.
    KsmScan {
        /// Pages it may scan.
        pages_to_scan: u64,
    },
    /// One aging pass.
    AgeRange {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Whether secondary TLBs are flushed.
        flush: bool,
    },
    /// kswapd's reclaim.
    Reclaim {
        /// Pages it may scan.
        nr_to_scan: u64,
    },
    /// `ptep_clear_flush_young_notify` on one page.
    ClearFlushYoung {
        /// The page's host address.
        start: u64,
    },
    /// The mm's teardown.
    ExitMmap,
    /// `madvise(MADV_HUGEPAGE)`.
    MadviseHugepage {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
    },
    /// `madvise(MADV_POPULATE_WRITE)`.
    MadvisePopulateWrite {
        /// First host address.
        start: u64,
        /// Bytes.
        len: u64,
    },
}

impl HostOp<'_> {
    /// Every `op` value.
    pub const NAMES: [&'static str; 11] = [
        "madvise_dontneed",
        "madvise_mergeable",
        "munmap",
        "mprotect",
        "ksm_scan",
        "age_range",
        "reclaim",
        "clear_flush_young",
        "exit_mmap",
        "madvise_hugepage",
        "madvise_populate_write",
    ];

    /// The `op` field's value.
    pub fn name(&self) -> &'static str {
        match self {
            HostOp::MadviseDontneed { .. } => "madvise_dontneed",
            HostOp::MadviseMergeable { .. } => "madvise_mergeable",
            HostOp::Munmap { .. } => "munmap",
            HostOp::Mprotect { .. } => "mprotect",
            HostOp::KsmScan { .. } => "ksm_scan",
            HostOp::AgeRange { .. } => "age_range",
            HostOp::Reclaim { .. } => "reclaim",
            HostOp::ClearFlushYoung { .. } => "clear_flush_young",
            HostOp::ExitMmap => "exit_mmap",
            HostOp::MadviseHugepage { .. } => "madvise_hugepage",
            HostOp::MadvisePopulateWrite { .. } => "madvise_populate_write",
        }
    }
}

/// How a shootdown reached the host (`method` of `shootdown`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShootdownMethod {
    /// `mprotect` toggles, contents kept.
    ProtectToggle,
    /// `MADV_DONTNEED` of frames being freed.
    Discard,
    /// The memslot deleted and re-added, every vCPU kicked out.
    MemslotBounce,
    /// The host flush is turned off (tests): nothing was invalidated.
    Disabled,
}

impl ShootdownMethod {
    /// The `method` field's value.
    pub fn name(self) -> &'static str {
        match self {
            ShootdownMethod::ProtectToggle => "protect_toggle",
            ShootdownMethod::Discard => "discard",
            ShootdownMethod::MemslotBounce => "memslot_bounce",
            ShootdownMethod::Disabled => "disabled",
        }
    }
}

/// The VMM's answer to RESOLVE_PF (`outcome` of `resolve_pf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfOutcome {
    /// The VMM fixed its tables: the guest retries.
    Retry,
    /// The guest's own fault, handed back.
    GuestFault,
}

impl PfOutcome {
    /// The `outcome` field's value.
    pub fn name(self) -> &'static str {
        match self {
            PfOutcome::Retry => "retry",
            PfOutcome::GuestFault => "guest_fault",
        }
    }
}

/// One trace event. Field names are the JSON keys (docs/trace-events.md);
/// fields of the lower layers' own types (`event`, `reason`, `prot`) are
/// borrowed and written with their `Debug` form.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A host memory operation started.
    HostOp(HostOp<'a>),
    /// Reclaim wrote a page to swap and freed its frame.
    SwapOut {
        /// The page's host address.
        hva: u64,
        /// The frame freed.
        frame: u64,
    },
    /// A fault reads a page back from swap (`do_swap_page`).
    SwapIn {
        /// The page's host address.
        hva: u64,
        /// A write fault.
        write: bool,
    },
    /// A write fault copied a shared page (KSM sharing broken).
    Cow {
        /// The page's host address.
        hva: u64,
        /// The shared frame.
        old_frame: u64,
        /// The private copy.
        new_frame: u64,
    },
    /// A fault allocated a large folio (2^order pages).
    FolioAlloc {
        /// The first page's host address.
        hva: u64,
        /// The head frame.
        frame: u64,
        /// log2 of the pages.
        order: u8,
    },
    /// A huge PMD was split into 512 PTEs (`__split_huge_pmd`).
    SplitPmd {
        /// The 2 MiB range's host address.
        hva: u64,
        /// The head frame.
        frame: u64,
    },
    /// A large folio was split into small pages (`split_folio`).
    SplitFolio {
        /// The folio's first host address.
        hva: u64,
        /// The head frame.
        frame: u64,
        /// log2 of its pages.
        order: u8,
    },
    /// The notifier's `release`.
    Release,
    /// The notifier's `clear_flush_young`.
    ClearFlushYoung {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// The notifier's `clear_young`.
    ClearYoung {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// The notifier's `test_young`.
    TestYoung {
        /// The page's host address.
        address: u64,
    },
    /// The notifier's `change_pte`.
    ChangePte {
        /// The page's host address.
        address: u64,
        /// The frame the host PTE now maps.
        frame: u64,
        /// Whether it is writable.
        writable: bool,
    },
    /// The notifier's `invalidate_range_start`.
    InvalidateRangeStart {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Why (`MmuNotifyEvent`).
        event: &'a dyn fmt::Debug,
        /// Whether callbacks may sleep.
        blockable: bool,
    },
    /// The notifier's `invalidate_range_end`.
    InvalidateRangeEnd {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Why (`MmuNotifyEvent`).
        event: &'a dyn fmt::Debug,
    },
    /// A leaf spte cleared.
    SpteZapped {
        /// The shadow page (its frame).
        sp: u64,
        /// The entry.
        idx: u64,
        /// The frame it mapped (the first, for a 2 MiB spte).
        frame: u64,
        /// A 2 MiB spte (512 frames).
        large: bool,
        /// Why (`FlushReason`).
        reason: &'a dyn fmt::Debug,
    },
    /// An spte installed for a neighbour of a faulting gva
    /// (`FNAME(pte_prefetch)`).
    SptePrefetched {
        /// The shadow page (its frame).
        sp: u64,
        /// The entry.
        idx: u64,
        /// The guest frame it maps.
        gfn: u64,
        /// The host frame.
        frame: u64,
    },
    /// A shadow page freed.
    ShadowPageZapped {
        /// The shadow page (its frame).
        sp: u64,
        /// Its level (1: page table).
        level: u8,
    },
    /// An spte's Accessed bit cleared.
    AccessedCleared {
        /// The shadow page (its frame).
        sp: u64,
        /// The entry.
        idx: u64,
        /// The frame it maps.
        frame: u64,
    },
    /// An spte pointed at a new frame, read-only.
    SpteRepointed {
        /// The shadow page (its frame).
        sp: u64,
        /// The entry.
        idx: u64,
        /// The frame it mapped.
        old_frame: u64,
        /// The frame it maps now.
        new_frame: u64,
    },
    /// Stale host translations invalidated.
    Shootdown {
        /// Frames named.
        frames: usize,
        /// Runs of contiguous frames.
        runs: usize,
        /// How.
        method: ShootdownMethod,
    },
    /// A DMA device attached to a buffer (`mmu_interval_notifier_insert`).
    DmaAttach {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// A device fault mapped a page in the device's IOTLB.
    DmaFault {
        /// The offset in the buffer.
        iova: u64,
        /// The page's host address.
        hva: u64,
        /// The frame mapped.
        frame: u64,
        /// Mapped writable.
        writable: bool,
    },
    /// The device's interval notifier dropped IOTLB entries.
    DmaInvalidate {
        /// First host address.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Why (`MmuNotifyEvent`).
        event: &'a dyn fmt::Debug,
        /// The interval's new sequence.
        cur_seq: u64,
        /// Entries dropped.
        dropped: u64,
    },
    /// The VMM answered RESOLVE_PF.
    ResolvePf {
        /// The faulting address.
        gva: u64,
        /// The error code the guest gets back (or passed in).
        error_code: u64,
        /// The answer.
        outcome: PfOutcome,
    },
    /// What the guest did, as a demo saw it.
    GuestSaw(fmt::Arguments<'a>),
    /// A demo's remark.
    Note(fmt::Arguments<'a>),
}

impl Event<'_> {
    /// The `kind` field.
    pub fn kind(&self) -> Kind {
        match self {
            Event::HostOp(_) => Kind::HostOp,
            Event::SwapOut { .. } => Kind::SwapOut,
            Event::SwapIn { .. } => Kind::SwapIn,
            Event::Cow { .. } => Kind::Cow,
            Event::FolioAlloc { .. } => Kind::FolioAlloc,
            Event::SplitPmd { .. } => Kind::SplitPmd,
            Event::SplitFolio { .. } => Kind::SplitFolio,
            Event::DmaAttach { .. } => Kind::DmaAttach,
            Event::DmaFault { .. } => Kind::DmaFault,
            Event::DmaInvalidate { .. } => Kind::DmaInvalidate,
            Event::Release => Kind::Release,
            Event::ClearFlushYoung { .. } => Kind::ClearFlushYoung,
            Event::ClearYoung { .. } => Kind::ClearYoung,
            Event::TestYoung { .. } => Kind::TestYoung,
            Event::ChangePte { .. } => Kind::ChangePte,
            Event::InvalidateRangeStart { .. } => Kind::InvalidateRangeStart,
            Event::InvalidateRangeEnd { .. } => Kind::InvalidateRangeEnd,
            Event::SpteZapped { .. } => Kind::SpteZapped,
            Event::ShadowPageZapped { .. } => Kind::ShadowPageZapped,
            Event::SptePrefetched { .. } => Kind::SptePrefetched,
            Event::AccessedCleared { .. } => Kind::AccessedCleared,
            Event::SpteRepointed { .. } => Kind::SpteRepointed,
            Event::Shootdown { .. } => Kind::Shootdown,
            Event::ResolvePf { .. } => Kind::ResolvePf,
            Event::GuestSaw(_) => Kind::GuestSaw,
            Event::Note(_) => Kind::Note,
        }
    }

    /// The `tracing` level: DEBUG, INFO for a demo's own lines.
    pub fn level(&self) -> tracing::Level {
        match self {
            Event::GuestSaw(_) | Event::Note(_) => tracing::Level::INFO,
            _ => tracing::Level::DEBUG,
        }
    }

    /// Emits the event: a `tracing` event with target [`TARGET`] at
    /// [`Event::level`]. Inlined into the hot paths that emit (the fault
    /// path, notifier dispatch): when nobody listens at that level, the
    /// cost is one relaxed load and no event is built.
    #[inline(always)]
    pub fn emit(self) {
        if tracing::level_enabled!(self.level()) {
            self.record();
        }
    }

    /// The `tracing` event itself.
    #[inline(never)]
    fn record(self) {
        let kind = self.kind().name();
        let layer = self.kind().layer().name();
        match self {
            Event::HostOp(op) => op.emit(kind, layer),
            Event::SwapOut { hva, frame } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, frame, "host: page written to swap and freed");
            }
            Event::SwapIn { hva, write } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, write, "host: swap-in (do_swap_page)");
            }
            Event::Cow {
                hva,
                old_frame,
                new_frame,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, old_frame, new_frame, "host: copy-on-write broke the sharing");
            }
            Event::FolioAlloc { hva, frame, order } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, frame, order, "host: large folio allocated");
            }
            Event::SplitPmd { hva, frame } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, frame, "host: huge PMD split");
            }
            Event::SplitFolio { hva, frame, order } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, hva, frame, order, "host: large folio split");
            }
            Event::DmaAttach { start, end } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, "dma: device attached (mmu_interval_notifier_insert)");
            }
            Event::DmaFault {
                iova,
                hva,
                frame,
                writable,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, iova, hva, frame, writable, "dma: device fault mapped a page");
            }
            Event::DmaInvalidate {
                start,
                end,
                event,
                cur_seq,
                dropped,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, event = ?event, cur_seq, dropped, "dma: IOTLB entries invalidated");
            }
            Event::Release => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, "release: the mm is going away");
            }
            Event::ClearFlushYoung { start, end } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, "clear_flush_young");
            }
            Event::ClearYoung { start, end } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, "clear_young");
            }
            Event::TestYoung { address } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, address, "test_young");
            }
            Event::ChangePte {
                address,
                frame,
                writable,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, address, frame, writable, "change_pte");
            }
            Event::InvalidateRangeStart {
                start,
                end,
                event,
                blockable,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, event = ?event, blockable, "invalidate_range_start");
            }
            Event::InvalidateRangeEnd { start, end, event } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, start, end, event = ?event, "invalidate_range_end");
            }
            Event::SpteZapped {
                sp,
                idx,
                frame,
                large,
                reason,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, sp, idx, frame, large, reason = ?reason, "spte zapped");
            }
            Event::SptePrefetched {
                sp,
                idx,
                gfn,
                frame,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, sp, idx, gfn, frame, "spte prefetched");
            }
            Event::ShadowPageZapped { sp, level } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, sp, level, "shadow page zapped");
            }
            Event::AccessedCleared { sp, idx, frame } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, sp, idx, frame, "spte Accessed bit cleared");
            }
            Event::SpteRepointed {
                sp,
                idx,
                old_frame,
                new_frame,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, sp, idx, old_frame, new_frame, "spte repointed read-only");
            }
            Event::Shootdown {
                frames,
                runs,
                method: ShootdownMethod::Disabled,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, frames, runs, method = %ShootdownMethod::Disabled.name(), "host flush disabled: nothing invalidated");
            }
            Event::Shootdown {
                frames,
                runs,
                method,
            } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, frames, runs, method = %method.name(), "stale host translations invalidated");
            }
            Event::ResolvePf {
                gva,
                error_code,
                outcome,
            } => match outcome {
                PfOutcome::Retry => {
                    tracing::debug!(target: TARGET, layer = %layer, kind = %kind, gva, error_code, outcome = %outcome.name(), "guest page fault fixed by the VMM");
                }
                PfOutcome::GuestFault => {
                    tracing::debug!(target: TARGET, layer = %layer, kind = %kind, gva, error_code, outcome = %outcome.name(), "guest page fault reflected to the guest");
                }
            },
            Event::GuestSaw(text) | Event::Note(text) => {
                tracing::info!(target: TARGET, layer = %layer, kind = %kind, "{}", text);
            }
        }
    }
}

impl HostOp<'_> {
    fn emit(self, kind: &str, layer: &str) {
        let op = self.name();
        match self {
            HostOp::MadviseDontneed { start, len } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, "host: madvise(MADV_DONTNEED)");
            }
            HostOp::MadviseMergeable { start, len } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, "host: madvise(MADV_MERGEABLE)");
            }
            HostOp::Munmap { start, len } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, "host: munmap");
            }
            HostOp::Mprotect { start, len, prot } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, prot = ?prot, "host: mprotect");
            }
            HostOp::KsmScan { pages_to_scan } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, pages_to_scan, "host: ksmd scan");
            }
            HostOp::AgeRange { start, end, flush } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, end, flush, "host: aging pass");
            }
            HostOp::Reclaim { nr_to_scan } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, nr_to_scan, "host: reclaim (kswapd)");
            }
            HostOp::ClearFlushYoung { start } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, "host: ptep_clear_flush_young");
            }
            HostOp::ExitMmap => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, "host: exit_mmap");
            }
            HostOp::MadviseHugepage { start, len } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, "host: madvise(MADV_HUGEPAGE)");
            }
            HostOp::MadvisePopulateWrite { start, len } => {
                tracing::debug!(target: TARGET, layer = %layer, kind = %kind, op = %op, start, len, "host: madvise(MADV_POPULATE_WRITE)");
            }
        }
    }
}
