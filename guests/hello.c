/* guest: hello - greets from every vCPU, runs its main part in ring 3, exits 0 */
#include <shadowvm.h>

static volatile uint64_t aps_done;

/* Ring 3: formatting runs natively here; ring 1 (the kernel's) would
 * emulate every instruction of printf. */
static long user_main(void *arg)
{
    const struct svm_boot_info *bi = arg;

    printf("vCPUs: %u, memory: %lu MiB, paging: %s, cmdline: \"%s\"\n", bi->nr_vcpus,
           bi->mem_size >> 20, bi->paging_mode == SVM_PAGING_KVM ? "kvm" : "shadow",
           (const char *)bi->cmdline_gpa);
    printf("hello from ring %d\n", in_user_mode() ? 3 : 1);
    return 42;
}

int main(const struct svm_boot_info *bi)
{
    static const char greeting[] = "Hello from shadowvm!\n";
    long ret = 0;

    /* First byte out as early as possible, through the UART, no formatting. */
    serial_write(greeting, sizeof(greeting) - 1);
    if (run_user(user_main, (void *)bi, &ret, NULL) != RUN_USER_OK || ret != 42) {
        puts("ring 3 call failed");
        return 1;
    }
    puts("back in ring 1");
    while (atomic_load(&aps_done) + 1 < bi->nr_vcpus)
        cpu_relax();
    puts("bye");
    return 0;
}

void ap_main(const struct svm_boot_info *bi, unsigned cpu)
{
    static const char msg[] = "vCPU N: hello\n";
    char line[sizeof(msg)];

    (void)bi;
    memcpy(line, msg, sizeof(msg));
    line[5] = (char)('0' + cpu % 10); /* no printf in ring 1: it is emulated */
    if (cpu >= 10)
        printf("vCPU %u: hello\n", cpu);
    else
        rt_write(line, sizeof(line) - 1);
    atomic_add(&aps_done, 1);
}
