/* lib.h: what the C test kernels share: port IO, the COM1 UART (polled), a small printf,
 * CPUID and MSRs. Freestanding: no libc, no libgcc (no 64-bit division). */
#ifndef KERNEL_LIB_H
#define KERNEL_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define UART_LSR 5
#define UART_LSR_THRE 0x20

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }

static void putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_hex(u64 v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}

static void put_dec(u32 v)
{
    char buf[11];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(buf[--n]);
}

/* printf with %s, %c, %u, %x (32-bit), %X (64-bit, 16 digits), %8x-style widths for %x */
static void printf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc(*fmt);
            continue;
        }
        int width = 0;
        while (fmt[1] >= '0' && fmt[1] <= '9')
            width = width * 10 + (*++fmt - '0');
        switch (*++fmt) {
        case 's': puts(__builtin_va_arg(ap, const char *)); break;
        case 'c': putc((char)__builtin_va_arg(ap, int)); break;
        case 'u': put_dec(__builtin_va_arg(ap, u32)); break;
        case 'x': put_hex(__builtin_va_arg(ap, u32), width ? width : 8); break;
        case 'X': put_hex(__builtin_va_arg(ap, u64), 16); break;
        default: putc('%'); putc(*fmt); break;
        }
    }
    __builtin_va_end(ap);
}

#endif
