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
 * the fault; returns 3 after a fault. */
static int counter(unsigned cpu)
{
    uint64_t *page = alloc_pages(1);
    struct svm_fault f;

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
