/* guest: test guest: hostile page tables (frames beyond RAM, reserved bits, self-references), 10,000 CR3 loads and garbage hypercalls; every probe must fault */
#include <shadowvm.h>

/*
 * docs/design.md rule 5 from the guest's side.  The guest builds page tables
 * whose entries point at gpas beyond its RAM (where machine memory and the
 * shadow pool might be, seen from KVM), set reserved bits, or point back at
 * their own table, and probes them from ring 1 and ring 3: every probe must
 * end in a #PF at the probed address.  Then it loads 10,000 distinct CR3
 * values, tries CR3 values the VMM must refuse, and makes hypercalls with
 * garbage arguments.  The VMM must survive all of it; the host-side test
 * then checks the shadow MMU's coherence (`shadowvm run --check`).
 *
 * In kvm mode an access to a gpa outside RAM is MMIO, which shadowvm treats
 * as a fatal error (docs/guest-abi.md §5): those probes run in shadow mode
 * only.  Reserved bits, self-references and not-present entries are probed
 * in both modes.
 */

#define WIN      (1ull << 39)         /* PML4 slot 1 */
#define SLOT(n)  ((uint64_t)(n) << 39) /* PML4 slot n */
#define MIB      (1ull << 20)
#define NR_CR3   10000
#define NR_HC    2000

enum kind {
    ANY,  /* any #PF at the address */
    RSVD, /* P and RSVD set */
    PROT, /* P set, RSVD clear: a protection fault on a present entry */
};

struct probe {
    uint64_t va;
    uint8_t write, ring, kind;
    long rc;
    struct svm_fault f;
};

/* Static: in the image, so ring 3 may read and write it. */
static struct probe probes[2048];
static int nr_probes, failures, checks, rejected, hypercalls;
static bool shadow;

static void add(uint64_t va, int kind, bool both_modes)
{
    if (!both_modes && !shadow)
        return;
    for (int ring = 1; ring <= 3; ring += 2)
        for (int write = 0; write <= 1; write++) {
            /* A read-only supervisor self-reference can be read in ring 1. */
            if (kind == PROT && ring == 1 && !write)
                continue;
            if (nr_probes == (int)(sizeof(probes) / sizeof(probes[0])))
                panic("too many probes");
            probes[nr_probes++] = (struct probe){ .va = va, .write = write, .ring = ring, .kind = kind };
        }
}

static void run_probe(struct probe *p)
{
    memset(&p->f, 0, sizeof(p->f));
    if (p->write)
        p->rc = probe_write64((volatile void *)p->va, 0x6b6b6b6b6b6b6b6bull, &p->f);
    else {
        uint64_t v;

        p->rc = probe_read64((const volatile void *)p->va, &v, &p->f);
    }
}

static int faults, done; /* probes [0, done) have run and been checked */
static int loop_probes;  /* probes made outside probes[] */

/* Ring 3: every new ring-3 probe in one run_user (native there, only the
 * faults go through ring 0). */
static long user_probes(void *arg)
{
    (void)arg;
    for (int i = done; i < nr_probes; i++)
        if (probes[i].ring == 3)
            run_probe(&probes[i]);
    return 0;
}

/* Runs the new probes in both rings and checks that each one faulted. */
static void run_probes(void)
{
    struct svm_fault f;
    long ret;

    for (int i = done; i < nr_probes; i++)
        if (probes[i].ring == 1)
            run_probe(&probes[i]);
    CHECK(run_user(user_probes, NULL, &ret, &f) == RUN_USER_OK,
          "ring 3 probes escaped: vector %lu error 0x%lx cr2 0x%lx", f.vector, f.error_code, f.cr2);
    for (int i = done; i < nr_probes; i++) {
        struct probe *p = &probes[i];
        uint64_t ec = p->f.error_code;
        bool ok = p->rc == -1 && p->f.vector == 14 && p->f.cr2 == p->va &&
                  !!(ec & PF_W) == p->write && !!(ec & PF_U) == (p->ring == 3);

        if (p->kind == RSVD)
            ok = ok && (ec & (PF_P | PF_RSVD)) == (PF_P | PF_RSVD);
        if (p->kind == PROT)
            ok = ok && (ec & (PF_P | PF_RSVD)) == PF_P;
        faults += p->rc == -1;
        CHECK(ok, "ring %d %s 0x%lx: rc %ld vector %lu error 0x%lx cr2 0x%lx (kind %d)", p->ring,
              p->write ? "write" : "read", p->va, p->rc, p->f.vector, ec, p->f.cr2, p->kind);
    }
    done = nr_probes;
}

static unsigned maxphyaddr(void)
{
    uint32_t a = 0x80000008, b, c = 0, d;

    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return a & 0xff;
}

static uint64_t va_of(unsigned l4, unsigned l3, unsigned l2, unsigned l1)
{
    return SLOT(l4) | (uint64_t)l3 << 30 | (uint64_t)l2 << 21 | (uint64_t)l1 << 12;
}

/* Ring 3: write PML4 entry 0 of the boot tables, and the switcher's entry
 * (kvm mode delivers exceptions through it), into every CR3 page. */
struct fill {
    uint64_t *pages, entry0, entry511;
};
static struct fill fill;

static long user_fill(void *arg)
{
    struct fill *f = arg;

    for (int i = 0; i < NR_CR3; i++) {
        f->pages[i * 512] = f->entry0;
        f->pages[i * 512 + SVM_SWITCHER_PML4_INDEX] = f->entry511;
    }
    return 0;
}

/*
 * Ring 3 rewrites the live PML4 through a user alias of it (a PT entry of
 * the window) and then through a writable self-reference it has just made:
 * in shadow mode both write a write-protected guest table.
 */
static struct alias {
    volatile uint64_t *alias, *self;
    uint64_t e9, e10, e11, e12, self0;
} al;

static long user_alias(void *arg)
{
    struct alias *a = arg;

    a->alias[9] = a->e9;
    a->alias[10] = a->e10;
    a->alias[11] = a->e11;
    a->self0 = a->self[0];
    a->self[12] = a->e12;
    return 0;
}

static uint64_t xs = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
    xs ^= xs << 13;
    xs ^= xs >> 7;
    xs ^= xs << 17;
    return xs;
}

static long hc(long nr, long a0, long a1, long a2)
{
    hypercalls++;
    return svm_hypercall(nr, a0, a1, a2, 0).rax;
}

static void expect_einval_cr3(uint64_t cr3)
{
    long rc = hc(SVM_HC_LOAD_CR3, (long)cr3, 0, 0);

    rejected += rc < 0;
    CHECK(rc == SVM_EINVAL, "LOAD_CR3(0x%lx): %ld, want EINVAL", cr3, rc);
}

int main(const struct svm_boot_info *bi)
{
    uint64_t mem = bi->mem_size, *boot = (uint64_t *)bi->boot_cr3;
    unsigned phys = maxphyaddr();
    uint64_t top = 1ull << phys; /* first gpa above MAXPHYADDR */
    uint64_t *pml4 = pt_new_root(), *pdpt = alloc_pages(1), *pd = alloc_pages(1), *pt = alloc_pages(1);
    uint64_t *bait = alloc_pages(1);
    const uint64_t UW = PTE_P | PTE_W | PTE_U;
    uint64_t v;
    struct svm_fault f;
    int n;

    shadow = bi->paging_mode == SVM_PAGING_SHADOW;
    if (!pml4 || !pdpt || !pd || !pt || !bait) {
        puts("hostile: out of memory");
        return 2;
    }
    if (phys < 36 || phys > 52) {
        printf("hostile: odd MAXPHYADDR %u\n", phys);
        return 2;
    }
    bait[0] = 0xba17ba17ba17ba17ull;

    /* PML4: the boot identity map, the switcher, the window, and hostile
     * entries. */
    pml4[1] = (uint64_t)pdpt | UW;
    pml4[2] = mem | UW;                                 /* PDPT beyond RAM */
    pml4[3] = (uint64_t)pml4 | PTE_P;                   /* itself, supervisor read-only */
    pml4[4] = (uint64_t)pdpt | UW | PTE_PS;             /* PS is reserved in a PML4E */
    pml4[6] = (top - PAGE_SIZE) | UW;                   /* PDPT just below 2^MAXPHYADDR */
    pml4[7] = (1ull << 40) | UW;                        /* PDPT at 1 TiB */
    if (phys < 52)
        pml4[5] = (uint64_t)pdpt | UW | (1ull << 51);   /* bit 51 reserved */
    add(va_of(2, 0, 0, 0), ANY, false);
    add(va_of(3, 3, 3, 3), PROT, true);
    add(va_of(3, 0, 0, 0), PROT, true);
    add(va_of(4, 0, 0, 0), RSVD, true);
    if (phys < 52)
        add(va_of(5, 0, 0, 0), RSVD, true);
    add(va_of(6, 0, 0, 0), ANY, false);
    add(va_of(7, 5, 0, 0), ANY, false);

    /* PDPT. */
    pdpt[0] = (uint64_t)pd | UW;
    pdpt[1] = (1ull << 30) | UW | PTE_PS | (1ull << 13); /* 1G page, bit 13 reserved (or PS itself) */
    pdpt[2] = ((mem + (1ull << 30) - 1) & ~((1ull << 30) - 1)) | UW | PTE_PS; /* 1G page beyond RAM */
    pdpt[3] = (mem + 2 * MIB) | UW;                     /* PD beyond RAM */
    pdpt[4] = (top - PAGE_SIZE) | UW;                   /* PD just below 2^MAXPHYADDR */
    add(va_of(1, 1, 0, 0), RSVD, true);
    add(va_of(1, 2, 0, 0), ANY, false);
    add(va_of(1, 3, 0, 0), ANY, false);
    add(va_of(1, 4, 7, 9), ANY, false);

    /* PD. */
    pd[0] = (uint64_t)pt | UW;
    pd[1] = ((mem + 2 * MIB - 1) & ~(2 * MIB - 1)) | UW | PTE_PS; /* 2M page beyond RAM */
    pd[2] = (2 * MIB) | UW | PTE_PS | (1ull << 13);     /* 2M page, bit 13 reserved */
    pd[3] = (top - 2 * MIB) | UW | PTE_PS;              /* 2M page just below 2^MAXPHYADDR */
    pd[4] = (uint64_t)pd | PTE_P;                       /* itself, supervisor read-only */
    pd[5] = (mem + 4 * MIB) | UW;                       /* PT beyond RAM */
    if (phys < 52)
        pd[6] = (uint64_t)pt | UW | (1ull << 51);       /* bit 51 reserved */
    add(va_of(1, 0, 1, 0), ANY, false);
    add(va_of(1, 0, 2, 0), RSVD, true);
    add(va_of(1, 0, 3, 0), ANY, false);
    add(va_of(1, 0, 4, 4), PROT, true);
    add(va_of(1, 0, 4, 0), PROT, true);
    add(va_of(1, 0, 5, 0), ANY, false);
    if (phys < 52)
        add(va_of(1, 0, 6, 0), RSVD, true);

    /* PT: 4K leaves. */
    n = 0;
    pt[n++] = mem | UW;
    pt[n++] = (mem + PAGE_SIZE) | UW;
    pt[n++] = (mem < (1ull << 30) ? 1ull << 30 : mem + 2 * PAGE_SIZE) | UW;
    pt[n++] = ((phys > 40 ? 1ull << 40 : top) - PAGE_SIZE) | UW;
    pt[n++] = (top - PAGE_SIZE) | UW;
    pt[n++] = (top - 2 * PAGE_SIZE) | UW;
    for (int i = 0; i < n; i++)
        add(WIN + i * PAGE_SIZE, ANY, false);
    /* The machine memory and shadow pool beyond guest RAM, as KVM sees it:
     * every MiB from mem_size to 4x mem_size. */
    for (uint64_t gpa = mem, step = MIB * ((3 * mem / MIB + 191) / 192); gpa < 4 * mem && n < 480;
         gpa += step) {
        add(WIN + n * PAGE_SIZE, ANY, false);
        pt[n++] = gpa | UW;
    }
    if (phys < 52) {
        add(WIN + n * PAGE_SIZE, RSVD, true);
        pt[n++] = (uint64_t)bait | UW | (1ull << phys);  /* bit MAXPHYADDR */
        add(WIN + n * PAGE_SIZE, RSVD, true);
        pt[n++] = (uint64_t)bait | UW | (1ull << 51);
    }
    add(WIN + n * PAGE_SIZE, ANY, true);
    pt[n++] = 0x7ffffffffffff000ull | 0xffe;            /* garbage, not present */
    al.alias = (volatile uint64_t *)(WIN + n * PAGE_SIZE);
    pt[n++] = (uint64_t)pml4 | UW;                      /* the PML4, user-writable */

    load_cr3((uint64_t)pml4);

    /* POPULATE over the hostile tables: only RAM the tables really map,
     * through entries that all have Accessed set, may be populated.  The
     * window's PT maps frames beyond RAM, reserved bits, garbage and one
     * RAM page, the PML4 itself (user-writable): exactly one page, in both
     * modes.  Every probe below must still fault, and ring 3's writes to
     * the PML4 through that alias must still reach the VMM. */
    pt_mark_accessed(pml4, WIN, 8 * MIB, true);
    pt_mark_accessed(pml4, WIN + (1ull << 30), 2 * MIB, true);
    {
        static const uint64_t ranges[][2] = {
            { WIN, 1 },                  /* the hostile PT: the PML4 alias only */
            { SLOT(2), 0 },              /* PDPT beyond RAM */
            { SLOT(4), 0 },              /* reserved bit in the PML4E */
            { SLOT(6), 0 },              /* PDPT below 2^MAXPHYADDR */
            { SLOT(7), 0 },              /* PDPT at 1 TiB */
            { WIN + 2 * MIB, 0 },        /* 2M page beyond RAM */
            { WIN + 4 * MIB, 0 },        /* 2M page with a reserved bit */
            { WIN + 6 * MIB, 0 },        /* 2M page below 2^MAXPHYADDR */
            { WIN + (1ull << 30), 0 },   /* 1G page with a reserved bit */
        };

        for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
            uint64_t skipped = 0;
            long rc = populate(ranges[i][0], 2 * MIB, &skipped);

            hypercalls++;
            CHECK(rc == (long)ranges[i][1] && skipped == 512 - ranges[i][1],
                  "POPULATE(0x%lx, 2 MiB): %ld populated, %lu skipped, want %lu", ranges[i][0], rc,
                  skipped, ranges[i][1]);
        }
    }

    /* Reading through the self-references is architecturally fine. */
    CHECK(probe_read64((const volatile void *)va_of(3, 3, 3, 3), &v, &f) == 0 && v == pml4[0],
          "ring 0 read of the PML4 through itself: 0x%lx (vector %lu error 0x%lx)", v, f.vector,
          f.error_code);
    CHECK(probe_read64((const volatile void *)va_of(1, 0, 4, 4), &v, &f) == 0 && v == pd[0],
          "ring 0 read of the PD through itself: 0x%lx (vector %lu error 0x%lx)", v, f.vector,
          f.error_code);

    run_probes();
    CHECK(bait[0] == 0xba17ba17ba17ba17ull, "the bait page changed: 0x%lx", bait[0]);

    /* New hostile entries in the live PML4, written from ring 3. */
    al.self = (volatile uint64_t *)va_of(11, 11, 11, 11);
    al.e9 = (uint64_t)pdpt | UW | PTE_PS;               /* reserved */
    al.e10 = (mem + 8 * MIB) | UW;                      /* PDPT beyond RAM */
    al.e11 = (uint64_t)pml4 | UW;                       /* itself, user-writable */
    al.e12 = (uint64_t)pdpt | UW | PTE_PS;              /* reserved, written through itself */
    {
        long ret;

        CHECK(run_user(user_alias, &al, &ret, &f) == RUN_USER_OK,
              "ring 3 writes to the PML4 faulted: vector %lu error 0x%lx cr2 0x%lx", f.vector, f.error_code,
              f.cr2);
    }
    /* The CPU may set A (and D, where 11 served as a leaf). */
    CHECK((pml4[9] | PTE_A) == (al.e9 | PTE_A) && (pml4[10] | PTE_A) == (al.e10 | PTE_A) &&
              (pml4[11] | PTE_A | PTE_D) == (al.e11 | PTE_A | PTE_D) && (pml4[12] | PTE_A) == (al.e12 | PTE_A),
          "PML4 entries after the ring-3 writes: 0x%lx 0x%lx 0x%lx 0x%lx", pml4[9], pml4[10], pml4[11],
          pml4[12]);
    CHECK(al.self0 == pml4[0], "ring 3 read of the PML4 through itself: 0x%lx", al.self0);
    add(va_of(9, 0, 0, 0), RSVD, true);
    add(va_of(10, 0, 0, 0), ANY, false);
    add(va_of(12, 0, 0, 0), RSVD, true);
    run_probes();
    load_cr3(bi->boot_cr3);

    /*
     * 10,000 distinct CR3 values: one page each, whose entry 0 maps what
     * this loop and exception delivery need (the first 2 MiB through the
     * boot page table, the image page by page), so the VMM can prefault
     * the delivery pages into every new root.  A private copy rather than
     * boot_cr3's entry 0: in shadow mode, recycling a root invalidates in
     * the host every frame mapped under it, and the boot map would soon
     * cover the 10,000 pages themselves.
     */
    {
        uint64_t *xpdpt = alloc_pages(1), *xpd = alloc_pages(1);
        uint64_t *bpd = (uint64_t *)(((uint64_t *)(boot[0] & PTE_ADDR_MASK))[0] & PTE_ADDR_MASK);

        fill.pages = alloc_pages(NR_CR3);
        if (!xpdpt || !xpd || !fill.pages) {
            puts("hostile: out of memory for the CR3 pages");
            return 2;
        }
        xpdpt[0] = (uint64_t)xpd | UW;
        xpd[0] = bpd[0];
        for (uint64_t pa = bi->image_start; pa < bi->image_end; pa += PAGE_SIZE) {
            uint64_t *xpt = xpd[pa >> 21] & PTE_P ? (uint64_t *)(xpd[pa >> 21] & PTE_ADDR_MASK) : NULL;

            if (!xpt) {
                xpt = alloc_pages(1);
                if (!xpt)
                    panic("out of memory");
                xpd[pa >> 21] = (uint64_t)xpt | UW;
            }
            xpt[(pa >> 12) & 511] = pa | UW;
        }
        fill.entry0 = (uint64_t)xpdpt | UW;
        fill.entry511 = boot[SVM_SWITCHER_PML4_INDEX];
    }
    {
        long ret;

        CHECK(run_user(user_fill, &fill, &ret, &f) == RUN_USER_OK, "filling the CR3 pages faulted: vector %lu",
              f.vector);
    }
    for (int i = 0; i < NR_CR3; i++) {
        uint64_t cr3 = (uint64_t)&fill.pages[i * 512];

        hypercalls++;
        load_cr3(cr3);
        if (i % 1000 == 999) {
            struct probe p = { .va = WIN + (uint64_t)i * PAGE_SIZE, .kind = ANY };

            /* The window is not mapped in these tables. */
            run_probe(&p);
            faults += p.rc == -1;
            loop_probes++;
            CHECK(p.rc == -1 && p.f.vector == 14 && p.f.cr2 == p.va && p.f.error_code == 0,
                  "probe after CR3 load %d: rc %ld vector %lu error 0x%lx", i, p.rc, p.f.vector,
                  p.f.error_code);
        }
    }
    load_cr3(bi->boot_cr3);
    /* Give the CR3 pages back while the VMM still caches roots for some. */
    {
        long rc = balloon((uint64_t)fill.pages, NR_CR3);

        hypercalls++;
        CHECK(rc == NR_CR3, "BALLOON of the CR3 pages: %ld", rc);
    }

    /* CR3 values the VMM must refuse. */
    expect_einval_cr3(mem);
    expect_einval_cr3(mem + PAGE_SIZE);
    expect_einval_cr3(4 * mem);
    expect_einval_cr3(1ull << 40);
    expect_einval_cr3(top - PAGE_SIZE);
    expect_einval_cr3(top);
    expect_einval_cr3(bi->boot_cr3 | 1ull << 52);
    expect_einval_cr3(bi->boot_cr3 | 1ull << 63);
    expect_einval_cr3(bi->boot_cr3 | 7);
    expect_einval_cr3(bi->boot_cr3 | 0x20);
    expect_einval_cr3(bi->boot_cr3 | 0x800);
    expect_einval_cr3(~0ull);
    expect_einval_cr3(-PAGE_SIZE);

    /* Arguments at the edges: overflowing ranges, non-canonical addresses. */
    {
        static const struct {
            long nr;
            uint64_t a0, a1;
            long want;
        } e[] = {
            { SVM_HC_PRINT, ~0ull - 8, 16, SVM_EFAULT },
            { SVM_HC_PRINT, ~0ull, 0, SVM_EFAULT },
            { SVM_HC_PRINT, 0x200000, ~0ull, SVM_EINVAL },
            { SVM_HC_BALLOON, 0x200000, 1ull << 52, SVM_EINVAL },
            { SVM_HC_BALLOON, 0x200000, ~0ull, SVM_EINVAL },
            { SVM_HC_BALLOON, -PAGE_SIZE, 1, SVM_EINVAL },
            { SVM_HC_BALLOON, -PAGE_SIZE, 2, SVM_EINVAL },
            { SVM_HC_INVLPG, 1ull << 47, 0, SVM_EINVAL },
            { SVM_HC_INVLPG, ~0ull, 0, 0 },
            { SVM_HC_FLUSH_TLB, ~0ull, 0, SVM_EINVAL },
            /* CR2 is the last fault: a probe of the null page, below. */
            { SVM_HC_RESOLVE_PF, PF_W | PF_U, 1ull << 63, SVM_PF_GUEST_FAULT },
            { SVM_HC_RESOLVE_PF, PF_I, ~0ull, SVM_PF_GUEST_FAULT },
            { SVM_HC_RESOLVE_PF, PF_P | PF_W | PF_U | PF_RSVD | PF_I, 0, SVM_PF_GUEST_FAULT },
            { SVM_HC_RESOLVE_PF, 0xffff, 0, SVM_PF_GUEST_FAULT },
            { SVM_HC_RESOLVE_PF, 0x10000, 0, SVM_EINVAL },
            { SVM_HC_RESOLVE_PF, ~0ull, 0, SVM_EINVAL },
            { SVM_HC_SET_TRAP_TABLE, ~0ull - 8, 2, SVM_EFAULT },
            { SVM_HC_SET_TRAP_TABLE, 0x200000, 257, SVM_EINVAL },
            { SVM_HC_SET_TRAP_TABLE, 0x200000, ~0ull, SVM_EINVAL },
            { SVM_HC_SET_STACK, 8, 0, SVM_EINVAL },
            { SVM_HC_SET_STACK, ~0ull, 0, SVM_EINVAL },
            { SVM_HC_SET_STACK, 0, 0x200000, SVM_EINVAL },
            { SVM_HC_SET_STACK, 0, ~0ull, SVM_EINVAL },
            { SVM_HC_SET_STACK, 0, SVM_SWITCHER_GVA + 0x2000, SVM_EINVAL },
            { SVM_HC_HOST_OP, ~0ull, 0, SVM_EINVAL },
            { SVM_HC_HOST_OP, 1ull << 32, 0, SVM_EINVAL },
            { SVM_HC_SET_PAGING, 16, 0, SVM_EINVAL },
            { SVM_HC_SET_PAGING, ~0ull, 0, SVM_EINVAL },
            { SVM_HC_SET_PAGING, 1ull << 63 | SVM_SET_PAGING_WP | SVM_SET_PAGING_NX, 0, SVM_EINVAL },
            { SVM_HC_POPULATE, SVM_SWITCHER_GVA, PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, SVM_SWITCHER_GVA - PAGE_SIZE, 2 * PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, -PAGE_SIZE, PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, -PAGE_SIZE, 2 * PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, 0x7ffffffff000ull, 2 * PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, 1ull << 47, PAGE_SIZE, SVM_EINVAL },
            { SVM_HC_POPULATE, 0x200000, ~0ull & ~0xfffull, SVM_EINVAL },
            { SVM_HC_POPULATE, 0x200000, 1ull << 52, SVM_EINVAL },
            { SVM_HC_POPULATE, 0x200001, PAGE_SIZE, SVM_EINVAL },
        };

        for (size_t i = 0; i < sizeof(e) / sizeof(e[0]); i++) {
            long rc;

            if (e[i].nr == SVM_HC_RESOLVE_PF) /* CR2: a not-present page */
                probe_read64((const volatile void *)8, &v, &f);
            rc = hc(e[i].nr, (long)e[i].a0, (long)e[i].a1, 0);

            rejected += rc < 0;
            CHECK(rc == e[i].want, "hypercall %ld(0x%lx, 0x%lx): %ld, want %ld", e[i].nr, e[i].a0, e[i].a1, rc,
                  e[i].want);
        }
    }

    /* Garbage hypercalls: every number (plus unknown ones, and known ones
     * with bits above 31), garbage arguments. */
    for (int i = 0; i < NR_HC; i++) {
        static const uint64_t edge[] = { ~0ull, 1ull << 63, 1ull << 52, 1ull << 40, -PAGE_SIZE,
                                         0x7ffffffff000ull, 0x800000000000ull, 0xfffull };
        static const long nrs[] = { SVM_HC_NOP, SVM_HC_PRINT, SVM_HC_EXIT, SVM_HC_LOAD_CR3, SVM_HC_INVLPG,
                                    SVM_HC_FLUSH_TLB, SVM_HC_RESOLVE_PF, SVM_HC_BALLOON, SVM_HC_HOST_OP,
                                    SVM_HC_SET_PAGING, SVM_HC_POPULATE, SVM_HC_DMA, SVM_HC_SET_TRAP_TABLE,
                                    SVM_HC_SET_STACK, SVM_HC_HALT };
        const int nr_known = sizeof(nrs) / sizeof(nrs[0]);
        uint64_t r = rnd();
        long nr = (long)(r % 20), rc;
        bool known = nr < nr_known;
        uint64_t a[3];

        for (int k = 0; k < 3; k++) {
            uint64_t x = rnd();

            a[k] = (x & 3) == 0 ? edge[(x >> 2) % (sizeof(edge) / sizeof(edge[0]))] : rnd();
        }
        if (known)
            nr = nrs[nr];
        else if (r & 0x200)
            nr = (long)((r >> 20) & 0x3ff) + 10;         /* unknown, near the known ones */
        else
            nr = nrs[(r >> 20) % nr_known] | (long)(1ull << (32 + (r >> 8) % 31)); /* bits above 31 */
        if (a[0] == 0x800000000000ull)
            a[0] = mem + (r >> 40 << 12);                /* just past RAM */
        if (nr == SVM_HC_EXIT || nr == SVM_HC_HALT)
            nr = -1 - (long)(r >> 60);                   /* never exit or halt by accident */
        if (nr == SVM_HC_SET_TRAP_TABLE)
            a[1] |= 1ull << (9 + (r >> 8) % 55);         /* never a table (> 256 entries) */
        if (nr == SVM_HC_SET_STACK)
            a[0] |= 8;                                   /* never a stack */
        if (nr == SVM_HC_RESOLVE_PF)                     /* CR2: a not-present page */
            probe_read64((const volatile void *)8, &v, &f);
        if (nr == SVM_HC_LOAD_CR3)
            a[0] |= 1ull << (52 + (r >> 8) % 12);        /* never a usable table */
        if (nr == SVM_HC_BALLOON)
            a[0] |= 1;                                   /* never discards our memory */
        if (nr == SVM_HC_PRINT && a[1] <= 4096)
            a[0] |= 1ull << 62;                          /* never prints */
        if (nr == SVM_HC_RESOLVE_PF && (r & 0x100))
            a[0] &= 0x1f;                                /* a valid error code */
        if (nr == SVM_HC_INVLPG && (r & 0x100))
            a[0] &= 0x7fffffffffffull;                   /* canonical */
        if (nr == SVM_HC_SET_PAGING)
            a[0] |= 1ull << (4 + (r >> 8) % 60);         /* never a mode change */
        if (nr == SVM_HC_POPULATE)
            a[2] |= 1ull << ((r >> 8) % 64);             /* never a valid flag */
        rc = hc(nr, (long)a[0], (long)a[1], (long)a[2]);
        rejected += rc < 0;
        known = false;
        for (int k = 0; k < nr_known; k++)
            known |= nr == nrs[k];
        if (!known)
            CHECK(rc == SVM_ENOSYS, "hypercall %ld: %ld, want ENOSYS", nr, rc);
        else if (nr == SVM_HC_NOP)
            CHECK(rc == 0, "NOP: %ld", rc);
        else if (nr == SVM_HC_RESOLVE_PF && (a[0] & ~0xffffull) == 0)
            CHECK(rc == SVM_PF_GUEST_FAULT, "RESOLVE_PF(0x%lx, 0x%lx): %ld", a[0], a[1], rc);
        else if (nr == SVM_HC_INVLPG && (a[0] >> 47 == 0 || a[0] >> 47 == 0x1ffff))
            CHECK(rc == 0, "INVLPG(0x%lx): %ld", a[0], rc);
        else if (nr == SVM_HC_HOST_OP && a[0] == SVM_HOST_OP_PING)
            CHECK(rc == (long)a[1], "HOST_OP ping: %ld", rc);
        else
            CHECK(rc == SVM_EINVAL || rc == SVM_EFAULT, "hypercall %ld(0x%lx, 0x%lx, 0x%lx): %ld, want an error", nr,
                  a[0], a[1], a[2], rc);
    }
    /* Still alive, still on the boot tables: the image is mapped. */
    CHECK(read_cr3() == bi->boot_cr3, "CR3 changed");
    CHECK(hc(SVM_HC_NOP, 0, 0, 0) == 0, "NOP after the garbage");

    /* End on the hostile tables, so the VMM's coherence check after the
     * run sees them live. */
    load_cr3((uint64_t)pml4);
    CHECK(probe_read64((const volatile void *)va_of(3, 3, 3, 3), &v, &f) == 0 && v == pml4[0],
          "again: ring 0 read of the PML4 through itself: 0x%lx", v);
    add(va_of(2, 0, 0, 0), ANY, false);
    add(va_of(9, 0, 0, 0), RSVD, true);
    add(WIN, ANY, false);
    run_probes();

    printf("hostile: %d probes, %d faults, %d hypercalls rejected (%d hypercalls, %d checks, %d failures)\n",
           nr_probes + loop_probes, faults, rejected, hypercalls, checks, failures);
    return failures || faults != nr_probes + loop_probes ? 1 : 0;
}
