/*
 * rt.h - internals shared by the runtime's C and assembly files.
 * Guests include <shadowvm.h>, never this.
 */
#ifndef RT_H
#define RT_H

/* Offsets in struct rt_cpu (the per-vCPU page that GS.base points at). */
#define RT_CPU_SELF        0   /* written by the VMM */
#define RT_CPU_ID          8   /* written by the VMM */
#define RT_CPU_KSAVE_RSP   16  /* kernel RSP saved by rt_enter_user */
#define RT_CPU_USTACK_TOP  24
#define RT_CPU_USER_VALUE  32
#define RT_CPU_USER_FAULT  40  /* struct svm_fault * of the current run_user */
#define RT_CPU_CR3         48  /* the guest's CR3 as last loaded through LOAD_CR3 */
#define RT_CPU_IN_CHECK    56  /* inside the handler_cpl_check probe */

/* Ring-3 -> ring-1 "system calls": ud2 at rt_user_sys_ud2, number in rax,
 * arguments in rdi, rsi, result in rax. */
#define RT_SYS_RETURN      1   /* (value): leave run_user() with RUN_USER_OK */
#define RT_SYS_WRITE       2   /* (buf, len) */
#define RT_SYS_EXIT        3   /* (code) */

#define RT_NR_VECTORS      32
#define RT_ISR_BASE        0x201000 /* linker.ld places .text.isr here */
#define RT_ISR_STRIDE      16

#ifndef __ASSEMBLER__
#include <shadowvm.h>

struct rt_cpu {
    struct rt_cpu *self;
    uint64_t id;
    uint64_t ksave_rsp;
    uint64_t ustack_top;
    uint64_t user_value;
    struct svm_fault *user_fault;
    uint64_t cr3;
    uint64_t in_cpl_check;
};

/* What rt_isr_common pushes, lowest address first. */
struct rt_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

static inline struct rt_cpu *this_cpu(void)
{
    struct rt_cpu *c;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(c));
    return c;
}

/* entry.S */
long rt_enter_user(long (*fn)(void *), void *arg, uint64_t ustack_top);
__attribute__((noreturn)) void rt_return_to_kernel(long status);
long rt_user_syscall(long nr, long a0, long a1);
extern char rt_user_sys_ud2[];
extern char rt_probe_exec_ret[], rt_probe_fixup[];
struct rt_extable { uint64_t insn, fixup; };
extern const struct rt_extable __start_ex_table[], __stop_ex_table[];
extern const struct svm_trap_info rt_trap_table[RT_NR_VECTORS];

/* trap.c */
void rt_trap(struct rt_frame *f);
/* console.c */
void rt_kernel_write(const char *buf, size_t len);

#endif /* __ASSEMBLER__ */
#endif /* RT_H */
