/* guest: test guest: exits through the exit port with code=N from the command line */
#include <shadowvm.h>

int main(const struct svm_boot_info *bi)
{
    uint8_t code = (uint8_t)cmdline_u64("code", 0);

    (void)bi;
    printf("exiting with %u through port 0x%x\n", code, SVM_PORT_EXIT);
    __asm__ volatile("outb %%al, %0" : : "i"(SVM_PORT_EXIT), "a"(code));
    return 100; /* not reached */
}
