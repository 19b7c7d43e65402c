//! What a failed transfer means: the guest's business (an errno: the host
//! refused a page, or invalidations kept colliding) or the VMM's (a bug or
//! no machine memory left: the VM stops).

use crate::dma::DmaError;
use crate::mm::MmError;
use crate::vmm::abi::errno::{EAGAIN, EFAULT, EINVAL};
use crate::vmm::paging::PagingError;

/// A transfer's failure that stops the VM: never the guest's doing.
#[derive(Debug, thiserror::Error)]
pub enum GuestDmaError {
    /// The device failed in a way no guest value explains: it reached a
    /// frame the host mm does not own (a missed invalidation), machine
    /// memory ran out, or its thread is gone.
    #[error("DMA device: {0}")]
    Device(#[source] DmaError),
    /// Dropping the shadow of the guest tables a transfer wrote failed.
    #[error("after a DMA write: {0}")]
    PageTrack(#[source] PagingError),
}

/// How a guest sees a failed transfer.
#[derive(Debug)]
pub(super) enum Refusal {
    /// `EFAULT`: the host has no page the device may use there (unmapped,
    /// or read-only for a write): an ODP page fault the host cannot
    /// resolve, as `hmm_range_fault` returns `-EFAULT`.
    HostRefused,
    /// `EAGAIN`: invalidations kept colliding with the device's faults.
    Again,
    /// `EINVAL`: the device refused the range (the VMM checks it first).
    Invalid,
}

impl Refusal {
    pub(super) fn errno(&self) -> i64 {
        match self {
            Refusal::HostRefused => EFAULT,
            Refusal::Again => EAGAIN,
            Refusal::Invalid => EINVAL,
        }
    }
}

/// Sorts a device error: what the guest may be told, or what stops the VM.
/// As the shadow MMU's fault path: a host error is the guest's fault unless
/// machine memory ran out or the mm itself is broken.
pub(super) fn classify(e: DmaError) -> Result<Refusal, GuestDmaError> {
    use MmError as M;
    match e {
        DmaError::HostFault {
            source: M::NoVma(_) | M::Access { .. } | M::NoMemory | M::Locked(_),
            ..
        } => Ok(Refusal::HostRefused),
        // A non-blockable notifier refused, or the host's own fault kept
        // racing its invalidations ("fault retried too often"): transient.
        DmaError::HostFault {
            source: M::Notifier(_) | M::InvalidArgument(_),
            ..
        }
        | DmaError::TooManyRetries(_) => Ok(Refusal::Again),
        DmaError::OutOfRange { .. } | DmaError::Unaligned(_) | DmaError::InvalidBuffer { .. } => {
            Ok(Refusal::Invalid)
        }
        // Out of machine memory (reclaim found nothing), a bad frame or swap
        // slot, the mm gone while the VM runs, a frame the mm does not own,
        // the engine thread gone: the VMM's failure, never the guest's.
        e => Err(GuestDmaError::Device(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(source: MmError) -> DmaError {
        DmaError::HostFault {
            iova: 0x1000,
            source,
        }
    }

    #[test]
    fn host_refusals_are_errnos_and_vmm_failures_stop_the_vm() {
        let errno = |e| classify(e).map(|r| r.errno()).ok();
        assert_eq!(errno(host(MmError::NoVma(1))), Some(EFAULT));
        assert_eq!(
            errno(host(MmError::Access {
                addr: 1,
                access: "write"
            })),
            Some(EFAULT)
        );
        assert_eq!(errno(DmaError::TooManyRetries(1000)), Some(EAGAIN));
        assert_eq!(
            errno(host(MmError::InvalidArgument("fault retried too often"))),
            Some(EAGAIN)
        );
        assert_eq!(
            errno(DmaError::OutOfRange {
                iova: 0,
                len: 2,
                size: 1
            }),
            Some(EINVAL)
        );
        for fatal in [
            DmaError::FreedFrame { iova: 0, pfn: 7 },
            host(MmError::OutOfFrames),
            host(MmError::Exited),
            host(MmError::BadFrame(3)),
            DmaError::EngineStopped,
        ] {
            let text = fatal.to_string();
            let e = classify(fatal).expect_err(&text);
            assert!(e.to_string().starts_with("DMA device: "), "{e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }
}
