/* guest: hostops - checks what scripted host operations (--host-ops builtin:hostops) do to its pages: dontneed reads zero, mprotect ro faults writes, munmap faults; timed=1 polls a page until a timed dontneed zeroes it */
#include <shadowvm.h>

/*
 * Pages at fixed gpas, so the --host-ops script can name them
 * (docs/host-ops.md, the builtin:hostops scenario):
 *   A 0x1000000  checkpoint 1: dontneed       -> reads zero
 *   B 0x1001000  checkpoint 2: mprotect ro    -> reads work, writes fault
 *                checkpoint 3: mprotect rw    -> writes work again
 *   C 0x1002000  checkpoint 4: munmap         -> reads fault
 *   D 0x1003000  timed=1 (builtin:hostops-timed): polled until it reads zero
 * In kvm mode CHECKPOINT must return -EOPNOTSUPP and nothing else is checked.
 */

#define PAGE_A 0x1000000ull
#define PAGE_B 0x1001000ull
#define PAGE_C 0x1002000ull
#define PAGE_D 0x1003000ull
#define PATTERN 0x5eedf00dcafe0000ull

static int failures;

static void step(const char *name, int ok)
{
    printf("hostops: %s: %s\n", name, ok ? "ok" : "FAILED");
    if (!ok)
        failures++;
}

static long checkpoint(long n)
{
    return host_op(SVM_HOST_OP_CHECKPOINT, n, 0);
}

static int page_is(uint64_t gpa, uint64_t pattern)
{
    volatile uint64_t *p = (volatile uint64_t *)gpa;

    for (uint64_t w = 0; w < PAGE_SIZE / 8; w++)
        if (p[w] != (pattern ? pattern + w : 0))
            return 0;
    return 1;
}

static void fill(uint64_t gpa, uint64_t pattern)
{
    volatile uint64_t *p = (volatile uint64_t *)gpa;

    for (uint64_t w = 0; w < PAGE_SIZE / 8; w++)
        p[w] = pattern + w;
}

static int timed(void)
{
    volatile uint64_t *d = (volatile uint64_t *)PAGE_D;
    uint64_t spins = 0;

    fill(PAGE_D, PATTERN);
    puts("hostops: timed: waiting for page D to read zero");
    while (d[0] != 0)
        spins++;
    step("timed dontneed: page D reads zero", page_is(PAGE_D, 0));
    printf("hostops: timed: %lu polls\n", spins);
    return failures ? 1 : 0;
}

int main(const struct svm_boot_info *bi)
{
    struct svm_fault f;
    uint64_t v;
    long r;

    if (bi->free_start > PAGE_A || PAGE_D + PAGE_SIZE > bi->free_end) {
        printf("hostops: pages A..D outside free RAM [0x%lx, 0x%lx)\n", bi->free_start, bi->free_end);
        return 1;
    }
    if (cmdline_u64("timed", 0))
        return timed();

    step("CHECKPOINT(65536) is -EINVAL", checkpoint(1 << 16) == SVM_EINVAL);
    if (bi->paging_mode == SVM_PAGING_KVM) {
        step("kvm mode: CHECKPOINT is -EOPNOTSUPP", checkpoint(1) == SVM_EOPNOTSUPP);
        printf("hostops: %s\n", failures ? "FAILED" : "all ok (kvm mode)");
        return failures ? 1 : 0;
    }

    fill(PAGE_A, PATTERN);
    fill(PAGE_B, PATTERN + 0x1000);
    fill(PAGE_C, PATTERN + 0x2000);

    r = checkpoint(1);
    step("checkpoint 1 ran 1 op", r == 1);
    step("dontneed: page A reads zero", page_is(PAGE_A, 0));
    step("dontneed: page B kept its data", page_is(PAGE_B, PATTERN + 0x1000));

    r = checkpoint(2);
    step("checkpoint 2 ran 1 op", r == 1);
    step("mprotect ro: page B reads its data", page_is(PAGE_B, PATTERN + 0x1000));
    r = probe_write64((volatile void *)PAGE_B, 1, &f);
    printf("hostops: write to B: %s vector %lu error code 0x%lx cr2 0x%lx\n", r ? "fault" : "no fault",
           r ? f.vector : 0, r ? f.error_code : 0, r ? f.cr2 : 0);
    step("mprotect ro: a write to page B faults", r != 0 && f.vector == 14 && f.cr2 == PAGE_B &&
                                                     (f.error_code & PF_W));
    step("mprotect ro: page B unchanged", page_is(PAGE_B, PATTERN + 0x1000));

    r = checkpoint(3);
    step("checkpoint 3 ran 1 op", r == 1);
    r = probe_write64((volatile void *)PAGE_B, 7, &f);
    step("mprotect rw: a write to page B works", r == 0 && *(volatile uint64_t *)PAGE_B == 7);

    r = checkpoint(4);
    step("checkpoint 4 ran 1 op", r == 1);
    r = probe_read64((volatile void *)PAGE_C, &v, &f);
    printf("hostops: read of C: %s vector %lu cr2 0x%lx\n", r ? "fault" : "no fault", r ? f.vector : 0,
           r ? f.cr2 : 0);
    step("munmap: a read of page C faults", r != 0 && f.vector == 14 && f.cr2 == PAGE_C);
    r = probe_write64((volatile void *)(PAGE_C + 8), 1, &f);
    step("munmap: a write to page C faults", r != 0 && f.vector == 14 && f.cr2 == PAGE_C + 8);
    step("munmap: page A still works", probe_write64((volatile void *)PAGE_A, 3, &f) == 0);

    r = checkpoint(5);
    step("checkpoint 5 ran no op", r == 0);

    printf("hostops: %s (%d failed)\n", failures ? "FAILED" : "all ok", failures);
    return failures ? 1 : 0;
}
