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

/// Hypercall numbers (`rax`).
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
    /// `(cr2, error_code, rip) -> PF_RETRY | PF_GUEST_FAULT`, `rdx` = error code.
    pub const RESOLVE_PF: u64 = 6;
    /// `(gpa, nr_pages) -> nr_pages`: give guest frames back to the host.
    pub const BALLOON: u64 = 7;
    /// `(op, arg0, arg1) -> op-specific`: host-side operations for demos.
    pub const HOST_OP: u64 = 8;
    /// `(flags) -> 0`: set the guest's CR0.WP (`SET_PAGING_WP`) and EFER.NXE
    /// (`SET_PAGING_NX`); any other bit is `EINVAL`.
    pub const SET_PAGING: u64 = 9;
    /// The highest hypercall number.
    pub const MAX: u64 = 9;

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

/// Hypercall error results: negated Linux errno values.
pub mod errno {
    /// A guest address range lies outside RAM.
    pub const EFAULT: i64 = -14;
    /// An argument is malformed.
    pub const EINVAL: i64 = -22;
    /// No such hypercall.
    pub const ENOSYS: i64 = -38;
    /// The hypercall exists but not in this paging mode.
    pub const EOPNOTSUPP: i64 = -95;
}

/// `svm_boot_info.paging_mode`: KVM does the second level.
pub const PAGING_MODE_KVM: u32 = 0;
/// `svm_boot_info.paging_mode`: the VMM's shadow tables.
pub const PAGING_MODE_SHADOW: u32 = 1;

/// Kernel code selector (GDT entry 1).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector (GDT entry 2).
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (GDT entry 3, RPL 3).
pub const USER_DS: u16 = 0x1b;
/// User code selector (GDT entry 4, RPL 3).
pub const USER_CS: u16 = 0x23;
/// The TSS selector of vCPU 0; vCPU `n` uses `TSS_SEL_BASE + 16 * n`.
pub const TSS_SEL_BASE: u16 = 0x28;

/// Size of a page.
pub const PAGE_SIZE: u64 = 4096;
/// The GDT page.
pub const GDT_GPA: u64 = 0x1000;
/// The boot-info page (user-readable, read-only).
pub const BOOT_INFO_GPA: u64 = 0x2000;
/// The command line, NUL-terminated, in the boot-info page.
pub const CMDLINE_GPA: u64 = 0x2800;
/// Room for the command line, including its NUL.
pub const CMDLINE_MAX: usize = 2048;
/// The TSSes, `TSS_STRIDE` bytes apart.
pub const TSS_GPA: u64 = 0x4000;
/// Bytes per TSS slot.
pub const TSS_STRIDE: u64 = 256;
/// The boot PML4; the PDPT, the 4 KiB table for the first 2 MiB and the
/// page directories follow it.
pub const BOOT_PML4_GPA: u64 = 0x8000;
/// The per-vCPU areas (GS.base, stacks), `PERCPU_STRIDE` bytes apart.
pub const PERCPU_GPA: u64 = 0x10_0000;
/// Bytes per per-vCPU area.
pub const PERCPU_STRIDE: u64 = 0x8000;
/// Offset of the top of the IST1 stack in a per-vCPU area.
pub const PERCPU_IST_TOP: u64 = 0x2000;
/// Offset of the top of the TSS.RSP0 stack in a per-vCPU area.
pub const PERCPU_TRAP_TOP: u64 = 0x4000;
/// Offset of the top of the kernel stack (RSP at entry) in a per-vCPU area.
pub const PERCPU_KSTACK_TOP: u64 = 0x8000;
/// ELF segments must lie at or above this address; everything below it is
/// the VMM-built area, supervisor-only except the boot-info page.
pub const IMAGE_MIN_GPA: u64 = 0x20_0000;
/// The most vCPUs the layout has room for.
pub const MAX_VCPUS: u32 = 32;

/// gpa of vCPU `cpu`'s TSS.
pub fn tss_gpa(cpu: u32) -> u64 {
    TSS_GPA + u64::from(cpu) * TSS_STRIDE
}

/// gpa of vCPU `cpu`'s per-vCPU area.
pub fn percpu_gpa(cpu: u32) -> u64 {
    PERCPU_GPA + u64::from(cpu) * PERCPU_STRIDE
}

/// `svm_boot_info.magic`: "SVMB".
pub const BOOT_INFO_MAGIC: u32 = 0x424d_5653;
/// `svm_boot_info.version`.
pub const BOOT_INFO_VERSION: u32 = 1;

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
                .trim_end_matches('u')
                .trim_start_matches('(')
                .trim_end_matches(')');
            let parsed = if let Some(hex) = value.strip_prefix("0x") {
                i64::from_str_radix(hex.trim_end_matches('u'), 16).ok()
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
            ("SVM_SET_PAGING_WP", SET_PAGING_WP),
            ("SVM_SET_PAGING_NX", SET_PAGING_NX),
            ("SVM_HC_MAX", hc::MAX),
            ("SVM_PF_RETRY", PF_RETRY),
            ("SVM_PF_GUEST_FAULT", PF_GUEST_FAULT),
            ("SVM_HOST_OP_PING", HOST_OP_PING),
            ("SVM_HOST_OP_CHECKPOINT", HOST_OP_CHECKPOINT),
            ("SVM_HOST_OP_MAX", HOST_OP_MAX),
            ("SVM_GDT_GPA", GDT_GPA),
            ("SVM_BOOT_INFO_GPA", BOOT_INFO_GPA),
            ("SVM_CMDLINE_GPA", CMDLINE_GPA),
            ("SVM_TSS_GPA", TSS_GPA),
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
        expect("SVM_EFAULT", errno::EFAULT);
        expect("SVM_EINVAL", errno::EINVAL);
        expect("SVM_ENOSYS", errno::ENOSYS);
        expect("SVM_EOPNOTSUPP", errno::EOPNOTSUPP);
        expect("SVM_PAGING_KVM", PAGING_MODE_KVM.into());
        expect("SVM_PAGING_SHADOW", PAGING_MODE_SHADOW.into());
        expect("SVM_KERNEL_CS", KERNEL_CS.into());
        expect("SVM_KERNEL_DS", KERNEL_DS.into());
        expect("SVM_USER_DS", USER_DS.into());
        expect("SVM_USER_CS", USER_CS.into());
        expect("SVM_BOOT_INFO_MAGIC", BOOT_INFO_MAGIC.into());
        expect("SVM_BOOT_INFO_VERSION", BOOT_INFO_VERSION.into());
        expect("SVM_FLUSH_GLOBAL", FLUSH_GLOBAL as i64);
    }
}
