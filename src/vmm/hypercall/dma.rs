//! The DMA hypercall's operations (docs/guest-abi.md §6): decoding and
//! validating them (pure), and running them on the VM's device. Ranges
//! inside the attached buffer are checked by the device, which knows the
//! buffer.

use crate::vmm::abi::{self, errno::EINVAL, errno::EOPNOTSUPP};
use crate::vmm::dma::{GuestDma, GuestDmaError, buffer_ok, transfer_len_ok};

/// A decoded DMA operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaCall {
    /// ATTACH the device to guest RAM `[gpa, gpa + len)`.
    Attach {
        /// First byte, page aligned.
        gpa: u64,
        /// Bytes, whole pages.
        len: u64,
    },
    /// COPY `len` bytes from iova `src` to iova `dst`.
    Copy {
        /// Source iova.
        src: u64,
        /// Destination iova.
        dst: u64,
        /// Bytes.
        len: u64,
    },
    /// FILL `len` bytes at `iova` with `byte`.
    Fill {
        /// First iova.
        iova: u64,
        /// Bytes.
        len: u64,
        /// The value.
        byte: u8,
    },
    /// DETACH the device.
    Detach,
}

impl DmaCall {
    /// Decodes `(op, arg0, arg1, arg2)` (`rdi, rsi, rdx, r10`) against
    /// `mem_size` bytes of RAM; `Err` is the errno (`EINVAL` for every bad
    /// value, in both paging modes).
    pub fn decode(args: [u64; 4], mem_size: u64) -> Result<Self, i64> {
        let [op, a0, a1, a2] = args;
        Ok(match op {
            abi::DMA_ATTACH if buffer_ok(a0, a1, mem_size) => DmaCall::Attach { gpa: a0, len: a1 },
            abi::DMA_COPY if transfer_len_ok(a2) => DmaCall::Copy {
                src: a0,
                dst: a1,
                len: a2,
            },
            abi::DMA_FILL if transfer_len_ok(a1) => DmaCall::Fill {
                iova: a0,
                len: a1,
                byte: u8::try_from(a2).map_err(|_| EINVAL)?,
            },
            abi::DMA_DETACH => DmaCall::Detach,
            _ => return Err(EINVAL),
        })
    }

    /// Runs the operation on `dma`, the VM's device (`None` in kvm mode:
    /// `EOPNOTSUPP`).
    pub fn run(self, dma: Option<&GuestDma>) -> Result<i64, GuestDmaError> {
        let Some(dma) = dma else {
            return Ok(EOPNOTSUPP);
        };
        match self {
            DmaCall::Attach { gpa, len } => dma.attach(gpa, len),
            DmaCall::Copy { src, dst, len } => dma.copy(src, dst, len),
            DmaCall::Fill { iova, len, byte } => dma.fill(iova, len, byte),
            DmaCall::Detach => Ok(dma.detach()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::abi::{DMA_ATTACH, DMA_COPY, DMA_DETACH, DMA_FILL, DMA_XFER_MAX, PAGE_SIZE};

    const MEM: u64 = 16 << 20;

    fn decode(a: &[u64]) -> Result<DmaCall, i64> {
        let mut args = [0u64; 4];
        args[..a.len()].copy_from_slice(a);
        DmaCall::decode(args, MEM)
    }

    #[test]
    fn every_operation_is_validated() {
        assert_eq!(
            decode(&[DMA_ATTACH, 0x40_0000, 2 * PAGE_SIZE]),
            Ok(DmaCall::Attach {
                gpa: 0x40_0000,
                len: 2 * PAGE_SIZE
            })
        );
        for (gpa, len) in [
            (0x40_0001, PAGE_SIZE),
            (0x40_0000, 1),
            (0x40_0000, 0),
            (0x1000, PAGE_SIZE),
            (MEM - PAGE_SIZE, 2 * PAGE_SIZE),
            (MEM, PAGE_SIZE),
            (0x40_0000, !(PAGE_SIZE - 1)),
            (abi::SWITCHER_GVA, PAGE_SIZE),
        ] {
            assert_eq!(
                decode(&[DMA_ATTACH, gpa, len]),
                Err(EINVAL),
                "{gpa:#x}+{len:#x}"
            );
        }
        assert_eq!(
            decode(&[DMA_COPY, 1, u64::MAX, 7]),
            Ok(DmaCall::Copy {
                src: 1,
                dst: u64::MAX,
                len: 7
            }),
            "iovas are the device's to check"
        );
        assert_eq!(decode(&[DMA_COPY, 0, 8, 0]), Err(EINVAL));
        assert_eq!(decode(&[DMA_COPY, 0, 8, DMA_XFER_MAX + 1]), Err(EINVAL));
        assert_eq!(
            decode(&[DMA_FILL, 8, DMA_XFER_MAX, 255]),
            Ok(DmaCall::Fill {
                iova: 8,
                len: DMA_XFER_MAX,
                byte: 255
            })
        );
        assert_eq!(decode(&[DMA_FILL, 8, 8, 256]), Err(EINVAL));
        assert_eq!(decode(&[DMA_FILL, 8, 0, 1]), Err(EINVAL));
        assert_eq!(decode(&[DMA_FILL, 8, u64::MAX, 1]), Err(EINVAL));
        assert_eq!(decode(&[DMA_DETACH, 5, 6, 7]), Ok(DmaCall::Detach));
        for op in [4, 1 << 32, u64::MAX] {
            assert_eq!(decode(&[op]), Err(EINVAL), "{op:#x}");
        }
    }

    #[test]
    fn kvm_mode_has_no_device() {
        for call in [
            DmaCall::Attach {
                gpa: 0x40_0000,
                len: PAGE_SIZE,
            },
            DmaCall::Detach,
        ] {
            assert_eq!(call.run(None).unwrap(), EOPNOTSUPP);
        }
    }
}
