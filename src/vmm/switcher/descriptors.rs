//! The bytes of the switcher's descriptors (SDM vol. 3, 3.4.5 segment
//! descriptors, 6.14.1 64-bit IDT gates, 8.7 64-bit TSS, 20.5.2 the I/O
//! permission bitmap): pure functions, no memory.

use crate::vmm::abi::{self, PORT_EXIT, PORT_HYPERCALL, PORT_SERIAL, PORT_SERIAL_LEN};

/// Bytes of a 64-bit TSS without its I/O bitmap.
pub const TSS_SIZE: u64 = 104;
/// Ports the I/O bitmap covers; every higher port is past the TSS limit,
/// which denies it.
pub const IOMAP_PORTS: u64 = 0x400;
/// The TSS limit: the TSS, the bitmap and the all-ones byte the SDM asks
/// for after it (the CPU reads two bitmap bytes per access).
pub const TSS_LIMIT: u32 = (TSS_SIZE + IOMAP_PORTS / 8) as u32;
/// Descriptors before the TSS descriptors: null, kernel code, kernel data,
/// user data, user code.
pub const GDT_FIXED_ENTRIES: u64 = 5;

/// A code or data segment descriptor (8 bytes).
pub fn seg_desc(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((base >> 24) << 56)
}

/// The GDT's fixed entries. Every descriptor a guest can load has DPL 1 or
/// 3: there is no ring-0 segment, and no call gate. The Accessed bit is
/// set, so the CPU never writes the (read-only) GDT.
pub fn gdt_fixed_entries() -> [u64; GDT_FIXED_ENTRIES as usize] {
    [
        0,
        seg_desc(0, 0xfffff, 0xbb, 0xa), // kernel code: P, DPL1, exec/read/accessed; G, L
        seg_desc(0, 0xfffff, 0xb3, 0xc), // kernel data: P, DPL1, read/write/accessed; G, DB
        seg_desc(0, 0xfffff, 0xf3, 0xc), // user data: DPL3
        seg_desc(0, 0xfffff, 0xfb, 0xa), // user code: DPL3, L
    ]
}

/// A 64-bit TSS descriptor (16 bytes), busy as after `ltr`, DPL 0 (a
/// system descriptor: `ltr` is ring-0 only, and no segment register loads
/// it).
pub fn tss_desc(base: u64) -> [u64; 2] {
    [seg_desc(base as u32, TSS_LIMIT, 0x8b, 0), base >> 32]
}

/// The GDT for `nr_vcpus`: the fixed entries, then vCPU n's TSS descriptor
/// at selector `TSS_SEL_BASE + 16 * n`.
pub fn gdt(nr_vcpus: u32) -> Vec<u64> {
    let mut gdt = gdt_fixed_entries().to_vec();
    for cpu in 0..nr_vcpus {
        gdt.extend_from_slice(&tss_desc(abi::switcher_tss(cpu)));
    }
    gdt
}

/// The GDT's limit with `nr_vcpus` TSS descriptors.
pub fn gdt_limit(nr_vcpus: u32) -> u16 {
    // Fits: nr_vcpus <= MAX_VCPUS is checked before this is called.
    ((GDT_FIXED_ENTRIES * 8 + u64::from(nr_vcpus) * 16) - 1) as u16
}

/// A 64-bit interrupt gate to `handler` through the ring-1 code selector
/// *with RPL 1* (an RPL-0 selector makes the `kvm_pvm` backend run the
/// handler with ring-0 privilege: docs/design.md), DPL 0 (so `int n`
/// cannot use it from ring 1 or 3), on IST stack `ist`.
pub fn interrupt_gate(handler: u64, ist: u8) -> [u64; 2] {
    let attr: u64 = 0x80 | 0xe; // P, DPL 0, 64-bit interrupt gate
    [
        (handler & 0xffff)
            | (u64::from(abi::KERNEL_CS) << 16)
            | (u64::from(ist & 7) << 32)
            | (attr << 40)
            | (((handler >> 16) & 0xffff) << 48),
        handler >> 32,
    ]
}

/// Whether the I/O bitmap lets ring 1 (and ring 3) reach `port`: the UART,
/// the exit port, and the hypercall port with the three ports its `outl`
/// also covers.
pub fn port_allowed(port: u16) -> bool {
    let p = u64::from(port);
    let serial = u64::from(PORT_SERIAL)..u64::from(PORT_SERIAL + PORT_SERIAL_LEN);
    let hypercall = u64::from(PORT_HYPERCALL)..u64::from(PORT_HYPERCALL) + 4;
    p == u64::from(PORT_EXIT) || hypercall.contains(&p) || serial.contains(&p)
}

/// A TSS with no stacks set (the guest sets them with `SET_STACK`) and the
/// I/O bitmap: a clear bit lets the port through.
pub fn tss() -> Vec<u8> {
    let mut t = vec![0u8; TSS_LIMIT as usize + 1];
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // I/O map base
    let map = &mut t[TSS_SIZE as usize..];
    map.fill(0xff);
    for port in 0..IOMAP_PORTS as u16 {
        if port_allowed(port) {
            map[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    t
}

/// Offset in the TSS of the stack `SET_STACK` index `index` sets: 0 is
/// RSP0 (RSP1 too, see `Switcher::set_stack`), 1..=7 IST1..IST7.
pub fn tss_stack_offset(index: u64) -> Option<usize> {
    match index {
        0 => Some(4),
        1..=abi::IST_MAX => Some(36 + 8 * (index as usize - 1)),
        _ => None,
    }
}

/// Offset of RSP1 in the TSS.
pub const TSS_RSP1: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_descriptor_leads_to_ring_0() {
        for (i, d) in gdt(4).iter().enumerate().skip(1) {
            let access = (d >> 40) & 0xff;
            let system = access & 0x10 == 0;
            let dpl = (access >> 5) & 3;
            // Only the TSS descriptors (and their upper halves) are DPL 0,
            // and they are system descriptors no segment register loads.
            if dpl == 0 {
                assert!(i >= 5, "entry {i} is a DPL-0 segment");
                assert!(system);
                if (i - 5) % 2 == 0 {
                    assert_eq!(access & 0xf, 0xb, "entry {i}: busy 64-bit TSS, not a gate");
                }
            } else {
                assert!(
                    !system,
                    "entry {i}: a system descriptor (gate) with DPL {dpl}"
                );
                assert_eq!(access & 1, 1, "entry {i}: Accessed preset");
            }
        }
        assert_eq!(gdt(1)[1], 0x00af_bb00_0000_ffff);
        assert_eq!(gdt(1)[2], 0x00cf_b300_0000_ffff);
        assert_eq!(gdt_limit(2), 5 * 8 + 2 * 16 - 1);
    }

    #[test]
    fn gates_use_the_rpl1_selector() {
        let [lo, hi] = interrupt_gate(0x1234_5678_9abc_def0, 3);
        assert_eq!((lo >> 16) & 0xffff, 0x09);
        assert_eq!((lo >> 32) & 7, 3);
        assert_eq!((lo >> 40) & 0xff, 0x8e);
        assert_eq!(
            (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32),
            0x1234_5678_9abc_def0
        );
    }

    #[test]
    fn io_bitmap_allows_only_the_devices() {
        let t = tss();
        assert_eq!(t.len(), TSS_LIMIT as usize + 1);
        assert_eq!(*t.last().unwrap(), 0xff, "the all-ones byte after the map");
        let allowed =
            |port: u16| t[TSS_SIZE as usize + usize::from(port / 8)] & (1 << (port % 8)) == 0;
        let open: Vec<u16> = (0..IOMAP_PORTS as u16).filter(|&p| allowed(p)).collect();
        assert_eq!(
            open,
            [
                0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe,
                0x3ff
            ]
        );
        assert_eq!(tss_stack_offset(0), Some(4));
        assert_eq!(tss_stack_offset(1), Some(36));
        assert_eq!(tss_stack_offset(7), Some(84));
        assert_eq!(tss_stack_offset(8), None);
    }
}
