/* guest: test guest: writes to I/O port 0x1234, which no device claims */
#include <shadowvm.h>

int main(const struct svm_boot_info *bi)
{
    (void)bi;
    puts("writing to port 0x1234");
    __asm__ volatile("outb %%al, %%dx" : : "a"(0x42), "d"(0x1234));
    return 0;
}
