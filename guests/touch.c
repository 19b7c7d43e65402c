/* guest: touch - in ring 3, times the first touch and a re-touch of pages=N (default 1024) with rdtsc; pt4k=1 through 4 KiB guest pages, populate=1 populates first, stride=S touches every S-th page, align=A aligns the buffer, chunk=K balloons them back K pages per call */
#include <shadowvm.h>

/*
 * The per-page cost of a demand fault (first touch) and of a mapped access
 * (re-touch), measured in ring 3 where rdtsc and the stores run natively, in
 * TSC cycles: shadow mode / kvm mode ratios need no TSC frequency.
 *
 * Options (command line):
 *   pages=N     pages touched (default 1024)
 *   stride=S    touch every S-th page of a buffer of N*S pages (default 1):
 *               a sparse toucher, to show what fault-around costs in memory
 *   pt4k=1      touch through 4 KiB guest pages: the buffer is mapped again
 *               at WIN, page by page, in tables of our own (built in ring 3,
 *               where the tables in free RAM are writable and the stores
 *               run natively), loaded with LOAD_CR3; otherwise the boot
 *               identity map's 2 MiB pages
 *   ad=0        with pt4k=1: build the PTEs without Accessed and Dirty (the
 *               default sets them, as Linux's kernel mappings do, so that
 *               the shadow MMU may prefetch and POPULATE may map them)
 *   populate=1  POPULATE the buffer before the first touch, timed on its
 *               own in cycles per page (identity map: what the runtime's
 *               alloc_pages_populated does, pt_mark_accessed, a no-op on
 *               the boot map, then populate(); pt4k: populate() of the
 *               alias)
 *   align=A     start the buffer at a multiple of A bytes (default 4K; 2M
 *               keeps it out of the image's 2 MiB, which shadow mode mlocks
 *               and so never backs with a huge page)
 *   chunk=K     then balloon the pages back K at a time from ring 1, so
 *               every call makes the VMM flush K frames (the TLB-shootdown
 *               cost, read from --json)
 *
 * Other vCPUs spin in ring 3 on a page of their own meanwhile, so a
 * shootdown has a running vCPU to reach.  Used by scripts/bench.sh.
 */

#define WIN 0x8000000000ull /* PML4 slot 1: not mapped by the boot tables */

struct job {
    volatile uint8_t *base;
    uint64_t pages, stride;
    uint64_t cycles;
    /* pt4k: map base_pa (pages * stride pages) at WIN in pml4. */
    uint64_t *pml4;
    uint64_t base_pa, flags;
    long failed;
};

static struct job job; /* in the image: user-accessible */
static volatile uint64_t done;

/* Ring 3: one store per page, timed. */
static long touch_pass(void *arg)
{
    struct job *j = arg;
    uint64_t step = j->stride * PAGE_SIZE;
    uint64_t t0 = rdtsc();

    for (uint64_t i = 0; i < j->pages; i++)
        j->base[i * step] = (uint8_t)(i + 1);
    j->cycles = rdtsc() - t0;
    return 0;
}

/* Ring 3: the 4 KiB alias mapping (tables from free RAM, user-writable). */
static long build_alias(void *arg)
{
    struct job *j = arg;
    uint64_t span = j->pages * j->stride;

    for (uint64_t i = 0; i < span; i++)
        if (pt_map(j->pml4, WIN + i * PAGE_SIZE, j->base_pa + i * PAGE_SIZE, j->flags)) {
            j->failed = 1;
            return 0;
        }
    if (j->flags & PTE_A)
        pt_mark_accessed(j->pml4, WIN, span * PAGE_SIZE, true);
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

static int user(long (*fn)(void *), const char *what)
{
    struct svm_fault fault;
    long ret;

    if (run_user(fn, &job, &ret, &fault) != RUN_USER_OK) {
        printf("touch: %s: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", what, fault.vector,
               fault.error_code, fault.cr2);
        return 1;
    }
    return 0;
}

static int pass(const char *what)
{
    if (user(touch_pass, what))
        return 1;
    printf("touch: %s %lu pages %lu cycles %lu cycles/page\n", what, job.pages, job.cycles,
           job.cycles / job.pages);
    return 0;
}

static void report_populate(uint64_t cycles, long r, uint64_t skipped)
{
    if (r < 0)
        printf("touch: populate %lu pages failed (%ld)\n", job.pages * job.stride, r);
    else
        printf("touch: populate %lu pages %lu cycles %lu cycles/page (%ld populated, %lu skipped)\n",
               job.pages * job.stride, cycles, cycles / (job.pages * job.stride), r, skipped);
}

int main(const struct svm_boot_info *bi)
{
    uint64_t pages = cmdline_u64("pages", 1024);
    uint64_t stride = cmdline_u64("stride", 1);
    uint64_t chunk = cmdline_u64("chunk", 0);
    bool pt4k = cmdline_u64("pt4k", 0) != 0;
    bool ad = cmdline_u64("ad", 1) != 0;
    bool pop = cmdline_u64("populate", 0) != 0;
    uint64_t align = cmdline_u64("align", PAGE_SIZE);
    uint64_t span, t0;
    long pop_rc = 0;
    uint64_t skipped = 0;
    uint8_t *base;

    if (pages == 0 || stride == 0 || pages * stride / stride != pages) {
        puts("touch: pages and stride must be at least 1");
        return 2;
    }
    if (align < PAGE_SIZE || (align & (align - 1)) || align > (1ull << 30)) {
        puts("touch: align must be a power of two from 4K to 1G");
        return 2;
    }
    span = pages * stride;
    base = alloc_pages(span + align / PAGE_SIZE - 1);
    if (!base) {
        printf("touch: cannot allocate %lu pages (free RAM: %lu KiB)\n", span,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    base = (uint8_t *)(((uint64_t)base + align - 1) & ~(align - 1));
    job.base = base;
    job.pages = pages;
    job.stride = stride;
    printf("touch: %u vCPUs, %lu pages at %p, stride %lu, %s guest pages%s\n", nr_cpus(), pages, base,
           stride, pt4k ? "4 KiB" : "2 MiB", pt4k && !ad ? " without A/D" : "");
    if (pop && !pt4k) {
        /* What alloc_pages_populated does (the boot map has A|D already,
         * so the marking writes nothing). */
        t0 = rdtsc();
        pt_mark_accessed((uint64_t *)read_cr3(), (uint64_t)base, span * PAGE_SIZE, true);
        pop_rc = populate((uint64_t)base, span * PAGE_SIZE, &skipped);
        report_populate(rdtsc() - t0, pop_rc, skipped);
    }
    if (pt4k) {
        job.pml4 = pt_new_root();
        job.base_pa = (uint64_t)base;
        job.flags = PTE_P | PTE_W | PTE_U | (ad ? PTE_A | PTE_D : 0);
        if (!job.pml4 || user(build_alias, "building the 4 KiB mapping") || job.failed) {
            puts("touch: cannot build the 4 KiB mapping (out of memory)");
            return 2;
        }
        load_cr3((uint64_t)job.pml4);
        job.base = (volatile uint8_t *)WIN;
        if (pop) {
            t0 = rdtsc();
            pop_rc = populate(WIN, span * PAGE_SIZE, &skipped);
            report_populate(rdtsc() - t0, pop_rc, skipped);
        }
    }
    if (pass("first") || pass("retouch"))
        return 1;
    {
        /* The bare hypercall round trip from ring 1 (emulated), for scale. */
        t0 = rdtsc();
        for (int i = 0; i < 64; i++)
            host_op(SVM_HOST_OP_PING, i, 0);
        printf("touch: ping 64 calls %lu cycles/call\n", (rdtsc() - t0) / 64);
    }
    if (chunk) {
        uint64_t calls = 0;

        t0 = rdtsc();
        for (uint64_t i = 0; i < span; i += chunk, calls++) {
            uint64_t n = span - i < chunk ? span - i : chunk;
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
