/*
 * trap.c - the one C exception handler, ring-3 system calls, run_user(),
 * registering handlers and stacks.
 *
 * #PF: ask the VMM first (SVM_HC_RESOLVE_PF, which also returns CR2: ring 1
 * cannot read it).  "Retry" means the VMM fixed its tables and the access
 * can simply run again; "guest fault" hands back the architectural error
 * code, and the fault is the guest's own: a probe's fixup, the end of a
 * run_user() call, or a panic.
 */
#include "rt.h"

volatile bool handler_cpl_check;
volatile uint64_t handler_cpl_ok[RT_NR_VECTORS], handler_cpl_bad[RT_NR_VECTORS];

/* A privileged instruction: in ring 1 it raises #GP, which the probe turns
 * into -1; 0 means it ran, so the handler was in ring 0. */
SVM_PROBE_INSN(rt_probe_mov_cr0, "mov %cr0, %rax");

/* handler_cpl_check: prove this handler runs in ring 1.  The probe's #GP
 * enters rt_trap again, with in_cpl_check set so it does not recurse. */
static void check_cpl(uint64_t vector)
{
    struct rt_cpu *c = this_cpu();
    struct svm_fault f;

    if (!handler_cpl_check || c->in_cpl_check || vector >= RT_NR_VECTORS)
        return;
    c->in_cpl_check = 1;
    if (rt_probe_mov_cr0(0, &f) == -1 && f.vector == 13)
        __atomic_fetch_add(&handler_cpl_ok[vector], 1, __ATOMIC_RELAXED);
    else
        __atomic_fetch_add(&handler_cpl_bad[vector], 1, __ATOMIC_RELAXED);
    c->in_cpl_check = 0;
}

static const char *const vector_names[RT_NR_VECTORS] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)",
    "#TS", "#NP", "#SS", "#GP", "#PF", "(15)", "#MF", "#AC", "#MC", "#XM",
    "#VE", "#CP", "(22)", "(23)", "(24)", "(25)", "(26)", "(27)", "(28)", "(29)",
    "(30)", "(31)",
};

static bool user_range_ok(uint64_t p, uint64_t len)
{
    return len <= 4096 && p >= svm_boot->user_start && p + len >= p && p + len <= svm_boot->user_end;
}

static void rt_syscall(struct rt_frame *f)
{
    f->rip += 2; /* skip the ud2 */
    switch (f->rax) {
    case RT_SYS_RETURN:
        this_cpu()->user_value = f->rdi;
        rt_return_to_kernel(RUN_USER_OK);
    case RT_SYS_WRITE:
        if (!user_range_ok(f->rdi, f->rsi)) {
            f->rax = (uint64_t)SVM_EFAULT;
            return;
        }
        rt_kernel_write((const char *)f->rdi, f->rsi);
        f->rax = f->rsi;
        return;
    case RT_SYS_EXIT:
        exit((int)f->rdi);
    default:
        f->rax = (uint64_t)SVM_ENOSYS;
    }
}

static void dump_and_die(struct rt_frame *f, uint64_t cr2)
{
    printf("panic: unexpected %s (vector %lu) error_code=0x%lx in ring %lu on vCPU %u\n"
           "  rip=%lx cs=%lx rflags=%lx rsp=%lx ss=%lx cr2=%lx cr3=%lx\n"
           "  rax=%lx rbx=%lx rcx=%lx rdx=%lx rsi=%lx rdi=%lx rbp=%lx\n",
           vector_names[f->vector % RT_NR_VECTORS], f->vector, f->error_code, f->cs & 3,
           cpu_id(), f->rip, f->cs, f->rflags, f->rsp, f->ss, cr2, this_cpu()->cr3, f->rax,
           f->rbx, f->rcx, f->rdx, f->rsi, f->rdi, f->rbp);
    exit(SVM_EXIT_PANIC);
}

void rt_trap(struct rt_frame *f)
{
    bool from_user = (f->cs & 3) == 3;
    uint64_t cr2 = 0;

    check_cpl(f->vector);
    switch (f->vector) {
    case 14: {
        struct svm_hc_result r;

        r = svm_hypercall(SVM_HC_RESOLVE_PF, (long)f->error_code, (long)f->rflags, (long)f->rip, 0);
        if (r.rax == SVM_PF_RETRY)
            return;
        if (r.rax != SVM_PF_GUEST_FAULT)
            panic("RESOLVE_PF(%lx) failed: %ld", f->error_code, r.rax);
        f->error_code = (uint64_t)r.rdx;
        cr2 = (uint64_t)r.rsi;
        break;
    }
    case 6:
        if (from_user && f->rip == (uint64_t)rt_user_sys_ud2) {
            rt_syscall(f);
            return;
        }
        break;
    case 2:
        printf("NMI on vCPU %u\n", cpu_id());
        return;
    case 8:
        dump_and_die(f, cr2);
    }

    /* The guest's own fault. A probe? (Linux's fixup_exception) */
    for (const struct rt_extable *e = __start_ex_table; e < __stop_ex_table; e++) {
        if (e->insn == f->rip) {
            f->r8 = f->vector;
            f->rdx = f->error_code;
            f->rcx = cr2;
            f->rip = e->fixup;
            return;
        }
    }
    /* A probe_exec() whose fetch of its target faulted: the fault is at the
     * target itself (rip == cr2), with the call's return address on top of
     * the stack.  Pop it and take the probes' fixup. */
    if (f->vector == 14 && f->rip == cr2 && (!from_user || user_range_ok(f->rsp, 8)) &&
        *(const uint64_t *)f->rsp == (uint64_t)rt_probe_exec_ret) {
        f->rsp += 8;
        f->r8 = f->vector;
        f->rdx = f->error_code;
        f->rcx = cr2;
        f->rip = (uint64_t)rt_probe_fixup;
        return;
    }
    /* Ring 3 inside run_user(): end it, like a signal ends a process. */
    if (from_user && this_cpu()->ksave_rsp) {
        struct svm_fault *fault = this_cpu()->user_fault;

        if (fault) {
            fault->vector = f->vector;
            fault->error_code = f->error_code;
            fault->cr2 = cr2;
        }
        rt_return_to_kernel(RUN_USER_FAULT);
    }
    dump_and_die(f, cr2);
}

int run_user(long (*fn)(void *), void *arg, long *ret, struct svm_fault *fault)
{
    struct rt_cpu *c = this_cpu();
    long status;

    if (!c->ustack_top) {
        char *stack = alloc_pages(16);

        if (!stack)
            panic("run_user: no memory for a user stack");
        c->ustack_top = (uint64_t)stack + 16 * PAGE_SIZE;
    }
    c->user_fault = fault;
    status = rt_enter_user(fn, arg, c->ustack_top);
    c->ksave_rsp = 0;
    if (status == RUN_USER_OK && ret)
        *ret = (long)c->user_value;
    return (int)status;
}

long set_trap(unsigned vector, uint64_t handler, unsigned ist)
{
    static struct svm_trap_info t[SVM_MAX_VCPUS]; /* one per vCPU: any may call */
    struct svm_trap_info *e = &t[cpu_id() % SVM_MAX_VCPUS];

    *e = (struct svm_trap_info){ .handler = handler, .vector = (uint8_t)vector, .ist = (uint8_t)ist };
    return svm_hypercall(SVM_HC_SET_TRAP_TABLE, (long)e, 1, 0, 0).rax;
}

uint64_t rt_trap_stub(unsigned vector)
{
    return vector < RT_NR_VECTORS ? RT_ISR_BASE + vector * RT_ISR_STRIDE : 0;
}

long set_stack(unsigned index, uint64_t rsp)
{
    return svm_hypercall(SVM_HC_SET_STACK, index, (long)rsp, 0, 0).rax;
}
