/* guest: verify - in ring 3, fills pages=N (default 2048) with per-page pseudo-random data, re-checks every byte rounds=R (default 20) times, rewriting one page per round; each vCPU checks its own share */
#include <shadowvm.h>

/*
 * Page i's contents come from a xorshift64 generator seeded by i and the
 * page's generation (bumped each time the page is rewritten), so they can
 * be regenerated at any time; a checksum per page is kept too.  Each round
 * re-generates every page and compares it byte for byte (word by word,
 * then byte by byte on a mismatch), reporting the first 10 corrupted bytes
 * (page, offset, expected, got), and compares the page's checksum.  With
 * rewrite=1 (the default) each vCPU then rewrites one of its pages with
 * the next generation, so memory keeps changing.  inject=P (P >= 1) flips
 * one bit of page P-1 after the fill, to show what a corruption report
 * looks like (exit status 1).
 *
 * With several vCPUs the pages are split into one contiguous share per
 * vCPU (vCPU c gets pages [c*N/V, (c+1)*N/V)); all run in ring 3 at the
 * same time and only vCPU 0 prints the summary.  The output does not
 * depend on the number of vCPUs except for the first line.
 */

#define MAX_REPORTS 10
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

struct share {
    uint64_t first, count; /* pages */
    uint64_t corrupted;    /* bytes */
    uint64_t bad_sums;     /* pages whose checksum did not match */
    uint64_t rewritten;
    uint64_t fault;        /* nonzero: run_user failed */
};

static volatile uint64_t *base;
static uint64_t *sums;       /* per-page checksum */
static uint32_t *generation; /* per page */
static uint64_t nr_pages, rounds, rewrite, inject;
static volatile uint64_t reports; /* shared: at most MAX_REPORTS lines in all */
static volatile uint64_t ready, done;
static struct share shares[SVM_MAX_VCPUS];

static inline uint64_t seed(uint64_t page, uint32_t gen)
{
    uint64_t s = (page + 1) * 0x9e3779b97f4a7c15ull ^ ((uint64_t)gen << 40) ^ 0xd1b54a32d192ed03ull;

    return s ? s : 1;
}

static inline uint64_t next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static uint64_t fill_page(uint64_t i)
{
    volatile uint64_t *page = base + i * WORDS_PER_PAGE;
    uint64_t x = seed(i, generation[i]), sum = 0;

    for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) {
        uint64_t v = next(&x);

        page[w] = v;
        sum = (sum ^ v) * 0x100000001b3ull + w;
    }
    return sum;
}

/* Ring 3: fill this vCPU's share and record the checksums. */
static long fill_share(void *arg)
{
    struct share *s = arg;

    for (uint64_t i = s->first; i < s->first + s->count; i++)
        sums[i] = fill_page(i);
    /* inject=P: corrupt one byte of page P-1 behind the checksum's back. */
    if (inject && inject - 1 >= s->first && inject - 1 < s->first + s->count)
        ((volatile uint8_t *)(base + (inject - 1) * WORDS_PER_PAGE))[123] ^= 0x40;
    return 0;
}

static void check_page(struct share *s, uint64_t i)
{
    volatile uint64_t *page = base + i * WORDS_PER_PAGE;
    uint64_t x = seed(i, generation[i]), sum = 0;

    for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) {
        uint64_t want = next(&x), got = page[w];

        sum = (sum ^ got) * 0x100000001b3ull + w;
        if (got == want)
            continue;
        for (unsigned b = 0; b < 8; b++) {
            uint8_t gb = (uint8_t)(got >> (8 * b)), wb = (uint8_t)(want >> (8 * b));

            if (gb == wb)
                continue;
            s->corrupted++;
            if (atomic_add(&reports, 1) < MAX_REPORTS)
                printf("verify: corrupted byte: page %lu offset %lu: expected 0x%02x, got 0x%02x\n",
                       i, w * 8 + b, wb, gb);
        }
    }
    if (sum != sums[i])
        s->bad_sums++;
}

/* Ring 3: all rounds over this vCPU's share. */
static long check_share(void *arg)
{
    struct share *s = arg;

    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t i = s->first; i < s->first + s->count; i++)
            check_page(s, i);
        if (rewrite && s->count) {
            uint64_t i = s->first + (r * 7919 + 13) % s->count;

            generation[i]++;
            sums[i] = fill_page(i);
            s->rewritten++;
        }
    }
    return 0;
}

static void run_share(unsigned cpu)
{
    struct share *s = &shares[cpu];
    struct svm_fault fault;

    if (run_user(fill_share, s, NULL, &fault) != RUN_USER_OK ||
        run_user(check_share, s, NULL, &fault) != RUN_USER_OK) {
        s->fault = fault.cr2 | 1;
        printf("verify: vCPU %u: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", cpu,
               fault.vector, fault.error_code, fault.cr2);
    }
    atomic_add(&done, 1);
}

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    (void)bi;
    while (!atomic_load(&ready))
        cpu_relax();
    if (ready == 1)
        run_share(cpu);
}

int main(const struct svm_boot_info *bi)
{
    uint64_t vcpus = bi->nr_vcpus, corrupted = 0, bad_sums = 0, rewritten = 0, faults = 0;
    uint64_t meta_pages;

    nr_pages = cmdline_u64("pages", 2048);
    rounds = cmdline_u64("rounds", 20);
    rewrite = cmdline_u64("rewrite", 1);
    inject = cmdline_u64("inject", 0);
    meta_pages = (nr_pages * (8 + 4) + PAGE_SIZE - 1) / PAGE_SIZE;
    if (nr_pages == 0) {
        puts("verify: pages must be at least 1");
        ready = 2;
        return 2;
    }
    base = alloc_pages(nr_pages);
    sums = alloc_pages(meta_pages);
    if (!base || !sums) {
        printf("verify: cannot allocate %lu pages (free RAM: %lu KiB)\n", nr_pages + meta_pages,
               (bi->free_end - bi->free_start) >> 10);
        ready = 2;
        return 2;
    }
    generation = (uint32_t *)(sums + nr_pages);
    for (uint64_t c = 0; c < vcpus; c++) {
        shares[c].first = c * nr_pages / vcpus;
        shares[c].count = (c + 1) * nr_pages / vcpus - shares[c].first;
    }
    printf("verify: %lu pages on %lu vCPUs, %lu rounds\n", nr_pages, vcpus, rounds);
    atomic_add(&ready, 1);
    run_share(0);
    while (atomic_load(&done) < vcpus)
        cpu_relax();
    for (uint64_t c = 0; c < vcpus; c++) {
        corrupted += shares[c].corrupted;
        bad_sums += shares[c].bad_sums;
        rewritten += shares[c].rewritten;
        faults += shares[c].fault != 0;
    }
    if (faults)
        return 1;
    printf("verify: %lu page checksums wrong, %lu pages rewritten\n", bad_sums, rewritten);
    printf("verify: %lu pages x %lu rounds, %lu corrupted bytes\n", nr_pages, rounds, corrupted);
    return corrupted || bad_sums ? 1 : 0;
}
