/* guest: test guest: loads an empty IDT and raises #UD, which triple-faults */
#include <shadowvm.h>

int main(const struct svm_boot_info *bi)
{
    static const struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } empty_idt = { 0, 0 };

    (void)bi;
    puts("about to triple fault");
    __asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
    return 0;
}
