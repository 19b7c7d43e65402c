/* guest: pagetable - builds its own page tables, switches CR3, maps/unmaps/remaps pages and checks reads, #PF error codes and A/D bits from ring 1 and ring 3 */
#include <shadowvm.h>

#define WIN 0x8000000000ull /* PML4 slot 1 (512 GiB): not mapped by the boot tables */

static int checks, failures;

/* One access, made from ring 3 by user_probe().  Static: user-accessible. */
static struct probe {
    uint64_t va, val;
    bool write;
    long rc;
    struct svm_fault f;
} probe;

static long user_probe(void *arg)
{
    struct probe *p = arg;

    if (p->write)
        p->rc = probe_write64((volatile void *)p->va, p->val, &p->f);
    else
        p->rc = probe_read64((const volatile void *)p->va, &p->val, &p->f);
    return 0;
}

/* Access `va` from ring `ring`; returns 0 or -1 (fault in *f). */
static long access(int ring, bool write, uint64_t va, uint64_t *val, struct svm_fault *f)
{
    long ret;

    memset(f, 0, sizeof(*f));
    if (ring == 1)
        return write ? probe_write64((volatile void *)va, *val, f)
                     : probe_read64((const volatile void *)va, val, f);
    probe.va = va;
    probe.val = *val;
    probe.write = write;
    if (run_user(user_probe, &probe, &ret, f) != RUN_USER_OK) {
        printf("ring 3 probe of 0x%lx escaped: vector %lu\n", va, f->vector);
        return -2;
    }
    *val = probe.val;
    *f = probe.f;
    return probe.rc;
}

static void expect_value(int ring, uint64_t va, uint64_t want)
{
    struct svm_fault f;
    uint64_t v = 0;
    long rc = access(ring, false, va, &v, &f);

    CHECK(rc == 0 && v == want, "ring %d read 0x%lx: rc %ld value 0x%lx, want 0x%lx (fault vector %lu error 0x%lx)",
          ring, va, rc, v, want, f.vector, f.error_code);
}

static void expect_fault(int ring, bool write, uint64_t va, uint64_t vector, uint64_t error_code)
{
    struct svm_fault f;
    uint64_t v = 0x1234;
    long rc = access(ring, write, va, &v, &f);

    CHECK(rc == -1 && f.vector == vector && f.error_code == error_code && (vector != 14 || f.cr2 == va),
          "ring %d %s 0x%lx: rc %ld vector %lu error 0x%lx cr2 0x%lx, want vector %lu error 0x%lx",
          ring, write ? "write" : "read", va, rc, f.vector, f.error_code, f.cr2, vector, error_code);
}

int main(const struct svm_boot_info *bi)
{
    uint64_t *pml4 = pt_new_root();
    uint64_t *a = alloc_pages(1), *b = alloc_pages(1), *c = alloc_pages(1);
    uint64_t *pte, v;
    struct svm_fault f;

    if (!pml4 || !a || !b || !c) {
        puts("pagetable: out of memory");
        return 2;
    }
    a[0] = 0xaaaaaaaa00000001ull;
    b[0] = 0xbbbbbbbb00000002ull;
    c[0] = 0xcccccccc00000003ull;

    /* Share the boot identity map (kernel, stacks, this image) and the
     * switcher's entry, add a window. */
    pt_map(pml4, WIN, (uint64_t)a, PTE_P | PTE_W | PTE_U);
    pt_map(pml4, WIN + PAGE_SIZE, (uint64_t)b, PTE_P | PTE_U); /* read-only */
    pt_map(pml4, WIN + 3 * PAGE_SIZE, (uint64_t)c, PTE_P | PTE_W); /* supervisor */
    load_cr3((uint64_t)pml4);
    CHECK(read_cr3() == (uint64_t)pml4, "read_cr3");
    puts("pagetable: switched to the guest's own tables");

    /* Present pages. */
    expect_value(1, WIN, a[0]);
    expect_value(3, WIN, a[0]);
    expect_value(3, WIN + PAGE_SIZE, b[0]);
    expect_value(1, WIN + 3 * PAGE_SIZE, c[0]);

    /* Accessed and dirty bits, set by the CPU. */
    pte = pt_lookup(pml4, WIN);
    *pte &= ~(PTE_A | PTE_D);
    invlpg(WIN);
    expect_value(3, WIN, a[0]);
    CHECK((*pte & (PTE_A | PTE_D)) == PTE_A, "after a read the PTE is 0x%lx, want A and not D", *pte);
    v = 0x5eed;
    CHECK(access(3, true, WIN, &v, &f) == 0, "ring 3 write to a writable page faulted (error 0x%lx)", f.error_code);
    CHECK(a[0] == 0x5eed, "the write did not reach the frame: 0x%lx", a[0]);
    CHECK((*pte & (PTE_A | PTE_D)) == (PTE_A | PTE_D), "after a write the PTE is 0x%lx, want A and D", *pte);

    /* Protection faults: architectural error codes and CR2. */
    expect_fault(3, true, WIN + PAGE_SIZE, 14, PF_P | PF_W | PF_U);  /* read-only */
    expect_fault(1, true, WIN + PAGE_SIZE, 14, PF_P | PF_W);         /* CR0.WP=1 */
    expect_fault(3, false, WIN + 2 * PAGE_SIZE, 14, PF_U);           /* not present */
    expect_fault(1, false, WIN + 2 * PAGE_SIZE, 14, 0);
    expect_fault(3, false, WIN + 3 * PAGE_SIZE, 14, PF_P | PF_U);    /* supervisor page */
    expect_fault(3, false, WIN + (1ull << 30), 14, PF_U);            /* no page directory */
    expect_fault(3, false, 0x8000000000000000ull, 13, 0);            /* non-canonical: #GP */

    /* Remap: after invlpg the new frame shows through. */
    pt_map(pml4, WIN, (uint64_t)c, PTE_P | PTE_W | PTE_U);
    invlpg(WIN);
    expect_value(3, WIN, c[0]);
    expect_value(1, WIN, c[0]);

    /* Unmap. */
    CHECK((pt_unmap(pml4, WIN) & PTE_ADDR_MASK) == (uint64_t)c, "pt_unmap returned the wrong frame");
    invlpg(WIN);
    expect_fault(3, false, WIN, 14, PF_U);
    expect_fault(1, true, WIN, 14, PF_W);

    /* Map again, with a full flush this time. */
    pt_map(pml4, WIN, (uint64_t)b, PTE_P | PTE_W | PTE_U);
    flush_tlb(SVM_FLUSH_GLOBAL);
    expect_value(3, WIN, b[0]);

    /* Back to the boot tables: the window is gone. */
    load_cr3(bi->boot_cr3);
    expect_fault(3, false, WIN, 14, PF_U);
    expect_value(3, (uint64_t)b, b[0]);

    printf("pagetable: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
