/* probe.c: a kernel that reports what it was booted with, the way a hobby kernel or a test
 * suite starts: the multiboot information (flags, memory sizes, command line, memory map,
 * loader name), QEMU's fw_cfg (signature, ID, RAM size, CPU counts, file directory), the
 * CPU (CPUID: vendor, brand, every basic and extended leaf, the hypervisor's leaves and a leaf
 * past the last; IA32_APIC_BASE, a wrmsr read back) and the local APIC page (ID, version).
 * The command line may say "exit=N": the kernel then exits through isa-debug-exit with N. */
#include "lib.h"

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};

struct multiboot_mmap_entry {
    u32 size;
    u64 addr, len;
    u32 type;
} __attribute__((packed));

#define FW_CFG_CTL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
#define FW_CFG_MAX_CPUS 0x0f
#define FW_CFG_FILE_DIR 0x19
#define MSR_IA32_APICBASE 0x1b
#define MSR_IA32_SYSENTER_CS 0x174
#define APIC_ID 0x20
#define APIC_LVR 0x30

static void fw_cfg_read(u16 key, void *buf, u32 len)
{
    outw(FW_CFG_CTL, key);
    for (u32 i = 0; i < len; i++)
        ((u8 *)buf)[i] = inb(FW_CFG_DATA);
}

static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

static void report_multiboot(u32 magic, const struct multiboot_info *mbi)
{
    printf("multiboot magic %x info %x flags %x\n", magic, (u32)mbi, mbi->flags);
    if (mbi->flags & 1)
        printf("mem_lower %u KiB mem_upper %u KiB\n", mbi->mem_lower, mbi->mem_upper);
    if (mbi->flags & (1 << 2))
        printf("cmdline \"%s\"\n", (const char *)mbi->cmdline);
    if (mbi->flags & (1 << 9))
        printf("loader \"%s\"\n", (const char *)mbi->boot_loader_name);
    if (mbi->flags & (1 << 6)) {
        u32 p = mbi->mmap_addr;
        while (p < mbi->mmap_addr + mbi->mmap_length) {
            const struct multiboot_mmap_entry *e = (const void *)p;
            printf("mmap %X-%X type %u\n", e->addr, e->addr + e->len - 1, e->type);
            p += e->size + 4;
        }
    }
}

static void report_fw_cfg(void)
{
    char sig[5] = {0};
    u32 id = 0;
    u64 ram = 0;
    u16 nb = 0, max = 0;
    u8 count[4];
    fw_cfg_read(FW_CFG_SIGNATURE, sig, 4);
    fw_cfg_read(FW_CFG_ID, &id, 4);
    fw_cfg_read(FW_CFG_RAM_SIZE, &ram, 8);
    fw_cfg_read(FW_CFG_NB_CPUS, &nb, 2);
    fw_cfg_read(FW_CFG_MAX_CPUS, &max, 2);
    printf("fw_cfg \"%s\" id %x ram %X cpus %u max %u\n", sig, id, ram, nb, max);
    fw_cfg_read(FW_CFG_FILE_DIR, count, 4);
    u32 files = be32(count);
    for (u32 i = 0; i < files && i < 16; i++) {
        u8 entry[64]; /* size (BE32), select (BE16), reserved, name[56]: read on from the dir */
        for (u32 j = 0; j < 64; j++)
            entry[j] = inb(FW_CFG_DATA);
        entry[63] = 0;
        printf("fw_cfg file %4x size %u \"%s\"\n", (u32)(entry[4] << 8 | entry[5]),
               be32(entry), (const char *)entry + 8);
    }
}

#define MAX_LEAVES 0x20 /* printed per range at most, whatever the CPU claims */

static void print_leaf(u32 leaf)
{
    u32 r[4];
    cpuid(leaf, 0, r);
    printf("cpuid %x: %x %x %x %x\n", leaf, r[0], r[1], r[2], r[3]);
}

/* Every leaf from `base` to the highest the CPU names there; the highest, or 0 if none. */
static u32 print_leaves(u32 base)
{
    u32 r[4];
    cpuid(base, 0, r);
    u32 top = r[0] >= base && r[0] - base < MAX_LEAVES ? r[0] : base;
    for (u32 leaf = base; leaf <= top; leaf++)
        print_leaf(leaf);
    return r[0] >= base ? r[0] : 0;
}

static void report_cpu(void)
{
    u32 r[4];
    char text[49] = {0};
    cpuid(0, 0, r);
    *(u32 *)text = r[1];
    *(u32 *)(text + 4) = r[3];
    *(u32 *)(text + 8) = r[2];
    printf("cpuid vendor \"%s\"\n", text);
    print_leaves(0);
    u32 top = print_leaves(0x80000000);
    if (top >= 0x80000004) {
        for (u32 i = 0; i < 3; i++)
            cpuid(0x80000002 + i, 0, (u32 *)(text + 16 * i));
        printf("cpuid brand \"%s\"\n", text);
    }
    print_leaf(top ? top + 1 : 0x80000001); /* past the last leaf */
    print_leaf(0x40000000);
    print_leaf(0x40000001);
    printf("IA32_APIC_BASE %X\n", rdmsr(MSR_IA32_APICBASE));
    wrmsr(MSR_IA32_SYSENTER_CS, 0x10);
    printf("IA32_SYSENTER_CS %X after wrmsr 10\n", rdmsr(MSR_IA32_SYSENTER_CS));
    printf("lapic id %x version %x\n", mmio_read32(0xfee00000 + APIC_ID),
           mmio_read32(0xfee00000 + APIC_LVR));
}

static u32 exit_value(const char *cmdline)
{
    for (const char *p = cmdline; *p; p++) {
        if (p[0] == 'e' && p[1] == 'x' && p[2] == 'i' && p[3] == 't' && p[4] == '=') {
            u32 v = 0;
            for (p += 5; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (u32)(*p - '0');
            return v;
        }
    }
    return 0;
}

u32 kmain(u32 magic, const struct multiboot_info *mbi)
{
    puts("probe: booted\n");
    report_multiboot(magic, mbi);
    report_fw_cfg();
    report_cpu();
    u32 code = mbi->flags & (1 << 2) ? exit_value((const char *)mbi->cmdline) : 0;
    printf("probe: exit %u\n", code);
    return code;
}
