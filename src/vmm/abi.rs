//! The guest ABI: ports, hypercall numbers, errors, memory layout and the
//! boot-info struct.
//!
//! `docs/guest-abi.md` is the normative text and `guests/include/shadowvm.h`
//! the guest's copy; a unit test below checks that the header's `#define`s
//! match these constants.

use vm_memory::ByteValued;

/// 16550 UART base port (8 registers).
pub const PORT_SERIAL: u16 = 0x3f8;
/// Number of serial registers.
pub const PORT_SERIAL_LEN: u16 = 8;
/// isa-debug-exit style port: an `out` of any size makes shadowvm exit with
/// the low byte of the value.
pub const PORT_EXIT: u16 = 0xf4;
/// Hypercall port: `outl %eax, $0xf5` with the hypercall number in `eax`.
pub const PORT_HYPERCALL: u16 = 0xf5;

/// Hypercall numbers: the whole of `rax` (a value with bits above 31 set
/// is no hypercall: `ENOSYS`).
///
/// The table is in ranges, so that independent additions do not collide:
/// `0x000..` the paging and console calls, `0x100..` ABI v2's ring-1 calls
/// (trap table, stacks, halt).
pub mod hc {
    /// `() -> 0`.
    pub const NOP: u64 = 0;
    /// `(gpa, len) -> len`: write guest bytes to the console.
    pub const PRINT: u64 = 1;
    /// `(code)`: stop the VM; shadowvm exits with `code & 0xff`.
    pub const EXIT: u64 = 2;
    /// `(cr3) -> 0`: switch the guest's page tables.
    pub const LOAD_CR3: u64 = 3;
    /// `(gva) -> 0`: drop any translation of the page holding `gva`.
    pub const INVLPG: u64 = 4;
    /// `(flags) -> 0`: drop all translations (`FLUSH_GLOBAL`: global ones too).
    pub const FLUSH_TLB: u64 = 5;
    /// `(error_code, rflags, rip) -> PF_RETRY | PF_GUEST_FAULT`, `rdx` =
    /// error code, `rsi` = CR2.
    pub const RESOLVE_PF: u64 = 6;
    /// `(gpa, nr_pages) -> nr_pages`: give guest frames back to the host.
    pub const BALLOON: u64 = 7;
    /// `(op, arg0, arg1) -> op-specific`: host-side operations for demos.
    pub const HOST_OP: u64 = 8;
    /// `(flags) -> 0`: set the guest's CR0.WP (`SET_PAGING_WP`), EFER.NXE
    /// (`SET_PAGING_NX`), CR4.SMEP (`SET_PAGING_SMEP`) and CR4.SMAP
    /// (`SET_PAGING_SMAP`); any other bit is `EINVAL`.
    pub const SET_PAGING: u64 = 9;
    /// `(gva, len, flags) -> pages`, `rdx` = pages skipped (ABI v2):
    /// populate the host memory behind the guest's accessed mappings of the
    /// range and (shadow mode) install their sptes, `MADV_POPULATE_WRITE`
    /// plus `KVM_PRE_FAULT_MEMORY`.
    pub const POPULATE: u64 = 10;
    /// `(op, arg0, arg1, arg2) -> op-specific`: the VM's DMA device
    /// (`DMA_ATTACH`, `DMA_COPY`, `DMA_FILL`, `DMA_DETACH`; shadow mode).
    pub const DMA: u64 = 11;
    /// `(gpa, count) -> 0`: register ring-1 exception handlers, `count`
    /// `TrapInfo` entries at `gpa` (Xen's `set_trap_table`).
    pub const SET_TRAP_TABLE: u64 = 0x100;
    /// `(index, rsp) -> 0`: this vCPU's kernel stack (`index` 0: TSS.RSP0
    /// and RSP1) or IST stack `index` (1..=7) (Xen's `stack_switch`).
    pub const SET_STACK: u64 = 0x101;
    /// `()`: stop this vCPU (there are no interrupts to wake it); replaces
    /// `hlt`, which faults in ring 1.
    pub const HALT: u64 = 0x102;

    /// Every hypercall, in `--stats` order.
    pub const ALL: [u64; 15] = [
        NOP,
        PRINT,
        EXIT,
        LOAD_CR3,
        INVLPG,
        FLUSH_TLB,
        RESOLVE_PF,
        BALLOON,
        HOST_OP,
        SET_PAGING,
        POPULATE,
        DMA,
        SET_TRAP_TABLE,
        SET_STACK,
        HALT,
    ];

    /// The position of hypercall `nr` in [`ALL`], if it is one.
    pub fn index(nr: u64) -> Option<usize> {
        ALL.iter().position(|&n| n == nr)
    }

    /// The name of hypercall `nr` (in `--stats`).
    pub fn name(nr: u64) -> &'static str {
        match nr {
            NOP => "nop",
            PRINT => "print",
            EXIT => "exit",
            LOAD_CR3 => "load_cr3",
            INVLPG => "invlpg",
            FLUSH_TLB => "flush_tlb",
            RESOLVE_PF => "resolve_pf",
            BALLOON => "balloon",
            HOST_OP => "host_op",
            SET_PAGING => "set_paging",
            POPULATE => "populate",
            DMA => "dma",
            SET_TRAP_TABLE => "set_trap_table",
            SET_STACK => "set_stack",
            HALT => "halt",
            _ => "unknown",
        }
    }
}

/// `FLUSH_TLB` flag: also drop global translations.
pub const FLUSH_GLOBAL: u64 = 1 << 0;
/// `SET_PAGING` flag: CR0.WP (supervisor writes honour R/W).
pub const SET_PAGING_WP: u64 = 1 << 0;
/// `SET_PAGING` flag: EFER.NXE (XD is a permission bit; else bit 63 is reserved).
pub const SET_PAGING_NX: u64 = 1 << 1;
/// `SET_PAGING` flag: CR4.SMEP (supervisor fetches from user pages fault).
pub const SET_PAGING_SMEP: u64 = 1 << 2;
/// `SET_PAGING` flag: CR4.SMAP (supervisor data accesses to user pages
/// fault unless EFLAGS.AC is set).
pub const SET_PAGING_SMAP: u64 = 1 << 3;
/// Every `SET_PAGING` flag.
pub const SET_PAGING_ALL: u64 = SET_PAGING_WP | SET_PAGING_NX | SET_PAGING_SMEP | SET_PAGING_SMAP;
/// `POPULATE` flags the guest may pass: none is defined yet (any bit set
/// is `EINVAL`, so that bits can be given a meaning later).
pub const POPULATE_FLAGS: u64 = 0;
/// `RESOLVE_PF` result: the VMM fixed its tables; retry the access.
pub const PF_RETRY: u64 = 0;
/// `RESOLVE_PF` result: the guest's own fault; `rdx` holds the error code.
pub const PF_GUEST_FAULT: u64 = 1;
/// `HOST_OP` operation: returns its first argument, in every mode.
pub const HOST_OP_PING: u64 = 0;
/// `HOST_OP` operation (shadow mode): `CHECKPOINT(n)`, `n < 2^16`, runs the
/// `--host-ops` script's ops for checkpoint `n` and returns how many ran.
pub const HOST_OP_CHECKPOINT: u64 = 1;
/// The highest `HOST_OP` operation.
pub const HOST_OP_MAX: u64 = 1;

/// `DMA` operation `ATTACH(gpa, len)`: attach the VM's DMA device to guest
/// RAM `[gpa, gpa + len)` (page aligned, at or above `IMAGE_MIN_GPA`, at
/// most `DMA_BUFFER_MAX`); iova `i` is gpa `gpa + i`. One device per VM:
/// `EBUSY` while one is attached.
pub const DMA_ATTACH: u64 = 0;
/// `DMA` operation `COPY(src, dst, len)`: the device reads `len` bytes at
/// iova `src` and writes them at iova `dst` (overlap allowed: memmove).
pub const DMA_COPY: u64 = 1;
/// `DMA` operation `FILL(iova, len, byte)`: the device writes `len` bytes
/// of `byte` at `iova`.
pub const DMA_FILL: u64 = 2;
/// `DMA` operation `DETACH()`: detach the device (`ENODEV` if none).
pub const DMA_DETACH: u64 = 3;
/// The highest `DMA` operation.
pub const DMA_OP_MAX: u64 = 3;
/// The largest DMA buffer (1 GiB).
pub const DMA_BUFFER_MAX: u64 = 1 << 30;
/// The largest transfer of one `COPY` or `FILL` (1 MiB).
pub const DMA_XFER_MAX: u64 = 1 << 20;

/// Hypercall error results: negated Linux errno values.
pub mod errno {
    /// A hypercall from ring 3: only the guest kernel (ring 1) may make them.
    pub const EPERM: i64 = -1;
    /// A guest address range lies outside RAM.
    pub const EFAULT: i64 = -14;
    /// An argument is malformed.
    pub const EINVAL: i64 = -22;
    /// No such hypercall.
    pub const ENOSYS: i64 = -38;
    /// The hypercall exists but not in this paging mode, or the host's KVM
    /// refuses the mode it asks for.
    pub const EOPNOTSUPP: i64 = -95;
    /// DMA: a transfer kept colliding with host invalidations; try again.
    pub const EAGAIN: i64 = -11;
    /// DMA: a device is already attached.
    pub const EBUSY: i64 = -16;
    /// DMA: no device is attached.
    pub const ENODEV: i64 = -19;
}

/// `svm_boot_info.paging_mode`: KVM does the second level.
pub const PAGING_MODE_KVM: u32 = 0;
/// `svm_boot_info.paging_mode`: the VMM's shadow tables.
pub const PAGING_MODE_SHADOW: u32 = 1;

/// The ring the guest kernel runs in.
pub const KERNEL_RPL: u16 = 1;
/// Kernel code selector: GDT entry 1, 64-bit code, DPL 1, RPL 1.
pub const KERNEL_CS: u16 = 0x08 | KERNEL_RPL;
/// Kernel data selector: GDT entry 2, DPL 1, RPL 1.
pub const KERNEL_DS: u16 = 0x10 | KERNEL_RPL;
/// User data selector (GDT entry 3, RPL 3).
pub const USER_DS: u16 = 0x1b;
/// User code selector (GDT entry 4, RPL 3).
pub const USER_CS: u16 = 0x23;
/// The TSS selector of vCPU 0; vCPU `n` uses `TSS_SEL_BASE + 16 * n`.
pub const TSS_SEL_BASE: u16 = 0x28;

/// The switcher: the reserved gva range `[SWITCHER_GVA, 2^64)` (PML4 slot
/// 511), where the VMM maps the GDT, the IDTs and the TSSes read-only and
/// supervisor-only. Shadow mode refuses any guest mapping there.
pub const SWITCHER_GVA: u64 = 0xffff_ff80_0000_0000;
/// The PML4 slot of the switcher range.
pub const SWITCHER_PML4_INDEX: usize = 511;
/// Entries of each vCPU's IDT.
pub const IDT_ENTRIES: u64 = 256;
/// Highest IST index (`SET_STACK` index, `TrapInfo::ist`).
pub const IST_MAX: u64 = 7;

/// gva of the GDT (switcher page 0).
pub const fn switcher_gdt() -> u64 {
    SWITCHER_GVA
}

/// gva of vCPU `cpu`'s IDT (switcher page `1 + 2 * cpu`).
pub const fn switcher_idt(cpu: u32) -> u64 {
    SWITCHER_GVA + (1 + 2 * cpu as u64) * PAGE_SIZE
}

/// gva of vCPU `cpu`'s TSS and I/O bitmap (switcher page `2 + 2 * cpu`).
pub const fn switcher_tss(cpu: u32) -> u64 {
    SWITCHER_GVA + (2 + 2 * cpu as u64) * PAGE_SIZE
}

/// One entry of the `SET_TRAP_TABLE` table (`struct svm_trap_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapInfo {
    /// Handler address in the image; 0 unregisters the vector.
    pub handler: u64,
    /// Exception vector.
    pub vector: u8,
    /// IST index, 0 (the current or kernel stack) to `IST_MAX`.
    pub ist: u8,
    /// Zero.
    pub flags: u16,
    /// Zero.
    pub reserved: u32,
}

// SAFETY: `TrapInfo` is `repr(C)`, made only of integers, with no padding
// (checked by the size assertion below), so any byte pattern is a valid value.
unsafe impl ByteValued for TrapInfo {}

const _: () = assert!(std::mem::size_of::<TrapInfo>() == 16);

/// Size of a page.
pub const PAGE_SIZE: u64 = 4096;
/// The boot-info page (user-readable, read-only).
pub const BOOT_INFO_GPA: u64 = 0x2000;
/// The command line, NUL-terminated, in the boot-info page.
pub const CMDLINE_GPA: u64 = 0x2800;
/// Room for the command line, including its NUL.
pub const CMDLINE_MAX: usize = 2048;
/// The boot PML4; the PDPT, the 4 KiB table for the first 2 MiB and the
/// page directories follow it.
pub const BOOT_PML4_GPA: u64 = 0x8000;
/// The per-vCPU areas (GS.base, stacks), `PERCPU_STRIDE` bytes apart.
pub const PERCPU_GPA: u64 = 0x10_0000;
/// Bytes per per-vCPU area.
pub const PERCPU_STRIDE: u64 = 0x8000;
/// Offset of the top of the runtime's IST1 stack in a per-vCPU area (the
/// VMM only checks that stacks lie in the area; their use is the guest's).
pub const PERCPU_IST_TOP: u64 = 0x2000;
/// Offset of the top of the runtime's trap stack (TSS.RSP0) in a per-vCPU
/// area.
pub const PERCPU_TRAP_TOP: u64 = 0x4000;
/// Offset of the top of the kernel stack (RSP at entry) in a per-vCPU area.
pub const PERCPU_KSTACK_TOP: u64 = 0x8000;
/// ELF segments must lie at or above this address; everything below it is
/// the VMM-built area (boot info, boot tables, per-vCPU areas),
/// supervisor-only except the boot-info page.
pub const IMAGE_MIN_GPA: u64 = 0x20_0000;
/// The most vCPUs the layout has room for.
pub const MAX_VCPUS: u32 = 32;

/// gpa of vCPU `cpu`'s per-vCPU area.
pub fn percpu_gpa(cpu: u32) -> u64 {
    PERCPU_GPA + u64::from(cpu) * PERCPU_STRIDE
}

/// `svm_boot_info.magic`: "SVMB".
pub const BOOT_INFO_MAGIC: u32 = 0x424d_5653;
/// `svm_boot_info.version`.
pub const BOOT_INFO_VERSION: u32 = 2;

/// `struct svm_boot_info` at `BOOT_INFO_GPA`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// `BOOT_INFO_MAGIC`.
    pub magic: u32,
    /// `BOOT_INFO_VERSION`.
    pub version: u32,
    /// Bytes of RAM, gpa `[0, mem_size)`.
    pub mem_size: u64,
    /// `PAGING_MODE_*`.
    pub paging_mode: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Address of the NUL-terminated command line.
    pub cmdline_gpa: u64,
    /// Command line length without the NUL.
    pub cmdline_len: u32,
    /// Zero.
    pub reserved0: u32,
    /// Lowest gpa of the ELF's loadable segments.
    pub image_start: u64,
    /// End of the highest one, page aligned up.
    pub image_end: u64,
    /// First free gpa (page aligned; the RAM there is zero).
    pub free_start: u64,
    /// End of free RAM.
    pub free_end: u64,
    /// The boot PML4 (CR3 at entry).
    pub boot_cr3: u64,
    /// `PERCPU_GPA`.
    pub percpu_base: u64,
    /// `PERCPU_STRIDE`.
    pub percpu_stride: u64,
    /// Start of the range the boot tables map with U=1.
    pub user_start: u64,
    /// Its end.
    pub user_end: u64,
}

// SAFETY: `BootInfo` is `repr(C)`, made only of integers, with no padding
// (checked by the size assertion below), so any byte pattern is a valid value.
unsafe impl ByteValued for BootInfo {}

const _: () = assert!(std::mem::size_of::<BootInfo>() == 112);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `#define NAME value` lines of the guest header whose value is a plain
    /// integer expression we can evaluate.
    fn header_defines() -> HashMap<String, i64> {
        let text = include_str!("../../guests/include/shadowvm.h");
        let mut defs = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("#define ") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let value = value
                .trim_start_matches('(')
                .trim_end_matches(')')
                .trim_end_matches(['u', 'l']);
            let parsed = if let Some(hex) = value.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok().map(|v| v as i64)
            } else {
                value.parse::<i64>().ok()
            };
            if let Some(v) = parsed {
                defs.insert(name.to_string(), v);
            }
        }
        defs
    }

    #[test]
    fn header_matches_abi() {
        let d = header_defines();
        let expect = |name: &str, value: i64| {
            assert_eq!(
                d.get(name).copied(),
                Some(value),
                "shadowvm.h {name} differs from abi.rs"
            );
        };
        expect("SVM_PORT_SERIAL", PORT_SERIAL.into());
        expect("SVM_PORT_EXIT", PORT_EXIT.into());
        expect("SVM_PORT_HYPERCALL", PORT_HYPERCALL.into());
        for (name, nr) in [
            ("SVM_HC_NOP", hc::NOP),
            ("SVM_HC_PRINT", hc::PRINT),
            ("SVM_HC_EXIT", hc::EXIT),
            ("SVM_HC_LOAD_CR3", hc::LOAD_CR3),
            ("SVM_HC_INVLPG", hc::INVLPG),
            ("SVM_HC_FLUSH_TLB", hc::FLUSH_TLB),
            ("SVM_HC_RESOLVE_PF", hc::RESOLVE_PF),
            ("SVM_HC_BALLOON", hc::BALLOON),
            ("SVM_HC_HOST_OP", hc::HOST_OP),
            ("SVM_HC_SET_PAGING", hc::SET_PAGING),
            ("SVM_HC_POPULATE", hc::POPULATE),
            ("SVM_HC_SET_TRAP_TABLE", hc::SET_TRAP_TABLE),
            ("SVM_HC_SET_STACK", hc::SET_STACK),
            ("SVM_HC_HALT", hc::HALT),
            ("SVM_SET_PAGING_WP", SET_PAGING_WP),
            ("SVM_SET_PAGING_NX", SET_PAGING_NX),
            ("SVM_SET_PAGING_SMEP", SET_PAGING_SMEP),
            ("SVM_SET_PAGING_SMAP", SET_PAGING_SMAP),
            ("SVM_PF_RETRY", PF_RETRY),
            ("SVM_PF_GUEST_FAULT", PF_GUEST_FAULT),
            ("SVM_HOST_OP_PING", HOST_OP_PING),
            ("SVM_HOST_OP_CHECKPOINT", HOST_OP_CHECKPOINT),
            ("SVM_HOST_OP_MAX", HOST_OP_MAX),
            ("SVM_HC_DMA", hc::DMA),
            ("SVM_DMA_ATTACH", DMA_ATTACH),
            ("SVM_DMA_COPY", DMA_COPY),
            ("SVM_DMA_FILL", DMA_FILL),
            ("SVM_DMA_DETACH", DMA_DETACH),
            ("SVM_DMA_OP_MAX", DMA_OP_MAX),
            ("SVM_DMA_BUFFER_MAX", DMA_BUFFER_MAX),
            ("SVM_DMA_XFER_MAX", DMA_XFER_MAX),
            ("SVM_BOOT_INFO_GPA", BOOT_INFO_GPA),
            ("SVM_CMDLINE_GPA", CMDLINE_GPA),
            ("SVM_SWITCHER_GVA", SWITCHER_GVA),
            ("SVM_SWITCHER_PML4_INDEX", SWITCHER_PML4_INDEX as u64),
            ("SVM_IDT_ENTRIES", IDT_ENTRIES),
            ("SVM_IST_MAX", IST_MAX),
            ("SVM_BOOT_PML4_GPA", BOOT_PML4_GPA),
            ("SVM_PERCPU_GPA", PERCPU_GPA),
            ("SVM_PERCPU_STRIDE", PERCPU_STRIDE),
            ("SVM_PERCPU_IST", PERCPU_IST_TOP),
            ("SVM_PERCPU_TRAP", PERCPU_TRAP_TOP),
            ("SVM_PERCPU_KSTACK", PERCPU_KSTACK_TOP),
            ("SVM_IMAGE_MIN_GPA", IMAGE_MIN_GPA),
        ] {
            expect(name, nr as i64);
        }
        expect("SVM_CMDLINE_MAX", CMDLINE_MAX as i64);
        expect("SVM_MAX_VCPUS", MAX_VCPUS.into());
        expect("SVM_EPERM", errno::EPERM);
        expect("SVM_EFAULT", errno::EFAULT);
        expect("SVM_EINVAL", errno::EINVAL);
        expect("SVM_ENOSYS", errno::ENOSYS);
        expect("SVM_EOPNOTSUPP", errno::EOPNOTSUPP);
        expect("SVM_EAGAIN", errno::EAGAIN);
        expect("SVM_EBUSY", errno::EBUSY);
        expect("SVM_ENODEV", errno::ENODEV);
        expect("SVM_PAGING_KVM", PAGING_MODE_KVM.into());
        expect("SVM_PAGING_SHADOW", PAGING_MODE_SHADOW.into());
        expect("SVM_KERNEL_CS", KERNEL_CS.into());
        expect("SVM_KERNEL_DS", KERNEL_DS.into());
        expect("SVM_USER_DS", USER_DS.into());
        expect("SVM_USER_CS", USER_CS.into());
        expect("SVM_BOOT_INFO_MAGIC", BOOT_INFO_MAGIC.into());
        expect("SVM_BOOT_INFO_VERSION", BOOT_INFO_VERSION.into());
        expect("SVM_FLUSH_GLOBAL", FLUSH_GLOBAL as i64);
        // The same hypercall table in both: every SVM_HC_ name is known here.
        let in_header = d.keys().filter(|k| k.starts_with("SVM_HC_")).count();
        assert_eq!(
            in_header,
            hc::ALL.len(),
            "shadowvm.h and hc::ALL list the same hypercalls"
        );
    }

    #[test]
    fn switcher_layout() {
        assert_eq!(SWITCHER_GVA >> 39 & 511, SWITCHER_PML4_INDEX as u64);
        assert_eq!(switcher_idt(0), SWITCHER_GVA + PAGE_SIZE);
        assert_eq!(switcher_tss(1), SWITCHER_GVA + 4 * PAGE_SIZE);
        assert_eq!(KERNEL_CS & 3, KERNEL_RPL);
        assert_eq!(KERNEL_DS & 3, KERNEL_RPL);
    }
}
