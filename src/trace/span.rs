//! Slices: what takes time, as `tracing` spans with target [`TARGET`] at
//! DEBUG. Each has a `label` (its name in a trace viewer, docs/trace-events.md
//! "Slices") and its arguments. A host operation, a notifier callback or a
//! shootdown is a slice made from its own event (`slice!`,
//! [`Event::slice`]); the vCPU's work has the constructors below.
//!
//! Without a subscriber that listens at DEBUG, creating one costs one
//! relaxed load and builds nothing: the field values (the `label`'s
//! formatting included) are only evaluated for an enabled span.

use std::fmt;

use tracing::Span;

use super::event::{Event, HostOp};
use super::{Kind, TARGET};

/// An address, frame number or error code, shown in hex in a viewer.
#[derive(Clone, Copy)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Labels of the slices the vCPU threads record.
pub const KVM_RUN: &str = "KVM_RUN";
/// The label prefix of a vCPU exit (`exit io`, `exit hlt`, ...).
pub const EXIT: &str = "exit";
/// The label prefix of a hypercall (`hypercall resolve_pf`, ...).
pub const HYPERCALL: &str = "hypercall";
/// A guest page fault the VMM resolves (RESOLVE_PF), with its outcome.
pub const RESOLVE_PF: &str = "resolve_pf";

/// One `KVM_RUN` of vCPU `vcpu`: the time the guest ran.
#[inline]
pub fn kvm_run(vcpu: u32) -> Span {
    tracing::debug_span!(target: TARGET, "KVM_RUN", label = %KVM_RUN, vcpu)
}

/// The VMM handling an exit of vCPU `vcpu` for `reason` (the `--stats`
/// name: `io`, `hlt`, `intr`, ...).
#[inline]
pub fn vcpu_exit(vcpu: u32, reason: &'static str) -> Span {
    tracing::debug_span!(target: TARGET, "exit", label = %format_args!("{EXIT} {reason}"), vcpu, reason = %reason)
}

/// Hypercall `nr` (called `name`).
#[inline]
pub fn hypercall(nr: u64, name: &'static str) -> Span {
    tracing::debug_span!(target: TARGET, "hypercall", label = %format_args!("{HYPERCALL} {name}"), nr, call = %name)
}

/// RESOLVE_PF for `gva`; record its `outcome` once known
/// ([`record_outcome`]).
#[inline]
pub fn resolve_pf(gva: u64, error_code: u64) -> Span {
    tracing::debug_span!(
        target: TARGET,
        "resolve_pf",
        label = %RESOLVE_PF,
        gva = %Hex(gva),
        error_code = %Hex(error_code),
        outcome = tracing::field::Empty
    )
}

/// Records a [`resolve_pf`] slice's outcome.
#[inline]
pub fn record_outcome(span: &Span, outcome: super::PfOutcome) {
    span.record("outcome", tracing::field::display(outcome.name()));
}

/// Kinds whose events open a slice (`slice!`): host operations, notifier
/// callbacks and shootdowns.
pub fn is_slice(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::HostOp
            | Kind::Release
            | Kind::ClearFlushYoung
            | Kind::ClearYoung
            | Kind::TestYoung
            | Kind::ChangePte
            | Kind::InvalidateRangeStart
            | Kind::InvalidateRangeEnd
            | Kind::Shootdown
    )
}

impl Event<'_> {
    /// Enters a slice named after the event, then emits the event inside
    /// it; the slice lasts until the guard drops. Used through `slice!`.
    #[inline(never)]
    pub fn slice(self) -> tracing::span::EnteredSpan {
        let span = self.span().entered();
        self.emit();
        span
    }

    /// The span of a slice kind ([`is_slice`]), with the event's fields.
    fn span(&self) -> Span {
        let label = self.kind().name();
        match *self {
            Event::HostOp(op) => op.span(),
            Event::Release => tracing::debug_span!(target: TARGET, "release", label = %label),
            Event::ClearFlushYoung { start, end } => {
                tracing::debug_span!(target: TARGET, "clear_flush_young", label = %label, start = %Hex(start), end = %Hex(end))
            }
            Event::ClearYoung { start, end } => {
                tracing::debug_span!(target: TARGET, "clear_young", label = %label, start = %Hex(start), end = %Hex(end))
            }
            Event::TestYoung { address } => {
                tracing::debug_span!(target: TARGET, "test_young", label = %label, address = %Hex(address))
            }
            Event::ChangePte {
                address,
                frame,
                writable,
            } => {
                tracing::debug_span!(target: TARGET, "change_pte", label = %label, address = %Hex(address), frame = %Hex(frame), writable)
            }
            Event::InvalidateRangeStart {
                start,
                end,
                event,
                blockable,
            } => {
                tracing::debug_span!(target: TARGET, "invalidate_range_start", label = %label, start = %Hex(start), end = %Hex(end), event = ?event, blockable)
            }
            Event::InvalidateRangeEnd { start, end, event } => {
                tracing::debug_span!(target: TARGET, "invalidate_range_end", label = %label, start = %Hex(start), end = %Hex(end), event = ?event)
            }
            Event::Shootdown {
                frames,
                runs,
                method,
            } => {
                tracing::debug_span!(target: TARGET, "shootdown", label = %label, frames, runs, method = %method.name())
            }
            _ => tracing::debug_span!(target: TARGET, "event", label = %label),
        }
    }
}

impl HostOp<'_> {
    /// A host operation's slice, labelled with its `op` (the mm's
    /// `clear_flush_young` is labelled `ptep_clear_flush_young`, its Linux
    /// name, apart from the notifier callback it calls).
    fn span(&self) -> Span {
        let label = match self {
            HostOp::ClearFlushYoung { .. } => "ptep_clear_flush_young",
            _ => self.name(),
        };
        match *self {
            HostOp::MadviseDontneed { start, len }
            | HostOp::MadviseMergeable { start, len }
            | HostOp::MadviseHugepage { start, len }
            | HostOp::MadvisePopulateWrite { start, len }
            | HostOp::Munmap { start, len } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label, start = %Hex(start), len = %Hex(len))
            }
            HostOp::Mprotect { start, len, prot } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label, start = %Hex(start), len = %Hex(len), prot = ?prot)
            }
            HostOp::KsmScan { pages_to_scan } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label, pages_to_scan)
            }
            HostOp::AgeRange { start, end, flush } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label, start = %Hex(start), end = %Hex(end), flush)
            }
            HostOp::Reclaim { nr_to_scan } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label, nr_to_scan)
            }
            HostOp::ClearFlushYoung { start } => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %self.name(), start = %Hex(start))
            }
            HostOp::ExitMmap => {
                tracing::debug_span!(target: TARGET, "host_op", label = %label, op = %label)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_labels_are_documented() {
        let doc = include_str!("../../docs/trace-events.md");
        let labels = [
            KVM_RUN,
            EXIT,
            HYPERCALL,
            RESOLVE_PF,
            "ptep_clear_flush_young",
        ];
        let kinds = Kind::ALL.into_iter().filter(|k| is_slice(*k));
        for label in labels.into_iter().chain(kinds.map(Kind::name)) {
            assert!(
                doc.contains(&format!("`{label}")),
                "docs/trace-events.md does not name the slice `{label}`"
            );
        }
    }
}
