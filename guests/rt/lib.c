/*
 * lib.c - the few libc pieces the guests use, and command-line parsing.
 * memset/memcpy use one string instruction: gcc may call them for struct
 * copies, and in ring 1 one emulated instruction beats a loop.
 */
#include "rt.h"

void *memset(void *d, int c, size_t n)
{
    void *ret = d;

    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;

    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return ret;
}

size_t strlen(const char *s)
{
    size_t n = 0;

    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

unsigned long strtoul(const char *s, const char **end, int base)
{
    unsigned long v = 0;

    if (base == 0) {
        base = 10;
        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
            base = 16;
            s += 2;
        }
    }
    for (;; s++) {
        int d;

        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (*s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (*s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        if (d >= base)
            break;
        v = v * (unsigned long)base + (unsigned long)d;
    }
    if (end)
        *end = s;
    return v;
}

const char *cmdline_get(const char *key, size_t *len)
{
    const char *p = (const char *)svm_boot->cmdline_gpa;
    size_t klen = strlen(key);

    while (*p) {
        const char *tok = p, *eq;

        while (*p && *p != ' ')
            p++;
        eq = tok + klen;
        if ((size_t)(p - tok) > klen && *eq == '=' && strncmp(tok, key, klen) == 0) {
            if (len)
                *len = (size_t)(p - eq - 1);
            return eq + 1;
        }
        while (*p == ' ')
            p++;
    }
    return NULL;
}

uint64_t cmdline_u64(const char *key, uint64_t dflt)
{
    const char *v = cmdline_get(key, NULL), *end;
    uint64_t n;

    if (!v)
        return dflt;
    n = strtoul(v, &end, 0);
    switch (*end) {
    case 'K': case 'k': n <<= 10; break;
    case 'M': case 'm': n <<= 20; break;
    case 'G': case 'g': n <<= 30; break;
    }
    return n;
}
