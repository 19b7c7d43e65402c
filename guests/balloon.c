/* guest: balloon - writes pages=N (default 512) pages in ring 3, balloons every other chunk=K (default 16) pages back, checks zeros and survivors, reuses them, and checks that invalid BALLOON calls fail */
#include <shadowvm.h>

/*
 * BALLOON (docs/guest-abi.md §6) is a hypercall, so ring 1; all the
 * reading and writing runs in ring 3.  Chunks 0, 2, 4, ... of K pages are
 * ballooned (one call each), so every ballooned range sits between pages
 * that must keep their contents.  Then the invalid calls, each of which
 * must return -22 EINVAL (the BALLOON row of the ABI table):
 * an unaligned gpa, a range past the end of RAM, zero pages, a range below
 * 2 MiB (kernel data: GDT, boot tables, stacks) and a page count so large
 * that gpa + count * 4K wraps around.
 */

#define MAX_REPORTS 10

struct job {
    volatile uint64_t *base;
    uint64_t pages;
    uint64_t chunk;
    int reused;   /* ballooned pages were written again */
    uint64_t errors;
};

static struct job job; /* in the image: user-accessible */

static inline int ballooned(const struct job *j, uint64_t page)
{
    return (page / j->chunk) % 2 == 0;
}

static inline uint64_t value(uint64_t addr, int generation)
{
    return (addr * 0x9e3779b97f4a7c15ull) ^ (generation ? 0x5a5a5a5a00000000ull : 0x0123456789abcdefull);
}

/* Ring 3: the first pattern everywhere. */
static long fill(void *arg)
{
    struct job *j = arg;

    for (uint64_t w = 0; w < j->pages * PAGE_SIZE / 8; w++)
        j->base[w] = value((uint64_t)&j->base[w], 0);
    return 0;
}

/* Ring 3: the second pattern in the ballooned pages. */
static long reuse(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->pages; i++) {
        volatile uint64_t *page = j->base + i * (PAGE_SIZE / 8);

        if (!ballooned(j, i))
            continue;
        for (uint64_t w = 0; w < PAGE_SIZE / 8; w++)
            page[w] = value((uint64_t)&page[w], 1);
    }
    j->reused = 1;
    return 0;
}

/* Ring 3: ballooned pages hold zero (or the second pattern once reused),
 * the others the first pattern. */
static long check(void *arg)
{
    struct job *j = arg;
    long bad = 0;

    for (uint64_t i = 0; i < j->pages; i++) {
        volatile uint64_t *page = j->base + i * (PAGE_SIZE / 8);
        int b = ballooned(j, i);

        for (uint64_t w = 0; w < PAGE_SIZE / 8; w++) {
            uint64_t addr = (uint64_t)&page[w];
            uint64_t want = !b ? value(addr, 0) : j->reused ? value(addr, 1) : 0;
            uint64_t got = page[w];

            if (got != want) {
                if (j->errors++ < MAX_REPORTS)
                    printf("balloon: page %lu (%s) offset %lu: expected 0x%lx, got 0x%lx\n", i,
                           b ? "ballooned" : "kept", w * 8, want, got);
                bad++;
            }
        }
    }
    return bad;
}

static long user(long (*fn)(void *), const char *what)
{
    struct svm_fault fault;
    long ret;

    if (run_user(fn, &job, &ret, &fault) != RUN_USER_OK) {
        printf("balloon: %s: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", what,
               fault.vector, fault.error_code, fault.cr2);
        return -1;
    }
    return ret;
}

int main(const struct svm_boot_info *bi)
{
    uint64_t pages = cmdline_u64("pages", 512);
    uint64_t chunk = cmdline_u64("chunk", 16);
    uint64_t given = 0, calls = 0, rejected = 0, failures = 0;
    long r;
    struct {
        const char *what;
        uint64_t gpa, nr;
    } invalid[5];

    if (pages < 2 || chunk == 0) {
        puts("balloon: pages must be at least 2 and chunk at least 1");
        return 2;
    }
    job.base = alloc_pages(pages);
    if (!job.base) {
        printf("balloon: cannot allocate %lu pages (free RAM: %lu KiB)\n", pages,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    job.pages = pages;
    job.chunk = chunk;
    if (user(fill, "fill") < 0)
        return 1;
    printf("balloon: wrote %lu pages\n", pages);

    for (uint64_t i = 0; i < pages; i += 2 * chunk) {
        uint64_t n = pages - i < chunk ? pages - i : chunk;

        r = balloon((uint64_t)job.base + i * PAGE_SIZE, n);
        calls++;
        if (r != (long)n) {
            printf("balloon: BALLOON of %lu pages at page %lu returned %ld\n", n, i, r);
            failures++;
        } else {
            given += n;
        }
    }
    printf("balloon: ballooned %lu pages in %lu calls of up to %lu pages\n", given, calls, chunk);
    if ((r = user(check, "check")) != 0) {
        printf("balloon: after ballooning: %ld bad words\n", r);
        failures++;
    } else {
        puts("balloon: ballooned pages read as zero, the others kept their pattern");
    }
    if (user(reuse, "reuse") < 0)
        return 1;
    if ((r = user(check, "check")) != 0) {
        printf("balloon: after reuse: %ld bad words\n", r);
        failures++;
    } else {
        puts("balloon: reused the ballooned pages: 0 bad words");
    }

    invalid[0].what = "unaligned gpa";
    invalid[0].gpa = (uint64_t)job.base + 8;
    invalid[0].nr = 1;
    invalid[1].what = "range past the end of RAM";
    invalid[1].gpa = bi->mem_size - PAGE_SIZE;
    invalid[1].nr = 2;
    invalid[2].what = "zero pages";
    invalid[2].gpa = (uint64_t)job.base;
    invalid[2].nr = 0;
    invalid[3].what = "kernel below 2 MiB";
    invalid[3].gpa = 0x1000;
    invalid[3].nr = (SVM_IMAGE_MIN_GPA - 0x1000) / PAGE_SIZE + 1;
    invalid[4].what = "page count that wraps";
    invalid[4].gpa = (uint64_t)job.base;
    invalid[4].nr = ~0ull / PAGE_SIZE;
    for (unsigned k = 0; k < 5; k++) {
        r = balloon(invalid[k].gpa, invalid[k].nr);
        if (r == SVM_EINVAL) {
            rejected++;
        } else {
            printf("balloon: %s: returned %ld, expected %d\n", invalid[k].what, r, SVM_EINVAL);
            failures++;
        }
    }
    printf("balloon: %lu of 5 invalid calls rejected with EINVAL\n", rejected);
    /* The rejected calls must not have discarded anything. */
    if ((r = user(check, "check")) != 0) {
        printf("balloon: after the invalid calls: %ld bad words\n", r);
        failures++;
    }
    printf("balloon: %lu pages, %lu ballooned, %lu failures\n", pages, given, failures);
    return failures ? 1 : 0;
}
