/* guest: wss - in ring 3, touches a cold set of cold=C pages (default 1024) once and a hot set of hot=H pages (default 64) repeatedly for duration_ms=M (default 500) in phases=P phases */
#include <shadowvm.h>

/*
 * A working set with a hot and a cold part, to make page aging visible from
 * the host: the cold pages are written once at the start and then left
 * alone (their young bits stay clear after the first aging pass), the hot
 * pages are written over and over until the time is up (young at every
 * pass).  At the end every page is checked for the value last written to
 * it.
 *
 * The guest has no clock: the TSC rate comes from CPUID 15H/16H when the
 * host reports it (the AMD hosts here do not), otherwise tsc_mhz=F (default
 * 2500) is assumed, so duration_ms is nominal.  The per-phase lines (the
 * ones with "rounds") depend on timing; every other line is deterministic.
 */

struct job {
    volatile uint64_t *cold, *hot;
    uint64_t nr_cold, nr_hot;
    uint64_t phase_cycles;
    uint64_t rounds;      /* hot rounds in the last phase */
    uint64_t total_rounds;
    uint64_t errors;
};

static struct job job; /* in the image: user-accessible */



#define WORDS_PER_PAGE (PAGE_SIZE / 8)

/* Ring 3: one write per cold page. */
static long touch_cold(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->nr_cold; i++)
        j->cold[i * WORDS_PER_PAGE] = 0xc01d000000000000ull | i;
    return 0;
}

/* Ring 3: rounds over the hot pages until the phase's time is up. */
static long touch_hot(void *arg)
{
    struct job *j = arg;
    uint64_t t0 = rdtsc(), rounds = 0;

    do {
        for (uint64_t i = 0; i < j->nr_hot; i++)
            j->hot[i * WORDS_PER_PAGE] = ((j->total_rounds + rounds) << 20) | i;
        rounds++;
    } while (rdtsc() - t0 < j->phase_cycles);
    j->rounds = rounds;
    j->total_rounds += rounds;
    return 0;
}

/* Ring 3: every page holds what was last written to it. */
static long check(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->nr_cold; i++)
        j->errors += j->cold[i * WORDS_PER_PAGE] != (0xc01d000000000000ull | i);
    for (uint64_t i = 0; i < j->nr_hot; i++)
        j->errors += j->hot[i * WORDS_PER_PAGE] != (((j->total_rounds - 1) << 20) | i);
    return 0;
}

static int user(long (*fn)(void *), const char *what)
{
    struct svm_fault fault;
    long ret;

    if (run_user(fn, &job, &ret, &fault) != RUN_USER_OK) {
        printf("wss: %s: user mode faulted: vector %lu error 0x%lx cr2 0x%lx\n", what,
               fault.vector, fault.error_code, fault.cr2);
        return 1;
    }
    return 0;
}

int main(const struct svm_boot_info *bi)
{
    uint64_t hot = cmdline_u64("hot", 64);
    uint64_t cold = cmdline_u64("cold", 1024);
    uint64_t duration_ms = cmdline_u64("duration_ms", 500);
    uint64_t phases = cmdline_u64("phases", 5);
    uint64_t mhz = cpuid_tsc_mhz();

    if (!mhz)
        mhz = cmdline_u64("tsc_mhz", 2500);
    if (hot == 0 || phases == 0) {
        puts("wss: hot and phases must be at least 1");
        return 2;
    }
    job.hot = alloc_pages(hot);
    job.cold = cold ? alloc_pages(cold) : NULL;
    if (!job.hot || (cold && !job.cold)) {
        printf("wss: cannot allocate %lu pages (free RAM: %lu KiB)\n", hot + cold,
               (bi->free_end - bi->free_start) >> 10);
        return 2;
    }
    job.nr_hot = hot;
    job.nr_cold = cold;
    job.phase_cycles = duration_ms * 1000 * mhz / phases;
    printf("wss: %lu hot pages, %lu cold pages, %lu ms in %lu phases\n", hot, cold, duration_ms,
           phases);
    if (user(touch_cold, "cold"))
        return 1;
    printf("wss: cold phase: %lu pages touched once\n", cold);
    for (uint64_t p = 1; p <= phases; p++) {
        if (user(touch_hot, "hot"))
            return 1;
        printf("wss: hot phase %lu: %lu rounds, %lu touches\n", p, job.rounds,
               job.rounds * hot);
    }
    printf("wss: hot total: %lu rounds, %lu touches\n", job.total_rounds,
           job.total_rounds * hot);
    if (user(check, "check"))
        return 1;
    printf("wss: %lu hot pages, %lu cold pages, %lu errors\n", hot, cold, job.errors);
    return job.errors ? 1 : 0;
}
