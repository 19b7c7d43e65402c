/* guest: test guest: spins forever in ring 3 (for --timeout and vCPU kicks) */
#include <shadowvm.h>

static volatile uint64_t counter;

static long spin(void *arg)
{
    (void)arg;
    for (;;)
        counter++;
    return 0;
}

int main(const struct svm_boot_info *bi)
{
    (void)bi;
    puts("spinning in ring 3");
    run_user(spin, NULL, NULL, NULL);
    return 0;
}
