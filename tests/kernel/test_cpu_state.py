"""X86CpuState: KVM's register ABI on a Unicorn CPU, checked by running real guest code."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_WRITE,
    Uc,
)
from unicorn.x86_const import (
    UC_X86_INS_OUT,
    UC_X86_REG_CR2,
    UC_X86_REG_EAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RIP,
)

from kvmlab.kernel.arch.x86.cpu_state import ContextLayout, X86CpuState, context_layout
from kvmlab.uapi.x86 import (
    SEGMENT_NAMES,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    X86_EFER_NX,
    X86_EFER_SCE,
    X86_RFLAGS_DF,
    X86_RFLAGS_IF,
    X86_RFLAGS_TF,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
)

RAM_SIZE = 0x20_0000
PML4 = 0x10000
ALIAS_VA = 0x4000_3000  # mapped by the long-mode page tables onto ALIAS_PA
ALIAS_PA = 0x5000
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10


class Guest:
    """One Unicorn CPU with 2 MiB of RAM at 0 that records OUT exits and exceptions."""

    def __init__(self) -> None:
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, RAM_SIZE)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.cpu = X86CpuState(uc)
        self.outs: list[tuple[int, int, int]] = []  # (port, value, rip of the OUT)
        self.vectors: list[int] = []
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)

    def _on_out(self, uc: Uc, port: int, _size: int, value: int, _data: object) -> None:
        self.outs.append((port, value, uc.reg_read(UC_X86_REG_RIP)))
        uc.emu_stop()

    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        self.vectors.append(intno)
        uc.emu_stop()

    def run(self, count: int = 1000) -> None:
        """Enter the guest at RIP; it stops at an OUT, an exception, hlt or after `count` insns."""
        self.uc.emu_start(self.cpu.rip, 0, count=count)

    def sregs(self) -> kvm_sregs:
        out = kvm_sregs()
        self.cpu.get_sregs(out)
        return out


def asm(source: str, mode: int, address: int) -> bytes:
    encoding = Ks(KS_ARCH_X86, mode).asm(source, address)[0]
    return bytes(encoding or b"")


def seg(
    selector: int = 0,
    base: int = 0,
    limit: int = 0xFFFF,
    type: int = 3,
    *,
    s: int = 1,
    dpl: int = 0,
    present: int = 1,
    db: int = 0,
    l: int = 0,  # noqa: E741 (kvm_segment's field name)
    g: int = 0,
    avl: int = 0,
    unusable: int = 0,
) -> kvm_segment:
    return kvm_segment(base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable)


def real_mode(cs_selector: int = 0, cs_base: int = 0) -> kvm_sregs:
    s = kvm_sregs()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, seg())
    s.cs = seg(cs_selector, cs_base, type=0xB)
    s.tr = seg(type=0xB, s=0)
    s.ldt = seg(type=2, s=0)
    s.gdt.limit = s.idt.limit = 0xFFFF
    s.cr0 = 0x6000_0010
    return s


def flat32() -> kvm_sregs:
    s = real_mode()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, seg(0x10, 0, 0xFFFF_FFFF, 3, db=1, g=1))
    s.cs = seg(0x08, 0, 0xFFFF_FFFF, 0xB, db=1, g=1)
    s.gdt.limit = s.idt.limit = 0
    s.cr0 = X86_CR0_PE | 0x10
    return s


def long64() -> kvm_sregs:
    s = flat32()
    s.cs = seg(0x08, 0, 0xFFFF_FFFF, 0xB, l=1, g=1)
    s.cr0 = X86_CR0_PG | X86_CR0_PE | 0x10
    s.cr3 = PML4
    s.cr4 = X86_CR4_PAE
    s.efer = X86_EFER_LME | X86_EFER_LMA
    return s


def build_page_tables(uc: Uc) -> None:
    """Identity-map the first 2 MiB with one large page, and ALIAS_VA onto ALIAS_PA."""
    pdpt, pd, alias_pd, alias_pt = PML4 + 0x1000, PML4 + 0x2000, PML4 + 0x3000, PML4 + 0x4000
    present_rw = 3
    uc.mem_write(PML4, struct.pack("<Q", pdpt | present_rw))
    uc.mem_write(pdpt, struct.pack("<Q", pd | present_rw))
    uc.mem_write(pd, struct.pack("<Q", 0 | 0x80 | present_rw))  # PS: a 2 MiB page at 0
    uc.mem_write(pdpt + 8, struct.pack("<Q", alias_pd | present_rw))  # VA 1 GiB
    uc.mem_write(alias_pd, struct.pack("<Q", alias_pt | present_rw))
    uc.mem_write(alias_pt + 8 * 3, struct.pack("<Q", ALIAS_PA | present_rw))  # VA + 0x3000


def as_dict(s: kvm_sregs) -> dict[str, object]:
    """The kvm_sregs fields this layer owns, for readable comparisons."""
    d: dict[str, object] = {
        name: {f[0]: getattr(getattr(s, name), f[0]) for f in kvm_segment._fields_}
        for name in SEGMENT_NAMES
    }
    for name in ("gdt", "idt"):
        d[name] = (getattr(s, name).base, getattr(s, name).limit)
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        d[name] = getattr(s, name)
    return d


def test_real_mode_fetches_from_the_hidden_cs_base_not_selector_times_16() -> None:
    g = Guest()
    g.cpu.set_sregs(real_mode(cs_selector=0x100, cs_base=0x20000))
    g.uc.mem_write(0x20010, asm("mov ax, 0x1234; out 0x80, ax; hlt", KS_MODE_16, 0x10))
    g.uc.mem_write(0x1010, asm("out 0x81, al; hlt", KS_MODE_16, 0x10))  # at selector * 16
    g.cpu.set_rip(0x10)
    g.run()
    assert g.outs == [(0x80, 0x1234, 0x13)]


def test_reset_state_makes_the_first_fetch_at_fffffff0() -> None:
    g = Guest()
    g.uc.mem_map(0xFFFF_F000, 0x1000)
    g.uc.mem_write(0xFFFF_FFF0, asm("mov al, 0x42; out 0x80, al; hlt", KS_MODE_16, 0xFFF0))
    g.cpu.set_sregs(real_mode(cs_selector=0xF000, cs_base=0xFFFF_0000))
    g.cpu.set_rip(0xFFF0)
    g.run()
    assert g.outs == [(0x80, 0x42, 0xFFF2)]
    assert (g.sregs().cs.selector, g.sregs().cs.base) == (0xF000, 0xFFFF_0000)


def test_flat_protected_mode_decodes_32_bit_code_without_a_gdt_in_memory() -> None:
    g = Guest()
    g.cpu.set_sregs(flat32())
    g.uc.mem_write(0x1000, asm("mov eax, 0x12345678; out 0x80, eax; hlt", KS_MODE_32, 0x1000))
    g.cpu.set_rip(0x1000)
    g.run()
    assert g.outs == [(0x80, 0x12345678, 0x1005)]


def test_long_mode_runs_64_bit_code_through_guest_page_tables() -> None:
    g = Guest()
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    code = (
        f"mov rax, 0x123456789abcdef0; mov rbx, {ALIAS_VA:#x}; mov [rbx], rax; out 0x80, eax; hlt"
    )
    g.uc.mem_write(0x1000, asm(code, KS_MODE_64, 0x1000))
    g.cpu.set_rip(0x1000)
    g.run()
    assert g.outs and g.outs[0][1] == 0x9ABCDEF0
    assert g.uc.mem_read(ALIAS_PA, 8) == struct.pack("<Q", 0x1234_5678_9ABC_DEF0)
    assert g.uc.mem_read(ALIAS_VA & 0xFFFF, 8) == bytes(8)  # not identity-mapped


def test_translate_and_read_virtual_walk_the_guest_page_tables() -> None:
    g = Guest()
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    g.uc.mem_write(ALIAS_PA + 0x10, b"through paging")
    g.cpu.write_reg(UC_X86_REG_CR2, 0xC2)
    assert g.cpu.translate(ALIAS_VA + 0x10) == ALIAS_PA + 0x10
    assert g.cpu.translate(0x1234, UC_PROT_WRITE) == 0x1234
    assert g.cpu.read_virtual(ALIAS_VA + 0x10, 14) == b"through paging"
    assert g.cpu.translate(ALIAS_VA + 0x1000) is None  # not present
    assert g.cpu.read_virtual(ALIAS_VA + 0xFF0, 0x20, UC_PROT_EXEC) is None
    assert g.cpu.read_reg(UC_X86_REG_CR2) == 0xC2  # the failed walks left no page-fault state


def test_read_code_reads_at_cs_base_plus_ip_and_stops_at_a_fault() -> None:
    g = Guest()
    g.cpu.set_sregs(real_mode(cs_selector=0x100, cs_base=0x20000))
    g.uc.mem_write(0x20010, b"\x90\xf4")
    assert g.cpu.read_code(0x10, 2) == b"\x90\xf4"
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    g.uc.mem_write(ALIAS_PA + 0xFFE, b"\x0f\x0b")
    assert g.cpu.read_code(ALIAS_VA + 0xFFE, 16) == b"\x0f\x0b"  # the next page is not present


GDT = 0x500
GDT_ENTRIES = (0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF)  # null, code32, data32


def test_get_sregs_reports_a_guest_driven_switch_to_protected_mode() -> None:
    g = Guest()
    g.uc.mem_write(GDT, struct.pack("<3Q", *GDT_ENTRIES))
    g.uc.mem_write(0x600, struct.pack("<HI", 8 * len(GDT_ENTRIES) - 1, GDT))
    boot = """
        lgdt [0x600]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        ljmp 0x08:pm32
    .code32
    pm32:
        mov ax, 0x10
        mov ds, ax
        mov ss, ax
        out 0x80, al
        hlt
    """
    g.uc.mem_write(0x7C00, asm(boot, KS_MODE_16, 0x7C00))
    g.cpu.set_sregs(real_mode())
    g.cpu.set_rip(0x7C00)
    g.run()
    assert g.outs and g.outs[0][1] == 0x10
    s = g.sregs()
    assert (s.cs.selector, s.cs.base, s.cs.limit) == (8, 0, 0xFFFF_FFFF)
    assert (s.cs.db, s.cs.g, s.cs.s, s.cs.present, s.cs.type & 0xA) == (1, 1, 1, 1, 0xA)
    assert (s.ds.selector, s.ss.selector, s.ss.db) == (0x10, 0x10, 1)
    assert (s.gdt.base, s.gdt.limit) == (GDT, 23)
    assert s.cr0 & X86_CR0_PE
    assert g.cpu.cpl() == 0


def distinctive(base: kvm_sregs) -> kvm_sregs:
    """`base` with a different, unusual value in every field this layer owns."""
    s = kvm_sregs.from_buffer_copy(base)
    for i, name in enumerate(SEGMENT_NAMES):
        old = getattr(s, name)
        setattr(
            s,
            name,
            seg(
                old.selector | (i << 3),
                old.base + 0x1000 * (i + 1) if name not in ("cs", "ss") else old.base,
                old.limit - i,
                old.type,
                s=old.s,
                dpl=old.dpl,
                present=old.present,
                db=old.db,
                l=old.l,
                g=old.g,
                avl=i & 1,
                unusable=int(name == "ldt"),
            ),
        )
    s.gdt.base, s.gdt.limit = 0x7000, 0x3F
    s.idt.base, s.idt.limit = 0x8000, 0xFFF
    s.cr2, s.cr8 = 0xDEAD_B000, 5
    s.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT
    s.efer |= X86_EFER_SCE | X86_EFER_NX
    return s


@pytest.mark.parametrize("mode", [real_mode, flat32, long64], ids=["real", "pm32", "long64"])
def test_set_then_get_sregs_round_trips_every_field(mode: Callable[[], kvm_sregs]) -> None:
    g = Guest()
    want = distinctive(mode())
    g.cpu.set_sregs(want)
    assert as_dict(g.sregs()) == as_dict(want)


def test_set_sregs_flushes_the_tlb_so_edited_page_tables_take_effect() -> None:
    g = Guest()
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    store = f"mov rbx, {ALIAS_VA:#x}; mov [rbx], eax; out 0x80, al; hlt"
    g.uc.mem_write(0x1000, asm(store, KS_MODE_64, 0x1000))
    g.cpu.set_regs(kvm_regs(rax=0x11, rip=0x1000, rflags=2))
    g.run()
    alias_pte = PML4 + 0x4000 + 8 * 3
    g.uc.mem_write(alias_pte, struct.pack("<Q", 0x6000 | 3))  # the VMM remaps the page
    g.cpu.set_sregs(long64())
    g.cpu.set_regs(kvm_regs(rax=0x22, rip=0x1000, rflags=2))
    g.run()
    assert (g.uc.mem_read(ALIAS_PA, 1), g.uc.mem_read(0x6000, 1)) == (b"\x11", b"\x22")


def test_set_sregs_leaves_rip_alone_when_leaving_long_mode() -> None:
    g = Guest()
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    g.cpu.set_rip(0x1_0000_1000)
    g.cpu.set_sregs(real_mode())
    assert g.cpu.rip == 0x1_0000_1000


def test_regs_round_trip_including_rflags_if_df_tf() -> None:
    g = Guest()
    want = kvm_regs(*(0x1111_0000_0000_0000 * (i + 1) + i for i in range(16)), 0x1234, 0)
    want.rflags = 0x2 | X86_RFLAGS_IF | X86_RFLAGS_DF | X86_RFLAGS_TF | 0x8D5  # + arithmetic flags
    g.cpu.set_regs(want)
    got = kvm_regs()
    g.cpu.get_regs(got)
    assert bytes(got) == bytes(want)
    assert g.cpu.rip == 0x1234


def test_rflags_df_set_through_set_regs_steers_string_instructions() -> None:
    g = Guest()
    g.cpu.set_sregs(flat32())
    g.uc.mem_write(0x1000, asm("stosb; hlt", KS_MODE_32, 0x1000))
    regs = kvm_regs(rax=0x55, rdi=0x3000, rsp=0x8000, rip=0x1000, rflags=0x2 | X86_RFLAGS_DF)
    g.cpu.set_regs(regs)
    g.run()
    assert g.cpu.read_reg(UC_X86_REG_RDI) == 0x2FFF
    assert g.uc.mem_read(0x3000, 1) == b"\x55"


@pytest.mark.parametrize("opener", ["sti", "mov ss, ax"])
def test_interrupt_shadow_covers_exactly_one_instruction_after(opener: str) -> None:
    g = Guest()
    g.cpu.set_sregs(real_mode())
    g.uc.mem_write(0x1000, asm(f"{opener}; nop; nop; hlt", KS_MODE_16, 0x1000))
    g.cpu.set_rip(0x1000)
    assert not g.cpu.interrupt_shadow()
    g.run(count=1)
    assert g.cpu.interrupt_shadow()
    g.run(count=1)
    assert not g.cpu.interrupt_shadow()


def test_exception_error_code_after_a_general_protection_fault() -> None:
    g = Guest()
    g.cpu.set_sregs(flat32())
    g.uc.mem_write(0x1000, asm("mov ax, 0x33; mov ds, ax; hlt", KS_MODE_32, 0x1000))
    g.cpu.set_rip(0x1000)
    g.run()
    assert g.vectors == [13]
    assert g.cpu.exception_error_code() == 0x30  # the selector, RPL bits cleared
    assert g.cpu.rip == 0x1004  # at the faulting mov


def test_exception_error_code_and_cr2_after_a_page_fault_on_write() -> None:
    g = Guest()
    build_page_tables(g.uc)
    g.cpu.set_sregs(long64())
    g.uc.mem_write(0x1000, asm("mov rbx, 0x40004008; mov [rbx], eax; hlt", KS_MODE_64, 0x1000))
    g.cpu.set_rip(0x1000)
    g.run()
    assert g.vectors == [14]
    assert g.cpu.exception_error_code() == 2  # W=1, P=0, U=0
    assert g.cpu.read_reg(UC_X86_REG_CR2) == 0x4000_4008


def test_unusable_round_trips_until_the_guest_reloads_the_segment() -> None:
    g = Guest()
    g.uc.mem_write(GDT, struct.pack("<3Q", *GDT_ENTRIES))
    s = flat32()
    s.gdt.base, s.gdt.limit = GDT, 23
    s.ds = seg(0x10, 0, 0xFFFF_FFFF, 3, db=1, g=1, unusable=1)
    s.es = seg(0x10, 0, 0xFFFF_FFFF, 3, db=1, g=1, present=0)
    g.cpu.set_sregs(s)
    got = g.sregs()
    assert (got.ds.unusable, got.ds.present, got.es.unusable, got.es.present) == (1, 1, 0, 0)
    g.uc.mem_write(
        0x1000, asm("mov ax, 0x10; mov ds, ax; xor eax, eax; mov es, ax; hlt", KS_MODE_32, 0x1000)
    )
    g.cpu.set_rip(0x1000)
    g.run()
    got = g.sregs()
    assert (got.ds.unusable, got.ds.present) == (0, 1)  # a loaded data segment
    assert (got.es.unusable, got.es.present) == (1, 0)  # a null selector, as VMX reports it


def test_cpl_follows_ss_dpl_in_protected_mode_and_is_0_in_real_mode() -> None:
    g = Guest()
    s = flat32()
    s.cs = seg(0x1B, 0, 0xFFFF_FFFF, 0xB, dpl=3, db=1, g=1)
    s.ss = seg(0x23, 0, 0xFFFF_FFFF, 3, dpl=3, db=1, g=1)
    g.cpu.set_sregs(s)
    assert g.cpu.cpl() == 3
    s = real_mode()
    s.ss.dpl = 3
    g.cpu.set_sregs(s)
    assert g.cpu.cpl() == 0


def test_context_layout_probe_finds_the_unicorn_2_1_4_offsets() -> None:
    layout = context_layout()
    assert layout == ContextLayout.probe()  # deterministic, so caching it is sound
    assert layout == ContextLayout(
        size=5608,
        eip=168,
        hflags=216,
        segs=224,
        gdt=416,
        idt=440,
        cr=464,
        efer=632,
        error_code=5424,
    )


def test_set_regs_rip_is_where_the_guest_resumes() -> None:
    g = Guest()
    g.cpu.set_sregs(flat32())
    g.uc.mem_write(0x2000, asm("mov eax, 7; out 0x80, eax; hlt", KS_MODE_32, 0x2000))
    g.cpu.set_regs(kvm_regs(rip=0x2000, rflags=2))
    g.run()
    assert g.outs == [(0x80, 7, 0x2005)]
    assert g.cpu.read_reg(UC_X86_REG_EAX) == 7
