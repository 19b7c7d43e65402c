/* guest: test guest: checks every hypercall's validation and results in both paging modes, and that ring 3 gets EPERM */
#include <shadowvm.h>

static int checks, failures;

static void expect(long got, long want, const char *what)
{
    checks++;
    if (got != want) {
        failures++;
        printf("FAIL %s: got %ld, want %ld\n", what, got, want);
    }
}

static long hc(long nr, long a0, long a1, long a2)
{
    return svm_hypercall(nr, a0, a1, a2, 0).rax;
}

static long user_hypercall(void *arg)
{
    (void)arg;
    return svm_hypercall(SVM_HC_HOST_OP, SVM_HOST_OP_PING, 0x5eed, 0, 0).rax;
}

/* A trap table of one entry (static: its gpa is its address). */
static struct svm_trap_info trap;

static long set_trap_raw(uint64_t handler, unsigned vector, unsigned ist, unsigned flags)
{
    trap = (struct svm_trap_info){ .handler = handler, .vector = (uint8_t)vector, .ist = (uint8_t)ist,
                                   .flags = (uint16_t)flags };
    return hc(SVM_HC_SET_TRAP_TABLE, (long)&trap, 1, 0);
}

int main(const struct svm_boot_info *bi)
{
    static const char msg[] = "PRINT hypercall works\n";
    uint64_t mem = bi->mem_size;
    struct svm_hc_result r;
    struct svm_fault f;
    uint64_t *page;

    uint64_t area = bi->percpu_base + cpu_id() * bi->percpu_stride;
    uint64_t v;

    expect(hc(SVM_HC_NOP, 0, 0, 0), 0, "NOP");
    expect(hc(0x1ff, 0, 0, 0), SVM_ENOSYS, "unknown hypercall");
    expect(hc(-1, 0, 0, 0), SVM_ENOSYS, "hypercall -1");
    /* The number is all of rax: NOP with a bit above 31 is no hypercall. */
    expect(hc(1l << 32 | SVM_HC_NOP, 0, 0, 0), SVM_ENOSYS, "NOP | 1 << 32");
    expect(hc(1l << 63 | SVM_HC_HALT, 0, 0, 0), SVM_ENOSYS, "HALT | 1 << 63");

    expect(hc(SVM_HC_PRINT, (long)msg, sizeof(msg) - 1, 0), sizeof(msg) - 1, "PRINT");
    expect(hc(SVM_HC_PRINT, (long)mem - 4, 16, 0), SVM_EFAULT, "PRINT past the end of RAM");
    expect(hc(SVM_HC_PRINT, (long)msg, 1 << 20, 0), SVM_EINVAL, "PRINT too long");

    expect(hc(SVM_HC_LOAD_CR3, (long)bi->boot_cr3 + 1, 0, 0), SVM_EINVAL, "LOAD_CR3 low bits");
    expect(hc(SVM_HC_LOAD_CR3, (long)bi->boot_cr3 | 0x18, 0, 0), 0, "LOAD_CR3 with PWT|PCD");
    expect(hc(SVM_HC_LOAD_CR3, (long)mem, 0, 0), SVM_EINVAL, "LOAD_CR3 outside RAM");
    expect(hc(SVM_HC_LOAD_CR3, 1l << 60, 0, 0), SVM_EINVAL, "LOAD_CR3 reserved bits");
    expect(hc(SVM_HC_LOAD_CR3, (long)bi->boot_cr3, 0, 0), 0, "LOAD_CR3 boot tables");
    expect(hc(SVM_HC_INVLPG, 0x200000, 0, 0), 0, "INVLPG");
    expect(hc(SVM_HC_INVLPG, 0x0000800000000000l, 0, 0), SVM_EINVAL, "INVLPG non-canonical");
    expect(hc(SVM_HC_FLUSH_TLB, 0, 0, 0), 0, "FLUSH_TLB");
    expect(hc(SVM_HC_FLUSH_TLB, SVM_FLUSH_GLOBAL, 0, 0), 0, "FLUSH_TLB global");
    expect(hc(SVM_HC_FLUSH_TLB, 0x80, 0, 0), SVM_EINVAL, "FLUSH_TLB unknown flags");

    /* RESOLVE_PF resolves the vCPU's last fault (CR2) and returns CR2 in
     * rsi: fault on the null guard page first. */
    expect(probe_read64((const volatile void *)0x18, &v, &f), -1, "read of page 0 faults");
    expect((long)f.cr2, 0x18, "its CR2");
    r = svm_hypercall(SVM_HC_RESOLVE_PF, PF_W | PF_U, 0, 0x200000, 0);
    expect(r.rax, SVM_PF_GUEST_FAULT, "RESOLVE_PF");
    /* Page 0 is not present: the architectural code is W|U in both modes
     * (kvm mode echoes it, shadow mode computes it from the walk). */
    expect(r.rdx, PF_W | PF_U, "RESOLVE_PF error code");
    expect(r.rsi, 0x18, "RESOLVE_PF returns CR2");
    expect(hc(SVM_HC_RESOLVE_PF, 1 << 20, 0, 0), SVM_EINVAL, "RESOLVE_PF bad error code");

    page = alloc_pages(2);
    page[0] = 7;
    expect(hc(SVM_HC_BALLOON, (long)page, 2, 0), 2, "BALLOON");
    expect((long)page[0], 0, "ballooned page reads as zero");
    expect(hc(SVM_HC_BALLOON, (long)page + 1, 1, 0), SVM_EINVAL, "BALLOON unaligned");
    expect(hc(SVM_HC_BALLOON, 0x1000, 1, 0), SVM_EINVAL, "BALLOON the VMM area");
    expect(hc(SVM_HC_BALLOON, (long)mem - 4096, 2, 0), SVM_EINVAL, "BALLOON past the end of RAM");
    expect(hc(SVM_HC_BALLOON, (long)page, 0, 0), SVM_EINVAL, "BALLOON zero pages");

    expect(hc(SVM_HC_HOST_OP, SVM_HOST_OP_PING, 0x5eed, 0), 0x5eed, "HOST_OP ping");
    expect(hc(SVM_HC_HOST_OP, SVM_HOST_OP_MAX + 1, 0, 0), SVM_EINVAL, "HOST_OP unknown op");

    /* POPULATE (ABI v2): page-aligned gva and len, len <= mem_size, no flags,
     * canonical, no wrap, clear of the switcher; what the range does not map
     * through accessed entries is skipped (rdx), not refused. */
    {
        long populated;
        uint64_t *p = alloc_pages_populated(4, &populated), skipped = 99;

        expect(populated, 4, "POPULATE of 4 fresh pages marked A|D");
        p[0] = 1;
        p[3 * 512] = 2;
        expect((long)(p[0] + p[3 * 512] + p[1]), 3, "populated pages work");
        expect(populate((uint64_t)p, 4 * PAGE_SIZE, &skipped), 4, "POPULATE again");
        expect((long)skipped, 0, "POPULATE again: nothing skipped");
        expect(populate(0, PAGE_SIZE, &skipped), 0, "POPULATE of the null page");
        expect((long)skipped, 1, "POPULATE of the null page: skipped");
        expect(populate(1ull << 39, 16 * PAGE_SIZE, &skipped), 0, "POPULATE of unmapped memory");
        expect((long)skipped, 16, "POPULATE of unmapped memory: skipped");
        expect(populate((uint64_t)p, 0, &skipped), 0, "POPULATE of nothing");
        expect(hc(SVM_HC_POPULATE, (long)p + 8, PAGE_SIZE, 0), SVM_EINVAL, "POPULATE unaligned gva");
        expect(hc(SVM_HC_POPULATE, (long)p, 100, 0), SVM_EINVAL, "POPULATE unaligned len");
        expect(hc(SVM_HC_POPULATE, (long)p, PAGE_SIZE, 1), SVM_EINVAL, "POPULATE flags");
        expect(hc(SVM_HC_POPULATE, 0, (long)mem + PAGE_SIZE, 0), SVM_EINVAL, "POPULATE longer than RAM");
        expect(hc(SVM_HC_POPULATE, -2 * PAGE_SIZE, 4 * PAGE_SIZE, 0), SVM_EINVAL, "POPULATE wrapping");
        expect(hc(SVM_HC_POPULATE, 0x7ffffffff000l, 2 * PAGE_SIZE, 0), SVM_EINVAL,
               "POPULATE into the non-canonical hole");
        expect(hc(SVM_HC_POPULATE, (long)SVM_SWITCHER_GVA, PAGE_SIZE, 0), SVM_EINVAL, "POPULATE the switcher");
        expect(hc(SVM_HC_POPULATE, (long)SVM_SWITCHER_GVA - PAGE_SIZE, 2 * PAGE_SIZE, 0), SVM_EINVAL,
               "POPULATE into the switcher");
    }

    expect(hc(SVM_HC_SET_PAGING, SVM_SET_PAGING_WP | SVM_SET_PAGING_NX, 0, 0), 0, "SET_PAGING boot mode");
    expect(hc(SVM_HC_SET_PAGING, 16, 0, 0), SVM_EINVAL, "SET_PAGING unknown bit");

    /* The trap table: handlers in the image, IST 0..7, flags zero; the
     * table in RAM; at most 256 entries.  A bad entry changes nothing. */
    expect(set_trap_raw(rt_trap_stub(6), 6, 0, 0), 0, "SET_TRAP_TABLE #UD");
    expect(set_trap_raw(rt_trap_stub(6), 6, 8, 0), SVM_EINVAL, "SET_TRAP_TABLE IST 8");
    expect(set_trap_raw(rt_trap_stub(6), 6, 0, 1), SVM_EINVAL, "SET_TRAP_TABLE flags");
    expect(set_trap_raw(0x1000, 6, 0, 0), SVM_EINVAL, "SET_TRAP_TABLE handler outside the image");
    expect(set_trap_raw(SVM_SWITCHER_GVA, 6, 0, 0), SVM_EINVAL, "SET_TRAP_TABLE handler in the switcher");
    expect(hc(SVM_HC_SET_TRAP_TABLE, (long)&trap, 257, 0), SVM_EINVAL, "SET_TRAP_TABLE 257 entries");
    expect(hc(SVM_HC_SET_TRAP_TABLE, (long)mem - 8, 1, 0), SVM_EFAULT, "SET_TRAP_TABLE past the end of RAM");
    expect(hc(SVM_HC_SET_TRAP_TABLE, (long)&trap, 0, 0), 0, "SET_TRAP_TABLE of nothing");
    /* #UD still works after the refused entries. */
    {
        long ret;

        expect(run_user(user_hypercall, NULL, &ret, &f), RUN_USER_OK, "ring 3 after SET_TRAP_TABLE");
        /* Ring 3 may not make hypercalls (Xen's rule): EPERM, nothing done. */
        expect(ret, SVM_EPERM, "ring 3 hypercall");
    }

    /* Stacks: in this vCPU's own per-vCPU area, or 0. */
    expect(hc(SVM_HC_SET_STACK, 0, (long)(area + SVM_PERCPU_TRAP), 0), 0, "SET_STACK kernel");
    expect(hc(SVM_HC_SET_STACK, 1, (long)(area + SVM_PERCPU_IST), 0), 0, "SET_STACK IST1");
    expect(hc(SVM_HC_SET_STACK, 8, (long)(area + SVM_PERCPU_IST), 0), SVM_EINVAL, "SET_STACK IST8");
    expect(hc(SVM_HC_SET_STACK, 0, (long)area, 0), SVM_EINVAL, "SET_STACK below the area");
    expect(hc(SVM_HC_SET_STACK, 0, (long)(area + SVM_PERCPU_STRIDE + 16), 0), SVM_EINVAL,
           "SET_STACK above the area");
    expect(hc(SVM_HC_SET_STACK, 0, (long)bi->free_start + 4096, 0), SVM_EINVAL, "SET_STACK in free RAM");

    printf("hypercalls: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
