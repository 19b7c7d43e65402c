/* guest: dma - hands the DMA device (hypercall DMA) a buffer and checks that the device reads what the guest wrote and the guest what the device wrote: copies, fills, ballooned pages, host-refused pages (--host-ops builtin:dma), one lane of DMA rounds per vCPU; rounds=N ballast=PAGES */
#include <shadowvm.h>

/*
 * The buffer is 128 pages at gpa 0x1000000 (fixed, so the --host-ops
 * script builtin:dma can name its pages); iova = gpa - 0x1000000.
 *
 *   pages   0-15  the guest writes a pattern, the device copies it ...
 *          16-31  ... here
 *          32-39  the device fills them
 *          40-55  filled; 40-47 ballooned, then copied to 48-55 (zeros)
 *          56-59  host operations at checkpoints 1-4 (builtin:dma):
 *                 56 read-only then read-write, 57 dropped, 58 unmapped,
 *                 59 the copies' target
 *          60-63  a page table the device writes (60), a staged PTE (61),
 *                 the pages it maps (62, 63)
 *         64-127  lanes: vCPU n (n < 4) copies 8 pages at 64 + 16n to the
 *                 8 after them and fills them, `rounds` times, while the
 *                 other vCPUs do the same in their lanes
 *
 * ballast=N pages after the buffer are touched, a slice each round of lane
 * 0, so that with a small --machine-mem reclaim keeps evicting (the
 * device's pages too).  Loops over memory run in ring 3; hypercalls in
 * ring 1.  In kvm mode there is no device: the operations are EOPNOTSUPP,
 * and only the argument checks (the same lines in both modes) run.
 */

#define BUF        0x1000000ull
#define BUF_PAGES  128
#define P(n)       ((uint64_t)(n) * PAGE_SIZE) /* iova of buffer page n */
#define MAX_LANES  4
#define LANE(n)    P(64 + 16 * (n))
#define LANE_LEN   P(8)
#define BALLAST    (BUF + P(BUF_PAGES))
#define BALLAST_SLICE 64

static int checks, failures;

struct job {
    volatile uint8_t *p;
    uint64_t len;
    uint64_t seed;
    uint64_t shift; /* check_pattern: p[shift + i] == pattern(seed, i) */
    uint8_t byte;
};

/* One per vCPU: ring 3 reads it, so it lives in the image. */
static struct job jobs[MAX_LANES];

static volatile uint64_t go, lanes_done;
static volatile uint64_t lane_bad[MAX_LANES], lane_failed[MAX_LANES];
static uint64_t rounds, ballast, lanes;

static inline uint8_t pattern(uint64_t seed, uint64_t i)
{
    uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ (seed + 1) * 0xbf58476d1ce4e5b9ull;

    return (uint8_t)(x >> 56);
}

/* Ring 3. */
static long u_write_pattern(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->len; i++)
        j->p[i] = pattern(j->seed, i);
    return 0;
}

static long u_check_pattern(void *arg)
{
    struct job *j = arg;
    long bad = 0;

    for (uint64_t i = 0; i < j->len; i++)
        bad += j->p[j->shift + i] != pattern(j->seed, i);
    return bad;
}

static long u_check_byte(void *arg)
{
    struct job *j = arg;
    long bad = 0;

    for (uint64_t i = 0; i < j->len; i++)
        bad += j->p[i] != j->byte;
    return bad;
}

/* One word in each page. */
static long u_touch(void *arg)
{
    struct job *j = arg;

    for (uint64_t i = 0; i < j->len; i += PAGE_SIZE)
        *(volatile uint64_t *)(j->p + i) = j->seed + i;
    return 0;
}

/* Runs fn on this vCPU's job over [iova, iova + len) of the buffer (a
 * pattern checked at p[shift + i]); returns its value, or -1 if ring 3
 * faulted. */
static long user_shifted(long (*fn)(void *), uint64_t iova, uint64_t len, uint64_t seed,
                         uint64_t shift, uint8_t byte)
{
    struct job *j = &jobs[cpu_id() % MAX_LANES];
    struct svm_fault f;
    long ret;

    j->p = (volatile uint8_t *)(BUF + iova);
    j->len = len;
    j->seed = seed;
    j->shift = shift;
    j->byte = byte;
    if (run_user(fn, j, &ret, &f) != RUN_USER_OK) {
        printf("dma: ring 3 faulted at 0x%lx: vector %lu error 0x%lx\n", f.cr2, f.vector, f.error_code);
        return -1;
    }
    return ret;
}

static long user(long (*fn)(void *), uint64_t iova, uint64_t len, uint64_t seed, uint8_t byte)
{
    return user_shifted(fn, iova, len, seed, 0, byte);
}

/* Bad bytes in [iova + shift, iova + shift + len) against pattern(seed). */
static long check_shifted(uint64_t iova, uint64_t len, uint64_t seed, uint64_t shift)
{
    return user_shifted(u_check_pattern, iova, len, seed, shift, 0);
}

static void step(const char *what, bool ok)
{
    CHECK(ok, "dma: %s", what);
    if (ok)
        printf("dma: %s: ok\n", what);
}

static long checkpoint(long n)
{
    return host_op(SVM_HOST_OP_CHECKPOINT, n, 0);
}

/* A transfer, tried again while invalidations keep colliding (EAGAIN). */
static long copy(uint64_t src, uint64_t dst, uint64_t len)
{
    long rc;
    int tries = 0;

    while ((rc = dma_copy(src, dst, len)) == SVM_EAGAIN && ++tries < 100)
        ;
    return rc;
}

static long fill(uint64_t iova, uint64_t len, unsigned byte)
{
    long rc;
    int tries = 0;

    while ((rc = dma_fill(iova, len, byte)) == SVM_EAGAIN && ++tries < 100)
        ;
    return rc;
}

/* `rounds` of: pattern into the lane's source, the device copies it, the
 * guest checks; the device fills the destination, the guest checks. */
static void run_lane(unsigned lane)
{
    uint64_t src = LANE(lane), dst = src + LANE_LEN;
    uint64_t slice = 0;

    for (uint64_t r = 0; r < rounds; r++) {
        uint64_t seed = lane * 1000000 + r;
        uint8_t byte = (uint8_t)(r * 37 + lane) | 1;
        long bad;

        if (lane == 0 && ballast) {
            uint64_t n = ballast < BALLAST_SLICE ? ballast : BALLAST_SLICE;

            user(u_touch, BALLAST - BUF + P(slice), P(n), seed, 0);
            slice = (slice + n) % ballast;
            if (slice + n > ballast)
                slice = 0;
        }
        user(u_write_pattern, src, LANE_LEN, seed, 0);
        if (copy(src, dst, LANE_LEN) != 0) {
            lane_failed[lane]++;
            continue;
        }
        bad = user(u_check_pattern, dst, LANE_LEN, seed, 0);
        lane_bad[lane] += bad < 0 ? LANE_LEN : (uint64_t)bad;
        if (fill(dst, LANE_LEN, byte) != 0) {
            lane_failed[lane]++;
            continue;
        }
        bad = user(u_check_byte, dst, LANE_LEN, 0, byte);
        lane_bad[lane] += bad < 0 ? LANE_LEN : (uint64_t)bad;
    }
}

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    if (bi->paging_mode != SVM_PAGING_SHADOW)
        return;
    while (!go)
        cpu_relax();
    if (cpu < lanes) {
        run_lane(cpu);
        atomic_add(&lanes_done, 1);
    }
}

/* Values refused in both modes: decoding checks them before the mode. */
static void bad_calls(const struct svm_boot_info *bi)
{
    static const struct {
        const char *what;
        uint64_t op, a0, a1, a2;
    } bad[] = {
        { "unknown operation", SVM_DMA_OP_MAX + 1, 0, 0, 0 },
        { "attach: unaligned gpa", SVM_DMA_ATTACH, BUF + 8, PAGE_SIZE, 0 },
        { "attach: length not whole pages", SVM_DMA_ATTACH, BUF, 100, 0 },
        { "attach: zero length", SVM_DMA_ATTACH, BUF, 0, 0 },
        { "attach: below 2 MiB", SVM_DMA_ATTACH, 0x1000, PAGE_SIZE, 0 },
        { "attach: length that wraps", SVM_DMA_ATTACH, BUF, -PAGE_SIZE, 0 },
        { "attach: over 1 GiB", SVM_DMA_ATTACH, BUF, SVM_DMA_BUFFER_MAX + PAGE_SIZE, 0 },
        { "attach: the switcher", SVM_DMA_ATTACH, SVM_SWITCHER_GVA, PAGE_SIZE, 0 },
        { "copy: zero bytes", SVM_DMA_COPY, 0, PAGE_SIZE, 0 },
        { "copy: over 1 MiB", SVM_DMA_COPY, 0, PAGE_SIZE, SVM_DMA_XFER_MAX + 1 },
        { "fill: byte 256", SVM_DMA_FILL, 0, 8, 256 },
        { "fill: zero bytes", SVM_DMA_FILL, 0, 0, 1 },
    };
    const unsigned n = sizeof(bad) / sizeof(bad[0]);
    unsigned rejected = 0;
    long rc;

    for (unsigned i = 0; i < n; i++) {
        rc = svm_hypercall(SVM_HC_DMA, (long)bad[i].op, (long)bad[i].a0, (long)bad[i].a1, (long)bad[i].a2).rax;
        CHECK(rc == SVM_EINVAL, "dma: %s: %ld, want EINVAL", bad[i].what, rc);
        rejected += rc == SVM_EINVAL;
    }
    rc = dma_attach(bi->mem_size - PAGE_SIZE, P(2));
    CHECK(rc == SVM_EINVAL, "dma: attach past the end of RAM: %ld", rc);
    rejected += rc == SVM_EINVAL;
    printf("dma: %u of %u bad calls rejected with EINVAL\n", rejected, n + 1);
}

static void copies(void)
{
    long rc;

    user(u_write_pattern, P(0), P(16), 1, 0);
    rc = copy(P(0), P(16), P(16));
    step("the device copied 64 KiB the guest wrote", rc == 0 && user(u_check_pattern, P(16), P(16), 1, 0) == 0);
    /* The device has the source mapped now: it must see later writes. */
    user(u_write_pattern, P(0), P(16), 2, 0);
    rc = copy(P(0), P(16), P(16));
    step("the device sees the guest's later writes", rc == 0 && user(u_check_pattern, P(16), P(16), 2, 0) == 0);
    /* memmove: [3, 4099) gets what [0, 4096) held. */
    rc = copy(P(0), 3, P(1));
    step("an overlapping COPY moves like memmove", rc == 0 && check_shifted(P(0), P(1), 2, 3) == 0);
}

static void fills(void)
{
    volatile uint8_t *b = (volatile uint8_t *)BUF;
    uint64_t at = P(32) + PAGE_SIZE - 3;
    bool ok;
    long rc;

    rc = fill(P(32), P(8), 0xa5);
    step("the device filled 32 KiB with 0xa5", rc == 0 && user(u_check_byte, P(32), P(8), 0, 0xa5) == 0);
    rc = fill(at, 7, 0x3c);
    ok = rc == 0 && b[at - 1] == 0xa5 && b[at + 7] == 0xa5;
    for (int i = 0; i < 7; i++)
        ok = ok && b[at + i] == 0x3c;
    step("an unaligned FILL across a page boundary writes its 7 bytes only", ok);
}

static void ballooned(void)
{
    long rc;

    rc = fill(P(40), P(16), 0x5a);
    step("the device filled pages 40-55", rc == 0 && user(u_check_byte, P(40), P(16), 0, 0x5a) == 0);
    rc = balloon(BUF + P(40), 8);
    step("BALLOON gave pages 40-47 back", rc == 8);
    rc = copy(P(40), P(48), P(8));
    step("the device reads ballooned pages as zero (fresh pages)",
         rc == 0 && user(u_check_byte, P(40), P(16), 0, 0) == 0);
    rc = fill(P(40), P(4), 0x77);
    step("the device writes ballooned pages back into use",
         rc == 0 && user(u_check_byte, P(40), P(4), 0, 0x77) == 0 && user(u_check_byte, P(44), P(4), 0, 0) == 0);
}

/* Pages 56-59 under the builtin:dma script's host operations. */
static void host_refusals(void)
{
    volatile uint64_t *ro = (volatile uint64_t *)(BUF + P(56));
    struct svm_fault f;
    uint64_t v;
    long rc;

    rc = fill(P(56), P(4), 0x11);
    step("the device filled pages 56-59", rc == 0 && user(u_check_byte, P(56), P(4), 0, 0x11) == 0);
    rc = checkpoint(1);
    if (rc == 0) {
        puts("dma: host refusals: not checked (run with --host-ops builtin:dma)");
        return;
    }
    step("checkpoint 1 made page 56 read-only", rc == 1);
    step("a device write to the read-only page is EFAULT", fill(P(56), 8, 0x22) == SVM_EFAULT);
    rc = copy(P(56), P(59), P(1));
    step("a device read of it works", rc == 0 && user(u_check_byte, P(59), P(1), 0, 0x11) == 0);
    rc = probe_write64(ro, 1, &f);
    step("a guest write to it faults too", rc != 0 && f.vector == 14 && (f.error_code & PF_W));
    step("checkpoint 2 made it writable", checkpoint(2) == 1);
    rc = fill(P(56), P(1), 0x22);
    step("the device writes it again", rc == 0 && user(u_check_byte, P(56), P(1), 0, 0x22) == 0);
    step("checkpoint 3 dropped page 57", checkpoint(3) == 1);
    rc = copy(P(57), P(59), P(1));
    step("the device reads the dropped page as zero", rc == 0 && user(u_check_byte, P(59), P(1), 0, 0) == 0);
    step("checkpoint 4 unmapped page 58", checkpoint(4) == 1);
    step("a device read of the unmapped page is EFAULT", copy(P(58), P(59), 8) == SVM_EFAULT);
    step("a device write to it is EFAULT", fill(P(58) + 8, 8, 1) == SVM_EFAULT);
    step("a COPY that runs into it is EFAULT", copy(P(57) + 4000, P(59), 200) == SVM_EFAULT);
    rc = probe_read64((volatile uint64_t *)(BUF + P(58)), &v, &f);
    step("a guest read of it faults too", rc != 0 && f.vector == 14 && f.cr2 == BUF + P(58));
}

/*
 * A DMA write into a live page table takes effect at the next TLB flush, as
 * on hardware: buffer page 60 becomes the level-1 table of gva PT_VA,
 * mapping it to page 62; the guest reads it (the VMM now shadows and
 * write-protects page 60); the device copies a new PTE (to page 63) into
 * it; after FLUSH_TLB the guest reads page 63's data at PT_VA.
 */
#define PT_VA 0x8000000000ull /* PML4 entry 1: nothing else there */

static void page_table_write(const struct svm_boot_info *bi)
{
    volatile uint64_t *table = (volatile uint64_t *)(BUF + P(60));
    volatile uint64_t *staged = (volatile uint64_t *)(BUF + P(61));
    uint64_t *pml4 = pt_new_root(), *pdpt, *pd;
    uint64_t before = 1, after = 1, idx = (PT_VA >> 12) & 511;
    struct svm_fault f;
    long rc;

    if (!pml4 || pt_map(pml4, PT_VA, BUF + P(62), PTE_P | PTE_W | PTE_U) != 0) {
        step("a page table for the page-table test", false);
        return;
    }
    pdpt = (uint64_t *)(pml4[1] & PTE_ADDR_MASK);
    pd = (uint64_t *)(pdpt[0] & PTE_ADDR_MASK);
    for (int i = 0; i < 512; i++)
        table[i] = 0;
    table[idx] = (BUF + P(62)) | PTE_P | PTE_W | PTE_U;
    pd[0] = (BUF + P(60)) | PTE_P | PTE_W | PTE_U;
    *(volatile uint64_t *)(BUF + P(62)) = 0x6262626262626262ull;
    *(volatile uint64_t *)(BUF + P(63)) = 0x6363636363636363ull;
    *staged = (BUF + P(63)) | PTE_P | PTE_W | PTE_U;
    load_cr3((uint64_t)pml4);
    probe_read64((volatile uint64_t *)PT_VA, &before, &f);
    rc = copy(P(61), P(60) + idx * 8, 8);
    flush_tlb(0);
    probe_read64((volatile uint64_t *)PT_VA, &after, &f);
    load_cr3(bi->boot_cr3);
    step("a PTE the device wrote takes effect at the next TLB flush",
         rc == 0 && before == 0x6262626262626262ull && after == 0x6363636363636363ull);
    if (before != 0x6262626262626262ull || after != 0x6363636363636363ull)
        printf("dma: through the page table: 0x%lx before, 0x%lx after\n", before, after);
}

static void shadow_mode(const struct svm_boot_info *bi)
{
    long rc;

    step("COPY, FILL and DETACH before ATTACH are ENODEV",
         dma_copy(0, 8, 8) == SVM_ENODEV && dma_fill(0, 8, 1) == SVM_ENODEV && dma_detach() == SVM_ENODEV);
    rc = dma_attach(BUF, P(BUF_PAGES));
    step("ATTACH of 128 pages at 0x1000000", rc == 0);
    if (rc != 0)
        return;
    step("a second ATTACH is EBUSY", dma_attach(BUF, P(1)) == SVM_EBUSY && dma_attach(BUF + P(BUF_PAGES), P(1)) == SVM_EBUSY);
    step("transfers outside the buffer are EINVAL",
         dma_copy(P(BUF_PAGES) - 4, 0, 8) == SVM_EINVAL && dma_copy(0, P(BUF_PAGES), 1) == SVM_EINVAL &&
             dma_copy(-1ull, 0, 2) == SVM_EINVAL && dma_fill(P(BUF_PAGES) - 1, 2, 0) == SVM_EINVAL &&
             dma_fill(-8ull, 16, 0) == SVM_EINVAL);
    go = 1; /* the other vCPUs' lanes run from now on */
    copies();
    fills();
    ballooned();
    host_refusals();
    page_table_write(bi);

    run_lane(0);
    atomic_add(&lanes_done, 1);
    while (atomic_load(&lanes_done) < lanes)
        cpu_relax();
    {
        uint64_t bad = 0, failed = 0;

        for (unsigned l = 0; l < lanes; l++) {
            bad += lane_bad[l];
            failed += lane_failed[l];
        }
        printf("dma: %lu lanes x %lu rounds: %lu bad bytes, %lu failed transfers\n", lanes, rounds, bad, failed);
        CHECK(bad == 0 && failed == 0, "dma: lanes: %lu bad bytes, %lu failed transfers", bad, failed);
    }

    step("DETACH", dma_detach() == 0);
    step("COPY and DETACH after DETACH are ENODEV", dma_copy(0, 8, 8) == SVM_ENODEV && dma_detach() == SVM_ENODEV);
    rc = dma_attach(BUF, P(4));
    user(u_write_pattern, P(0), P(2), 3, 0);
    rc = rc ? rc : copy(P(0), P(2), P(2));
    step("a device attached again copies again", rc == 0 && user(u_check_pattern, P(2), P(2), 3, 0) == 0);
    puts("dma: leaving the device attached for the VM's exit");
}

int main(const struct svm_boot_info *bi)
{
    rounds = cmdline_u64("rounds", 20);
    ballast = cmdline_u64("ballast", 0);
    lanes = bi->nr_vcpus < MAX_LANES ? bi->nr_vcpus : MAX_LANES;
    if (BUF < bi->free_start || BALLAST + P(ballast) > bi->free_end) {
        printf("dma: the buffer and ballast [0x%llx, 0x%llx) must lie in free RAM [0x%lx, 0x%lx)\n", BUF,
               BALLAST + P(ballast), bi->free_start, bi->free_end);
        return 2;
    }
    printf("dma: buffer of %d pages at 0x%llx, %lu lanes x %lu rounds, %lu ballast pages\n", BUF_PAGES, BUF, lanes,
           rounds, ballast);
    bad_calls(bi);
    if (bi->paging_mode == SVM_PAGING_KVM) {
        step("kvm mode: no DMA device, ATTACH, COPY, FILL and DETACH are EOPNOTSUPP",
             dma_attach(BUF, P(1)) == SVM_EOPNOTSUPP && dma_copy(0, 8, 8) == SVM_EOPNOTSUPP &&
                 dma_fill(0, 8, 1) == SVM_EOPNOTSUPP && dma_detach() == SVM_EOPNOTSUPP);
    } else {
        shadow_mode(bi);
    }
    printf("dma: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
