/* entry.S: a multiboot ELF entry for C kernels. The header asks for page-aligned modules and
 * memory information (flags 0 and 1) and, without flag 16, lets the loader read the ELF
 * program headers. _start sets up a stack and calls kmain(magic, info); if kmain returns,
 * its value goes to isa-debug-exit. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
    outb %al, $0xf4
1:  hlt
    jmp 1b

    .bss
    .align 16
    .skip 16384
stack_top:
