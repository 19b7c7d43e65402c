//! The long-mode register state each vCPU starts with: what KVM_SET_SREGS
//! and KVM_SET_REGS get at creation (values measured on the `kvm_pvm`
//! backend, docs/design.md). The guest starts in ring 1, with the
//! switcher's GDT, IDT and TSS loaded.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::vmm::abi::{self, percpu_gpa};
use crate::vmm::switcher::descriptors::{TSS_LIMIT, gdt_limit};

/// CR0: PE | MP | ET | NE | WP | AM | PG.
pub const CR0_BOOT: u64 = 0x8005_0033;
/// CR4: PAE | PGE | OSFXSR | OSXMMEXCPT.
pub const CR4_BOOT: u64 = 0x6a0;
/// EFER: LME | LMA | NXE. SCE is clear: `syscall` would enter ring 0 at
/// LSTAR whatever the GDT says (and crashes this backend's emulator from
/// ring 1), so it must raise #UD.
pub const EFER_BOOT: u64 = 0xd00;
/// RFLAGS at entry: only the reserved bit 1.
pub const RFLAGS_BOOT: u64 = 0x2;

fn segment(selector: u16, type_: u8, dpl: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for vCPU `cpu`, starting from the values
/// KVM_GET_SREGS returned (get, modify, set: SET_SREGS also writes
/// `apic_base` and the interrupt bitmap, which we keep). CPL 1: CS and SS
/// are the ring-1 selectors; GDTR, IDTR and TR point into the switcher.
pub fn vcpu_sregs(mut sregs: kvm_sregs, cpu: u32, nr_vcpus: u32) -> kvm_sregs {
    let ring = abi::KERNEL_RPL as u8;
    sregs.cs = segment(abi::KERNEL_CS, 0xb, ring, true);
    sregs.ss = segment(abi::KERNEL_DS, 0x3, ring, false);
    // DS/ES/FS/GS hold the DPL3 data selector: valid in both rings, so
    // iretq to ring 3 does not null them (and GS.base survives).
    let user_data = segment(abi::USER_DS, 0x3, 3, false);
    sregs.ds = user_data;
    sregs.es = user_data;
    sregs.fs = user_data;
    sregs.gs = kvm_segment {
        base: percpu_gpa(cpu),
        ..user_data
    };
    sregs.tr = kvm_segment {
        base: abi::switcher_tss(cpu),
        limit: TSS_LIMIT,
        selector: abi::TSS_SEL_BASE + 16 * cpu as u16,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = abi::switcher_gdt();
    sregs.gdt.limit = gdt_limit(nr_vcpus);
    // No gate is present until the guest registers its handlers.
    sregs.idt.base = abi::switcher_idt(cpu);
    sregs.idt.limit = (abi::IDT_ENTRIES * 16 - 1) as u16;
    sregs.cr0 = CR0_BOOT;
    sregs.cr3 = abi::BOOT_PML4_GPA;
    sregs.cr4 = CR4_BOOT;
    sregs.efer = EFER_BOOT;
    sregs
}

/// General registers at entry: `rip` = ELF entry, `rsp` = top of the
/// vCPU's kernel stack, `rdi` = boot info, `rsi` = vCPU index.
pub fn vcpu_regs(entry: u64, cpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: percpu_gpa(cpu) + abi::PERCPU_KSTACK_TOP,
        rdi: abi::BOOT_INFO_GPA,
        rsi: u64::from(cpu),
        rflags: RFLAGS_BOOT,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_sregs() {
        let sregs = vcpu_sregs(kvm_sregs::default(), 1, 2);
        assert_eq!(sregs.gdt.limit, 5 * 8 + 2 * 16 - 1);
        assert_eq!(sregs.tr.selector, 0x38);
        assert_eq!(sregs.gs.base, percpu_gpa(1));
        assert_eq!(sregs.cs.l, 1);
        assert_eq!((sregs.cs.selector, sregs.cs.dpl), (0x09, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.dpl), (0x11, 1));
        assert_eq!(sregs.idt.base, abi::switcher_idt(1));
        assert_eq!(sregs.tr.base, abi::switcher_tss(1));
        assert_eq!(sregs.efer & 1, 0, "EFER.SCE clear");
    }

    #[test]
    fn entry_regs() {
        let r = vcpu_regs(0x20_0000, 3);
        assert_eq!(r.rip, 0x20_0000);
        assert_eq!(r.rsp, percpu_gpa(3) + abi::PERCPU_KSTACK_TOP);
        assert_eq!(r.rsi, 3);
        assert_eq!(r.rdi, abi::BOOT_INFO_GPA);
        assert_eq!(r.rsp % 16, 0);
    }
}
