/* guest: memtest - in ring 3, writes and verifies size=N (default 8M) of RAM with 4 patterns, then balloons it back */
#include <shadowvm.h>

struct job {
    volatile uint64_t *base;
    uint64_t words;
    uint64_t errors;
    uint64_t first_bad;      /* address of the first mismatch */
    uint64_t first_got, first_want;
    int pattern;
};

static struct job job; /* in the image: user-accessible */

static uint64_t pattern_value(int pattern, uint64_t i, uint64_t addr, uint64_t *rng)
{
    switch (pattern) {
    case 0:
        return addr;
    case 1:
        return ~addr;
    case 2:
        return (i & 1) ? 0xaaaaaaaaaaaaaaaaull : 0x5555555555555555ull;
    default:
        /* xorshift64 */
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        return *rng;
    }
}

/* Ring 3: one pattern = write everything, then verify everything. */
static long memtest_pass(void *arg)
{
    struct job *j = arg;
    uint64_t rng = 0x9e3779b97f4a7c15ull;

    for (uint64_t i = 0; i < j->words; i++)
        j->base[i] = pattern_value(j->pattern, i, (uint64_t)&j->base[i], &rng);
    rng = 0x9e3779b97f4a7c15ull;
    for (uint64_t i = 0; i < j->words; i++) {
        uint64_t want = pattern_value(j->pattern, i, (uint64_t)&j->base[i], &rng);
        uint64_t got = j->base[i];

        if (got != want) {
            if (!j->errors) {
                j->first_bad = (uint64_t)&j->base[i];
                j->first_got = got;
                j->first_want = want;
            }
            j->errors++;
        }
    }
    return 0;
}

/* Ring 3: after BALLOON the pages read back as zero. */
static long count_nonzero(void *arg)
{
    struct job *j = arg;
    long nonzero = 0;

    for (uint64_t i = 0; i < j->words; i++)
        nonzero += j->base[i] != 0;
    return nonzero;
}

int main(const struct svm_boot_info *bi)
{
    static const char *const names[] = { "address", "~address", "checkerboard", "random" };
    uint64_t size = cmdline_u64("size", 8ull << 20) & ~(PAGE_SIZE - 1);
    struct svm_fault fault;
    long ret;
    void *base;

    if (size == 0) {
        puts("memtest: size must be at least 4K");
        return 2;
    }
    base = alloc_pages(size / PAGE_SIZE);
    if (!base) {
        printf("memtest: cannot allocate %lu KiB (free RAM: %lu KiB)\n", size >> 10,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    printf("memtest: testing %lu KiB at %p in ring 3\n", size >> 10, base);
    job.base = base;
    job.words = size / 8;
    for (int p = 0; p < 4; p++) {
        uint64_t before = job.errors;

        job.pattern = p;
        if (run_user(memtest_pass, &job, &ret, &fault) != RUN_USER_OK) {
            printf("memtest: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", fault.vector,
                   fault.error_code, fault.cr2);
            return 1;
        }
        printf("memtest: pattern %s: %s\n", names[p], job.errors == before ? "ok" : "ERRORS");
    }
    if (job.errors) {
        printf("memtest: %lu errors; first at 0x%lx: read 0x%lx, wrote 0x%lx\n", job.errors,
               job.first_bad, job.first_got, job.first_want);
        return 1;
    }
    ret = balloon((uint64_t)base, size / PAGE_SIZE);
    if (ret < 0) {
        printf("memtest: balloon not available (%ld)\n", ret);
    } else {
        if (run_user(count_nonzero, &job, &ret, &fault) != RUN_USER_OK || ret != 0) {
            printf("memtest: ballooned pages do not read as zero (%ld nonzero words)\n", ret);
            return 1;
        }
        printf("memtest: ballooned %lu KiB back to the host; it reads back as zero\n", size >> 10);
    }
    printf("memtest: %lu KiB, 4 patterns, 0 errors\n", size >> 10);
    return 0;
}
