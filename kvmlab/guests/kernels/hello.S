/* hello.S: the smallest kernel. An a.out-kludge multiboot header (flag 16: the loader takes
 * the load and bss addresses from the header, so this also boots as a flat binary), then
 * "hello" on COM1, polling the line status register before each byte, then a check that the
 * loader zeroed the bss and the multiboot magic, and an exit through isa-debug-exit. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010000
#define COM1 0x3f8
#define LSR_THRE 0x20

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header         /* header_addr */
    .long __load_start      /* load_addr */
    .long __load_end        /* load_end_addr */
    .long __bss_end         /* bss_end_addr */
    .long _start            /* entry_addr */

    .text
    .code32
    .globl _start
_start:
    mov $stack_top, %esp
    mov %eax, %edi              /* keep the magic */
    mov $message, %esi
1:  lodsb
    test %al, %al
    jz 3f
    mov %al, %ah
    mov $COM1 + 5, %dx
2:  inb %dx, %al                /* poll LSR until THR is empty */
    test $LSR_THRE, %al
    jz 2b
    mov $COM1, %dx
    mov %ah, %al
    outb %al, %dx
    jmp 1b
3:  /* exit value: 0x10 if the magic is right and the bss reads zero, else 0x11 */
    mov $0x10, %al
    cmp $0x2BADB002, %edi
    jne 5f
    mov $bss_start, %ecx
4:  cmp $bss_end, %ecx
    je 6f
    cmpb $0, (%ecx)
    jne 5f
    inc %ecx
    jmp 4b
5:  mov $0x11, %al
6:  outb %al, $0xf4
    cli
7:  hlt
    jmp 7b

    .section .rodata
message:
    .asciz "hello from hello.S\n"

    .bss
    .align 16
bss_start:
    .skip 4096
stack_top:
bss_end:
