/* guest: test guest: a byte out to the hypercall port, which the I/O bitmap allows but no device takes */
#include <shadowvm.h>

/*
 * Ports the TSS I/O bitmap denies raise #GP in the guest (see test-escape);
 * the ports it allows reach the VMM, where an access no device takes stops
 * the VM: here a byte, not a dword, to the hypercall port.
 */
int main(const struct svm_boot_info *bi)
{
    (void)bi;
    puts("writing a byte to port 0xf5");
    __asm__ volatile("outb %%al, %%dx" : : "a"(0x42), "d"(SVM_PORT_HYPERCALL));
    return 0;
}
