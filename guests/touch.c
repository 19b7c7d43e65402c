/* guest: touch - in ring 3, times the first touch and a re-touch of pages=N (default 1024) with rdtsc; chunk=K balloons them back K pages per call */
#include <shadowvm.h>

/*
 * The per-page cost of a demand fault (first touch) and of a mapped access
 * (re-touch), measured in ring 3 where rdtsc and the stores run natively, in
 * TSC cycles: shadow mode / kvm mode ratios need no TSC frequency.  With
 * chunk=K (K > 0) the pages are then ballooned back K at a time from ring 1,
 * so every call makes the VMM flush K frames (the TLB-shootdown cost, read
 * from --json).  Other vCPUs spin in ring 3 on a page of their own meanwhile,
 * so a shootdown has a running vCPU to reach.  Used by scripts/bench.sh.
 */

struct job {
    volatile uint8_t *base;
    uint64_t pages;
    uint64_t cycles;
};

static struct job job; /* in the image: user-accessible */
static volatile uint64_t done;


/* Ring 3: one store per page, timed. */
static long touch_pass(void *arg)
{
    struct job *j = arg;
    uint64_t t0 = rdtsc();

    for (uint64_t i = 0; i < j->pages; i++)
        j->base[i * PAGE_SIZE] = (uint8_t)(i + 1);
    j->cycles = rdtsc() - t0;
    return 0;
}

/* Ring 3 on the other vCPUs: keep running in the guest until main is done. */
static long spin(void *arg)
{
    volatile uint64_t *p = arg;

    while (!done)
        p[0]++;
    return 0;
}

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    uint64_t *page = alloc_pages(1);

    (void)bi;
    (void)cpu;
    if (page)
        run_user(spin, page, NULL, NULL);
    halt_forever();
}

static int pass(const char *what)
{
    struct svm_fault fault;
    long ret;

    if (run_user(touch_pass, &job, &ret, &fault) != RUN_USER_OK) {
        printf("touch: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", fault.vector,
               fault.error_code, fault.cr2);
        return 1;
    }
    printf("touch: %s %lu pages %lu cycles %lu cycles/page\n", what, job.pages, job.cycles,
           job.cycles / job.pages);
    return 0;
}

int main(const struct svm_boot_info *bi)
{
    uint64_t pages = cmdline_u64("pages", 1024);
    uint64_t chunk = cmdline_u64("chunk", 0);
    void *base;

    if (pages == 0) {
        puts("touch: pages must be at least 1");
        return 2;
    }
    base = alloc_pages(pages);
    if (!base) {
        printf("touch: cannot allocate %lu pages (free RAM: %lu KiB)\n", pages,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    job.base = base;
    job.pages = pages;
    printf("touch: %u vCPUs, %lu pages at %p\n", nr_cpus(), pages, base);
    if (pass("first") || pass("retouch"))
        return 1;
    {
        /* The bare hypercall round trip from ring 1 (emulated), for scale. */
        uint64_t t0 = rdtsc();

        for (int i = 0; i < 64; i++)
            host_op(SVM_HOST_OP_PING, i, 0);
        printf("touch: ping 64 calls %lu cycles/call\n", (rdtsc() - t0) / 64);
    }
    if (chunk) {
        uint64_t calls = 0, t0 = rdtsc();

        for (uint64_t i = 0; i < pages; i += chunk, calls++) {
            uint64_t n = pages - i < chunk ? pages - i : chunk;
            long r = balloon((uint64_t)base + i * PAGE_SIZE, n);

            if (r < 0) {
                printf("touch: balloon failed (%ld)\n", r);
                return 1;
            }
        }
        printf("touch: balloon %lu calls of %lu pages %lu cycles/call\n", calls, chunk,
               (rdtsc() - t0) / calls);
    }
    done = 1;
    return 0;
}
