/*
 * console.c - console output.
 *
 * Two paths to the same stdout: the 16550 UART (serial_write: `rep outsb`
 * to its data register; KVM exits once per byte) and the PRINT hypercall
 * (rt_write: one exit per 4 KiB).  printf and puts use rt_write.  Ring 3
 * asks the kernel through RT_SYS_WRITE (hypercalls are ring 1 only).  The
 * UART needs no setup and never makes the guest wait.
 */
#include "rt.h"

void serial_write(const char *buf, size_t len)
{
    if (in_user_mode()) {
        rt_write(buf, len);
        return;
    }
    __asm__ volatile("rep outsb" : "+S"(buf), "+c"(len) : "d"(SVM_PORT_SERIAL) : "memory");
}

/* PRINT takes a guest-physical address: our buffers are identity-mapped. */
void rt_kernel_write(const char *buf, size_t len)
{
    while (len) {
        size_t n = len < 4096 ? len : 4096;
        svm_hypercall(SVM_HC_PRINT, (long)buf, (long)n, 0, 0);
        buf += n;
        len -= n;
    }
}

void rt_write(const char *buf, size_t len)
{
    if (len == 0)
        return;
    if (in_user_mode())
        rt_user_syscall(RT_SYS_WRITE, (long)buf, (long)len);
    else
        rt_kernel_write(buf, len);
}

void puts(const char *s)
{
    rt_write(s, strlen(s));
    rt_write("\n", 1);
}

int vprintf(const char *fmt, va_list ap)
{
    char buf[512];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);

    rt_write(buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
    return n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

struct out {
    char *buf;
    size_t size;
    size_t len;
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_num(struct out *o, uint64_t v, unsigned base, bool neg, int width, char pad)
{
    char tmp[24];
    int n = 0;

    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width-- > n)
        put(o, pad);
    while (n)
        put(o, tmp[--n]);
}

/* %[0][width][l|ll|z](d|i|u|x|p|s|c|%) */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        int width = 0, lng = 0;
        char pad = ' ';

        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, long) : va_arg(ap, int);
            put_num(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            put_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, false, width, pad);
            break;
        case 'x':
            put_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, false, width, pad);
            break;
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_num(&o, (uint64_t)va_arg(ap, void *), 16, false, width, pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            while (*s)
                put(&o, *s++);
            break;
        }
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case '%':
            put(&o, '%');
            break;
        case '\0':
            fmt--;
            break;
        default:
            put(&o, '%');
            put(&o, *fmt);
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}
