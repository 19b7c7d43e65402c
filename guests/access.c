/* guest: access - like kvm-unit-tests' x86/access.c: every leaf/PDE permission-bit combination, read/write/fetch from ring 1 and 3, with CR0.WP, EFER.NX, CR4.SMEP, CR4.SMAP and EFLAGS.AC; prints fault, #PF error code and leaf A/D */
#include <shadowvm.h>

/*
 * A generator in the spirit of kvm-unit-tests' x86/access.c.  For every
 *
 *   leaf PTE {P, W, U, NX, A, D} x PDE (the level above) {P, W, U, NX}
 *   x access {read, write, fetch} x {ring 1, ring 3} x mode {CR0.WP, EFER.NX}
 *
 * and, in the modes with CR4.SMEP and CR4.SMAP (with EFLAGS.AC clear and
 * set), every combination from ring 1: SMEP and SMAP only concern the
 * kernel, and they need tables that map the kernel's code and data
 * supervisor-only, where ring 3 cannot run.
 *
 * it makes the access, and prints one line: fault or not, the #PF error code
 * and the leaf's A/D bits afterwards, then a summary.  The output is the
 * oracle of docs/design.md rule 6: shadow mode must print exactly what kvm mode
 * prints (tests/access.rs diffs them).  Each line is also checked against the
 * SDM's rules (model() below); a line that disagrees says so.
 *
 * Ring 1 is emulated on our backend (~1-3 us per instruction), so nothing is
 * done per combination in ring 1 but the access itself: every combination
 * gets a page of its own (a gva, a leaf PTE, and a PDE per PDE combination),
 * so the whole table is written once per mode (from ring 3, natively), loaded
 * with one LOAD_CR3, and no PTE changes while it is live -- no INVLPG per
 * combination.  The ring-3 accesses run in one run_user() call; the A/D
 * read-back, the model and the formatting run in ring 3 too.
 *
 * Layout: PML4 slot 1 (WIN, unused by the boot tables) -> one PDPT -> one PD.
 * PD entry `pdi` = group * 16 + pde_combo, group = ring * 3 + access; its
 * page table holds the 64 leaf combinations at indices 0..63.  So the slot
 * s = pdi * 64 + leaf_combo numbers the combinations (NR_SLOTS in all), and
 * gva(s) = WIN + pdi * 2 MiB + leaf_combo * 4 KiB.  Every present leaf maps
 * the same data frame: `ret` at offset 0 (fetches call it), COOKIE at
 * DATA_OFF (reads must see it, writes store it again).
 */

#define WIN 0x8000000000ull /* PML4 slot 1 (512 GiB) */

enum { ACC_READ, ACC_WRITE, ACC_FETCH, NR_ACC };
#define NR_RING   2
#define NR_LEAF   64 /* leaf bits: P W U NX A D */
#define NR_PDE    16 /* PDE bits:  P W U NX    */
#define NR_GROUPS (NR_RING * NR_ACC)
#define NR_PT     (NR_GROUPS * NR_PDE)
#define NR_SLOTS  (NR_PT * NR_LEAF)
#define SLOTS_PER_RING (NR_SLOTS / NR_RING)

#define DATA_OFF  8
#define COOKIE    0xacce55edc0ffee00ull

/* The paging modes to cover, switched with the SET_PAGING hypercall (the
 * native instructions fault in ring 1; in shadow mode the VMM must know the
 * mode, and keeps the real CR0.WP and EFER.NXE set).  `ac` is EFLAGS.AC
 * during the ring-1 accesses (it waives SMAP).  The SMEP/SMAP modes run ring
 * 1 only, on tables that map the kernel supervisor-only; among them, CR0.WP=0
 * with SMEP is KVM's smep_andnot_wp case, where a ring-1 write to a
 * read-only user page makes the shadow entry supervisor-only. */
struct mode {
    const char *name;
    bool wp, nx, smep, smap, ac;
};
static const struct mode modes[] = {
    { "cr0.wp=1 efer.nx=1", true, true, false, false, false },
    { "cr0.wp=0 efer.nx=1", false, true, false, false, false },
    { "cr0.wp=1 efer.nx=0", true, false, false, false, false },
    { "cr0.wp=0 efer.nx=0", false, false, false, false, false },
    { "cr0.wp=1 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=0", true, true, true, true, false },
    { "cr0.wp=1 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=1", true, true, true, true, true },
    { "cr0.wp=0 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=1", false, true, true, true, true },
    { "cr0.wp=0 efer.nx=1 cr4.smep=1 cr4.smap=0", false, true, true, false, false },
    { "cr0.wp=1 efer.nx=0 cr4.smep=1 cr4.smap=0", true, false, true, false, false },
};
#define NR_MODES (sizeof(modes) / sizeof(modes[0]))

/* One access's result, written by the probe (f only on a fault). */
struct result {
    long rc; /* 0, -1 (fault, in f), -2 (escaped the probe: ended run_user) */
    uint64_t val;
    struct svm_fault f;
};

static struct ctx {
    uint64_t *pml4, *pdpt, *pd;
    uint64_t *kpml4, *kpdpt; /* the same, with the kernel supervisor-only */
    uint64_t *pt;       /* NR_PT contiguous page tables */
    uint8_t *data;      /* the frame every present leaf maps */
    struct result *res; /* NR_SLOTS */
    char *out;          /* the report */
    size_t out_size, out_len;
    unsigned next;      /* ring-3 accesses: next slot */
    const struct mode *mode;
    unsigned total, faults, mismatches, escapes;
} ctx;

static uint64_t leaf_bits(unsigned l)
{
    return ((l & 1) ? PTE_P : 0) | ((l & 2) ? PTE_W : 0) | ((l & 4) ? PTE_U : 0) |
           ((l & 8) ? PTE_NX : 0) | ((l & 16) ? PTE_A : 0) | ((l & 32) ? PTE_D : 0);
}

static uint64_t pde_bits(unsigned d)
{
    return ((d & 1) ? PTE_P : 0) | ((d & 2) ? PTE_W : 0) | ((d & 4) ? PTE_U : 0) |
           ((d & 8) ? PTE_NX : 0);
}

static uint64_t slot_gva(unsigned s)
{
    return WIN + ((uint64_t)(s / NR_LEAF) << 21) + ((uint64_t)(s % NR_LEAF) << 12);
}

static uint64_t *slot_pte(unsigned s)
{
    return &ctx.pt[(s / NR_LEAF) * 512 + s % NR_LEAF];
}

/* Ring 3: (re)build the test tables for a mode, results cleared. */
static long build_tables(void *arg)
{
    (void)arg;
    memset(ctx.pd, 0, PAGE_SIZE);
    for (unsigned pdi = 0; pdi < NR_PT; pdi++) {
        uint64_t *pt = &ctx.pt[pdi * 512];

        ctx.pd[pdi] = (uint64_t)pt | pde_bits(pdi % NR_PDE);
        for (unsigned l = 0; l < NR_LEAF; l++)
            pt[l] = (uint64_t)ctx.data | leaf_bits(l);
    }
    ctx.pdpt[0] = (uint64_t)ctx.pd | PTE_P | PTE_W | PTE_U;
    ctx.pml4[1] = (uint64_t)ctx.pdpt | PTE_P | PTE_W | PTE_U;
    ctx.kpml4[1] = ctx.pml4[1];
    memset(ctx.res, 0, NR_SLOTS * sizeof(struct result));
    ctx.next = SLOTS_PER_RING;
    return 0;
}

/* The access of slot s (ring 1 or 3: the slot says which, the caller is it). */
static inline void access_slot(unsigned s)
{
    uint64_t va = slot_gva(s);
    struct result *r = &ctx.res[s];

    switch ((s / (NR_PDE * NR_LEAF)) % NR_ACC) {
    case ACC_READ:
        r->rc = probe_read64((const volatile void *)(va + DATA_OFF), &r->val, &r->f);
        break;
    case ACC_WRITE:
        r->rc = probe_write64((volatile void *)(va + DATA_OFF), COOKIE, &r->f);
        break;
    default:
        r->rc = probe_exec((const volatile void *)va, &r->f);
    }
}

/* Ring 3: the user half of the slots, as many as run before an escape. */
static long user_accesses(void *arg)
{
    (void)arg;
    while (ctx.next < NR_SLOTS)
        access_slot(ctx.next++);
    return 0;
}

/*
 * The architectural answer (SDM vol. 3, 4.6 access rights, 4.7 #PF error
 * code, 4.8 A/D bits) for 4-level paging and 4 KiB pages, with SMEP and
 * SMAP, no protection keys.  Returns true for a #PF with *ec; *ad gets the
 * leaf's A/D bits afterwards: set (D for a write) only by an access that
 * succeeds.  The levels above the PDE are present, writable and user.
 */
static bool model(const struct mode *m, unsigned d, unsigned l, bool user, unsigned acc,
                  unsigned *ec, uint64_t *ad)
{
    uint64_t pde = pde_bits(d), pte = leaf_bits(l);
    unsigned code = (acc == ACC_WRITE ? PF_W : 0) | (user ? PF_U : 0) |
                    (acc == ACC_FETCH && (m->nx || m->smep) ? PF_I : 0);
    bool u, w, x;

    *ad = pte & (PTE_A | PTE_D);
    for (int level = 1; level >= 0; level--) {
        uint64_t e = level ? pde : pte;

        if (!(e & PTE_P)) {
            *ec = code;
            return true;
        }
        if (!m->nx && (e & PTE_NX)) { /* bit 63 is reserved without EFER.NXE */
            *ec = code | PF_P | PF_RSVD;
            return true;
        }
    }
    u = (pde & PTE_U) && (pte & PTE_U);
    w = (pde & PTE_W) && (pte & PTE_W);
    x = !m->nx || !((pde | pte) & PTE_NX);
    if ((user && !u) || (acc == ACC_WRITE && !w && (user || m->wp)) || (acc == ACC_FETCH && !x) ||
        (!user && u && acc == ACC_FETCH && m->smep) ||
        (!user && u && acc != ACC_FETCH && m->smap && !m->ac)) {
        *ec = code | PF_P;
        return true;
    }
    *ad |= PTE_A | (acc == ACC_WRITE ? PTE_D : 0);
    return false;
}

static void emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emit(const char *fmt, ...)
{
    va_list ap;
    size_t room = ctx.out_size - ctx.out_len;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(ctx.out + ctx.out_len, room, fmt, ap);
    va_end(ap);
    ctx.out_len += (size_t)n < room ? (size_t)n : room - 1;
}

static void bits(char *b, uint64_t e, bool leaf)
{
    static const struct { uint64_t bit; char c; } names[] = {
        { PTE_P, 'P' }, { PTE_W, 'W' }, { PTE_U, 'U' }, { PTE_NX, 'N' }, { PTE_A, 'A' }, { PTE_D, 'D' },
    };
    unsigned n = leaf ? 6 : 4, i;

    for (i = 0; i < n; i++) {
        b[2 * i] = (e & names[i].bit) ? names[i].c : '-';
        b[2 * i + 1] = '.';
    }
    b[2 * n - 1] = '\0';
}

static void ad_str(char *b, uint64_t ad)
{
    b[0] = (ad & PTE_A) ? 'A' : '-';
    b[1] = (ad & PTE_D) ? 'D' : '-';
    b[2] = '\0';
}

/* Ring 3: one line per combination, compared with model(). */
static long report(void *arg)
{
    static const char acc_name[NR_ACC] = { 'r', 'w', 'f' };
    const struct mode *m = ctx.mode;

    (void)arg;
    emit("mode %s\n", m->name);
    for (unsigned d = 0; d < NR_PDE; d++) {
        for (unsigned l = 0; l < NR_LEAF; l++) {
            char lb[12], db[8];

            bits(lb, leaf_bits(l), true);
            bits(db, pde_bits(d), false);
            for (unsigned ring = 0; ring < (m->smep ? 1 : NR_RING); ring++) {
                for (unsigned acc = 0; acc < NR_ACC; acc++) {
                    unsigned s = ((ring * NR_ACC + acc) * NR_PDE + d) * NR_LEAF + l;
                    const struct result *r = &ctx.res[s];
                    uint64_t ad = *slot_pte(s) & (PTE_A | PTE_D), want_ad;
                    uint64_t want_cr2 = slot_gva(s) + (acc == ACC_FETCH ? 0 : DATA_OFF);
                    unsigned want_ec;
                    bool want_fault = model(m, d, l, ring == 1, acc, &want_ec, &want_ad);
                    bool same;
                    char a[3];

                    ctx.total++;
                    ad_str(a, ad);
                    emit("L=%s U=%s %c/%c: ", lb, db, acc_name[acc], ring ? 'u' : 's');
                    if (r->rc == 0) {
                        same = !want_fault && ad == want_ad;
                        emit("ok ad=%s", a);
                        if (acc == ACC_READ && r->val != COOKIE) {
                            emit(" val=0x%lx", r->val);
                            same = false;
                        }
                    } else {
                        ctx.faults++;
                        same = want_fault && r->f.vector == 14 && r->f.error_code == want_ec &&
                               r->f.cr2 == want_cr2 && ad == want_ad;
                        if (r->rc != -1) {
                            ctx.escapes++;
                            emit("escaped ");
                        }
                        if (r->f.vector == 14)
                            emit("fault ec=0x%lx ad=%s", r->f.error_code, a);
                        else
                            emit("fault vector=%lu ec=0x%lx ad=%s", r->f.vector, r->f.error_code, a);
                        if (r->f.vector == 14 && r->f.cr2 != want_cr2)
                            emit(" cr2=0x%lx", r->f.cr2);
                    }
                    if (!same) {
                        ad_str(a, want_ad);
                        ctx.mismatches++;
                        if (want_fault)
                            emit(" MISMATCH: SDM says fault ec=0x%x ad=%s", want_ec, a);
                        else
                            emit(" MISMATCH: SDM says ok ad=%s", a);
                    }
                    emit("\n");
                }
            }
        }
    }
    return 0;
}

static unsigned mode_flags(const struct mode *m)
{
    return (m->wp ? SVM_SET_PAGING_WP : 0) | (m->nx ? SVM_SET_PAGING_NX : 0) |
           (m->smep ? SVM_SET_PAGING_SMEP : 0) | (m->smap ? SVM_SET_PAGING_SMAP : 0);
}

static const struct mode boot_mode = { "boot", true, true, false, false, false };

/* EFLAGS.AC (popf may change it in any ring; stac is ring 0 only). */
static void set_ac(bool on)
{
    uint64_t f;

    __asm__ volatile("pushfq; pop %0" : "=r"(f));
    f = on ? f | (1ull << 18) : f & ~(1ull << 18);
    __asm__ volatile("push %0; popfq" : : "r"(f) : "memory", "cc");
}

static void user(long (*fn)(void *))
{
    struct svm_fault f;

    if (run_user(fn, NULL, NULL, &f) != RUN_USER_OK)
        panic("access: ring-3 helper took vector %lu error 0x%lx cr2 0x%lx", f.vector,
              f.error_code, f.cr2);
}

int main(const struct svm_boot_info *bi)
{
    const uint64_t *bootpdpt = (const uint64_t *)(((const uint64_t *)bi->boot_cr3)[0] & PTE_ADDR_MASK);
    unsigned covered = 0;

    ctx.pml4 = alloc_pages(1);
    ctx.kpml4 = alloc_pages(1);
    ctx.kpdpt = alloc_pages(1);
    ctx.pdpt = alloc_pages(1);
    ctx.pd = alloc_pages(1);
    ctx.pt = alloc_pages(NR_PT);
    ctx.data = alloc_pages(1);
    ctx.res = alloc_pages((NR_SLOTS * sizeof(struct result) + PAGE_SIZE - 1) / PAGE_SIZE);
    ctx.out_size = 128 * PAGE_SIZE * NR_MODES;
    ctx.out = alloc_pages(ctx.out_size / PAGE_SIZE);
    if (!ctx.pml4 || !ctx.kpml4 || !ctx.kpdpt || !ctx.pdpt || !ctx.pd || !ctx.pt || !ctx.data ||
        !ctx.res || !ctx.out) {
        puts("access: out of memory");
        return 2;
    }
    ctx.pml4[0] = ((const uint64_t *)bi->boot_cr3)[0]; /* kernel, image, free RAM */
    ctx.pml4[SVM_SWITCHER_PML4_INDEX] = ((const uint64_t *)bi->boot_cr3)[SVM_SWITCHER_PML4_INDEX];
    /* The SMEP/SMAP tables: the boot map with U clear at the PDPT level, so
     * the kernel's code and data are supervisor pages there. */
    for (unsigned i = 0; i < 512; i++)
        ctx.kpdpt[i] = bootpdpt[i] & ~PTE_U;
    ctx.kpml4[0] = (uint64_t)ctx.kpdpt | PTE_P | PTE_W;
    ctx.kpml4[SVM_SWITCHER_PML4_INDEX] = ctx.pml4[SVM_SWITCHER_PML4_INDEX];
    ctx.data[0] = 0xc3;                                 /* ret */
    *(uint64_t *)(ctx.data + DATA_OFF) = COOKIE;

    printf("access: leaf {P,W,U,NX,A,D} x PDE {P,W,U,NX} x {read,write,fetch} x {ring 1,ring 3}:"
           " %u combinations per mode (ring 1 only with SMEP: %u)\n",
           NR_SLOTS, SLOTS_PER_RING);
    printf("access: modes covered:");
    for (unsigned i = 0; i < NR_MODES; i++)
        printf(" [%s]", modes[i].name);
    printf("\n");

    for (unsigned i = 0; i < NR_MODES; i++) {
        const struct mode *m = &modes[i];

        ctx.mode = m;
        user(build_tables);
        /* With SMEP on, the kernel must already run on tables that map it
         * supervisor-only: switch tables first, then the mode. */
        load_cr3((uint64_t)(m->smep ? ctx.kpml4 : ctx.pml4));
        if (set_paging(mode_flags(m)) != 0) {
            load_cr3(bi->boot_cr3);
            emit("mode %s: skipped, cannot switch to it\n", m->name);
            continue;
        }
        set_ac(m->ac);
        for (unsigned s = 0; s < SLOTS_PER_RING; s++)
            access_slot(s);
        set_ac(false);
        /* Ring 3 in one go; an access that escapes its probe ends run_user:
         * record it and carry on with the next slot. */
        while (!m->smep && ctx.next < NR_SLOTS) {
            struct svm_fault f;

            if (run_user(user_accesses, NULL, NULL, &f) == RUN_USER_FAULT) {
                ctx.res[ctx.next - 1].rc = -2; /* access_slot(ctx.next++) */
                ctx.res[ctx.next - 1].f = f;
            }
        }
        if (set_paging(mode_flags(&boot_mode)) != 0) /* back to the boot mode */
            panic("access: SET_PAGING(WP|NX) refused");
        load_cr3(bi->boot_cr3);
        user(report);
        covered++;
    }
    rt_write(ctx.out, ctx.out_len);
    printf("access: %u combinations in %u of %u modes: %u faults, %u ok, %u escaped, %u differ from "
           "the SDM\n",
           ctx.total, covered, (unsigned)NR_MODES, ctx.faults, ctx.total - ctx.faults, ctx.escapes,
           ctx.mismatches);
    return ctx.mismatches || ctx.escapes || covered != NR_MODES ? 1 : 0;
}
