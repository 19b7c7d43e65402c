/*
 * entry.S - guest entry, the trap table, exception stubs, ring-3
 * entry/return and fault probes.
 *
 * The guest kernel runs in ring 1 (ABI v2), where every instruction is
 * emulated by our KVM backend, so the paths are short: the trap table is
 * built by the assembler (the stubs sit at a fixed address, see linker.ld),
 * not by a loop at boot.  The IDT itself is the VMM's (the switcher):
 * SET_TRAP_TABLE registers these stubs in it.
 */
#include <shadowvm.h>
#include "rt.h"

/* ---------------------------------------------------------------------- */
/* Entry: long mode, CPL1, rdi = boot info, rsi = vCPU index, rsp = kernel
 * stack top, GS.base = per-vCPU page, no exception handler registered yet
 * (rt_start registers them first).  Every vCPU starts here.                */
/* ---------------------------------------------------------------------- */
    .section .text.boot, "ax"
    .globl _start
_start:
    call rt_start
    jmp halt_forever

/* ---------------------------------------------------------------------- */
/* Exception stubs, RT_ISR_STRIDE bytes apart from RT_ISR_BASE.  The first */
/* instruction of each reloads SS: from ring 3 our backend delivers with   */
/* SS = 0 (not the architectural RPL-1 null selector), and a nested         */
/* exception's iretq would then fault.                                      */
/* ---------------------------------------------------------------------- */
/* Vectors for which the CPU pushes an error code. */
#define HAS_ERR(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

    .section .text.isr, "ax"
    .globl rt_isr_table
rt_isr_table:
    .set vec, 0
    .rept RT_NR_VECTORS
    .balign RT_ISR_STRIDE
    mov rt_kernel_ss(%rip), %ss
    .if HAS_ERR(vec) == 0
    pushq $0
    .endif
    pushq $vec
    jmp rt_isr_common
    .set vec, vec + 1
    .endr

    .text
rt_kernel_ss:
    .word SVM_KERNEL_DS
rt_isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call rt_trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp /* vector, error code */
    iretq

/* ---------------------------------------------------------------------- */
/* The trap table for SET_TRAP_TABLE (struct svm_trap_info): every         */
/* exception vector to its stub; NMI, #DF and #MC on IST1.                 */
/* ---------------------------------------------------------------------- */
    .section .rodata
    .balign 16
    .globl rt_trap_table
rt_trap_table:
    .set vec, 0
    .rept RT_NR_VECTORS
    .quad RT_ISR_BASE + vec * RT_ISR_STRIDE
    .byte vec
    .if vec == 2 || vec == 8 || vec == 18
    .byte 1
    .else
    .byte 0
    .endif
    .word 0
    .long 0
    .set vec, vec + 1
    .endr

/* ---------------------------------------------------------------------- */
/* Ring 3.                                                                 */
/* ---------------------------------------------------------------------- */
    .text
/* long rt_enter_user(long (*fn)(void *), void *arg, uint64_t ustack_top)
 * Saves the callee-saved registers and RSP in the per-vCPU page, then
 * iretq to rt_user_trampoline in ring 3.  Comes back through
 * rt_return_to_kernel(status), called by the trap handler. */
    .globl rt_enter_user
rt_enter_user:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %gs:RT_CPU_KSAVE_RSP
    pushq $SVM_USER_DS      /* ss */
    push %rdx               /* rsp */
    pushq $0x2              /* rflags: IF=0, IOPL=0 */
    pushq $SVM_USER_CS      /* cs */
    lea rt_user_trampoline(%rip), %rax
    push %rax               /* rip */
    mov %rdi, %rax
    mov %rsi, %rdi
    iretq

/* Ring 3: call fn(arg), then hand its value back to the kernel. */
rt_user_trampoline:
    call *%rax
    mov %rax, %rdi
    mov $RT_SYS_RETURN, %eax
    jmp rt_user_sys_ud2

/* long rt_user_syscall(long nr, long a0, long a1): ring 3 only. */
    .globl rt_user_syscall
rt_user_syscall:
    mov %rdi, %rax
    mov %rsi, %rdi
    mov %rdx, %rsi
    .globl rt_user_sys_ud2
rt_user_sys_ud2:
    ud2             /* the #UD handler recognises this address, then skips it */
    ret

/* void rt_return_to_kernel(long status): ring 1, on the trap stack.
 * Abandons the trap frame and returns `status` from rt_enter_user. */
    .globl rt_return_to_kernel
rt_return_to_kernel:
    mov %gs:RT_CPU_KSAVE_RSP, %rsp
    mov %rdi, %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

/* ---------------------------------------------------------------------- */
/* Fault probes (Linux's exception-table fixups).  On a fault the trap     */
/* handler jumps to the fixup with r8 = vector, rdx = error code,          */
/* rcx = cr2; r9 holds the caller's struct svm_fault pointer.              */
/* ---------------------------------------------------------------------- */
#define EX_ENTRY(insn, fixup) \
    .pushsection __ex_table, "a"; .balign 8; .quad insn, fixup; .popsection

/* long probe_read64(const volatile void *addr, uint64_t *out, struct svm_fault *f) */
    .globl probe_read64
probe_read64:
    mov %rdx, %r9
1:  mov (%rdi), %rax
    mov %rax, (%rsi)
    xor %eax, %eax
    ret
    EX_ENTRY(1b, rt_probe_fixup)

/* long probe_write64(volatile void *addr, uint64_t val, struct svm_fault *f) */
    .globl probe_write64
probe_write64:
    mov %rdx, %r9
1:  mov %rsi, (%rdi)
    xor %eax, %eax
    ret
    EX_ENTRY(1b, rt_probe_fixup)

/* long probe_exec(const volatile void *addr, struct svm_fault *f): calls
 * addr, which must hold a `ret`.  A fault on fetching addr is reported at
 * rip == addr, not at an instruction here, so __ex_table cannot name it:
 * the trap handler recognises the return address rt_probe_exec_ret on top
 * of the stack instead, pops it and enters rt_probe_fixup like a table entry. */
    .globl probe_exec
probe_exec:
    mov %rsi, %r9
    call *%rdi
    .globl rt_probe_exec_ret
rt_probe_exec_ret:
    xor %eax, %eax
    ret

    .globl rt_probe_fixup
rt_probe_fixup:
    test %r9, %r9
    jz 1f
    mov %r8, 0(%r9)
    mov %rdx, 8(%r9)
    mov %rcx, 16(%r9)
1:  mov $-1, %rax
    ret

/* hlt faults in ring 1: the HALT hypercall stops the vCPU instead. */
    .globl halt_forever
halt_forever:
    mov $SVM_HC_HALT, %eax
    outl %eax, $SVM_PORT_HYPERCALL
    jmp halt_forever

    .section .note.GNU-stack, "", @progbits
