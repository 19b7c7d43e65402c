/* guest: test guest: tries every way out of ring 1 (privileged instructions, ring-0 selectors, gates, ports, the switcher, native CR3 loads, recycled roots) and reports that each faulted or was refused */
#include <shadowvm.h>

/*
 * docs/design.md rule 5 from the guest kernel's side: at its highest
 * privilege (ring 1) the guest tries every way it can think of to reach
 * ring 0, the VMM's structures or a machine frame it was not given, and
 * counts for each try whether it faulted, was refused, or ended somewhere
 * harmless (a lower ring, a data segment register, a write dropped by a
 * read-only memslot).  Any other outcome is an escape; the guest prints
 *
 *     escape: <section>: N tries, F faulted, R refused, H harmless, E escaped
 *
 * per section and a total line, and exits 1 if anything escaped.  The
 * command line picks sections (only=priv,sel,...) or a try that stops the
 * VM (crash=int:N, crash=int3, crash=icebp, crash=sysenter: these make our
 * KVM backend fail with KVM_EXIT_INTERNAL_ERROR in ring 1, which the VMM
 * must turn into a clean guest crash, exit status 125).
 *
 * With two or more vCPUs the other vCPUs run the privileged-instruction,
 * native-CR3 and port sweeps at the same time.
 */

#define MIB (1ull << 20)
/* esc_int_table + INT_STRIDE * n: `int $n` as a probe: returns -1 with
 * esc_int_fault filled in if it faulted, 0 if it completed. */
#define INT_STRIDE 16
volatile struct svm_fault esc_int_fault;
#define WIN (1ull << 39) /* PML4 slot 1 */

struct tally {
    uint64_t tries, faulted, refused, harmless, escaped;
};

static int checks, failures;

static void account(struct tally *t, const char *what, int outcome)
{
    t->tries++;
    switch (outcome) {
    case 0: t->faulted++; break;
    case 1: t->refused++; break;
    case 2: t->harmless++; break;
    default:
        t->escaped++;
        printf("ESCAPED: %s\n", what);
    }
}

enum { FAULTED, REFUSED, HARMLESS, ESCAPED };

static void report(const char *section, const struct tally *t)
{
    printf("escape: %s: %lu tries, %lu faulted, %lu refused, %lu harmless, %lu escaped\n", section,
           t->tries, t->faulted, t->refused, t->harmless, t->escaped);
}

static bool section_on(const char *name)
{
    size_t len, n = strlen(name);
    const char *only = cmdline_get("only", &len);

    if (!only)
        return true;
    for (size_t i = 0; i < len;) {
        size_t j = i;

        while (j < len && only[j] != ',')
            j++;
        if (j - i == n && strncmp(only + i, name, n) == 0)
            return true;
        i = j + 1;
    }
    return false;
}

/* ------------------------------------------------------------------------ */
/* Privileged instructions, one probe each (ring 1).                         */
/* ------------------------------------------------------------------------ */

SVM_PROBE_INSN(p_rd_cr0, "mov %cr0, %rax");
SVM_PROBE_INSN(p_rd_cr2, "mov %cr2, %rax");
SVM_PROBE_INSN(p_rd_cr3, "mov %cr3, %rax");
SVM_PROBE_INSN(p_rd_cr4, "mov %cr4, %rax");
SVM_PROBE_INSN(p_rd_cr8, "mov %cr8, %rax");
SVM_PROBE_INSN(p_wr_cr0, "mov %rdi, %cr0");
SVM_PROBE_INSN(p_wr_cr3, "mov %rdi, %cr3");
SVM_PROBE_INSN(p_wr_cr4, "mov %rdi, %cr4");
SVM_PROBE_INSN(p_wr_cr8, "mov %rdi, %cr8");
SVM_PROBE_INSN(p_lgdt, "lgdt (%rdi)");
SVM_PROBE_INSN(p_lidt, "lidt (%rdi)");
SVM_PROBE_INSN(p_ltr, "ltr %di");
SVM_PROBE_INSN(p_lldt, "lldt %di");
SVM_PROBE_INSN(p_lmsw, "lmsw %di");
SVM_PROBE_INSN(p_clts, "clts");
SVM_PROBE_INSN(p_invd, "invd");
SVM_PROBE_INSN(p_wbinvd, "wbinvd");
SVM_PROBE_INSN(p_invlpg, "invlpg (%rdi)");
SVM_PROBE_INSN(p_hlt, "hlt");
SVM_PROBE_INSN(p_cli, "cli");
SVM_PROBE_INSN(p_sti, "sti");
SVM_PROBE_INSN(p_rd_dr7, "mov %dr7, %rax");
SVM_PROBE_INSN(p_wr_dr7, "mov %rdi, %dr7");
SVM_PROBE_INSN(p_wr_dr0, "mov %rdi, %dr0");
SVM_PROBE_INSN(p_rdpmc, "rdpmc");
SVM_PROBE_INSN(p_xsetbv, "xsetbv");
SVM_PROBE_INSN(p_syscall, "syscall");
SVM_PROBE_INSN(p_sysexit, "sysexitq");
SVM_PROBE_INSN(p_swapgs, "swapgs");
SVM_PROBE_INSN(p_in_f4, "in $0x80, %al");
SVM_PROBE_INSN(p_mov_ss, "mov %di, %ss");
SVM_PROBE_INSN(p_mov_ds, "mov %di, %ds");
SVM_PROBE_INSN(p_mov_es, "mov %di, %es");
SVM_PROBE_INSN(p_mov_fs, "mov %di, %fs");
SVM_PROBE_INSN(p_ud2, "ud2");
SVM_PROBE_INSN(p_ss_fault, "mov (%rsp,%rdi,1), %rax");

/* Probes of instructions that need registers set up first: the ex_table
 * entry names the instruction itself, so the setup comes before label 1. */
#define PROBE_SETUP(name, setup, insn)                                                       \
    long name(long arg, struct svm_fault *fault);                                           \
    __asm__(".pushsection .text\n.globl " #name "\n" #name ":\n"                            \
            "    mov %rsi, %r9\n"                                                           \
            "    " setup "\n"                                                               \
            "1:  " insn "\n"                                                                \
            "    ret\n"                                                                     \
            ".pushsection __ex_table, \"a\"\n.balign 8\n.quad 1b, rt_probe_fixup\n"         \
            ".popsection\n.popsection\n")

PROBE_SETUP(p_div0, "xor %edx, %edx; mov %rdi, %rax", "div %rdi");
PROBE_SETUP(p_rdmsr_at, "mov %edi, %ecx", "rdmsr");
PROBE_SETUP(p_wrmsr_at, "mov %edi, %ecx; xor %eax, %eax; xor %edx, %edx; or $1, %eax", "wrmsr");
PROBE_SETUP(p_vmcall, "mov %rdi, %rax", "vmcall");
PROBE_SETUP(p_vmmcall, "mov %rdi, %rax", "vmmcall");
PROBE_SETUP(p_in_dx, "mov %edi, %edx", "in (%dx), %al");
PROBE_SETUP(p_inw_dx, "mov %edi, %edx", "in (%dx), %ax");
PROBE_SETUP(p_inl_dx, "mov %edi, %edx", "in (%dx), %eax");
PROBE_SETUP(p_outw_dx, "mov %edi, %edx; xor %eax, %eax", "out %ax, (%dx)");
PROBE_SETUP(p_outl_dx, "mov %edi, %edx; xor %eax, %eax", "out %eax, (%dx)");

/* Probe one instruction: it must fault with `vector` (any if ~0). */
static int must_fault(long (*probe)(long, struct svm_fault *), long arg, uint64_t vector)
{
    struct svm_fault f = { .vector = ~0ull };

    if (probe(arg, &f) == -1)
        return vector == ~0ull || f.vector == vector ? FAULTED : ESCAPED;
    return ESCAPED;
}

static const uint32_t msrs[] = {
    0xc0000080, /* EFER */         0xc0000081, /* STAR */        0xc0000082, /* LSTAR */
    0xc0000083, /* CSTAR */        0xc0000084, /* SFMASK */      0xc0000100, /* FS_BASE */
    0xc0000101, /* GS_BASE */      0xc0000102, /* KERNEL_GS_BASE */
    0x174, 0x175, 0x176,           /* SYSENTER_CS/ESP/EIP */
    0x1b, /* APIC_BASE */          0x10, /* TSC */               0x277, /* PAT */
    0x2ff, /* MTRR_DEF_TYPE */     0x3a, /* FEATURE_CONTROL */   0x1d9, /* DEBUGCTL */
    0x11, 0x12,                    /* KVM wall clock, system time (old) */
    0x4b564d00, 0x4b564d01,        /* KVM wall clock, system time */
    0x4b564d02, 0x4b564d03, 0x4b564d04, /* async PF, steal time, PV EOI */
    0x4b564df0, 0x4b564df1, 0x4b564df2, 0x4b564df3, /* PVM: address range, vCPU struct, ... */
    0x4b564df4, 0x4b564df5, 0x4b564df6, /* PVM: event entry, return RIPs */
};

static void priv_section(struct tally *t, const struct svm_boot_info *bi)
{
    static const struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } desc = { 0xfff, 0x200000 };
    uint64_t cr0 = 0x80050033, cr4 = 0x6a0;
    /* Native CR3 loads of every page of the first MiB: the boot tables,
     * and where a ring-0 guest would guess machine frames. */
    for (uint64_t a = 0; a < MIB; a += PAGE_SIZE)
        account(t, "mov to cr3", must_fault(p_wr_cr3, (long)a, 13));
    account(t, "mov to cr3 (boot)", must_fault(p_wr_cr3, (long)bi->boot_cr3, 13));
    account(t, "mov to cr0", must_fault(p_wr_cr0, (long)cr0, 13));
    account(t, "mov to cr0 (no WP)", must_fault(p_wr_cr0, (long)(cr0 & ~(1ull << 16)), 13));
    account(t, "mov to cr4", must_fault(p_wr_cr4, (long)cr4, 13));
    account(t, "mov to cr4 (SMEP)", must_fault(p_wr_cr4, (long)(cr4 | (1 << 20)), 13));
    account(t, "mov to cr8", must_fault(p_wr_cr8, 0, 13));
    account(t, "mov from cr0", must_fault(p_rd_cr0, 0, 13));
    account(t, "mov from cr2", must_fault(p_rd_cr2, 0, 13));
    account(t, "mov from cr3", must_fault(p_rd_cr3, 0, 13));
    account(t, "mov from cr4", must_fault(p_rd_cr4, 0, 13));
    account(t, "mov from cr8", must_fault(p_rd_cr8, 0, 13));
    account(t, "lgdt", must_fault(p_lgdt, (long)&desc, 13));
    account(t, "lidt", must_fault(p_lidt, (long)&desc, 13));
    for (uint16_t sel = 0; sel < 0x80; sel++) {
        account(t, "ltr", must_fault(p_ltr, sel, ~0ull));
        account(t, "lldt", must_fault(p_lldt, sel, ~0ull));
    }
    account(t, "lmsw", must_fault(p_lmsw, 0x33, 13));
    account(t, "clts", must_fault(p_clts, 0, 13));
    account(t, "invd", must_fault(p_invd, 0, 13));
    account(t, "wbinvd", must_fault(p_wbinvd, 0, 13));
    account(t, "invlpg", must_fault(p_invlpg, 0x200000, 13));
    account(t, "hlt", must_fault(p_hlt, 0, 13));
    account(t, "cli", must_fault(p_cli, 0, 13));
    account(t, "sti", must_fault(p_sti, 0, 13));
    account(t, "mov from dr7", must_fault(p_rd_dr7, 0, 13));
    account(t, "mov to dr7", must_fault(p_wr_dr7, 0x400, 13));
    account(t, "mov to dr0", must_fault(p_wr_dr0, 0x200000, 13));
    account(t, "rdpmc", must_fault(p_rdpmc, 0, 13));
    account(t, "xsetbv", must_fault(p_xsetbv, 0, ~0ull));
    account(t, "sysexit", must_fault(p_sysexit, 0, 13));
    /* EFER.SCE is clear: #UD, never LSTAR in ring 0. */
    account(t, "syscall", must_fault(p_syscall, 0, 6));
    for (size_t i = 0; i < sizeof(msrs) / sizeof(msrs[0]); i++) {
        account(t, "rdmsr", must_fault(p_rdmsr_at, msrs[i], 13));
        account(t, "wrmsr", must_fault(p_wrmsr_at, msrs[i], 13));
    }
    /* KVM's own hypercalls: #GP here, or KVM refuses them from ring 1
     * (-KVM_EPERM): either way nothing happens. */
    static const long kvm_hcs[] = { 1, 5, 9, 10, 11, 12 };
    for (size_t i = 0; i < sizeof(kvm_hcs) / sizeof(kvm_hcs[0]); i++) {
        long (*const calls[])(long, struct svm_fault *) = { p_vmcall, p_vmmcall };

        for (int k = 0; k < 2; k++) {
            struct svm_fault f = { .vector = ~0ull };
            long rc = calls[k](kvm_hcs[i], &f);

            account(t, k ? "vmmcall" : "vmcall",
                    rc == -1 && f.vector != ~0ull ? FAULTED : rc == -1 ? REFUSED : ESCAPED);
        }
    }
    /* swapgs runs in ring 1 on this backend: it swaps GS.base with
     * KERNEL_GS_BASE, the guest's own; swap back. */
    {
        struct svm_fault f;

        if (p_swapgs(0, &f) == 0) {
            p_swapgs(0, &f);
            account(t, "swapgs", HARMLESS);
        } else {
            account(t, "swapgs", FAULTED);
        }
    }
    /* popf may not raise IOPL or set IF in ring 1. */
    {
        uint64_t fl;

        __asm__ volatile("pushfq; orq $0x3200, (%%rsp); popfq; pushfq; pop %0" : "=r"(fl)::"memory", "cc");
        account(t, "popf IOPL=3|IF", (fl & 0x3200) == 0 ? REFUSED : ESCAPED);
        account(t, "in 0x80 after popf", must_fault(p_in_f4, 0, 13));
    }
}

/* ------------------------------------------------------------------------ */
/* Far transfers and segment loads with every selector.                      */
/* ------------------------------------------------------------------------ */

/* esc_far(kind, sel): 0 ljmp, 1 lcall, 2 lret, 3 iretq to CS `sel`.
 * Returns -1 if the transfer faulted (vector in esc_vector), 2 if that
 * fault became a #DF (with esc_df_stub registered), 1 if it landed in ring 1
 * (esc_land_cs = CS there, esc_land_priv = whether `mov %cr0` then
 * faulted), 0 if it landed in ring 3 (which comes back through the
 * runtime's ring-3 return, like run_user). */
long esc_far(long kind, long sel);
volatile uint64_t esc_vector, esc_land_cs, esc_land_priv;
__attribute__((used, aligned(16))) uint8_t esc_ustack[4096]; /* in the image: user-accessible */

__asm__(
    ".pushsection .text\n"
    ".globl esc_far\n"
    "esc_far:\n"
    "    push %rbp; push %rbx; push %r12; push %r13; push %r14; push %r15\n"
    "    mov %rsp, %gs:16\n"          /* RT_CPU_KSAVE_RSP: where ring 3 comes back to */
    "    mov %rsp, esc_saved_rsp(%rip)\n"
    "    lea esc_land1(%rip), %rax\n"
    "    lea esc_farptr(%rip), %rcx\n"
    "    mov %eax, (%rcx)\n"
    "    mov %si, 4(%rcx)\n"
    "    mov %rsi, %rbx\n"            /* the selector */
    "    and $3, %rbx\n"
    "    lea esc_land3(%rip), %rdx\n"
    "    cmp $3, %rbx\n"
    "    cmove %rdx, %rax\n"          /* RPL 3: land in ring 3 */
    "    mov $0x11, %r8\n"            /* SS for the target ring */
    "    mov $0x1b, %rdx\n"
    "    cmp $3, %rbx\n"
    "    cmove %rdx, %r8\n"
    "    mov %rsp, %r10\n"
    "    lea esc_ustack+4096(%rip), %rdx\n"
    "    cmp $3, %rbx\n"
    "    cmove %rdx, %r10\n"
    "    cmp $0, %rdi\n"
    "    je 10f\n"
    "    cmp $1, %rdi\n"
    "    je 11f\n"
    "    cmp $2, %rdi\n"
    "    je 12f\n"
    /* iretq: SS, RSP, RFLAGS, CS, RIP */
    "    push %r8\n"
    "    push %r10\n"
    "    pushq $0x2\n"
    "    push %rsi\n"
    "    push %rax\n"
    "13: iretq\n"
    "10: ljmp *(%rcx)\n"
    "11: lcall *(%rcx)\n"
    "    jmp esc_land1\n"
    /* lretq: RIP, CS, then RSP and SS for an outer ring */
    "12: push %r8\n"
    "    push %r10\n"
    "    push %rsi\n"
    "    push %rax\n"
    "14: lretq\n"
    ".pushsection __ex_table, \"a\"\n.balign 8\n"
    ".quad 10b, esc_fixup\n.quad 11b, esc_fixup\n.quad 13b, esc_fixup\n.quad 14b, esc_fixup\n"
    ".popsection\n"
    /* The transfer faulted: the handler jumped here with r8 = vector. */
    "esc_fixup:\n"
    "    mov %r8, esc_vector(%rip)\n"
    "    mov $-1, %rax\n"
    "    jmp esc_back\n"
    /* Landed in ring 1 (or so it seems): is it really ring 1? */
    "esc_land1:\n"
    "    mov esc_saved_rsp(%rip), %rsp\n"
    "    mov $0x11, %eax\n"
    "    mov %eax, %ss\n"
    "    mov %cs, %rax\n"
    "    mov %rax, esc_land_cs(%rip)\n"
    "    lea esc_land_fault(%rip), %rsi\n"
    "    call p_rd_cr0\n"
    "    mov %rax, esc_land_priv(%rip)\n" /* -1: it faulted, ring 1 indeed */
    "    mov $1, %rax\n"
    "esc_back:\n"
    "    mov esc_saved_rsp(%rip), %rsp\n"
    "    movq $0, %gs:16\n"
    "    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbx; pop %rbp\n"
    "    ret\n"
    /* Landed in ring 3: come back through the runtime's ring-3 return. */
    "esc_land3:\n"
    "    mov %cs, %rax\n"
    "    mov %rax, esc_land_cs(%rip)\n"
    "    mov $1, %eax\n"             /* RT_SYS_RETURN */
    "    xor %edi, %edi\n"
    "    jmp rt_user_sys_ud2\n"
    ".popsection\n"
    ".pushsection .data\n"
    ".balign 8\n"
    "esc_saved_rsp: .quad 0\n"
    "esc_farptr: .long 0\n.word 0\n.word 0\n"
    "esc_land_fault: .quad 0, 0, 0\n"
    ".popsection\n");

/* sysretq in ring 1: architecturally #GP (#UD with EFER.SCE clear); this
 * backend executes it, into ring 3 at RCX.  Returns -1 (faulted) or 0
 * (landed in ring 3). */
long esc_sysret(void);
__asm__(
    ".pushsection .text\n"
    ".globl esc_sysret\n"
    "esc_sysret:\n"
    "    push %rbp; push %rbx; push %r12; push %r13; push %r14; push %r15\n"
    "    mov %rsp, %gs:16\n"
    "    mov %rsp, esc_saved_rsp(%rip)\n"
    "    lea esc_land3(%rip), %rcx\n"
    "    mov $0x2, %r11\n"
    "1:  sysretq\n"
    ".pushsection __ex_table, \"a\"\n.balign 8\n.quad 1b, esc_fixup\n.popsection\n"
    ".popsection\n");

static void clear_ksave(void)
{
    __asm__ volatile("movq $0, %%gs:16" ::: "memory");
}

/* The descriptor behind `sel` in the switcher's GDT, or 0. */
static uint64_t gdt_desc(uint16_t sel)
{
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } gdtr;

    __asm__ volatile("sgdt %0" : "=m"(gdtr));
    if (sel & 4 || (sel | 7) > gdtr.limit)
        return 0;
    return ((const volatile uint64_t *)gdtr.base)[sel >> 3];
}

static unsigned desc_dpl(uint64_t d)
{
    return (unsigned)(d >> 45) & 3;
}

static void selector_section(struct tally *t)
{
    extern const uint8_t esc_df_stub[];
    static const char *const kinds[] = { "ljmp", "lcall", "lret", "iretq" };

    /* A transfer may fault while it delivers its own fault (#DF): count
     * that as a fault too, through this test's #DF handler. */
    set_trap(8, (uint64_t)esc_df_stub, 1);
    for (unsigned sel = 0; sel < 0x100; sel++) {
        uint64_t d = gdt_desc((uint16_t)sel);
        /* The TSS descriptors (and their upper halves): a far jump or call
         * to one is a task switch, which this backend cannot emulate: the
         * VM stops (KVM_EXIT_INTERNAL_ERROR), so tests/isolation.rs tries
         * each in a VM of its own (crash=far:KIND:SEL). */
        bool tss = !(sel & 4) && sel >> 3 >= 5 && gdt_desc((uint16_t)(sel & ~7u)) != 0;
        /* The list: every selector whose RPL or DPL is 0, or that
         * names no descriptor; the ring-1 and ring-3 selectors of the
         * transfers' own rings are tried too (they must stay in ring 1 or
         * go to ring 3). */
        bool ring0ish = (sel & 3) == 0 || !(d >> 47 & 1) || desc_dpl(d) == 0;

        for (long kind = 0; kind < 4; kind++) {
            long r;

            if (!ring0ish || (tss && kind < 2))
                continue;
            esc_vector = ~0ull;
            esc_land_priv = 0;
            r = esc_far(kind, sel);
            clear_ksave();
            if (r == -1 || r == 2) /* 2: a #DF */
                account(t, kinds[kind], FAULTED);
            else if (r == 0)
                account(t, kinds[kind], (esc_land_cs & 3) == 3 ? HARMLESS : ESCAPED);
            else
                account(t, kinds[kind],
                        (long)esc_land_priv == -1 && (esc_land_cs & 3) == 1 ? HARMLESS : ESCAPED);
            if (r != -1 && r != 2 && (esc_land_cs & 3) != 3 && (long)esc_land_priv != -1)
                printf("ESCAPED: %s to 0x%x landed with CS 0x%lx\n", kinds[kind], sel, esc_land_cs);
        }
        /* Segment loads: SS must fault unless it is the kernel's own;
         * DS/ES/FS may load a data or readable code segment of DPL >= 1
         * (harmless in 64-bit mode); either way the CPL stays 1. */
        {
            struct svm_fault f, g;
            long r = p_mov_ss(sel, &f);
            /* A null selector with RPL 1 may be loaded into SS in ring 1
             * (64-bit mode); anything loaded must leave the CPL at 1. */
            bool still1 = r == -1 || p_rd_cr0(0, &g) == -1;

            __asm__ volatile("mov %0, %%ss" : : "r"((uint16_t)SVM_KERNEL_DS));
            account(t, "mov ss", r == -1 ? FAULTED : still1 ? HARMLESS : ESCAPED);
            if (!still1)
                printf("ESCAPED: mov ss with 0x%x\n", sel);
            for (int k = 0; k < 3; k++) {
                long (*const loads[])(long, struct svm_fault *) = { p_mov_ds, p_mov_es, p_mov_fs };

                r = loads[k](sel, &f);
                __asm__ volatile("mov %0, %%ds; mov %0, %%es; mov %0, %%fs"
                                 : : "r"((uint16_t)SVM_USER_DS));
                account(t, "mov ds/es/fs",
                        r == -1 ? FAULTED : p_rd_cr0(0, &g) == -1 ? HARMLESS : ESCAPED);
            }
        }
    }
    set_trap(8, rt_trap_stub(8), 1);
    /* sysret: into ring 3 at best. */
    {
        long r;

        esc_land_cs = 0;
        r = esc_sysret();
        clear_ksave();
        account(t, "sysret", r == -1 ? FAULTED : (esc_land_cs & 3) == 3 ? HARMLESS : ESCAPED);
    }
}

/* ------------------------------------------------------------------------ */
/* Exceptions: every handler runs in ring 1 (handler_cpl_check).             */
/* ------------------------------------------------------------------------ */

static long user_int(void *arg)
{
    /* int $n for n = arg; -1 if it faulted, else CS after it. */
    extern const uint8_t esc_int_table[];
    long (*fn)(void) = (long (*)(void))(esc_int_table + INT_STRIDE * (uint64_t)arg);
    uint16_t cs;

    if (fn() == -1)
        return -1;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs;
}

__asm__(".pushsection .text\n.globl esc_int_table\n.balign 16\nesc_int_table:\n"
        ".set n, 0\n.rept 256\n.balign 16\n"
        "lea esc_int_fault(%rip), %r9\n"
        "1: .byte 0xcd, n\n"
        "2: xor %eax, %eax\n"
        "ret\n"
        /* This backend reports some of these faults at the instruction
         * after the int: both addresses lead to the fixup. */
        ".pushsection __ex_table, \"a\"\n.balign 8\n.quad 1b, rt_probe_fixup\n"
        ".quad 2b, rt_probe_fixup\n.popsection\n"
        ".set n, n + 1\n.endr\n"
        ".globl esc_int3\nesc_int3: int3\nret\n"
        ".globl esc_icebp\nesc_icebp: .byte 0xf1\nret\n"
        ".globl esc_sysenter\nesc_sysenter: sysenter\nret\n"
        ".popsection\n");

static long user_tf(void *arg)
{
    (void)arg;
    __asm__ volatile("pushfq; orq $0x100, (%%rsp); popfq; nop; nop" ::: "memory", "cc");
    return 0;
}

static long user_ac(void *arg)
{
    static volatile uint64_t buf[2];
    uint64_t v;

    (void)arg;
    __asm__ volatile("pushfq; orq $0x40000, (%%rsp); popfq; mov (%1), %0"
                     : "=r"(v)
                     : "r"((volatile char *)buf + 1)
                     : "memory", "cc");
    return (long)v;
}

static long user_mf(void *arg)
{
    uint16_t cw;

    (void)arg;
    __asm__ volatile("fninit; fnstcw %0; andw $~4, %0; fldcw %0; fld1; fldz; fdivrp; fwait"
                     : "+m"(cw)::"memory");
    return 0;
}

static long user_xm(void *arg)
{
    uint32_t csr;

    (void)arg;
    __asm__ volatile("stmxcsr %0; andl $~0x200, %0; ldmxcsr %0; xorps %%xmm1, %%xmm1;"
                     "mov $1, %%eax; cvtsi2ss %%eax, %%xmm0; divss %%xmm1, %%xmm0"
                     : "+m"(csr)::"rax", "memory"); /* xmm0/1: nobody else uses them */
    return 0;
}

/* A ring-3 try that must end in an exception with `vector`. */
static int user_fault(long (*fn)(void *), void *arg, uint64_t vector)
{
    struct svm_fault f;
    long ret = 0;

    if (run_user(fn, arg, &ret, &f) != RUN_USER_FAULT) {
        /* user_int's probe caught the fault itself. */
        if (fn == user_int && ret == -1)
            return vector == ~0ull || esc_int_fault.vector == vector ? FAULTED : ESCAPED;
        return ESCAPED;
    }
    return vector == ~0ull || f.vector == vector ? FAULTED : ESCAPED;
}

/* #DF: the runtime treats it as fatal, so this test has its own handler:
 * it registers #GP again, proves it runs in ring 1, and abandons the #DF
 * frame through esc_back (an abort cannot be returned from). */
void esc_df(void);
volatile uint64_t esc_df_seen, esc_df_priv;
__asm__(".pushsection .text\n.globl esc_df_stub\nesc_df_stub:\n"
        "    mov esc_kss(%rip), %ss\n"
        "    call esc_df\n"
        "    mov $2, %eax\n"
        "    jmp esc_back\n"
        "esc_kss: .word 0x11\n"
        ".popsection\n");

void esc_df(void)
{
    struct svm_fault f;

    set_trap(13, rt_trap_stub(13), 0);
    esc_df_seen++;
    esc_df_priv = (uint64_t)p_rd_cr0(0, &f);
}

/* esc_call_saved(fn): calls fn() with esc_saved_rsp set, so that a handler
 * may come back through esc_back; returns what esc_back returns. */
long esc_call_saved(void (*fn)(void));
__asm__(".pushsection .text\n.globl esc_call_saved\nesc_call_saved:\n"
        "    push %rbp; push %rbx; push %r12; push %r13; push %r14; push %r15\n"
        "    mov %rsp, esc_saved_rsp(%rip)\n"
        "    call *%rdi\n"
        "    xor %eax, %eax\n"
        "    jmp esc_back\n"
        ".popsection\n");

static volatile uint64_t esc_np_vector;

static void ud_without_gate(void)
{
    struct svm_fault f = { .vector = ~0ull };

    p_ud2(0, &f);
    esc_np_vector = f.vector;
}

static void gp_without_gate(void)
{
    __asm__ volatile("cli"); /* #GP; gate 13 is not present: #NP, then #DF */
}

static void handlers_section(struct tally *t)
{
    extern const uint8_t esc_df_stub[];
    static const uint64_t covered[] = { 0, 1, 3, 6, 8, 12, 13, 14, 16, 17, 19 };
    uint64_t before_ok[32];

    for (int v = 0; v < 32; v++)
        before_ok[v] = handler_cpl_ok[v];
    handler_cpl_check = true;
    account(t, "#DE", must_fault(p_div0, 0, 0));
    account(t, "#DB from ring 3", user_fault(user_tf, NULL, 1));
    account(t, "#BP from ring 3", user_fault(user_int, (void *)3, ~0ull));
    account(t, "#UD", must_fault(p_ud2, 0, 6));
    account(t, "#SS", must_fault(p_ss_fault, 0x800000000000, 12));
    account(t, "#GP", must_fault(p_rd_cr0, 0, 13));
    {
        struct svm_fault f;
        uint64_t v;

        account(t, "#PF", probe_read64((const volatile void *)8, &v, &f) == -1 && f.vector == 14
                                  ? FAULTED : ESCAPED);
    }
    /* A vector without a gate: #NP (this backend makes it a #DF). */
    {
        long r;

        set_trap(8, (uint64_t)esc_df_stub, 1);
        set_trap(6, 0, 0);
        esc_np_vector = ~0ull;
        r = esc_call_saved(ud_without_gate);
        clear_ksave();
        set_trap(6, rt_trap_stub(6), 0);
        set_trap(8, rt_trap_stub(8), 1);
        account(t, "#UD without a gate", (r == 0 && esc_np_vector == 11) || r == 2 ? FAULTED : ESCAPED);
    }
    account(t, "#AC from ring 3", user_fault(user_ac, NULL, 17));
    account(t, "#MF from ring 3", user_fault(user_mf, NULL, 16));
    account(t, "#XM from ring 3", user_fault(user_xm, NULL, 19));
    /* #DF: #GP with no gate for #GP. */
    {
        long r;

        set_trap(8, (uint64_t)esc_df_stub, 1);
        set_trap(13, 0, 0);
        esc_df_seen = 0;
        r = esc_call_saved(gp_without_gate);
        clear_ksave();
        set_trap(13, rt_trap_stub(13), 0);
        set_trap(8, rt_trap_stub(8), 1);
        account(t, "#DF", r == 2 && esc_df_seen == 1 && (long)esc_df_priv == -1 ? FAULTED : ESCAPED);
        if (r == 2 && esc_df_seen)
            handler_cpl_ok[8] += (long)esc_df_priv == -1;
    }
    handler_cpl_check = false;
    for (size_t i = 0; i < sizeof(covered) / sizeof(covered[0]); i++) {
        uint64_t v = covered[i];

        CHECK(handler_cpl_ok[v] > before_ok[v], "the handler of vector %lu never ran", v);
    }
    for (int v = 0; v < 32; v++) {
        CHECK(handler_cpl_bad[v] == 0, "the handler of vector %d ran in ring 0 %lu times", v,
              handler_cpl_bad[v]);
        if (handler_cpl_bad[v])
            account(t, "a handler in ring 0", ESCAPED);
    }
    printf("escape: handlers: vectors checked in ring 1:");
    for (int v = 0; v < 32; v++)
        if (handler_cpl_ok[v])
            printf(" %d", v);
    printf("\n");
}

/* ------------------------------------------------------------------------ */
/* Gates: int $n through every vector from ring 3.                           */
/* ------------------------------------------------------------------------ */

static void gates_section(struct tally *t)
{
    for (uint64_t n = 0; n < 256; n++) {
        struct svm_fault f;

        long cs = 0;

        /* Every gate has DPL 0: #GP(n * 8 + 2), or what this backend does
         * instead (#UD; vector 3 for int3; int $0x1a completes in ring 3
         * without reaching the guest's handlers); never ring 0. */
        if (run_user(user_int, (void *)n, &cs, &f) == RUN_USER_FAULT || cs == -1)
            account(t, "int n from ring 3", FAULTED);
        else if ((cs & 3) == 3)
            account(t, "int n from ring 3", HARMLESS);
        else
            account(t, "int n from ring 3", ESCAPED);
    }
}

/* ------------------------------------------------------------------------ */
/* Sweeps with a fast #GP handler: every port, native CR3 loads.              */
/* ------------------------------------------------------------------------ */

/* The fast handler counts the #GP in esc_gp[cpu] and skips the faulting
 * instruction (esc_skip[cpu] bytes): emulated ring 1 is slow, so no C. */
volatile uint64_t esc_gp[SVM_MAX_VCPUS], esc_skip[SVM_MAX_VCPUS];
__asm__(".pushsection .text\n.globl esc_fast_gp\nesc_fast_gp:\n"
        "    mov esc_kss(%rip), %ss\n"
        "    add $8, %rsp\n"            /* the error code */
        "    push %rax\n"
        "    mov %gs:8, %rax\n"         /* vCPU index */
        "    lock incq esc_gp(,%rax,8)\n"
        "    mov esc_skip(,%rax,8), %rax\n"
        "    add %rax, 8(%rsp)\n"
        "    pop %rax\n"
        "    iretq\n"
        ".popsection\n");

static bool port_allowed(unsigned p)
{
    return (p >= SVM_PORT_EXIT && p <= SVM_PORT_HYPERCALL + 3) ||
           (p >= SVM_PORT_SERIAL && p < SVM_PORT_SERIAL + 8);
}

static void ports_section(struct tally *t, unsigned stride)
{
    extern const uint8_t esc_fast_gp[];
    unsigned cpu = cpu_id();
    uint64_t n = 0, before = esc_gp[cpu];

    set_trap(13, (uint64_t)esc_fast_gp, 0);
    esc_skip[cpu] = 1;
    for (unsigned p = cpu % stride; p < 0x10000; p += stride) {
        if (port_allowed(p))
            continue;
        __asm__ volatile("in (%%dx), %%al" : : "d"(p) : "rax", "memory");
        __asm__ volatile("out %%al, (%%dx)" : : "d"(p), "a"(0) : "memory");
        n += 2;
    }
    set_trap(13, rt_trap_stub(13), 0);
    t->tries += n;
    t->faulted += esc_gp[cpu] - before;
    t->escaped += n - (esc_gp[cpu] - before);
    /* Wider accesses that start or end next to an allowed port. */
    static const unsigned edges[] = { 0xf2, 0xf3, 0xf6, 0xf7, 0xf8, 0x3f5, 0x3f6, 0x3f7, 0x3fd, 0x3fe, 0x3ff };
    for (size_t i = 0; i < sizeof(edges) / sizeof(edges[0]); i++) {
        unsigned p = edges[i];
        bool word_ok = port_allowed(p) && port_allowed(p + 1);
        bool dword_ok = word_ok && port_allowed(p + 2) && port_allowed(p + 3);

        if (!word_ok) {
            account(t, "inw", must_fault(p_inw_dx, p, 13));
            account(t, "outw", must_fault(p_outw_dx, p, 13));
        }
        if (!dword_ok) {
            account(t, "inl", must_fault(p_inl_dx, p, 13));
            account(t, "outl", must_fault(p_outl_dx, p, 13));
        }
    }
}

static void cr3_sweep(struct tally *t, uint64_t top)
{
    extern const uint8_t esc_fast_gp[];
    unsigned cpu = cpu_id();
    uint64_t n = 0, before = esc_gp[cpu];

    set_trap(13, (uint64_t)esc_fast_gp, 0);
    esc_skip[cpu] = 3; /* mov %rdi, %cr3 and mov %cr3, %rax: 3 bytes each */
    for (uint64_t a = 0; a < top; a += PAGE_SIZE) {
        __asm__ volatile("mov %%rdi, %%cr3" : : "D"(a) : "memory"); /* 3 bytes */
        n++;
    }
    __asm__ volatile("mov %%cr3, %%rax" ::: "rax");
    n++;
    set_trap(13, rt_trap_stub(13), 0);
    t->tries += n;
    t->faulted += esc_gp[cpu] - before;
    t->escaped += n - (esc_gp[cpu] - before);
}

/* ------------------------------------------------------------------------ */
/* The switcher: read it, try to write it.                                    */
/* ------------------------------------------------------------------------ */

static long user_read(void *arg)
{
    uint64_t v;
    struct svm_fault f;

    return probe_read64((const volatile void *)arg, &v, &f) == -1 && f.vector == 14 &&
                   (f.error_code & (PF_P | PF_U)) == (PF_P | PF_U)
               ? 0
               : 1;
}

/* A write to `va` from ring 1 that must fault, or be dropped (kvm mode,
 * CR0.WP=0: a read-only memslot); `check` is the switcher word that must
 * not change. */
static int write_refused(uint64_t va, volatile const uint64_t *check)
{
    struct svm_fault f;
    uint64_t before = *check;
    long r = probe_write64((volatile void *)va, 0x6b6b6b6b6b6b6b6bull, &f);

    if (*check != before)
        return ESCAPED;
    if (r == -1)
        return f.vector == 14 && (f.error_code & (PF_P | PF_W)) == (PF_P | PF_W) ? FAULTED : ESCAPED;
    return REFUSED; /* the write was dropped */
}

/* A write through a guess at the switcher's physical address: it faults
 * (not memory), is dropped (kvm mode's read-only memslot), or lands in the
 * guest's own RAM; the switcher must not change. */
static int guess_refused(uint64_t va, volatile const uint64_t *check)
{
    struct svm_fault f;
    uint64_t before = *check, v = 0;
    long r = probe_write64((volatile void *)va, 0x6b6b6b6b6b6b6b6bull, &f);

    if (*check != before)
        return ESCAPED;
    if (r == -1)
        return f.vector == 14 ? FAULTED : ESCAPED;
    probe_read64((const volatile void *)va, &v, &f);
    return v == 0x6b6b6b6b6b6b6b6bull ? HARMLESS : REFUSED;
}

static void switcher_section(struct tally *t, const struct svm_boot_info *bi)
{
    bool shadow = bi->paging_mode == SVM_PAGING_SHADOW;
    volatile const uint64_t *gdt = (const volatile uint64_t *)SVM_SWITCHER_GDT;
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } gdtr, idtr;
    uint16_t tr;

    /* What the CPU uses is the switcher, and it is what the ABI says. */
    __asm__ volatile("sgdt %0; sidt %1; str %2" : "=m"(gdtr), "=m"(idtr), "=r"(tr));
    CHECK(gdtr.base == SVM_SWITCHER_GDT, "GDTR 0x%lx", gdtr.base);
    CHECK(idtr.base == SVM_SWITCHER_IDT(cpu_id()) && idtr.limit == 0xfff, "IDTR 0x%lx/%x", idtr.base,
          idtr.limit);
    CHECK(tr == SVM_TSS_SEL(cpu_id()), "TR 0x%x", tr);
    for (unsigned i = 1; (i * 8 | 7) <= gdtr.limit; i++) {
        uint64_t d = gdt[i];
        bool system = !(d >> 44 & 1);

        /* No segment a ring-1 guest could load has DPL 0; system
         * descriptors are the busy TSSes (and their upper halves). */
        if (i >= 5 && (i - 5) % 2 == 1)
            continue;
        CHECK(system ? (d >> 40 & 0x1f) == 0xb : desc_dpl(d) != 0, "GDT entry %u: 0x%lx", i, d);
        CHECK(system || (d >> 40 & 1), "GDT entry %u not pre-marked accessed: 0x%lx", i, d);
    }
    for (unsigned v = 0; v < 32; v++) {
        const volatile uint64_t *g = (const volatile uint64_t *)(idtr.base + 16 * v);

        CHECK((g[0] >> 16 & 0xffff) == SVM_KERNEL_CS && (g[0] >> 45 & 3) == 0 && (g[0] >> 40 & 0xf) == 0xe,
              "IDT gate %u: 0x%lx", v, g[0]);
    }

    /* Writes from ring 1 to every switcher page; reads from ring 3. */
    for (uint64_t va = SVM_SWITCHER_GVA; va < SVM_SWITCHER_TSS(bi->nr_vcpus - 1) + PAGE_SIZE; va += PAGE_SIZE) {
        account(t, "write to the switcher", write_refused(va + 8, gdt + 1));
        account(t, "ring-3 read of the switcher", run_user(user_read, (void *)va, NULL, NULL) == RUN_USER_OK
                                                               ? FAULTED : ESCAPED);
    }
    /* With CR0.WP=0 too: shadow mode keeps the real WP set and refuses the
     * range; kvm mode's memslot is read-only. */
    if (set_paging(SVM_SET_PAGING_NX) == 0) {
        account(t, "write to the switcher, CR0.WP=0", write_refused(SVM_SWITCHER_GDT + 8, gdt + 1));
        account(t, "write to the IDT, CR0.WP=0",
                write_refused(SVM_SWITCHER_IDT(cpu_id()) + 14 * 16,
                              (const volatile uint64_t *)(SVM_SWITCHER_IDT(cpu_id()) + 14 * 16)));
        set_paging(SVM_SET_PAGING_WP | SVM_SET_PAGING_NX);
    }

    /* Map the switcher's gva in its own tables, and guess where it lives. */
    {
        uint64_t *root = pt_new_root(), *page = alloc_pages(1);
        uint64_t guesses[] = { 0, PAGE_SIZE, 2 * PAGE_SIZE, bi->mem_size, bi->mem_size + PAGE_SIZE,
                               bi->mem_size + 2 * PAGE_SIZE };

        if (!root || !page)
            panic("out of memory");
        root[SVM_SWITCHER_PML4_INDEX] = 0; /* our own tables there instead */
        for (int k = 0; k < 4; k++)
            pt_map(root, SVM_SWITCHER_GVA + k * PAGE_SIZE, (uint64_t)page, PTE_P | PTE_W | PTE_U);
        for (size_t i = 0; i < sizeof(guesses) / sizeof(guesses[0]); i++)
            pt_map(root, WIN + i * PAGE_SIZE, guesses[i], PTE_P | PTE_W | PTE_U);
        if (shadow) {
            /* kvm mode uses the guest's tables as they are: there the IDT
             * would be this page, which is the guest's own business. */
            load_cr3((uint64_t)root);
            for (int k = 0; k < 4; k++) {
                uint64_t va = SVM_SWITCHER_GVA + k * PAGE_SIZE;

                account(t, "write to the switcher through own tables", write_refused(va + 8, gdt + 1));
                account(t, "ring-3 read through own tables",
                        run_user(user_read, (void *)va, NULL, NULL) == RUN_USER_OK ? FAULTED : ESCAPED);
            }
            CHECK(gdt[1] == 0x00afbb000000ffffull, "the GDT seen through the switcher range: 0x%lx", gdt[1]);
            load_cr3(bi->boot_cr3);
        }
        /* The guesses: in kvm mode gpa mem_size.. is the switcher's
         * read-only memslot (writes dropped); in shadow mode no gpa reaches
         * it (its frames are machine frames 0.., but gpa 0.. is RAM and the
         * rest is not memory).  The last word of each page: in guest RAM
         * (the null page, page 1, the boot-info page) nothing uses it. */
        load_cr3((uint64_t)root);
        for (size_t i = 0; i < sizeof(guesses) / sizeof(guesses[0]); i++)
            account(t, "write to a guessed switcher address",
                    guess_refused(WIN + i * PAGE_SIZE + 0xff8, gdt + 511));
        load_cr3(bi->boot_cr3);
        CHECK(*page == 0, "the page mapped over the switcher was written: 0x%lx", *page);
    }
}

/* ------------------------------------------------------------------------ */
/* The recycled-root attack and tables in freed frames.                       */
/* ------------------------------------------------------------------------ */

/*
 * The ABI v1 attack: recycle shadow roots (more CR3s than the VMM caches),
 * take fresh pages (some get the freed root frames), fill them with
 * entries naming machine addresses (guessed: every frame up to twice the
 * RAM size), and load each guess natively with `mov %cr3`.  In ring 1 the
 * native load faults; through LOAD_CR3 a guess is a gpa, validated, and
 * shadowed from the guest's own RAM.  The host side then checks with
 * --check that no shadow entry maps a frame outside guest RAM.
 */
static void recycled_section(struct tally *t, const struct svm_boot_info *bi)
{
    enum { ROOTS = 16, PAGES = 64 };
    uint64_t *roots[ROOTS], *pages;
    uint64_t top = 2 * bi->mem_size;

    for (int i = 0; i < ROOTS; i++) {
        roots[i] = pt_new_root();
        if (!roots[i] || pt_map(roots[i], WIN, (uint64_t)roots[i], PTE_P | PTE_W | PTE_U))
            panic("out of memory");
        load_cr3((uint64_t)roots[i]);
        account(t, "a fresh root maps only what the guest names", *(volatile uint64_t *)(WIN + 8 * 511) ==
                                                                      roots[i][511] ? REFUSED : ESCAPED);
    }
    load_cr3(bi->boot_cr3);
    pages = alloc_pages(PAGES);
    if (!pages)
        panic("out of memory");
    /* Every entry a guessed machine frame, present, writable, user: as a
     * PML4, PDPT, PD or PT, a window onto "any frame". */
    for (int p = 0; p < PAGES; p++)
        for (int e = 0; e < 512; e++)
            pages[p * 512 + e] = ((uint64_t)(p * 512 + e) * PAGE_SIZE % top) | PTE_P | PTE_W | PTE_U;
    /* The attack itself: native loads of every guess. */
    cr3_sweep(t, top);
    /* Through the hypercall: a guess beyond RAM is refused; one inside RAM
     * is the guest's own page, shadowed as a gpa table (kernel and
     * switcher entries kept, so the guest survives the load). */
    for (int p = 0; p < PAGES; p++) {
        uint64_t *pml4 = &pages[p * 512];
        uint64_t v;
        struct svm_fault f;
        long rc;

        pml4[0] = ((const uint64_t *)bi->boot_cr3)[0];
        pml4[SVM_SWITCHER_PML4_INDEX] = ((const uint64_t *)bi->boot_cr3)[SVM_SWITCHER_PML4_INDEX];
        load_cr3((uint64_t)pml4);
        /* Read through a few windows: guest RAM or a fault, nothing else. */
        for (int w = 1; w < 8; w++)
            probe_read64((const volatile void *)((uint64_t)w << 39 | (uint64_t)p << 30 | (uint64_t)w << 21),
                         &v, &f);
        load_cr3(bi->boot_cr3);
        rc = svm_hypercall(SVM_HC_LOAD_CR3, (long)(bi->mem_size + (uint64_t)p * PAGE_SIZE), 0, 0, 0).rax;
        account(t, "LOAD_CR3 of a frame beyond RAM", rc == SVM_EINVAL ? REFUSED : ESCAPED);
    }
    /* Tables in freed frames: balloon a live root's page table away (the
     * host takes the frame), rebuild it (a fresh frame), use it. */
    {
        uint64_t *root = pt_new_root(), *data = alloc_pages(1), *pte, v;
        struct svm_fault f;

        if (!root || !data || pt_map(root, WIN, (uint64_t)data, PTE_P | PTE_W | PTE_U))
            panic("out of memory");
        *data = 0xf00d;
        pte = pt_lookup(root, WIN);
        load_cr3((uint64_t)root);
        CHECK(probe_read64((const volatile void *)WIN, &v, &f) == 0 && v == 0xf00d, "read through the table");
        for (int round = 0; round < 8; round++) {
            uint64_t pt = (uint64_t)pte & ~(PAGE_SIZE - 1);

            CHECK(balloon(pt, 1) == 1, "balloon the live page table");
            invlpg(WIN);
            /* The table reads as zero now: the window is gone. */
            account(t, "a ballooned table maps nothing",
                    probe_read64((const volatile void *)WIN, &v, &f) == -1 ? FAULTED : ESCAPED);
            pt_map(root, WIN, (uint64_t)data, PTE_P | PTE_W | PTE_U);
            invlpg(WIN);
            CHECK(probe_read64((const volatile void *)WIN, &v, &f) == 0 && v == 0xf00d, "rebuilt table");
        }
        load_cr3(bi->boot_cr3);
    }
}

/* ------------------------------------------------------------------------ */
/* Ring 3: the same doors, one ring further out.                              */
/* ------------------------------------------------------------------------ */

static long user_tries(void *arg)
{
    struct tally *t = arg;
    struct svm_fault f;

    account(t, "ring-3 hypercall", svm_hypercall(SVM_HC_HOST_OP, SVM_HOST_OP_PING, 1, 0, 0).rax == SVM_EPERM
                                       ? REFUSED : ESCAPED);
    account(t, "ring-3 LOAD_CR3", svm_hypercall(SVM_HC_LOAD_CR3, 0x8000, 0, 0, 0).rax == SVM_EPERM ? REFUSED
                                                                                                  : ESCAPED);
    account(t, "ring-3 mov to cr3", must_fault(p_wr_cr3, 0x8000, 13));
    account(t, "ring-3 mov from cr0", must_fault(p_rd_cr0, 0, 13));
    account(t, "ring-3 wrmsr", must_fault(p_wrmsr_at, 0xc0000082, 13));
    account(t, "ring-3 lidt", must_fault(p_lidt, 0x200000, 13));
    account(t, "ring-3 hlt", must_fault(p_hlt, 0, 13));
    account(t, "ring-3 cli", must_fault(p_cli, 0, 13));
    account(t, "ring-3 in 0x80", must_fault(p_in_f4, 0, 13));
    account(t, "ring-3 in 0x1234", must_fault(p_in_dx, 0x1234, 13));
    account(t, "ring-3 in 0xcf8", must_fault(p_in_dx, 0xcf8, 13));
    account(t, "ring-3 mov ss 0x11", must_fault(p_mov_ss, 0x11, 13));
    account(t, "ring-3 mov ss 0x10", must_fault(p_mov_ss, 0x10, 13));
    account(t, "ring-3 mov ds 0x11", must_fault(p_mov_ds, 0x11, 13));
    account(t, "ring-3 vmcall", p_vmcall(1, &f) == -1 ? FAULTED : REFUSED);
    account(t, "ring-3 sysexit", must_fault(p_sysexit, 0, ~0ull));
    return 0;
}

static void user_section(struct tally *t)
{
    static struct tally ut; /* in the image: ring 3 may write it */
    struct svm_fault f;
    long ret;
    extern const uint8_t esc_sysenter[];

    ut = (struct tally){ 0 };
    CHECK(run_user(user_tries, &ut, &ret, &f) == RUN_USER_OK, "ring-3 tries ended in vector %lu", f.vector);
    *t = ut;
    /* syscall from ring 3 (EFER.SCE clear): this backend jumps to RIP 0
     * in ring 3 (a #PF there), never ring 0. */
    account(t, "ring-3 syscall", user_fault((long (*)(void *))(void *)p_syscall, NULL, ~0ull));
    account(t, "ring-3 sysenter", user_fault((long (*)(void *))(void *)esc_sysenter, NULL, ~0ull));
}

/* ------------------------------------------------------------------------ */

static void livelock(void);

static void crash(const char *what)
{
    extern const uint8_t esc_int3[], esc_icebp[], esc_sysenter[];
    void (*fn)(void) = NULL;
    size_t len;
    const char *intn = cmdline_get("crash", &len);
    char name[32];

    len = len < sizeof(name) - 1 ? len : sizeof(name) - 1;
    memcpy(name, intn, len);
    name[len] = '\0';
    if (strncmp(what, "int:", 4) == 0) {
        /* This backend stops the VM for most vectors; the others must
         * fault into a ring-1 handler or complete in ring 1. */
        /* int $0x1a clobbers registers here, the stack pointer's among
         * them: keep the vector in memory. */
        extern const uint8_t esc_int_table[];
        static volatile unsigned n;
        long (*intn_fn)(void);
        struct svm_fault f;
        long r;

        n = (unsigned)strtoul(intn + 4, NULL, 0) & 0xff;
        intn_fn = (long (*)(void))(esc_int_table + INT_STRIDE * n);
        printf("escape: crash: %s in ring 1\n", name);
        r = intn_fn();
        printf("escape: crash: int:%u %s in ring %u (vector %lu)", n, r == -1 ? "faulted" : "completed",
               in_user_mode() ? 3 : 1, r == -1 ? esc_int_fault.vector : 0);
        printf(", mov %%cr0 %s\n", p_rd_cr0(0, &f) == -1 ? "faults" : "RUNS");
        exit(3);
    } else if (strncmp(what, "far:", 4) == 0) {
        /* far:KIND:SEL, one far transfer (esc_far): the kinds and
         * selectors on which this backend stops the VM. */
        const char *end;
        long kind = (long)strtoul(what + 4, &end, 0), sel = (long)strtoul(end + 1, NULL, 0), r;

        printf("escape: crash: %s in ring 1\n", name);
        r = esc_far(kind, sel);
        clear_ksave();
        printf("escape: crash: %s RETURNED %ld (vector %lu, cs 0x%lx)\n", name, r, esc_vector, esc_land_cs);
        exit(1);
    } else if (strncmp(what, "livelock", 8) == 0) {
        livelock();
    } else if (strncmp(what, "int3", 4) == 0) {
        fn = (void (*)(void))(void *)esc_int3;
    } else if (strncmp(what, "icebp", 5) == 0) {
        fn = (void (*)(void))(void *)esc_icebp;
    } else if (strncmp(what, "sysenter", 8) == 0) {
        fn = (void (*)(void))(void *)esc_sysenter;
    } else {
        printf("escape: unknown crash=%s\n", what);
        exit(2);
    }
    printf("escape: crash: %s in ring 1\n", name);
    fn();
    printf("escape: crash: %s RETURNED\n", name);
    exit(1);
}

/* crash=livelock: a #PF handler that lies to RESOLVE_PF, always calling a
 * write a read.  The VMM fixes the read (a read-only entry for a clean
 * page), the write faults again, the same question comes back with nothing
 * changed: the VMM must stop the VM (shadow mode; kvm mode answers every
 * RESOLVE_PF with GUEST_FAULT, which this handler turns into a panic). */
__asm__(".pushsection .text\n.globl esc_lying_pf\nesc_lying_pf:\n"
        "    mov esc_kss(%rip), %ss\n"
        "    push %rax; push %rcx; push %rdx; push %rsi; push %rdi; push %r8; push %r9; push %r10; push %r11\n"
        "    mov 72(%rsp), %rdi\n"      /* the error code */
        "    and $~2, %rdi\n"           /* the lie: not a write */
        "    mov 96(%rsp), %rsi\n"      /* RFLAGS */
        "    mov 80(%rsp), %rdx\n"      /* RIP */
        "    mov $6, %eax\n"            /* SVM_HC_RESOLVE_PF */
        "    outl %eax, $0xf5\n"
        "    test %rax, %rax\n"
        "    jnz 1f\n"
        "    pop %r11; pop %r10; pop %r9; pop %r8; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
        "    add $8, %rsp\n"
        "    iretq\n"
        "1:  mov $2, %eax\n"            /* SVM_HC_EXIT(97): kvm mode */
        "    mov $97, %edi\n"
        "    outl %eax, $0xf5\n"
        "    jmp 1b\n"
        ".popsection\n");

static void livelock(void)
{
    extern const uint8_t esc_lying_pf[];
    volatile uint64_t *page = alloc_pages(1);

    if (!page)
        panic("out of memory");
    printf("escape: crash: livelock: a #PF handler that calls every write a read\n");
    set_trap(14, (uint64_t)esc_lying_pf, 0);
    *page = 1;
    printf("escape: crash: livelock RETURNED\n");
    exit(1);
}

static volatile uint64_t aps_done;
static struct tally ap_tally[SVM_MAX_VCPUS];

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    struct tally *t = &ap_tally[cpu % SVM_MAX_VCPUS];

    if (!cmdline_get("crash", NULL)) {
        if (section_on("priv"))
            priv_section(t, bi);
        if (section_on("ports"))
            ports_section(t, 7);
        if (section_on("recycled"))
            cr3_sweep(t, 2 * bi->mem_size);
    }
    atomic_add(&aps_done, 1);
}

int main(const struct svm_boot_info *bi)
{
    struct tally total = { 0 };
    const char *what = cmdline_get("crash", NULL);
    static const struct {
        const char *name;
        int id;
    } sections[] = { { "priv", 0 }, { "sel", 1 }, { "handlers", 2 }, { "gates", 3 }, { "ports", 4 },
                     { "switcher", 5 }, { "recycled", 6 }, { "user", 7 } };

    if (what)
        crash(what);
    for (size_t i = 0; i < sizeof(sections) / sizeof(sections[0]); i++) {
        struct tally t = { 0 };

        if (!section_on(sections[i].name))
            continue;
        switch (sections[i].id) {
        case 0: priv_section(&t, bi); break;
        case 1: selector_section(&t); break;
        case 2: handlers_section(&t); break;
        case 3: gates_section(&t); break;
        case 4: ports_section(&t, 1); break;
        case 5: switcher_section(&t, bi); break;
        case 6: recycled_section(&t, bi); break;
        case 7: user_section(&t); break;
        }
        report(sections[i].name, &t);
        total.tries += t.tries;
        total.faulted += t.faulted;
        total.refused += t.refused;
        total.harmless += t.harmless;
        total.escaped += t.escaped;
    }
    while (atomic_load(&aps_done) + 1 < bi->nr_vcpus)
        cpu_relax();
    for (unsigned c = 1; c < bi->nr_vcpus; c++) {
        struct tally *t = &ap_tally[c];
        char name[32];

        snprintf(name, sizeof(name), "vCPU %u", c);
        report(name, t);
        total.tries += t->tries;
        total.faulted += t->faulted;
        total.refused += t->refused;
        total.harmless += t->harmless;
        total.escaped += t->escaped;
    }
    report("total", &total);
    printf("escape: %d checks, %d failures\n", checks, failures);
    return total.escaped || failures ? 1 : 0;
}
