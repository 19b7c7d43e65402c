/* guest: test guest: unregisters every exception handler and raises #UD, which triple-faults */
#include <shadowvm.h>

/*
 * ABI v2: a vector the guest did not register has no gate, so #UD becomes
 * #NP, then #DF, then a triple fault: the VM stops (exit status 125).
 */
int main(const struct svm_boot_info *bi)
{
    (void)bi;
    puts("about to triple fault");
    for (unsigned v = 0; v < 32; v++)
        if (set_trap(v, 0, 0) != 0)
            panic("unregistering vector %u failed", v);
    __asm__ volatile("ud2");
    return 0;
}
