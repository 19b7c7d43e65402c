//! The trace-event schema: every event a layer reports about host memory
//! operations and what they do to the shadow tables (docs/trace-events.md).
//!
//! Events are [`Event`] values, emitted (with [`emit!`]) as `tracing` events with target
//! [`TARGET`] and the fields `layer`, `kind`, the event's own fields and a
//! `message`; without a subscriber that listens, an emission costs one
//! callsite-interest check. `shadowvm demo` narrates them or writes them as
//! JSON lines (`scenario::narrate`).
//!
//! What takes time is also a slice: a `tracing` span with the same target
//! ([`span`]). Host operations, notifier callbacks and shootdowns open one
//! from their own event with [`slice!`]; the vCPU loop and the hypercall
//! dispatch use the constructors in [`span`]. `--trace` writes both as a
//! Perfetto trace (`scenario::observe`).
//!
//! A leaf module: it names no other module of the crate, so every layer may
//! use it (tests/layering.rs).

mod event;
pub mod span;

pub use event::{Event, HostOp, PfOutcome, ShootdownMethod};

/// Emits `Event::$variant ...` ([`Event::emit`]):
/// `trace::emit!(SwapIn { hva, write })`. The event is only built when a
/// subscriber listens at INFO or more verbose, so a hot path that emits
/// pays one relaxed load when tracing is off.
macro_rules! emit {
    ($($event:tt)+) => {
        if ::tracing::level_enabled!(::tracing::Level::INFO) {
            $crate::trace::Event::$($event)+.emit();
        }
    };
}
pub(crate) use emit;

/// Like [`emit!`] for an event that starts something which takes time (a
/// host operation, a notifier callback, a shootdown): enters a slice named
/// after it ([`Event::slice`]) and emits the event inside it. Evaluates to
/// the slice's guard, `None` when nobody listens at DEBUG (one relaxed
/// load, nothing built): `let _slice = trace::slice!(Shootdown { .. });`
macro_rules! slice {
    ($($event:tt)+) => {
        if ::tracing::level_enabled!(::tracing::Level::DEBUG) {
            Some($crate::trace::Event::$($event)+.slice())
        } else {
            None
        }
    };
}
pub(crate) use slice;

/// Runs `$body` inside a slice made from `$event` (like [`slice!`]), for
/// the hot paths: the body is written out twice, once in the slice and
/// once bare, so when nobody listens at DEBUG it runs after one relaxed
/// load with no guard to drop on the way out (a `slice!` guard's drop, or
/// a shared closure, costs the notifier dispatch 0.3 to 1.7 ns).
/// `return` in the body returns from the enclosing function.
/// `trace::in_slice!(Event::ClearYoung { start, end }, { ... })`.
macro_rules! in_slice {
    ($event:expr, $body:block) => {
        if ::tracing::level_enabled!(::tracing::Level::DEBUG) {
            let _slice = $event.slice();
            $body
        } else {
            $body
        }
    };
}
pub(crate) use in_slice;

/// The `tracing` target of every event.
pub const TARGET: &str = "shadowvm::trace";

/// The layer an event comes from (its `layer` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The simulated host mm (`src/mm`).
    Mm,
    /// The MMU notifier (`src/notifier`).
    Notifier,
    /// The shadow MMU (`src/mmu`).
    Mmu,
    /// The simulated DMA device (`src/dma`).
    Dma,
    /// The host TLB shootdown (`src/vmm/host/tlb.rs`).
    Tlb,
    /// What the guest did or saw.
    Guest,
    /// A demo's own remarks.
    Demo,
}

impl Layer {
    /// Every layer, lowest first.
    pub const ALL: [Layer; 7] = [
        Layer::Mm,
        Layer::Notifier,
        Layer::Mmu,
        Layer::Dma,
        Layer::Tlb,
        Layer::Guest,
        Layer::Demo,
    ];

    /// The `layer` field's value.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Mm => "mm",
            Layer::Notifier => "notifier",
            Layer::Mmu => "mmu",
            Layer::Dma => "dma",
            Layer::Tlb => "tlb",
            Layer::Guest => "guest",
            Layer::Demo => "demo",
        }
    }

    /// The layer whose `layer` field is `name`.
    pub fn from_name(name: &str) -> Option<Layer> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// What an event reports (its `kind` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A host memory operation started (`op` says which).
    HostOp,
    /// Reclaim wrote a page to swap and freed its frame.
    SwapOut,
    /// A fault read a page back from swap.
    SwapIn,
    /// A write fault copied a shared page.
    Cow,
    /// A fault allocated a large folio.
    FolioAlloc,
    /// A huge PMD was split into PTEs.
    SplitPmd,
    /// A large folio was split into small pages.
    SplitFolio,
    /// The notifier's `release`: the mm is going away.
    Release,
    /// The notifier's `clear_flush_young`.
    ClearFlushYoung,
    /// The notifier's `clear_young`.
    ClearYoung,
    /// The notifier's `test_young`.
    TestYoung,
    /// The notifier's `change_pte`.
    ChangePte,
    /// The notifier's `invalidate_range_start`.
    InvalidateRangeStart,
    /// The notifier's `invalidate_range_end`.
    InvalidateRangeEnd,
    /// The shadow MMU cleared a leaf spte.
    SpteZapped,
    /// The shadow MMU freed a shadow page.
    ShadowPageZapped,
    /// The shadow MMU prefetched a neighbour's spte.
    SptePrefetched,
    /// The shadow MMU cleared an spte's Accessed bit.
    AccessedCleared,
    /// The shadow MMU pointed an spte at a new frame, read-only.
    SpteRepointed,
    /// The VMM invalidated stale translations in the host.
    Shootdown,
    /// A DMA device attached to a buffer.
    DmaAttach,
    /// A DMA device fault mapped a page.
    DmaFault,
    /// A DMA device's interval notifier dropped IOTLB entries.
    DmaInvalidate,
    /// The VMM answered a guest's RESOLVE_PF.
    ResolvePf,
    /// What the guest did, as a demo observed it.
    GuestSaw,
    /// A demo's remark.
    Note,
}

impl Kind {
    /// Every kind, in the order of docs/trace-events.md.
    pub const ALL: [Kind; 26] = [
        Kind::HostOp,
        Kind::SwapOut,
        Kind::SwapIn,
        Kind::Cow,
        Kind::FolioAlloc,
        Kind::SplitPmd,
        Kind::SplitFolio,
        Kind::Release,
        Kind::ClearFlushYoung,
        Kind::ClearYoung,
        Kind::TestYoung,
        Kind::ChangePte,
        Kind::InvalidateRangeStart,
        Kind::InvalidateRangeEnd,
        Kind::SpteZapped,
        Kind::ShadowPageZapped,
        Kind::SptePrefetched,
        Kind::AccessedCleared,
        Kind::SpteRepointed,
        Kind::Shootdown,
        Kind::DmaAttach,
        Kind::DmaFault,
        Kind::DmaInvalidate,
        Kind::ResolvePf,
        Kind::GuestSaw,
        Kind::Note,
    ];

    /// The `kind` field's value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::HostOp => "host_op",
            Kind::SwapOut => "swap_out",
            Kind::SwapIn => "swap_in",
            Kind::Cow => "cow",
            Kind::FolioAlloc => "folio_alloc",
            Kind::SplitPmd => "split_pmd",
            Kind::SplitFolio => "split_folio",
            Kind::Release => "release",
            Kind::ClearFlushYoung => "clear_flush_young",
            Kind::ClearYoung => "clear_young",
            Kind::TestYoung => "test_young",
            Kind::ChangePte => "change_pte",
            Kind::InvalidateRangeStart => "invalidate_range_start",
            Kind::InvalidateRangeEnd => "invalidate_range_end",
            Kind::SpteZapped => "spte_zapped",
            Kind::ShadowPageZapped => "shadow_page_zapped",
            Kind::SptePrefetched => "spte_prefetched",
            Kind::AccessedCleared => "accessed_cleared",
            Kind::SpteRepointed => "spte_repointed",
            Kind::Shootdown => "shootdown",
            Kind::DmaAttach => "dma_attach",
            Kind::DmaFault => "dma_fault",
            Kind::DmaInvalidate => "dma_invalidate",
            Kind::ResolvePf => "resolve_pf",
            Kind::GuestSaw => "guest_saw",
            Kind::Note => "note",
        }
    }

    /// The kind whose `kind` field is `name`.
    pub fn from_name(name: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The layer that emits it.
    pub fn layer(self) -> Layer {
        match self {
            Kind::HostOp
            | Kind::SwapOut
            | Kind::SwapIn
            | Kind::Cow
            | Kind::FolioAlloc
            | Kind::SplitPmd
            | Kind::SplitFolio => Layer::Mm,
            Kind::DmaAttach | Kind::DmaFault | Kind::DmaInvalidate => Layer::Dma,
            Kind::Release
            | Kind::ClearFlushYoung
            | Kind::ClearYoung
            | Kind::TestYoung
            | Kind::ChangePte
            | Kind::InvalidateRangeStart
            | Kind::InvalidateRangeEnd => Layer::Notifier,
            Kind::SpteZapped
            | Kind::ShadowPageZapped
            | Kind::SptePrefetched
            | Kind::AccessedCleared
            | Kind::SpteRepointed => Layer::Mmu,
            Kind::Shootdown => Layer::Tlb,
            Kind::ResolvePf | Kind::GuestSaw => Layer::Guest,
            Kind::Note => Layer::Demo,
        }
    }

    /// Kinds that come in bursts (one per spte, one per guest fault): a
    /// narrator may fold repeats into one "... and N more" line.
    pub fn repeats(self) -> bool {
        matches!(
            self,
            Kind::SpteZapped
                | Kind::ShadowPageZapped
                | Kind::SptePrefetched
                | Kind::AccessedCleared
                | Kind::ResolvePf
        )
    }
}

/// Fields that hold addresses, frame numbers, lengths or error codes: a
/// narrator shows them in hex.
pub const HEX_FIELDS: &[&str] = &[
    "start",
    "end",
    "address",
    "gva",
    "hva",
    "frame",
    "old_frame",
    "new_frame",
    "sp",
    "len",
    "error_code",
    "gfn",
    "iova",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_documented() {
        let doc = include_str!("../../docs/trace-events.md");
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
            assert!(
                doc.contains(&format!("`{}`", k.name())),
                "docs/trace-events.md does not describe `{}`",
                k.name()
            );
        }
        for l in Layer::ALL {
            assert_eq!(Layer::from_name(l.name()), Some(l));
        }
        for op in HostOp::NAMES {
            assert!(
                doc.contains(&format!("`{op}`")),
                "docs/trace-events.md does not describe host_op `{op}`"
            );
        }
        assert_eq!(Kind::from_name("nope"), None);
    }
}
