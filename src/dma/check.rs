//! The coherence checker: every IOTLB entry maps the frame the host page
//! table maps at its hva (writable only if the host PTE is), and that frame
//! belongs to the mm. Taken under the device lock, it holds at any time: an
//! invalidation clears the device's entries before the host changes a PTE,
//! and no fault can install until the range ends.

use crate::mm::{FrameOwner, Pfn, Pte};

use super::device::DmaDevice;

/// A broken rule, with what was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaCheckError {
    #[error("IOTLB entry for iova {iova:#x} maps frame {pfn}, owned by {owner:?}, not by the mm")]
    NotTheMmsFrame {
        iova: u64,
        pfn: Pfn,
        owner: FrameOwner,
    },
    #[error("IOTLB entry for iova {iova:#x} maps frame {pfn} but the host PTE is {host:?}")]
    Stale {
        iova: u64,
        pfn: Pfn,
        host: Option<Pte>,
    },
    #[error("IOTLB entry for iova {iova:#x} is writable but the host PTE is read-only")]
    WritableOverReadOnly { iova: u64 },
    #[error("frame {pfn} of iova {iova:#x} is outside machine memory")]
    BadFrame { iova: u64, pfn: Pfn },
}

impl DmaDevice {
    /// Checks every translation; returns how many there are.
    pub fn check_coherence(&self) -> Result<usize, DmaCheckError> {
        let inner = &self.inner;
        let tlb = inner.iotlb.lock();
        let mut n = 0;
        for (page, e) in tlb.iter() {
            let iova = page as u64 * crate::mm::PAGE_SIZE;
            let owner = inner
                .mm
                .frames()
                .owner(e.pfn)
                .map_err(|_| DmaCheckError::BadFrame { iova, pfn: e.pfn })?;
            if owner != inner.mm.frame_owner() {
                return Err(DmaCheckError::NotTheMmsFrame {
                    iova,
                    pfn: e.pfn,
                    owner,
                });
            }
            let host = inner.mm.pte(inner.base + iova);
            match host {
                Some(Pte::Present(p)) if p.pfn == e.pfn => {
                    if e.writable && !p.writable {
                        return Err(DmaCheckError::WritableOverReadOnly { iova });
                    }
                }
                _ => {
                    return Err(DmaCheckError::Stale {
                        iova,
                        pfn: e.pfn,
                        host,
                    });
                }
            }
            n += 1;
        }
        Ok(n)
    }
}
