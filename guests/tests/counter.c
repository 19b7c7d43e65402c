/* guest: test guest: every vCPU counts forever in ring 3 on a page of its own (for the stale-shadow test) */
#include <shadowvm.h>

static long count(void *arg)
{
    volatile uint64_t *p = arg;

    for (;;)
        p[0]++;
    return 0;
}

/* Prints "counter N at ADDR", counts until a fault ends it, then reports
 * the fault; returns 3 after a fault.  The page is a fresh one, or with
 * at=GPA on the command line the page at GPA + N * 4 KiB (identity-mapped
 * RAM; the demo of a split huge page puts it in a 2 MiB page of its own). */
static int counter(unsigned cpu)
{
    uint64_t at = cmdline_u64("at", 0);
    uint64_t *page = at ? (uint64_t *)(at + cpu * PAGE_SIZE) : alloc_pages(1);
    struct svm_fault f;

    if (at)
        ((volatile uint64_t *)page)[1] = 1; /* first touch a write: a huge page may back it */

    printf("counter %u at %lx\n", cpu, (uint64_t)page);
    if (run_user(count, page, NULL, &f) == RUN_USER_FAULT) {
        printf("counter %u: fault vector %lu error_code %lx cr2 %lx\n", cpu, f.vector,
               f.error_code, f.cr2);
        return 3;
    }
    return 0;
}

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    (void)bi;
    counter(cpu);
}

int main(const struct svm_boot_info *bi)
{
    (void)bi;
    return counter(0);
}
