/* guest: ksm - in ring 3, fills pages=N (default 1024) with patterns=K (default 4) page patterns, waits wait_ms=M (default 300), verifies, breaks sharing in every other page, verifies again */
#include <shadowvm.h>

/*
 * Page i holds pattern i % K over its whole 4 KiB, so only K distinct page
 * contents exist: a host running KSM can merge the N pages into K frames.
 * After the wait (time for the host to merge) every byte is checked; then
 * one byte in every odd page is written (a COW break for a merged page) and
 * every byte of every page is checked again.  All loops run in ring 3.
 *
 * The wait is a ring-3 busy loop on rdtsc.  The guest has no clock: CPUID
 * leaves 15H/16H are used for the TSC rate when the host reports them (the
 * AMD hosts here report zeros), otherwise tsc_mhz=F (default 2500) is
 * assumed, so wait_ms is nominal.  wait_ms=0 skips the wait.  Timing never
 * appears in the output, which is the same in every paging mode.
 */

#define MAX_REPORTS 10

struct job {
    volatile uint64_t *base;
    uint64_t pages;
    uint64_t patterns;
    uint64_t wait_cycles;
    int broken; /* odd pages have their one modified byte */
    uint64_t errors;
    uint64_t reports;
};

static struct job job; /* in the image: user-accessible */



/* Word w (0..511) of a page with pattern p: depends on p and w only. */
static inline uint64_t pattern_word(uint64_t p, uint64_t w)
{
    uint64_t x = (p + 1) * 0x9e3779b97f4a7c15ull ^ (w * 0xbf58476d1ce4e5b9ull);

    x ^= x >> 31;
    return x * 0x94d049bb133111ebull;
}

/* The byte modified in odd page i, and the value written there. */
static inline uint64_t broken_offset(uint64_t i)
{
    return (i * 131 + 7) % PAGE_SIZE;
}

static inline uint64_t expected_word(const struct job *j, uint64_t i, uint64_t w)
{
    uint64_t v = pattern_word(i % j->patterns, w);

    if (j->broken && (i & 1)) {
        uint64_t off = broken_offset(i);

        if (off / 8 == w) {
            unsigned shift = (unsigned)(off % 8) * 8;

            v ^= 0xffull << shift; /* the byte's complement */
        }
    }
    return v;
}

/* Ring 3. */
static long fill(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->pages; i++) {
        volatile uint64_t *page = j->base + i * (PAGE_SIZE / 8);
        uint64_t p = i % j->patterns;

        for (uint64_t w = 0; w < PAGE_SIZE / 8; w++)
            page[w] = pattern_word(p, w);
    }
    return 0;
}

/* Ring 3. */
static long wait(void *arg)
{
    struct job *j = arg;
    uint64_t t0 = rdtsc();

    while (rdtsc() - t0 < j->wait_cycles)
        cpu_relax();
    return 0;
}

/* Ring 3: check every byte of every page. */
static long verify(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->pages; i++) {
        volatile uint64_t *page = j->base + i * (PAGE_SIZE / 8);

        for (uint64_t w = 0; w < PAGE_SIZE / 8; w++) {
            uint64_t want = expected_word(j, i, w), got = page[w];

            if (got == want)
                continue;
            for (unsigned b = 0; b < 8; b++) {
                uint8_t gb = (uint8_t)(got >> (8 * b)), wb = (uint8_t)(want >> (8 * b));

                if (gb == wb)
                    continue;
                j->errors++;
                if (j->reports++ < MAX_REPORTS)
                    printf("ksm: page %lu offset %lu: expected 0x%02x, got 0x%02x\n", i,
                           w * 8 + b, wb, gb);
            }
        }
    }
    return 0;
}

/* Ring 3: one byte in every odd page. */
static long break_sharing(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 1; i < j->pages; i += 2) {
        volatile uint8_t *page = (volatile uint8_t *)(j->base + i * (PAGE_SIZE / 8));
        uint64_t off = broken_offset(i);

        page[off] = (uint8_t)~page[off];
    }
    j->broken = 1;
    return 0;
}

static int user(long (*fn)(void *), const char *what)
{
    struct svm_fault fault;
    long ret;

    if (run_user(fn, &job, &ret, &fault) != RUN_USER_OK) {
        printf("ksm: %s: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", what,
               fault.vector, fault.error_code, fault.cr2);
        return 1;
    }
    return 0;
}

int main(const struct svm_boot_info *bi)
{
    uint64_t pages = cmdline_u64("pages", 1024);
    uint64_t patterns = cmdline_u64("patterns", 4);
    uint64_t wait_ms = cmdline_u64("wait_ms", 300);
    uint64_t mhz = cpuid_tsc_mhz();
    uint64_t before;

    if (!mhz)
        mhz = cmdline_u64("tsc_mhz", 2500);
    if (pages == 0 || patterns == 0) {
        puts("ksm: pages and patterns must be at least 1");
        return 2;
    }
    job.base = alloc_pages(pages);
    if (!job.base) {
        printf("ksm: cannot allocate %lu pages (free RAM: %lu KiB)\n", pages,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    job.pages = pages;
    job.patterns = patterns;
    job.wait_cycles = wait_ms * 1000 * mhz;
    if (user(fill, "fill"))
        return 1;
    printf("ksm: filled %lu pages with %lu patterns\n", pages, patterns);
    if (user(wait, "wait"))
        return 1;
    printf("ksm: waited %lu ms\n", wait_ms);
    if (user(verify, "verify"))
        return 1;
    printf("ksm: verify before writes: %lu errors\n", job.errors);
    if (user(break_sharing, "write"))
        return 1;
    printf("ksm: wrote 1 byte in %lu pages\n", pages / 2);
    before = job.errors;
    if (user(verify, "verify"))
        return 1;
    printf("ksm: verify after writes: %lu errors\n", job.errors - before);
    printf("ksm: %lu pages, %lu patterns, %lu errors\n", pages, patterns, job.errors);
    return job.errors ? 1 : 0;
}
