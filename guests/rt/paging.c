/*
 * paging.c - CR3/TLB operations (always hypercalls, so the same guest runs
 * in kvm and shadow mode) and page-table helpers.
 */
#include "rt.h"

void load_cr3(uint64_t cr3)
{
    struct svm_hc_result r = svm_hypercall(SVM_HC_LOAD_CR3, (long)cr3, 0, 0, 0);

    if (r.rax != 0)
        panic("LOAD_CR3(%lx) failed: %ld", cr3, r.rax);
    this_cpu()->cr3 = cr3;
}

/* The guest's CR3.  Never `mov %cr3`: in shadow mode that is the VMM's root. */
uint64_t read_cr3(void)
{
    return this_cpu()->cr3;
}

void invlpg(uint64_t va)
{
    struct svm_hc_result r = svm_hypercall(SVM_HC_INVLPG, (long)va, 0, 0, 0);

    if (r.rax != 0)
        panic("INVLPG(%lx) failed: %ld", va, r.rax);
}

void flush_tlb(unsigned flags)
{
    struct svm_hc_result r = svm_hypercall(SVM_HC_FLUSH_TLB, flags, 0, 0, 0);

    if (r.rax != 0)
        panic("FLUSH_TLB(%x) failed: %ld", flags, r.rax);
}

long balloon(uint64_t gpa, uint64_t nr_pages)
{
    return svm_hypercall(SVM_HC_BALLOON, (long)gpa, (long)nr_pages, 0, 0).rax;
}

long populate(uint64_t gva, uint64_t len, uint64_t *skipped)
{
    struct svm_hc_result r = svm_hypercall(SVM_HC_POPULATE, (long)gva, (long)len, 0, 0);

    if (skipped)
        *skipped = r.rax >= 0 ? (uint64_t)r.rdx : 0;
    return r.rax;
}

long host_op(long op, long arg0, long arg1)
{
    return svm_hypercall(SVM_HC_HOST_OP, op, arg0, arg1, 0).rax;
}

long set_paging(unsigned flags)
{
    return svm_hypercall(SVM_HC_SET_PAGING, (long)flags, 0, 0, 0).rax;
}

uint64_t *pt_new_root(void)
{
    const uint64_t *boot = (const uint64_t *)svm_boot->boot_cr3;
    uint64_t *pml4 = alloc_pages(1);

    if (pml4) {
        pml4[0] = boot[0];
        pml4[SVM_SWITCHER_PML4_INDEX] = boot[SVM_SWITCHER_PML4_INDEX];
    }
    return pml4;
}

static unsigned pt_index(uint64_t va, int level)
{
    return (unsigned)((va >> (12 + 9 * level)) & 511);
}

/* Walk down to the level-0 table for `va`, allocating tables if `alloc`. */
static uint64_t *pt_walk(uint64_t *pml4, uint64_t va, bool alloc, bool *huge)
{
    uint64_t *table = pml4;

    *huge = false;
    for (int level = 3; level > 0; level--) {
        uint64_t *e = &table[pt_index(va, level)];

        if (!(*e & PTE_P)) {
            uint64_t *next;

            if (!alloc)
                return NULL;
            next = alloc_pages(1);
            if (!next)
                return NULL;
            *e = (uint64_t)next | PTE_P | PTE_W | PTE_U;
        } else if (*e & PTE_PS) {
            *huge = true;
            return e;
        }
        table = (uint64_t *)(*e & PTE_ADDR_MASK);
    }
    return &table[pt_index(va, 0)];
}

int pt_map(uint64_t *pml4, uint64_t va, uint64_t pa, uint64_t flags)
{
    bool huge;
    uint64_t *pte = pt_walk(pml4, va, true, &huge);

    if (!pte || huge)
        return -1;
    *pte = (pa & PTE_ADDR_MASK) | flags;
    return 0;
}

uint64_t *pt_lookup(uint64_t *pml4, uint64_t va)
{
    bool huge;

    return pt_walk(pml4, va, false, &huge);
}

uint64_t pt_unmap(uint64_t *pml4, uint64_t va)
{
    bool huge;
    uint64_t *pte = pt_walk(pml4, va, false, &huge);
    uint64_t old;

    if (!pte || huge)
        return 0;
    old = *pte;
    *pte = 0;
    return old;
}

/* Sets `bits` in *e unless they are all there already: a store into a
 * table the VMM shadows costs a fault (and in shadow mode, for an upper
 * level, a zap of its shadow pages), so only a change is written. */
static void set_bits(uint64_t *e, uint64_t bits)
{
    if ((*e & bits) != bits)
        __atomic_fetch_or(e, bits, __ATOMIC_SEQ_CST);
}

void pt_mark_accessed(uint64_t *pml4, uint64_t va, uint64_t len, bool dirty)
{
    uint64_t end = va + len, leaf_bits = PTE_A | (dirty ? PTE_D : 0);

    if (end < va)
        end = ~0ull;
    while (va < end) {
        uint64_t *table = pml4, size = 0;
        int level;

        for (level = 3; level >= 0; level--) {
            uint64_t *e = &table[pt_index(va, level)];
            bool leaf = level == 0 || (*e & PTE_PS);

            size = 1ull << (12 + 9 * level);
            if (!(*e & PTE_P))
                break; /* nothing mapped below: skip what it covers */
            if (leaf) {
                set_bits(e, leaf_bits);
                break;
            }
            set_bits(e, PTE_A);
            table = (uint64_t *)(*e & PTE_ADDR_MASK);
            if (level == 1) {
                /* A page table: mark its entries in one pass, not one walk
                 * each (ring 1 is emulated instruction by instruction). */
                for (unsigned i = pt_index(va, 0); i < 512 && va < end; i++, va += PAGE_SIZE)
                    if (table[i] & PTE_P)
                        set_bits(&table[i], leaf_bits);
                size = 0;
                break;
            }
        }
        if (size) {
            uint64_t next = (va | (size - 1)) + 1;

            if (next == 0)
                break;
            va = next;
        }
    }
}
