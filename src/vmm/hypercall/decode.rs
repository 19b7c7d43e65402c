//! Decoding and validating a hypercall (pure): `outl %eax, $0xf5` from
//! ring 1 with the number in `rax` (all of it) and arguments in `rdi, rsi,
//! rdx, r10` (docs/guest-abi.md). Bad arguments become a negative errno for
//! the guest; nothing a guest passes can make the VMM fail.

use super::dma::DmaCall;
use crate::vmm::abi::{self, PAGE_SIZE, TrapInfo, hc, percpu_gpa};
use crate::vmm::host::ops::MAX_CHECKPOINT;
use crate::vmm::kvm::memory::check_range;
use crate::vmm::paging::GuestPagingMode;
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
    /// RESOLVE_PF of the fault at the vCPU's CR2.
    ResolvePf {
        /// The #PF error code from the trap frame.
        error_code: u64,
        /// RFLAGS from the trap frame (EFLAGS.AC waives SMAP).
        rflags: u64,
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
    SetPaging(GuestPagingMode),
    /// POPULATE of `[gva, gva + len)` (checked by [`check_populate`]).
    Populate {
        /// First byte, page aligned.
        gva: u64,
        /// Bytes, a multiple of the page size.
        len: u64,
    },
    /// DMA: one operation of the VM's DMA device.
    Dma(DmaCall),
    /// SET_TRAP_TABLE: `count` entries at `gpa` (each validated by
    /// [`validate_trap`] once read).
    SetTrapTable {
        /// The table.
        gpa: u64,
        /// Entries.
        count: u64,
    },
    /// SET_STACK.
    SetStack {
        /// 0: kernel stack (TSS.RSP0 and RSP1); 1..=7: IST.
        index: u64,
        /// Top of the stack (0: none).
        rsp: u64,
    },
    /// HALT.
    Halt,
}

/// What arguments are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// The image, page aligned: handlers must lie in `[image_start,
    /// image_end)`, which is always mapped (docs/guest-abi.md §9).
    pub image_start: u64,
    /// End of the image.
    pub image_end: u64,
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

/// One SET_TRAP_TABLE entry: `Ok(None)` unregisters its vector, `Ok(Some
/// ((handler, ist)))` registers a ring-1 handler. The handler must lie in
/// the image (always mapped, so delivery never faults on it); flags and
/// the reserved field must be zero.
pub fn validate_trap(t: &TrapInfo, limits: &Limits) -> Result<Option<(u64, u8)>, i64> {
    if t.flags != 0 || t.reserved != 0 || u64::from(t.ist) > abi::IST_MAX {
        return Err(abi::errno::EINVAL);
    }
    if t.handler == 0 {
        return Ok(None);
    }
    if !(limits.image_start..limits.image_end).contains(&t.handler) {
        return Err(abi::errno::EINVAL);
    }
    Ok(Some((t.handler, t.ist)))
}

/// POPULATE's arguments: `gva` and `len` page aligned, `len` at most the
/// size of guest RAM (the work stays in proportion to the VM), no flag
/// set, and the range canonical, not wrapping, and clear of the switcher
/// (`[SWITCHER_GVA, 2^64)`: the VMM's, never the guest's to map). Every
/// refusal is `EINVAL`; the range itself may map anything (what it does
/// not map to RAM is skipped, not refused).
pub fn check_populate(gva: u64, len: u64, flags: u64, mem_size: u64) -> Result<(), i64> {
    use abi::errno::EINVAL;
    if flags & !abi::POPULATE_FLAGS != 0
        || !gva.is_multiple_of(PAGE_SIZE)
        || !len.is_multiple_of(PAGE_SIZE)
        || len > mem_size
    {
        return Err(EINVAL);
    }
    if len == 0 {
        return if is_canonical(gva) {
            Ok(())
        } else {
            Err(EINVAL)
        };
    }
    let last = gva.checked_add(len - 1).ok_or(EINVAL)?;
    // Both ends canonical and in the same half: the range does not cross
    // the non-canonical hole.
    if !is_canonical(gva) || !is_canonical(last) || (gva >> 63) != (last >> 63) {
        return Err(EINVAL);
    }
    if last >= abi::SWITCHER_GVA {
        return Err(EINVAL);
    }
    Ok(())
}

impl Hypercall {
    /// Decodes hypercall `nr` (the whole of `rax`) with `args` (`rdi, rsi,
    /// rdx, r10`) made by vCPU `cpu`; `Err` is the errno to return.
    pub fn decode(nr: u64, args: [u64; 4], limits: &Limits, cpu: u32) -> Result<Self, i64> {
        use abi::errno::{EFAULT, EINVAL, ENOSYS};
        let mem_size = limits.mem_size;
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
                if a0 & !PF_ERROR_CODE_MASK != 0 {
                    return Err(EINVAL);
                }
                Hypercall::ResolvePf {
                    error_code: a0,
                    rflags: a1,
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
                if a0 & !abi::SET_PAGING_ALL != 0 {
                    return Err(EINVAL);
                }
                Hypercall::SetPaging(GuestPagingMode {
                    wp: a0 & abi::SET_PAGING_WP != 0,
                    nx: a0 & abi::SET_PAGING_NX != 0,
                    smep: a0 & abi::SET_PAGING_SMEP != 0,
                    smap: a0 & abi::SET_PAGING_SMAP != 0,
                })
            }
            hc::POPULATE => {
                check_populate(a0, a1, a2, mem_size)?;
                Hypercall::Populate { gva: a0, len: a1 }
            }
            hc::SET_TRAP_TABLE => {
                let entry = std::mem::size_of::<TrapInfo>() as u64;
                if a1 > abi::IDT_ENTRIES {
                    return Err(EINVAL);
                }
                check_range(a0, a1 * entry, mem_size).map_err(|_| EFAULT)?;
                Hypercall::SetTrapTable { gpa: a0, count: a1 }
            }
            hc::SET_STACK => {
                // Stacks lie in the calling vCPU's own per-vCPU area, which
                // the VMM keeps mapped in every root and locked in the host:
                // delivery never faults on them (docs/guest-abi.md §6).
                let area = percpu_gpa(cpu);
                let in_area = a1 > area && a1 <= area + abi::PERCPU_STRIDE;
                if a0 > abi::IST_MAX || !(a1 == 0 || in_area) {
                    return Err(EINVAL);
                }
                Hypercall::SetStack { index: a0, rsp: a1 }
            }
            hc::HALT => Hypercall::Halt,
            hc::DMA => Hypercall::Dma(DmaCall::decode(args, mem_size)?),
            _ => return Err(ENOSYS),
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::vmm::abi::errno::{EFAULT, EINVAL, ENOSYS};

    /// The guest RAM and image of the hypercall tests.
    pub(in crate::vmm::hypercall) const MEM: u64 = 16 << 20;
    pub(in crate::vmm::hypercall) const LIMITS: Limits = Limits {
        mem_size: MEM,
        image_start: 0x20_0000,
        image_end: 0x20_8000,
    };

    fn decode(nr: u64, a: &[u64]) -> Result<Hypercall, i64> {
        let mut args = [0u64; 4];
        args[..a.len()].copy_from_slice(a);
        Hypercall::decode(nr, args, &LIMITS, 1)
    }

    fn mode(wp: bool, nx: bool, smep: bool, smap: bool) -> Hypercall {
        Hypercall::SetPaging(GuestPagingMode { wp, nx, smep, smap })
    }

    #[test]
    fn the_number_is_the_whole_of_rax() {
        assert_eq!(decode(hc::NOP, &[]), Ok(Hypercall::Nop));
        assert_eq!(decode(hc::HALT, &[]), Ok(Hypercall::Halt));
        for nr in [
            0xff,
            0x103,
            1 << 32,
            1 << 32 | hc::NOP,
            1 << 63 | hc::HALT,
            u64::MAX,
        ] {
            assert_eq!(decode(nr, &[]), Err(ENOSYS), "{nr:#x}");
        }
    }

    #[test]
    fn decode_validates_arguments() {
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
            decode(hc::RESOLVE_PF, &[7, 0x4_0202, 0x20_0000]),
            Ok(Hypercall::ResolvePf {
                error_code: 7,
                rflags: 0x4_0202,
            })
        );
        assert_eq!(decode(hc::RESOLVE_PF, &[1 << 16]), Err(EINVAL));

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
    }

    #[test]
    fn populate_ranges_are_checked() {
        let ok = |gva: u64, len: u64| {
            assert_eq!(
                decode(hc::POPULATE, &[gva, len, 0]),
                Ok(Hypercall::Populate { gva, len }),
                "{gva:#x} + {len:#x}"
            );
        };
        ok(0x20_0000, 0x1000);
        ok(0, MEM);
        ok(0x40_0000, 0);
        ok(0x7fff_ffff_f000, 0x1000);
        ok(0xffff_8000_0000_0000, MEM);
        ok(abi::SWITCHER_GVA - MEM, MEM);
        for (gva, len, flags) in [
            (0x20_0001, 0x1000, 0),                  // unaligned start
            (0x20_0000, 0x1001, 0),                  // unaligned length
            (0x20_0000, 0x1000, 1),                  // a flag
            (0x20_0000, 0x1000, 1 << 63),            // a high flag
            (0x20_0000, MEM + PAGE_SIZE, 0),         // longer than RAM
            (0x20_0000, !0xfff, 0),                  // longer than RAM, wraps
            (0x7fff_ffff_f000, 0x2000, 0),           // into the hole
            (0x8000_0000_0000, 0x1000, 0),           // non-canonical
            (0xffff_7fff_ffff_f000, 0x2000, 0),      // from the hole
            (abi::SWITCHER_GVA, 0x1000, 0),          // the switcher
            (abi::SWITCHER_GVA - 0x1000, 0x2000, 0), // into it
            (0xffff_ffff_ffff_f000, 0x1000, 0),      // its last page
            (0xffff_ffff_ffff_f000, 0x2000, 0),      // wraps
            (0x8000_0000_0000, 0, 0),                // empty, non-canonical
        ] {
            assert_eq!(
                decode(hc::POPULATE, &[gva, len, flags]),
                Err(EINVAL),
                "{gva:#x} + {len:#x} flags {flags:#x}"
            );
        }
    }

    #[test]
    fn set_paging_takes_the_four_mode_bits() {
        assert_eq!(
            decode(hc::SET_PAGING, &[0]),
            Ok(mode(false, false, false, false))
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_WP | abi::SET_PAGING_NX]),
            Ok(mode(true, true, false, false))
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_NX]),
            Ok(mode(false, true, false, false))
        );
        assert_eq!(
            decode(
                hc::SET_PAGING,
                &[abi::SET_PAGING_SMEP | abi::SET_PAGING_SMAP]
            ),
            Ok(mode(false, false, true, true))
        );
        assert_eq!(
            decode(hc::SET_PAGING, &[abi::SET_PAGING_ALL]),
            Ok(mode(true, true, true, true))
        );
        for bad in [16, 1 << 63 | 3, u64::MAX, 1 << 11, 1 << 16] {
            assert_eq!(decode(hc::SET_PAGING, &[bad]), Err(EINVAL), "{bad:#x}");
        }
    }

    #[test]
    fn trap_tables_and_stacks_are_checked() {
        assert_eq!(
            decode(hc::SET_TRAP_TABLE, &[0x20_0000, 32]),
            Ok(Hypercall::SetTrapTable {
                gpa: 0x20_0000,
                count: 32
            })
        );
        assert_eq!(decode(hc::SET_TRAP_TABLE, &[0x20_0000, 257]), Err(EINVAL));
        assert_eq!(decode(hc::SET_TRAP_TABLE, &[MEM - 16, 2]), Err(EFAULT));
        assert_eq!(decode(hc::SET_TRAP_TABLE, &[u64::MAX, 1]), Err(EFAULT));

        let t = |handler, ist, flags, reserved| TrapInfo {
            handler,
            vector: 14,
            ist,
            flags,
            reserved,
        };
        assert_eq!(
            validate_trap(&t(0x20_1000, 1, 0, 0), &LIMITS),
            Ok(Some((0x20_1000, 1)))
        );
        assert_eq!(
            validate_trap(&t(0, 0, 0, 0), &LIMITS),
            Ok(None),
            "unregister"
        );
        for bad in [
            t(0x20_1000, 8, 0, 0),
            t(0x20_1000, 0, 1, 0),
            t(0x20_1000, 0, 0, 1),
            t(0x1f_ffff, 0, 0, 0),
            t(0x20_8000, 0, 0, 0),
            t(abi::SWITCHER_GVA, 0, 0, 0),
            t(u64::MAX, 0, 0, 0),
        ] {
            assert_eq!(validate_trap(&bad, &LIMITS), Err(EINVAL), "{bad:?}");
        }

        // vCPU 1's area is [0x108000, 0x110000).
        let area = percpu_gpa(1);
        for (index, rsp) in [
            (0, area + 0x8000),
            (0, area + 1),
            (7, area + 0x2000),
            (3, 0),
        ] {
            assert_eq!(
                decode(hc::SET_STACK, &[index, rsp]),
                Ok(Hypercall::SetStack { index, rsp }),
                "{index} {rsp:#x}"
            );
        }
        for (index, rsp) in [
            (8, area + 0x1000),
            (0, area),
            (0, area + 0x8001),
            (0, percpu_gpa(0) + 0x4000),
            (1, 0x20_0000),
            (0, u64::MAX),
        ] {
            assert_eq!(
                decode(hc::SET_STACK, &[index, rsp]),
                Err(EINVAL),
                "{index} {rsp:#x}"
            );
        }
    }
}
