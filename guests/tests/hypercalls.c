/* guest: test guest: checks every hypercall's validation and results in both paging modes, and that ring 3 cannot make one */
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
    return svm_hypercall(SVM_HC_NOP, 0, 0, 0, 0).rax;
}

int main(const struct svm_boot_info *bi)
{
    static const char msg[] = "PRINT hypercall works\n";
    uint64_t mem = bi->mem_size;
    struct svm_hc_result r;
    struct svm_fault f;
    uint64_t *page;

    expect(hc(SVM_HC_NOP, 0, 0, 0), 0, "NOP");
    expect(hc(SVM_HC_MAX + 1, 0, 0, 0), SVM_ENOSYS, "unknown hypercall");
    expect(hc(-1, 0, 0, 0), SVM_ENOSYS, "hypercall -1");

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

    r = svm_hypercall(SVM_HC_RESOLVE_PF, 0x1000, PF_W | PF_U, 0x200000, 0);
    expect(r.rax, bi->paging_mode == SVM_PAGING_KVM ? SVM_PF_GUEST_FAULT : r.rax, "RESOLVE_PF");
    /* kvm mode echoes the code; shadow mode computes it from the walk: the
     * GDT page is present, so the architectural code is P|W|U. */
    expect(r.rdx, bi->paging_mode == SVM_PAGING_KVM ? PF_W | PF_U : PF_P | PF_W | PF_U,
           "RESOLVE_PF error code");
    expect(hc(SVM_HC_RESOLVE_PF, 0x1000, 1 << 20, 0), SVM_EINVAL, "RESOLVE_PF bad error code");

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

    /* Ring 3 has no I/O permission: a hypercall there is a #GP. */
    checks++;
    if (run_user(user_hypercall, NULL, NULL, &f) != RUN_USER_FAULT || f.vector != 13) {
        failures++;
        printf("FAIL ring 3 hypercall: vector %lu\n", f.vector);
    }

    printf("hypercalls: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
