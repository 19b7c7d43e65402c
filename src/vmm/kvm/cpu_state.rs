//! A vCPU's registers, captured for error reports.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};

/// General and special registers of one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuState {
    /// KVM_GET_REGS.
    pub regs: kvm_regs,
    /// KVM_GET_SREGS.
    pub sregs: kvm_sregs,
}

impl CpuState {
    /// The current privilege level (CS.DPL in long mode).
    pub fn cpl(&self) -> u8 {
        self.sregs.cs.dpl
    }
}

impl fmt::Display for CpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        writeln!(
            f,
            "  rip={:016x} rsp={:016x} rflags={:08x} cs={:04x} ss={:04x} cpl={}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector,
            s.ss.selector,
            self.cpl()
        )?;
        writeln!(
            f,
            "  rax={:016x} rbx={:016x} rcx={:016x} rdx={:016x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(
            f,
            "  rsi={:016x} rdi={:016x} rbp={:016x} r8 ={:016x}",
            r.rsi, r.rdi, r.rbp, r.r8
        )?;
        writeln!(
            f,
            "  r9 ={:016x} r10={:016x} r11={:016x} r12={:016x}",
            r.r9, r.r10, r.r11, r.r12
        )?;
        writeln!(
            f,
            "  r13={:016x} r14={:016x} r15={:016x}",
            r.r13, r.r14, r.r15
        )?;
        writeln!(
            f,
            "  cr0={:016x} cr2={:016x} cr3={:016x} cr4={:016x}",
            s.cr0, s.cr2, s.cr3, s.cr4
        )?;
        write!(
            f,
            "  efer={:x} gdt={:x}/{:x} idt={:x}/{:x} tr={:04x} gs.base={:x}",
            s.efer, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit, s.tr.selector, s.gs.base
        )
    }
}
