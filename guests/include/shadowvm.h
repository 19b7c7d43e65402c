/*
 * shadowvm.h - the one header a shadowvm guest includes.
 *
 * Part 1 is the guest ABI (docs/guest-abi.md is the normative text; the
 * constants here must match src/vmm/abi.rs).  Part 2 is the API of the small
 * runtime in guests/rt/ that every built-in guest links against.
 *
 * A guest defines `int main(const struct svm_boot_info *bi)`, which runs on
 * vCPU 0 in ring 1 (the guest kernel never runs in ring 0: ABI v2); its
 * return value becomes shadowvm's exit code.  It may define
 * `void ap_main(const struct svm_boot_info *bi, unsigned cpu)` for the other
 * vCPUs (the default one halts).
 *
 * Ring 1 is emulated on our KVM backend (~1-3 us per instruction) while ring 3
 * runs natively, so keep kernel-mode work tiny and run loops in user mode
 * with run_user().
 */
#ifndef SHADOWVM_H
#define SHADOWVM_H

#ifndef __ASSEMBLER__
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#endif

/* ===================================================================== */
/* Part 1: the guest ABI                                                  */
/* ===================================================================== */

/* I/O ports. */
#define SVM_PORT_SERIAL     0x3f8 /* 16550 UART, 8 registers; THR output -> stdout */
#define SVM_PORT_EXIT       0xf4  /* out: shadowvm exits with (value & 0xff) */
#define SVM_PORT_HYPERCALL  0xf5  /* outl %eax: hypercall number in eax */

/* Hypercall numbers: the whole of rax (bits above 31 set: SVM_ENOSYS).
 * Arguments in rdi, rsi, rdx, r10; results in rax (and rdx, rsi where
 * stated).  Every other register is preserved.  Ring 1 only: from ring 3
 * every hypercall returns SVM_EPERM. */
#define SVM_HC_NOP          0 /* () -> 0 */
#define SVM_HC_PRINT        1 /* (gpa, len) -> len written */
#define SVM_HC_EXIT         2 /* (code) -> does not return */
#define SVM_HC_LOAD_CR3     3 /* (cr3) -> 0 */
#define SVM_HC_INVLPG       4 /* (gva) -> 0 */
#define SVM_HC_FLUSH_TLB    5 /* (flags) -> 0 */
#define SVM_HC_RESOLVE_PF   6 /* (error_code, rflags, rip) -> SVM_PF_*, rdx = error code, rsi = CR2 */
#define SVM_HC_BALLOON      7 /* (gpa, nr_pages) -> pages given back */
#define SVM_HC_HOST_OP      8 /* (op, arg0, arg1) -> op-specific */
#define SVM_HC_SET_PAGING   9 /* (flags) -> 0: CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP */
#define SVM_HC_POPULATE     10 /* (gva, len, flags = 0) -> pages populated, rdx = pages skipped (v2) */
#define SVM_HC_DMA          11 /* (op, arg0, arg1, arg2) -> 0: the DMA device, SVM_DMA_* */
/* ABI v2, ring 1 (0x100..): */
#define SVM_HC_SET_TRAP_TABLE 0x100 /* (gpa, count) -> 0: struct svm_trap_info[count] */
#define SVM_HC_SET_STACK    0x101 /* (index, rsp) -> 0: 0 = kernel stack, 1..7 = IST */
#define SVM_HC_HALT         0x102 /* () -> does not return: this vCPU stops */

/* SVM_HC_FLUSH_TLB flags. */
#define SVM_FLUSH_GLOBAL    1u /* also drop global translations */

/* SVM_HC_SET_PAGING flags (any other bit: SVM_EINVAL). */
#define SVM_SET_PAGING_WP   1u /* CR0.WP: supervisor writes honour R/W */
#define SVM_SET_PAGING_NX   2u /* EFER.NXE: XD is a permission bit, else bit 63 is reserved */
#define SVM_SET_PAGING_SMEP 4u /* CR4.SMEP: ring 1 may not execute user pages */
#define SVM_SET_PAGING_SMAP 8u /* CR4.SMAP: ring 1 may not touch user pages unless EFLAGS.AC */

/* SVM_HC_RESOLVE_PF results. */
#define SVM_PF_RETRY        0 /* fixed: return from the #PF handler (iretq) */
#define SVM_PF_GUEST_FAULT  1 /* the guest's own fault: rdx = architectural error code */

/* SVM_HC_HOST_OP operations. */
#define SVM_HOST_OP_PING    0 /* (cookie) -> cookie; every mode */
#define SVM_HOST_OP_CHECKPOINT 1 /* (n < 2^16) -> ops run; shadow mode, runs --host-ops ops */
#define SVM_HOST_OP_MAX     1

/* SVM_HC_DMA operations (shadow mode; kvm mode: SVM_EOPNOTSUPP).  The
 * device addresses its buffer by iova = gpa - buffer gpa.  A transfer runs
 * on the device's own thread; the hypercall returns when it is complete. */
#define SVM_DMA_ATTACH      0 /* (gpa, len) -> 0; SVM_EBUSY if one is attached */
#define SVM_DMA_COPY        1 /* (src iova, dst iova, len) -> 0: memmove by the device */
#define SVM_DMA_FILL        2 /* (iova, len, byte) -> 0 */
#define SVM_DMA_DETACH      3 /* () -> 0; SVM_ENODEV if none is attached */
#define SVM_DMA_OP_MAX      3
#define SVM_DMA_BUFFER_MAX  0x40000000 /* bytes: 1 GiB */
#define SVM_DMA_XFER_MAX    0x100000   /* bytes per COPY or FILL: 1 MiB */

/* Hypercall errors (negated Linux errno values). */
#define SVM_EPERM           (-1)   /* a hypercall from ring 3 */
#define SVM_EFAULT          (-14)
#define SVM_EINVAL          (-22)
#define SVM_ENOSYS          (-38)  /* unknown hypercall number */
#define SVM_EOPNOTSUPP      (-95)  /* known, but not available in this paging mode or on this host */
#define SVM_EAGAIN          (-11)  /* DMA: invalidations kept colliding with the transfer; try again */
#define SVM_EBUSY           (-16)  /* DMA: a device is already attached */
#define SVM_ENODEV          (-19)  /* DMA: no device is attached */

/* Paging modes (svm_boot_info.paging_mode). */
#define SVM_PAGING_KVM      0
#define SVM_PAGING_SHADOW   1

/* GDT selectors (the switcher's GDT).  The kernel runs in ring 1: its
 * selectors have DPL 1 and RPL 1.  There is no ring-0 descriptor. */
#define SVM_KERNEL_CS       0x09 /* GDT entry 1: 64-bit code, DPL 1 */
#define SVM_KERNEL_DS       0x11 /* GDT entry 2: data, DPL 1 */
#define SVM_USER_DS         0x1b /* GDT entry 3, RPL 3 */
#define SVM_USER_CS         0x23 /* GDT entry 4, RPL 3 */
#define SVM_TSS_SEL(cpu)    (0x28 + 16 * (cpu))

/* The switcher: the VMM's GDT, IDTs and TSSes, mapped read-only and
 * supervisor-only in the reserved range [SVM_SWITCHER_GVA, 2^64) (PML4 slot
 * 511).  Shadow mode refuses any guest mapping there; kvm mode maps it
 * through boot_cr3's entry 511, which tables the guest builds must copy. */
#define SVM_SWITCHER_GVA    0xffffff8000000000ull
#define SVM_SWITCHER_PML4_INDEX 511
#define SVM_SWITCHER_GDT    SVM_SWITCHER_GVA
#define SVM_SWITCHER_IDT(cpu) (SVM_SWITCHER_GVA + (1 + 2 * (uint64_t)(cpu)) * 4096)
#define SVM_SWITCHER_TSS(cpu) (SVM_SWITCHER_GVA + (2 + 2 * (uint64_t)(cpu)) * 4096)
#define SVM_IDT_ENTRIES     256
#define SVM_IST_MAX         7

/* Guest physical memory layout (identity-mapped at boot: gva == gpa). */
#define SVM_BOOT_INFO_GPA   0x2000
#define SVM_CMDLINE_GPA     0x2800
#define SVM_CMDLINE_MAX     2048   /* bytes, including the NUL */
#define SVM_BOOT_PML4_GPA   0x8000
#define SVM_PERCPU_GPA      0x100000 /* 32 KiB per vCPU, see below */
#define SVM_PERCPU_STRIDE   0x8000
#define SVM_IMAGE_MIN_GPA   0x200000 /* ELF segments must lie at or above 2 MiB */
#define SVM_MAX_VCPUS       32

/* The per-vCPU area (GS.base points at its first byte).  SET_STACK accepts
 * only stacks inside the calling vCPU's own area; the runtime uses: */
#define SVM_PERCPU_PAGE     0x0000 /* 4 KiB: quadword 0 = its own address, 1 = vCPU index */
#define SVM_PERCPU_IST      0x2000 /* top of the 4 KiB IST1 stack (NMI, #DF, #MC) */
#define SVM_PERCPU_TRAP     0x4000 /* top of the 8 KiB kernel stack for traps from ring 3 */
#define SVM_PERCPU_KSTACK   0x8000 /* top of the 16 KiB kernel stack (RSP at entry) */

#define SVM_BOOT_INFO_MAGIC   0x424d5653u /* "SVMB" */
#define SVM_BOOT_INFO_VERSION 2

#ifndef __ASSEMBLER__
/* At SVM_BOOT_INFO_GPA; rdi points at it on entry.  Read-only for the guest. */
struct svm_boot_info {
    uint32_t magic;        /*   0: SVM_BOOT_INFO_MAGIC */
    uint32_t version;      /*   4: SVM_BOOT_INFO_VERSION */
    uint64_t mem_size;     /*   8: bytes of RAM, gpa [0, mem_size) */
    uint32_t paging_mode;  /*  16: SVM_PAGING_* */
    uint32_t nr_vcpus;     /*  20 */
    uint64_t cmdline_gpa;  /*  24: NUL-terminated command line */
    uint32_t cmdline_len;  /*  32: bytes, without the NUL */
    uint32_t reserved0;    /*  36 */
    uint64_t image_start;  /*  40: lowest gpa of the ELF's PT_LOAD segments */
    uint64_t image_end;    /*  48: end of the highest one (page aligned up) */
    uint64_t free_start;   /*  56: first free gpa (page aligned; RAM is zero there) */
    uint64_t free_end;     /*  64: end of free RAM (== mem_size) */
    uint64_t boot_cr3;     /*  72: the boot PML4 */
    uint64_t percpu_base;  /*  80: SVM_PERCPU_GPA */
    uint64_t percpu_stride;/*  88: SVM_PERCPU_STRIDE */
    uint64_t user_start;   /*  96: boot tables map [user_start, user_end) with U=1 */
    uint64_t user_end;     /* 104 */
};

/* One SVM_HC_SET_TRAP_TABLE entry: `vector` goes to `handler` (in the
 * image) in ring 1, on IST stack `ist` (0: the current stack, or the kernel
 * stack from ring 3); handler 0 unregisters it.  The handler's first
 * instruction must reload SS with SVM_KERNEL_DS (see docs/guest-abi.md §6). */
struct svm_trap_info {
    uint64_t handler;
    uint8_t vector;
    uint8_t ist;
    uint16_t flags;    /* 0 */
    uint32_t reserved; /* 0 */
};

/* The time-stamp counter, serialized (native in ring 3). */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

/* The TSC rate in MHz from CPUID leaves 0x15/0x16, or 0 when the CPU does
 * not say (call it from ring 1: CPUID is one emulated instruction there). */
static inline uint64_t cpuid_tsc_mhz(void)
{
    uint32_t a, b, c, d;

    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    if (a >= 0x15) {
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x15), "c"(0));
        if (a && b && c)
            return (uint64_t)c * b / a / 1000000;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x16), "c"(0));
        if (a & 0xffff)
            return a & 0xffff;
    }
    return 0;
}

#endif /* __ASSEMBLER__ */

#define PTE_P    (1ull << 0)
#define PTE_W    (1ull << 1)
#define PTE_U    (1ull << 2)
#define PTE_PWT  (1ull << 3)
#define PTE_PCD  (1ull << 4)
#define PTE_A    (1ull << 5)
#define PTE_D    (1ull << 6)
#define PTE_PS   (1ull << 7)
#define PTE_G    (1ull << 8)
#define PTE_NX   (1ull << 63)
#define PTE_ADDR_MASK 0x000ffffffffff000ull

/* #PF error code bits. */
#define PF_P     (1u << 0)
#define PF_W     (1u << 1)
#define PF_U     (1u << 2)
#define PF_RSVD  (1u << 3)
#define PF_I     (1u << 4)

#define PAGE_SIZE 4096ull

/* ===================================================================== */
/* Part 2: the runtime (guests/rt/)                                       */
/* ===================================================================== */

/* Exit code the runtime uses when the guest panics (unexpected exception). */
#define SVM_EXIT_PANIC 99

#ifndef __ASSEMBLER__

struct svm_hc_result {
    long rax;
    long rdx;
    long rsi;
};

/* Raw hypercall; ring 1 only (ring 3 gets SVM_EPERM). */
static inline struct svm_hc_result svm_hypercall(long nr, long a0, long a1, long a2, long a3)
{
    register long r10 __asm__("r10") = a3;
    long rax = nr, rdx = a2, rsi = a1;
    __asm__ volatile("outl %%eax, %[port]"
                     : "+a"(rax), "+d"(rdx), "+S"(rsi)
                     : [port] "i"(SVM_PORT_HYPERCALL), "D"(a0), "r"(r10)
                     : "memory");
    return (struct svm_hc_result){ rax, rdx, rsi };
}

/* The boot info, valid after entry on every vCPU. */
extern const struct svm_boot_info *svm_boot;

/* Console; all work in ring 1 and ring 3.  rt_write (and so printf, puts)
 * uses the PRINT hypercall, one exit per call; serial_write goes through
 * the UART's data register, one exit per byte.  Output longer than 511
 * bytes per printf call is truncated. */
void rt_write(const char *buf, size_t len);
void serial_write(const char *buf, size_t len);
void puts(const char *s); /* appends a newline */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Leave the VM; work in ring 1 and ring 3. */
__attribute__((noreturn)) void exit(int code);
__attribute__((noreturn)) void panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Small libc pieces. */
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
unsigned long strtoul(const char *s, const char **end, int base);
/* Value of `key=` in the command line, or NULL; *len gets its length. */
const char *cmdline_get(const char *key, size_t *len);
/* `key=N` parsed as a number with an optional K/M/G suffix, or `dflt`. */
uint64_t cmdline_u64(const char *key, uint64_t dflt);

/* vCPU identity (ring 1 only). */
unsigned cpu_id(void);
unsigned nr_cpus(void);
static inline bool in_user_mode(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 3;
}

/* Page allocator: bump allocation from svm_boot->free_start.  The pages are
 * zero (RAM starts zeroed and is never reused), identity-mapped and
 * user-accessible in the boot tables.  Returns NULL when RAM runs out.
 * Safe on any vCPU, ring 1 or 3. */
void *alloc_pages(size_t nr_pages);
/* alloc_pages(), then ask the VMM to populate the pages (ring 1 only): sets
 * Accessed and Dirty on the current tables' entries that map them
 * (pt_mark_accessed) and makes the POPULATE hypercall, so the first touch
 * of each page takes no fault.  *populated (if not NULL) gets POPULATE's
 * result (pages populated, or a negative SVM_E*).  Populating is advice:
 * the pages are usable whatever it did. */
void *alloc_pages_populated(size_t nr_pages, long *populated);

/* Paging: always through these wrappers (hypercalls), never the native
 * instructions, so the same guest runs in kvm and shadow mode. */
void load_cr3(uint64_t cr3);
uint64_t read_cr3(void);
void invlpg(uint64_t va);
void flush_tlb(unsigned flags);
long balloon(uint64_t gpa, uint64_t nr_pages);
/* POPULATE [gva, gva + len) (page aligned, at most mem_size bytes, clear of
 * the switcher) on the current tables: the pages mapped to RAM through
 * entries that all have Accessed set get their host memory, and in shadow
 * mode the VMM's mapping, now.  Returns the pages populated or a negative
 * SVM_E*; *skipped (if not NULL) gets the range's other pages. */
long populate(uint64_t gva, uint64_t len, uint64_t *skipped);
long host_op(long op, long arg0, long arg1);
/* CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP (SVM_SET_PAGING_* flags); the
 * native instructions fault in ring 1.  Returns 0 or a negative SVM_E*
 * error (SVM_EOPNOTSUPP: the host refuses SMEP or SMAP).  Enable SMEP only
 * on tables that map the kernel's code supervisor-only: the boot tables
 * map the image user-accessible. */
long set_paging(unsigned flags);

/* The DMA device (SVM_HC_DMA; shadow mode, SVM_EOPNOTSUPP in kvm mode).
 * Each returns 0 or a negative SVM_E* error: SVM_EINVAL for a bad range,
 * SVM_EFAULT when the host refuses a page (unmapped or read-only: the
 * transfer may have partly happened), SVM_EAGAIN when host invalidations
 * kept colliding with it (try again).  The call returns once the device's
 * thread has completed the transfer. */
long dma_attach(uint64_t gpa, uint64_t len);
long dma_copy(uint64_t src_iova, uint64_t dst_iova, uint64_t len);
long dma_fill(uint64_t iova, uint64_t len, unsigned byte);
long dma_detach(void);

/* Exceptions: the runtime registers its handlers for vectors 0-31 at entry
 * (NMI, #DF, #MC on IST1).  set_trap replaces one (handler in the image,
 * first instruction reloading SS; 0 unregisters it); rt_trap_stub(v) is the
 * runtime's own handler for v, to put back.  set_stack sets this vCPU's
 * kernel stack (index 0) or IST stack (1..7), inside its per-vCPU area. */
long set_trap(unsigned vector, uint64_t handler, unsigned ist);
uint64_t rt_trap_stub(unsigned vector);
long set_stack(unsigned index, uint64_t rsp);

/* Page-table helpers over identity-mapped tables.  `pml4` is a table's
 * address; missing intermediate tables come from alloc_pages() with
 * P|W|U set.  pt_map maps one 4 KiB page: pte = pa | flags.
 * pt_new_root allocates a PML4 with the boot tables' entries 0 (kernel,
 * image, RAM) and 511 (the switcher: kvm mode needs it to deliver
 * exceptions) copied; NULL when RAM runs out. */
uint64_t *pt_new_root(void);
int pt_map(uint64_t *pml4, uint64_t va, uint64_t pa, uint64_t flags);
/* The leaf PTE's address, or NULL if an intermediate level is missing
 * (2 MiB leaves: returns the PDE). */
uint64_t *pt_lookup(uint64_t *pml4, uint64_t va);
/* Clear the PTE; returns the old value (0 if none).  Flush with invlpg(). */
uint64_t pt_unmap(uint64_t *pml4, uint64_t va);
/* Set Accessed on every entry that maps [va, va + len) and, with `dirty`,
 * Dirty on the leaves (atomically: the CPU and the VMM set them too), as
 * the CPU would on a touch: what POPULATE asks of a mapping before it maps
 * it (Linux's kernel mappings have A|D preset for the same reason).  Works
 * on tables the caller may write: ring 3 for its own tables in free RAM,
 * ring 1 for the boot tables. */
void pt_mark_accessed(uint64_t *pml4, uint64_t va, uint64_t len, bool dirty);

/* Fault probes: one access that may fault.  Return 0 on success or -1 if it
 * faulted, with *fault (if not NULL) filled in.  They work in ring 1 and
 * ring 3 (the fault is fixed up and the probe returns; nothing is retried). */
struct svm_fault {
    uint64_t vector;
    uint64_t error_code;
    uint64_t cr2;
};
long probe_read64(const volatile void *addr, uint64_t *out, struct svm_fault *fault);
long probe_write64(volatile void *addr, uint64_t val, struct svm_fault *fault);
/* An instruction fetch: calls addr, which must hold a `ret` (0xc3). */
long probe_exec(const volatile void *addr, struct svm_fault *fault);

/* SVM_PROBE_INSN(name, "insn") defines
 *     long name(long arg, struct svm_fault *fault);
 * which runs the one instruction `insn` (AT&T syntax) with arg in %rdi and
 * returns 0 if it completed (%rax, %rcx, %rdx, %rsi, %r8, %r9 may be
 * clobbered by it), or -1 with *fault filled in if it raised an exception:
 * a probe for instructions that may fault, e.g. privileged ones. */
#define SVM_PROBE_INSN(name, insn)                                                       \
    long name(long arg, struct svm_fault *fault);                                       \
    __asm__(".pushsection .text\n.globl " #name "\n" #name ":\n"                        \
            "    mov %rsi, %r9\n"                                                        \
            "1:  " insn "\n"                                                             \
            "    xor %eax, %eax\n"                                                       \
            "    ret\n"                                                                  \
            ".pushsection __ex_table, \"a\"\n.balign 8\n.quad 1b, rt_probe_fixup\n"   \
            ".popsection\n.popsection\n")

/* Proof that exception handlers run in ring 1: while handler_cpl_check is
 * set, every exception handler first executes a privileged instruction
 * (mov %cr0) and counts, per vector, whether it faulted (handler_cpl_ok)
 * or not (handler_cpl_bad: the handler ran in ring 0). */
extern volatile bool handler_cpl_check;
extern volatile uint64_t handler_cpl_ok[32], handler_cpl_bad[32];

/* Run fn(arg) in ring 3 on this vCPU's user stack and come back.
 * Returns RUN_USER_OK with *ret = fn's return value, or RUN_USER_FAULT if
 * the user code took an unexpected exception (details in *fault). */
#define RUN_USER_OK    0
#define RUN_USER_FAULT 1
int run_user(long (*fn)(void *), void *arg, long *ret, struct svm_fault *fault);

/* Atomics for SMP guests. */
static inline uint64_t atomic_add(volatile uint64_t *p, uint64_t v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline uint64_t atomic_load(const volatile uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}
__attribute__((noreturn)) void halt_forever(void);

/* Self-checking guests: CHECK(cond, fmt, ...) counts a check in the
 * guest's `checks` and, if cond is false, a failure in `failures`, printing
 * "FAIL line N: " and the message. The guest defines both counters
 * (static int checks, failures;) and reports them at the end. */
#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        checks++;                                                                         \
        if (!(cond)) {                                                                    \
            failures++;                                                                   \
            printf("FAIL line %d: ", __LINE__);                                           \
            printf(__VA_ARGS__);                                                          \
            rt_write("\n", 1);                                                            \
        }                                                                                 \
    } while (0)

/* Guest entry points. */
int main(const struct svm_boot_info *bi);
void ap_main(const struct svm_boot_info *bi, unsigned cpu);

#endif /* __ASSEMBLER__ */
#endif /* SHADOWVM_H */
