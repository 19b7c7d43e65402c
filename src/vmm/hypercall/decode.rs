//! Decoding and validating a hypercall (pure): `outl %eax, $0xf5` with the
//! number in `eax` and arguments in `rdi, rsi, rdx, r10`
//! (docs/guest-abi.md). Bad arguments become a negative errno for the
//! guest; nothing a guest passes can make the VMM fail.

use crate::vmm::abi::{self, PAGE_SIZE, hc};
use crate::vmm::host::ops::MAX_CHECKPOINT;
use crate::vmm::kvm::memory::check_range;
use crate::vmm::x86::pte;

/// A decoded, validated hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// NOP.
    Nop,
    /// PRINT.
    Print {
        /// Buffer.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// EXIT.
    Exit {
        /// Exit code.
        code: u8,
    },
    /// LOAD_CR3.
    LoadCr3 {
        /// New CR3.
        cr3: u64,
    },
    /// INVLPG.
    Invlpg {
        /// Address.
        gva: u64,
    },
    /// FLUSH_TLB.
    FlushTlb {
        /// Global entries too.
        global: bool,
    },
    /// RESOLVE_PF.
    ResolvePf {
        /// Faulting address.
        cr2: u64,
        /// Hardware error code.
        error_code: u64,
        /// Faulting instruction.
        rip: u64,
    },
    /// BALLOON.
    Balloon {
        /// First page.
        gpa: u64,
        /// Page count.
        nr_pages: u64,
    },
    /// HOST_OP.
    HostOp {
        /// Operation.
        op: u64,
        /// First argument.
        arg0: u64,
        /// Second argument.
        arg1: u64,
    },
    /// SET_PAGING.
    SetPaging {
        /// CR0.WP.
        wp: bool,
        /// EFER.NXE.
        nx: bool,
    },
}

/// Longest PRINT.
pub const PRINT_MAX: u64 = 4096;
/// #PF error-code bits a guest may pass (P, W, U, RSVD, I, PK, SS, SGX).
pub const PF_ERROR_CODE_MASK: u64 = 0xffff;
const CR3_FLAG_BITS: u64 = (1 << 3) | (1 << 4); // PWT, PCD

/// Whether `va` is canonical with 48-bit virtual addresses.
pub fn is_canonical(va: u64) -> bool {
    (((va << 16) as i64) >> 16) as u64 == va
}

impl Hypercall {
    /// Decodes hypercall `nr` with `args` (`rdi, rsi, rdx, r10`) for a
    /// guest with `mem_size` bytes of RAM; `Err` is the errno to return.
    pub fn decode(nr: u64, args: [u64; 4], mem_size: u64) -> Result<Self, i64> {
        use abi::errno::{EFAULT, EINVAL, ENOSYS};
        let [a0, a1, a2, _a3] = args;
        Ok(match nr {
            hc::NOP => Hypercall::Nop,
            hc::PRINT => {
                if a1 > PRINT_MAX {
                    return Err(EINVAL);
                }
                check_range(a0, a1, mem_size).map_err(|_| EFAULT)?;
                Hypercall::Print { gpa: a0, len: a1 }
            }
            hc::EXIT => Hypercall::Exit { code: a0 as u8 },
            hc::LOAD_CR3 => {
                let root = a0 & pte::ADDR_MASK;
                if a0 & !(pte::ADDR_MASK | CR3_FLAG_BITS) != 0
                    || check_range(root, PAGE_SIZE, mem_size).is_err()
                {
                    return Err(EINVAL);
                }
                Hypercall::LoadCr3 { cr3: a0 }
            }
            hc::INVLPG => {
                if !is_canonical(a0) {
                    return Err(EINVAL);
                }
                Hypercall::Invlpg { gva: a0 }
            }
            hc::FLUSH_TLB => {
                if a0 & !abi::FLUSH_GLOBAL != 0 {
                    return Err(EINVAL);
                }
                Hypercall::FlushTlb {
                    global: a0 & abi::FLUSH_GLOBAL != 0,
                }
            }
            hc::RESOLVE_PF => {
                if a1 & !PF_ERROR_CODE_MASK != 0 {
                    return Err(EINVAL);
                }
                Hypercall::ResolvePf {
                    cr2: a0,
                    error_code: a1,
                    rip: a2,
                }
            }
            hc::BALLOON => {
                let len = a1.checked_mul(PAGE_SIZE).ok_or(EINVAL)?;
                if !a0.is_multiple_of(PAGE_SIZE)
                    || a1 == 0
                    || a0 < abi::IMAGE_MIN_GPA
                    || check_range(a0, len, mem_size).is_err()
                {
                    return Err(EINVAL);
                }
                Hypercall::Balloon {
                    gpa: a0,
                    nr_pages: a1,
                }
            }
            hc::HOST_OP => {
                if a0 > abi::HOST_OP_MAX || (a0 == abi::HOST_OP_CHECKPOINT && a1 >= MAX_CHECKPOINT)
                {
                    return Err(EINVAL);
                }
                Hypercall::HostOp {
                    op: a0,
                    arg0: a1,
                    arg1: a2,
                }
            }
            hc::SET_PAGING => {
                if a0 & !(abi::SET_PAGING_WP | abi::SET_PAGING_NX) != 0 {
                    return Err(EINVAL);
                }
                Hypercall::SetPaging {
                    wp: a0 & abi::SET_PAGING_WP != 0,
                    nx: a0 & abi::SET_PAGING_NX != 0,
                }
            }
            _ => return Err(ENOSYS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::abi::errno::{EFAULT, EINVAL, ENOSYS};

    const MEM: u64 = 16 << 20;

    fn decode(nr: u64, a: &[u64]) -> Result<Hypercall, i64> {
        let mut args = [0u64; 4];
        args[..a.len()].copy_from_slice(a);
        Hypercall::decode(nr, args, MEM)
    }

    #[test]
    fn decode_validates_arguments() {
        assert_eq!(decode(hc::NOP, &[]), Ok(Hypercall::Nop));
        assert_eq!(decode(hc::MAX + 1, &[]), Err(ENOSYS));
        assert_eq!(decode(u64::MAX, &[]), Err(ENOSYS));

        assert_eq!(
            decode(hc::PRINT, &[0x20_0000, 5]),
            Ok(Hypercall::Print {
                gpa: 0x20_0000,
                len: 5
            })
        );
        assert_eq!(decode(hc::PRINT, &[0x20_0000, PRINT_MAX + 1]), Err(EINVAL));
        assert_eq!(decode(hc::PRINT, &[MEM - 2, 5]), Err(EFAULT));
        assert_eq!(decode(hc::PRINT, &[u64::MAX - 1, 5]), Err(EFAULT));

        assert_eq!(
            decode(hc::EXIT, &[0x1_0007]),
            Ok(Hypercall::Exit { code: 7 })
        );

        assert_eq!(
            decode(hc::LOAD_CR3, &[0x8000]),
            Ok(Hypercall::LoadCr3 { cr3: 0x8000 })
        );
        assert_eq!(
            decode(hc::LOAD_CR3, &[0x8018]),
            Ok(Hypercall::LoadCr3 { cr3: 0x8018 })
        );
        assert_eq!(decode(hc::LOAD_CR3, &[0x8001]), Err(EINVAL));
        assert_eq!(decode(hc::LOAD_CR3, &[MEM]), Err(EINVAL));
        assert_eq!(decode(hc::LOAD_CR3, &[1 << 60 | 0x8000]), Err(EINVAL));

        assert_eq!(
            decode(hc::INVLPG, &[0xffff_8000_0000_0000]),
            Ok(Hypercall::Invlpg {
                gva: 0xffff_8000_0000_0000
            })
        );
        assert_eq!(decode(hc::INVLPG, &[0x0000_8000_0000_0000]), Err(EINVAL));

        assert_eq!(
            decode(hc::FLUSH_TLB, &[0]),
            Ok(Hypercall::FlushTlb { global: false })
        );
        assert_eq!(
            decode(hc::FLUSH_TLB, &[1]),
            Ok(Hypercall::FlushTlb { global: true })
        );
        assert_eq!(decode(hc::FLUSH_TLB, &[2]), Err(EINVAL));

        assert_eq!(
            decode(hc::RESOLVE_PF, &[0x1234, 7, 0x20_0000]),
            Ok(Hypercall::ResolvePf {
                cr2: 0x1234,
                error_code: 7,
                rip: 0x20_0000
            })
        );
        assert_eq!(decode(hc::RESOLVE_PF, &[0x1234, 1 << 16]), Err(EINVAL));

        assert_eq!(
            decode(hc::BALLOON, &[0x40_0000, 2]),
            Ok(Hypercall::Balloon {
                gpa: 0x40_0000,
                nr_pages: 2
            })
        );
        assert_eq!(decode(hc::BALLOON, &[0x40_0001, 1]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x40_0000, 0]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x1000, 1]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[MEM - PAGE_SIZE, 2]), Err(EINVAL));
        assert_eq!(decode(hc::BALLOON, &[0x40_0000, u64::MAX / 2]), Err(EINVAL));

        assert_eq!(
            decode(hc::HOST_OP, &[0, 9]),
            Ok(Hypercall::HostOp {
                op: 0,
                arg0: 9,
                arg1: 0
            })
        );
        assert_eq!(decode(hc::HOST_OP, &[abi::HOST_OP_MAX + 1]), Err(EINVAL));
        assert_eq!(
            decode(hc::HOST_OP, &[abi::HOST_OP_CHECKPOINT, 1 << 16]),
            Err(EINVAL)
        );
        assert!(decode(hc::HOST_OP, &[abi::HOST_OP_CHECKPOINT, (1 << 16) - 1]).is_ok());

        assert_eq!(
            decode(hc::SET_PAGING, &[0]),
            Ok(Hypercall::SetPaging {
                wp: false,
                nx: false
            })
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_WP | abi::SET_PAGING_NX]),
            Ok(Hypercall::SetPaging { wp: true, nx: true })
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_NX]),
            Ok(Hypercall::SetPaging {
                wp: false,
                nx: true
            })
        );
        for bad in [4, 1 << 63 | 3, u64::MAX, 1 << 11, 1 << 16] {
            assert_eq!(decode(hc::SET_PAGING, &[bad]), Err(EINVAL), "{bad:#x}");
        }
    }
}
