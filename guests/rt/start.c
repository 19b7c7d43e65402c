/*
 * start.c - C entry on every vCPU, exit, panic, the page allocator.
 */
#include "rt.h"

const struct svm_boot_info *svm_boot;
/* Next free gpa; 0 until the first vCPU through rt_start sets it. */
static volatile uint64_t alloc_next;

void rt_start(const struct svm_boot_info *bi, uint64_t cpu);

void rt_start(const struct svm_boot_info *bi, uint64_t cpu)
{
    uint64_t area = bi->percpu_base + cpu * bi->percpu_stride, unset = 0;

    /* Handlers and stacks first: until then any exception stops the VM. */
    svm_hypercall(SVM_HC_SET_TRAP_TABLE, (long)rt_trap_table, RT_NR_VECTORS, 0, 0);
    svm_hypercall(SVM_HC_SET_STACK, 0, (long)(area + SVM_PERCPU_TRAP), 0, 0);
    svm_hypercall(SVM_HC_SET_STACK, 1, (long)(area + SVM_PERCPU_IST), 0, 0);
    svm_boot = bi;
    __atomic_compare_exchange_n(&alloc_next, &unset, bi->free_start, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    this_cpu()->cr3 = bi->boot_cr3;
    if (bi->magic != SVM_BOOT_INFO_MAGIC)
        exit(SVM_EXIT_PANIC);
    if (cpu == 0)
        exit(main(bi));
    ap_main(bi, (unsigned)cpu);
    halt_forever();
}

/* The default for guests that do not use the other vCPUs: they halt. */
__attribute__((weak)) void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    (void)bi;
    (void)cpu;
}

void exit(int code)
{
    if (in_user_mode())
        rt_user_syscall(RT_SYS_EXIT, code, 0);
    svm_hypercall(SVM_HC_EXIT, code, 0, 0, 0);
    halt_forever();
}

void panic(const char *fmt, ...)
{
    va_list ap;

    rt_write("panic: ", 7);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    rt_write("\n", 1);
    exit(SVM_EXIT_PANIC);
}

unsigned cpu_id(void)
{
    return (unsigned)this_cpu()->id;
}

unsigned nr_cpus(void)
{
    return svm_boot->nr_vcpus;
}

void *alloc_pages(size_t nr_pages)
{
    uint64_t bytes = (uint64_t)nr_pages * PAGE_SIZE;
    uint64_t p;

    if (nr_pages == 0 || bytes / PAGE_SIZE != nr_pages)
        return NULL;
    p = __atomic_fetch_add(&alloc_next, bytes, __ATOMIC_SEQ_CST);
    if (p + bytes < p || p + bytes > svm_boot->free_end)
        return NULL;
    return (void *)p;
}

void *alloc_pages_populated(size_t nr_pages, long *populated)
{
    void *p = alloc_pages(nr_pages);
    long r = SVM_ENOSYS;

    if (p) {
        uint64_t len = (uint64_t)nr_pages * PAGE_SIZE;

        pt_mark_accessed((uint64_t *)read_cr3(), (uint64_t)p, len, true);
        r = populate((uint64_t)p, len, NULL);
    }
    if (populated)
        *populated = r;
    return p;
}
