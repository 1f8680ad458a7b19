"""KVM's x86 register ABI (kvm_regs, kvm_sregs) mapped onto one Unicorn x86-64 CPU.

One `Uc(UC_ARCH_X86, UC_MODE_64)` runs every guest mode. Unicorn's register API cannot reach
the hidden half of the CPU state (segment descriptor caches, QEMU's `hflags` mode bits), so
KVM_GET/SET_SREGS edit the raw context instead: `uc_context_save` is a memcpy of QEMU's
`CPUX86State`, whose field offsets `ContextLayout` finds once per process by writing marker
values and looking for them. A Unicorn release with a different layout fails that probe at
start-up with a clear message instead of corrupting guest state.

General-purpose registers take the hot path of every exit, so they go straight to
`uc_reg_read_batch`/`uc_reg_write_batch` through ctypes with prebuilt arrays (about 1 µs,
against about 38 µs for the binding's `reg_read_batch`).
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Final

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_OK,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
    __version__,
)
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_DR0,
    UC_X86_REG_DS,
    UC_X86_REG_ES,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GDTR,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_IDTR,
    UC_X86_REG_LDTR,
    UC_X86_REG_MSR,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
    UC_X86_REG_SS,
    UC_X86_REG_TR,
)

from kvmlab.uapi.x86 import kvm_regs, kvm_segment, kvm_sregs

MSR_EFER: Final = 0xC0000080
EFER_SCE: Final = 1 << 0
EFER_LMA: Final = 1 << 10
EFER_NXE: Final = 1 << 11
CR0_PE: Final = 1 << 0
CR0_TS: Final = 1 << 3
RFLAGS_VM: Final = 1 << 17

# QEMU's hflags bits (target/i386/cpu.h, HF_*_SHIFT): the translator's view of the CPU mode.
HF_CPL_MASK: Final = 3
HF_INHIBIT_IRQ: Final = 1 << 3  # one-instruction interrupt shadow after sti / mov ss
HF_CS32: Final = 1 << 4
HF_SS32: Final = 1 << 5
HF_ADDSEG: Final = 1 << 6  # segment bases must be added (not a flat 32-bit model)
HF_PE: Final = 1 << 7
HF_MP: Final = 1 << 9  # MP, EM, TS mirror CR0 bits 1-3 in this order
HF_EM: Final = 1 << 10
HF_TS: Final = 1 << 11
HF_LMA: Final = 1 << 14
HF_CS64: Final = 1 << 15
HF_GUEST: Final = 1 << 21  # in SVM guest mode: intercept checks are compiled in
# The bits set_sregs recomputes; the rest (interrupt shadow, OSFXSR/SMAP that QEMU's CR4 write
# sets, SVME that its EFER write sets, SMM, ...) are kept.
_HF_DERIVED: Final = (
    HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP | HF_EM | HF_TS | HF_LMA | HF_CS64
)

# QEMU keeps descriptor attributes in the layout of the descriptor's second dword.
DESC_TYPE_SHIFT: Final = 8
DESC_S: Final = 1 << 12
DESC_DPL_SHIFT: Final = 13
DESC_P: Final = 1 << 15
DESC_AVL: Final = 1 << 20
DESC_L: Final = 1 << 21
DESC_B: Final = 1 << 22
DESC_G: Final = 1 << 23
DESC_ATTR_MASK: Final = 0x00F0FF00  # QEMU may also keep base bits of the descriptor here

# Segment caches in the context, in QEMU's order: R_ES R_CS R_SS R_DS R_FS R_GS, then ldt, tr.
QEMU_SEGMENTS: Final = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
# kvm_sregs order (cs ds es fs gs ss tr ldt) as indexes into QEMU_SEGMENTS.
_KVM_SEG_ORDER: Final = tuple(
    QEMU_SEGMENTS.index(name) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
)
_SEG_ES, _SEG_CS, _SEG_SS, _SEG_DS = 0, 1, 2, 3
SEGMENT_CACHE_SIZE: Final = 24  # SegmentCache: selector u32, pad, base u64, limit u32, flags u32

_SEG_CACHE = struct.Struct("<I4xQII")
_SEG_CACHES = struct.Struct("<" + "I4xQII" * len(QEMU_SEGMENTS))
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_CRS = struct.Struct("<5Q")  # cr[0..4]
# kvm_sregs from cs up to efer: 8 kvm_segment, gdt and idt kvm_dtable, cr0 cr2 cr3 cr4 cr8 efer.
_KVM_SREGS_HEAD = struct.Struct("<" + "QIH10B" * 8 + "QH6x" * 2 + "6Q")
assert _KVM_SREGS_HEAD.size == kvm_sregs.apic_base.offset
assert ctypes.sizeof(kvm_segment) == struct.calcsize("<QIH10B")

GPR_IDS: Final = (  # the order of struct kvm_regs
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RSI,
    UC_X86_REG_RDI,
    UC_X86_REG_RSP,
    UC_X86_REG_RBP,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RIP,
    UC_X86_REG_RFLAGS,  # all 64 bits; EFLAGS would be the low 32 (both keep IF, DF, TF, AC, ID)
)
assert ctypes.sizeof(kvm_regs) == 8 * len(GPR_IDS)
# the general registers by their number in an instruction's ModRM/REX encoding
# (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8-r15)
GPR_BY_NUMBER: Final = tuple(GPR_IDS[i] for i in (0, 2, 3, 1, 6, 7, 4, 5, *range(8, 16)))

_vmem_translate = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)
)(("uc_vmem_translate", uclib))
_vmem_read = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
)(("uc_vmem_read", uclib))
_vmem_write = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
)(("uc_vmem_write", uclib))

PAGE_SIZE: Final = 0x1000


class _UcX86Msr(ctypes.Structure):
    """Unicorn's uc_x86_msr: the value type of UC_X86_REG_MSR."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


def _check(err: int) -> None:
    """Raise the binding's UcError for a failed raw uclib call."""
    if err != UC_ERR_OK:
        raise UcError(err)


class ContextLayoutError(RuntimeError):
    """The raw Unicorn context does not look like the CPUX86State kvmlab was written against."""


@dataclass(frozen=True, slots=True)
class ContextLayout:
    """Byte offsets of the CPUX86State fields kvmlab edits, inside a raw uc_context blob."""

    size: int
    eip: int
    hflags: int
    segs: int  # QEMU_SEGMENTS, SEGMENT_CACHE_SIZE bytes each (ldt and tr follow gs)
    gdt: int  # SegmentCache: base at +8, limit at +16
    idt: int
    cr: int  # cr[0..4], u64 each
    efer: int
    error_code: int  # int32 error code of the last exception

    @classmethod
    def probe(cls) -> ContextLayout:
        """Find the offsets on a scratch engine by planting markers and tracing side effects."""
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        for reg, value in (
            (UC_X86_REG_RIP, 0x1122_3344_5566_7788),
            (UC_X86_REG_CR2, 0x2233_4455_6677_8899),
            (UC_X86_REG_CR3, 0x3344_5566_7788_9000),
            (UC_X86_REG_FS_BASE, 0x4455_6677_8899_AABB),
            (UC_X86_REG_GS_BASE, 0x5566_7788_99AA_BBCC),
            (UC_X86_REG_DR0, 0x6677_8899_AABB_CCDD),
            (UC_X86_REG_ES, 0x1111),
            (UC_X86_REG_CS, 0x2222),
            (UC_X86_REG_SS, 0x3333),
            (UC_X86_REG_DS, 0x4444),
        ):
            uc.reg_write(reg, value)
        uc.reg_write(UC_X86_REG_LDTR, (0x5555, 0x7788_99AA_BBCC_DDEE, 0x1234_5678, 0x8200))
        uc.reg_write(UC_X86_REG_TR, (0x6666, 0x0102_0304_0506_0708, 0x9988_7766, 0x8B00))
        uc.reg_write(UC_X86_REG_GDTR, (0, 0x1111_2222_3333_4444, 0x5566, 0))
        uc.reg_write(UC_X86_REG_IDTR, (0, 0x7777_6666_5555_4444, 0x3322, 0))
        blob = bytes(uc.context_save())

        def find(value: int, what: str) -> int:
            needle = _U64.pack(value)
            first = blob.find(needle)
            if first < 0 or blob.find(needle, first + 1) >= 0:
                raise ContextLayoutError(_layout_message(f"{what} marker not found exactly once"))
            return first

        tr = find(0x0102_0304_0506_0708, "TR base") - 8
        segs = tr - 7 * SEGMENT_CACHE_SIZE
        layout_checks = {
            "ES/CS/SS/DS selectors": [
                _SEG_CACHE.unpack_from(blob, segs + i * SEGMENT_CACHE_SIZE)[0] for i in range(4)
            ]
            == [0x1111, 0x2222, 0x3333, 0x4444],
            "FS base": find(0x4455_6677_8899_AABB, "FS base") == segs + 4 * SEGMENT_CACHE_SIZE + 8,
            "GS base": find(0x5566_7788_99AA_BBCC, "GS base") == segs + 5 * SEGMENT_CACHE_SIZE + 8,
            "LDT": _SEG_CACHE.unpack_from(blob, segs + 6 * SEGMENT_CACHE_SIZE)
            == (0x5555, 0x7788_99AA_BBCC_DDEE, 0x1234_5678, 0x8200),
            "TR": _SEG_CACHE.unpack_from(blob, tr)
            == (0x6666, 0x0102_0304_0506_0708, 0x9988_7766, 0x8B00),
        }
        gdt = find(0x1111_2222_3333_4444, "GDT base") - 8
        idt = find(0x7777_6666_5555_4444, "IDT base") - 8
        cr = find(0x3344_5566_7788_9000, "CR3") - 3 * 8
        layout_checks["GDT limit"] = _U32.unpack_from(blob, gdt + 16)[0] == 0x5566
        layout_checks["IDT limit"] = _U32.unpack_from(blob, idt + 16)[0] == 0x3322
        layout_checks["CR2"] = _U64.unpack_from(blob, cr + 2 * 8)[0] == 0x2233_4455_6677_8899
        failed = [name for name, ok in layout_checks.items() if not ok]
        if failed:
            raise ContextLayoutError(_layout_message("unexpected " + ", ".join(failed)))

        # hflags: the one word besides cr[0] that changes, by HF_TS, when CR0.TS is toggled.
        cr0 = uc.reg_read(UC_X86_REG_CR0)
        uc.reg_write(UC_X86_REG_CR0, cr0 ^ CR0_TS)
        hflags = _changed_word(blob, bytes(uc.context_save()), _U32, HF_TS, exclude=cr)
        uc.reg_write(UC_X86_REG_CR0, cr0)
        # EFER: the u64 that changes by SCE|NXE when both are toggled through wrmsr.
        blob = bytes(uc.context_save())
        efer = uc.reg_read(UC_X86_REG_MSR, MSR_EFER)
        uc.reg_write(UC_X86_REG_MSR, (MSR_EFER, efer ^ (EFER_SCE | EFER_NXE)))
        efer_off = _changed_word(blob, bytes(uc.context_save()), _U64, EFER_SCE | EFER_NXE)
        uc.reg_write(UC_X86_REG_MSR, (MSR_EFER, efer))

        eip = find(0x1122_3344_5566_7788, "RIP")
        error_code = _probe_error_code(uc, find(0x6677_8899_AABB_CCDD, "DR0"))
        return cls(len(blob), eip, hflags, segs, gdt, idt, cr, efer_off, error_code)


def _layout_message(detail: str) -> str:
    return (
        f"unicorn {__version__}: raw CPU context layout not recognised ({detail}). kvmlab edits "
        "QEMU's CPUX86State inside uc_context and is pinned to unicorn==2.1.4."
    )


def _changed_word(
    before: bytes, after: bytes, word: struct.Struct, xor: int, exclude: int = -1
) -> int:
    """The offset of the only aligned word (other than `exclude`) that changed by `xor`."""
    hits = [
        off
        for off in range(0, len(before) - word.size + 1, word.size)
        if off != exclude
        and word.unpack_from(before, off)[0] ^ word.unpack_from(after, off)[0] == xor
    ]
    if len(hits) != 1:
        raise ContextLayoutError(_layout_message(f"a flag toggle of {xor:#x} changed {hits}"))
    return hits[0]


def _probe_error_code(uc: Uc, dr0: int) -> int:
    """Raise #GP(0x30) in the scratch guest; QEMU keeps error_code 16 bytes before dr[0]."""
    code_page = 0x1000
    uc.mem_map(code_page, PAGE_SIZE, UC_PROT_ALL)
    uc.mem_write(code_page, bytes.fromhex("66b833008ed8"))  # mov ax, 0x33; mov ds, ax
    uc.reg_write(UC_X86_REG_GDTR, (0, 0, 0, 0))  # selector 0x33 is beyond the GDT limit
    vectors: list[int] = []

    def on_interrupt(uc: Uc, intno: int, _data: object) -> None:
        vectors.append(intno)
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.emu_start(code_page, 0, count=2)
    offset = dr0 - 16  # error_code, exception_is_int, exception_next_eip, then dr[8]
    if vectors != [13] or _U32.unpack_from(bytes(uc.context_save()), offset)[0] != 0x30:
        raise ContextLayoutError(_layout_message(f"#GP error code not at {offset}"))
    return offset


@dataclass(frozen=True, slots=True)
class SvmLayout:
    """Where QEMU keeps the SVM state kvmlab uses for intercepts (CPUX86State, after dr[8],
    the four breakpoint pointers and old_exception)."""

    vm_vmcb: int
    tsc_offset: int
    intercept: int


SVM_EXIT_MSR: Final = 0x7C
SVM_EXIT_READ_CR8: Final = 0x08
SVM_EXIT_WRITE_CR8: Final = 0x18
INTERCEPT_CR8: Final = 1 << 8  # in intercept_cr_read / intercept_cr_write (u16 each)
SVM_EXIT_INTR: Final = 0x60
EXCP_VMEXIT: Final = 0x100
INTERCEPT_MSR_PROT: Final = 1 << (SVM_EXIT_MSR - SVM_EXIT_INTR)
VMCB_MSRPM_BASE_PA: Final = 0x48  # struct vmcb_control_area.msrpm_base_pa


@cache
def svm_layout() -> SvmLayout:
    """The SVM fields' offsets, checked once per process by making a scratch guest's RDMSR,
    WRMSR and MOV from and to CR8 exit with the right exit code, rip and direction."""
    layout = context_layout()
    dr0 = layout.error_code + 16
    svm = SvmLayout(vm_vmcb=dr0 + 104, tsc_offset=dr0 + 112, intercept=dr0 + 120)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    vmcb = 0x10000
    uc.mem_map(0, 0x13000, UC_PROT_ALL)
    uc.mem_write(vmcb + VMCB_MSRPM_BASE_PA, _U64.pack(vmcb + PAGE_SIZE))
    uc.mem_write(vmcb + PAGE_SIZE, b"\xff" * 2 * PAGE_SIZE)
    # rdmsr; nop; wrmsr; mov rax, cr8; mov cr8, rax; hlt
    uc.mem_write(0x1000, bytes.fromhex("0f32900f30440f20c0440f22c0f4"))
    exits: list[tuple[int, int, int]] = []

    def on_interrupt(uc: Uc, intno: int, _data: object) -> None:
        blob = bytes(uc.context_save())
        code = _U32.unpack_from(blob, layout.error_code)[0]
        exits.append((intno, uc.reg_read(UC_X86_REG_RIP), code))
        rip = uc.reg_read(UC_X86_REG_RIP)
        uc.reg_write(UC_X86_REG_RIP, rip + (2 if intno == EXCP_VMEXIT + SVM_EXIT_MSR else 4))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    X86CpuState(uc)._set_intercepts(svm, vmcb, INTERCEPT_MSR_PROT, INTERCEPT_CR8)
    rip = 0x1000
    for _ in range(5):
        uc.emu_start(rip, 0, count=1 << 62)
        rip = uc.reg_read(UC_X86_REG_RIP)
    msr, exit_code = EXCP_VMEXIT + SVM_EXIT_MSR, EXCP_VMEXIT
    expected = [
        (msr, 0x1000, 0),
        (msr, 0x1003, 1),
        (exit_code + SVM_EXIT_READ_CR8, 0x1005, 0),
        (exit_code + SVM_EXIT_WRITE_CR8, 0x1009, 0),
    ]
    if exits != expected or rip != 0x100E:
        raise ContextLayoutError(_layout_message(f"MSR and CR8 intercepts gave {exits}"))
    return svm


@cache
def context_layout() -> ContextLayout:
    """The probed layout, computed once per process."""
    return ContextLayout.probe()


@cache
def _decode_attributes(flags: int) -> tuple[int, int, int, int, int, int, int, int]:
    """QEMU descriptor flags -> kvm_segment's (type, present, dpl, db, s, l, g, avl)."""
    return (
        (flags >> DESC_TYPE_SHIFT) & 15,
        int(bool(flags & DESC_P)),
        (flags >> DESC_DPL_SHIFT) & 3,
        int(bool(flags & DESC_B)),
        int(bool(flags & DESC_S)),
        int(bool(flags & DESC_L)),
        int(bool(flags & DESC_G)),
        int(bool(flags & DESC_AVL)),
    )


def encode_attributes(seg: kvm_segment) -> int:
    """kvm_segment's attribute fields -> QEMU descriptor flags (as get_seg in QEMU's kvm.c)."""
    return (
        (seg.type & 15) << DESC_TYPE_SHIFT
        | (DESC_S if seg.s else 0)
        | (seg.dpl & 3) << DESC_DPL_SHIFT
        | (DESC_P if seg.present else 0)
        | (DESC_AVL if seg.avl else 0)
        | (DESC_L if seg.l else 0)
        | (DESC_B if seg.db else 0)
        | (DESC_G if seg.g else 0)
    )


def compute_hflags(
    hflags: int,
    cr0: int,
    efer: int,
    rflags: int,
    cs_flags: int,
    ss_flags: int,
    data_bases: int,
) -> int:
    """Recompute QEMU's mode bits in `hflags` from architectural state.

    This mirrors QEMU's x86_update_hflags (what QEMU runs after loading state from KVM) and
    cpu_x86_load_seg_cache; `data_bases` is DS.base | ES.base | SS.base. CPL follows SS.DPL in
    protected mode, is 3 in virtual-8086 mode and 0 in real mode.
    """
    pe = cr0 & CR0_PE
    new = hflags & ~_HF_DERIVED
    if pe:
        new |= HF_PE
        new |= 3 if rflags & RFLAGS_VM else (ss_flags >> DESC_DPL_SHIFT) & 3
    new |= (cr0 << 8) & (HF_MP | HF_EM | HF_TS)  # CR0 bits 1-3 -> hflags bits 9-11
    if efer & EFER_LMA:
        new |= HF_LMA
    if new & HF_LMA and cs_flags & DESC_L:
        return new | HF_CS32 | HF_SS32 | HF_CS64
    if cs_flags & DESC_B:
        new |= HF_CS32
    if ss_flags & DESC_B:
        new |= HF_SS32
    if not pe or rflags & RFLAGS_VM or not new & HF_CS32 or data_bases:
        new |= HF_ADDSEG
    return new


class X86CpuState:
    """KVM's view of one x86 vCPU's registers, read from and written to a Unicorn engine.

    Fields QEMU does not hold are shadowed here: `unusable` per segment (reported as set until
    the guest reloads that segment, then as "not present", the way VMX reports it) and CR8,
    because Unicorn has no TPR: UC_X86_REG_CR8 lands outside QEMU's cr[5] array and a guest
    `mov cr8` is dropped by the APIC stub.
    """

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self.layout = context_layout()
        self._h = uc._uch
        # A private, reusable uc_context: the header of a real one (CPU-only context mode).
        saved = bytes(uc.context_save())
        if len(saved) != self.layout.size:
            raise ContextLayoutError(_layout_message(f"context size {len(saved)}"))
        self._ctx = ctypes.create_string_buffer(saved, len(saved))
        self._ctx_addr = ctypes.addressof(self._ctx)
        n = len(GPR_IDS)
        self._gpr_n = n
        self._gpr_ids = (ctypes.c_int * n)(*GPR_IDS)
        self._gpr_vals = (ctypes.c_uint64 * n)()
        self._gpr_ptrs = (ctypes.c_void_p * n)(
            *(ctypes.addressof(self._gpr_vals) + 8 * i for i in range(n))
        )
        self._gpr_bytes = memoryview(self._gpr_vals).cast("B")
        self._one = ctypes.c_uint64()
        self._one_ref = ctypes.byref(self._one)
        self._phys = ctypes.c_uint64()
        self._phys_ref = ctypes.byref(self._phys)
        self._msr = _UcX86Msr(MSR_EFER, 0)
        self._intercepts = 0  # the SVM intercept bits in force (enable_intercepts)
        self._msr_ref = ctypes.byref(self._msr)
        # Per QEMU segment: (the segment cache as set, the unusable bit it was set with).
        self._unusable: list[tuple[tuple[int, int, int, int], int] | None] = [None] * 8
        self.cr8 = 0

    # --- general-purpose registers (the hot path) ---------------------------------------------

    def get_regs(self, out: kvm_regs) -> None:
        """KVM_GET_REGS: fill `out` with the GPRs, rip and rflags."""
        _check(uclib.uc_reg_read_batch(self._h, self._gpr_ids, self._gpr_ptrs, self._gpr_n))
        memoryview(out).cast("B")[:] = self._gpr_bytes  # 3x faster than ctypes.memmove

    def set_regs(self, regs: kvm_regs) -> None:
        """KVM_SET_REGS: load the GPRs, rip and rflags (rflags as given: bit 1 is the caller's)."""
        self._gpr_bytes[:] = memoryview(regs).cast("B")
        _check(uclib.uc_reg_write_batch(self._h, self._gpr_ids, self._gpr_ptrs, self._gpr_n))

    @property
    def rip(self) -> int:
        """The instruction pointer (the offset into CS, as KVM reports it)."""
        _check(uclib.uc_reg_read(self._h, UC_X86_REG_RIP, self._one_ref))
        return self._one.value

    def set_rip(self, value: int) -> None:
        """Move the instruction pointer."""
        self._one.value = value
        _check(uclib.uc_reg_write(self._h, UC_X86_REG_RIP, self._one_ref))

    def read_reg(self, reg: int) -> int:
        """Read one register of at most 64 bits (a UC_X86_REG_* id)."""
        self._one.value = 0  # narrower registers fill only the low bytes
        _check(uclib.uc_reg_read(self._h, reg, self._one_ref))
        return self._one.value

    def write_reg(self, reg: int, value: int) -> None:
        """Write one register of at most 64 bits (a UC_X86_REG_* id)."""
        self._one.value = value
        _check(uclib.uc_reg_write(self._h, reg, self._one_ref))

    # --- special registers (raw context) ------------------------------------------------------

    def _save(self) -> None:
        _check(uclib.uc_context_save(self._h, self._ctx_addr))

    def _restore(self) -> None:
        _check(uclib.uc_context_restore(self._h, self._ctx_addr))

    def get_sregs(self, out: kvm_sregs) -> None:
        """KVM_GET_SREGS: fill everything up to efer; apic_base and interrupt_bitmap are left."""
        layout, ctx = self.layout, self._ctx
        self._save()
        caches = _SEG_CACHES.unpack_from(ctx, layout.segs)
        fields: list[int] = []
        for i in _KVM_SEG_ORDER:
            cache_ = caches[4 * i : 4 * i + 4]
            selector, base, limit, flags = cache_
            attrs = _decode_attributes(flags & DESC_ATTR_MASK)
            shadow = self._unusable[i]
            unusable = shadow[1] if shadow is not None and shadow[0] == cache_ else attrs[1] ^ 1
            fields += (base, limit, selector & 0xFFFF, *attrs, unusable, 0)
        for table in (layout.gdt, layout.idt):
            fields += (
                _U64.unpack_from(ctx, table + 8)[0],
                _U32.unpack_from(ctx, table + 16)[0] & 0xFFFF,
            )
        cr0, _cr1, cr2, cr3, cr4 = _CRS.unpack_from(ctx, layout.cr)
        efer = _U64.unpack_from(ctx, layout.efer)[0]
        _KVM_SREGS_HEAD.pack_into(out, 0, *fields, cr0, cr2, cr3, cr4, self.cr8, efer)

    def set_sregs(self, s: kvm_sregs) -> None:
        """KVM_SET_SREGS: load segments, descriptor tables, control registers and EFER.

        CR0/CR3/CR4/EFER go through Unicorn first so that QEMU's own side effects happen
        (OSFXSR/SMAP and SVME hflags, EFER's supported-bit mask); then the segment caches,
        EFER.LMA and the mode bits of hflags are patched in the raw context, and the TLB is
        flushed so that paging changes take effect. RIP and the interrupt shadow are kept.
        """
        layout, ctx = self.layout, self._ctx
        rip = self.rip  # a CR0 write that leaves long mode truncates it
        rflags = self.read_reg(UC_X86_REG_RFLAGS)
        for reg, value in (
            (UC_X86_REG_CR4, s.cr4),
            (UC_X86_REG_CR3, s.cr3),
            (UC_X86_REG_CR0, s.cr0),
            (UC_X86_REG_CR2, s.cr2),
        ):
            self.write_reg(reg, value)
        self.write_msr(MSR_EFER, s.efer)
        self._save()

        caches: list[tuple[int, int, int, int]] = []
        for i, name in enumerate(QEMU_SEGMENTS):
            seg: kvm_segment = getattr(s, name)
            cache_ = (seg.selector, seg.base, seg.limit, encode_attributes(seg))
            _SEG_CACHE.pack_into(ctx, layout.segs + i * SEGMENT_CACHE_SIZE, *cache_)
            self._unusable[i] = (cache_, int(bool(seg.unusable)))
            caches.append(cache_)
        for table, dt in ((layout.gdt, s.gdt), (layout.idt, s.idt)):
            _U64.pack_into(ctx, table + 8, dt.base)
            _U32.pack_into(ctx, table + 16, dt.limit)
        efer = (_U64.unpack_from(ctx, layout.efer)[0] & ~EFER_LMA) | (s.efer & EFER_LMA)
        _U64.pack_into(ctx, layout.efer, efer)
        _U64.pack_into(ctx, layout.eip, rip)
        hflags = compute_hflags(
            _U32.unpack_from(ctx, layout.hflags)[0],
            s.cr0,
            efer,
            rflags,
            caches[_SEG_CS][3],
            caches[_SEG_SS][3],
            s.ds.base | s.es.base | s.ss.base,
        )
        _U32.pack_into(ctx, layout.hflags, hflags)
        self._restore()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.cr8 = s.cr8

    def _hflags(self) -> int:
        self._save()
        return int(_U32.unpack_from(self._ctx, self.layout.hflags)[0])

    def interrupt_shadow(self) -> bool:
        """True right after `sti` or `mov ss`: no interrupt may be taken before the next one."""
        return bool(self._hflags() & HF_INHIBIT_IRQ)

    def cpl(self) -> int:
        """The current privilege level (0 in real mode, 3 in virtual-8086 mode)."""
        return self._hflags() & HF_CPL_MASK

    def exception_error_code(self) -> int:
        """The error code of the last exception (#GP selector, #PF P/W/U bits, ...).

        Unicorn's UC_HOOK_INTR only passes the vector; QEMU left the code in its CPU state.
        """
        self._save()
        return int(_U32.unpack_from(self._ctx, self.layout.error_code)[0])

    def exception_is_int(self) -> bool:
        """Was the last exception raised by an INT n / INT3 / INTO instruction (no error code)?"""
        self._save()
        return bool(_U32.unpack_from(self._ctx, self.layout.error_code + 4)[0])

    def clear_exception_is_int(self) -> None:
        """Forget that the last exception was an INT n: Unicorn moves rip to the end of the
        last INT at every later exception while this is set, an intercept exit included."""
        self._save()
        _U32.pack_into(self._ctx, self.layout.error_code + 4, 0)
        self._restore()

    def set_interrupt_shadow(self, on: bool) -> None:
        """Start (or end) the one-instruction interrupt shadow of `sti` / `mov ss`."""
        self._save()
        hflags = _U32.unpack_from(self._ctx, self.layout.hflags)[0] & ~HF_INHIBIT_IRQ
        _U32.pack_into(self._ctx, self.layout.hflags, hflags | (HF_INHIBIT_IRQ if on else 0))
        self._restore()

    # --- intercepts: QEMU's SVM model plays the VMCS execution controls -----------------------

    def enable_intercepts(self, vmcb: int, intercepts: int, crs: int = 0) -> None:
        """Make the CPU a "guest" of QEMU's SVM model with the given intercept bits, so that the
        instructions named there (RDMSR/WRMSR; MOV to and from the CRs in `crs`) raise an
        intercept exit instead of running.

        `vmcb` is the guest-physical address of a private VMCB whose MSR permission map asks
        for every MSR; the exit reaches UC_HOOK_INTR as EXCP_VMEXIT + the SVM exit code.
        """
        self._set_intercepts(svm_layout(), vmcb, intercepts, crs)

    def _set_intercepts(self, svm: SvmLayout, vmcb: int, intercepts: int, crs: int = 0) -> None:
        self._intercepts = intercepts
        self._save()
        ctx = self._ctx
        hflags = _U32.unpack_from(ctx, self.layout.hflags)[0]
        _U32.pack_into(ctx, self.layout.hflags, hflags | HF_GUEST)
        _U64.pack_into(ctx, svm.vm_vmcb, vmcb)
        _U64.pack_into(ctx, svm.intercept, intercepts)
        _U16.pack_into(ctx, svm.intercept + 8, crs)  # intercept_cr_read
        _U16.pack_into(ctx, svm.intercept + 10, crs)  # intercept_cr_write
        self._restore()

    def tsc_offset(self) -> int:
        """What the CPU adds to the host TSC for the guest's `rdtsc` (the SVM TSC offset)."""
        self._save()
        return int(_U64.unpack_from(self._ctx, svm_layout().tsc_offset)[0])

    def set_tsc_offset(self, offset: int) -> None:
        self._save()
        _U64.pack_into(self._ctx, svm_layout().tsc_offset, offset & 0xFFFF_FFFF_FFFF_FFFF)
        self._restore()

    def read_msr(self, index: int) -> int:
        """An MSR as QEMU's CPU holds it (helper_rdmsr; unknown ones read 0)."""
        self._msr.rid, self._msr.value = index, 0
        with self._intercepts_off():
            _check(uclib.uc_reg_read(self._h, UC_X86_REG_MSR, self._msr_ref))
        return int(self._msr.value)

    def write_msr(self, index: int, value: int) -> None:
        self._msr.rid, self._msr.value = index, value
        with self._intercepts_off():
            _check(uclib.uc_reg_write(self._h, UC_X86_REG_MSR, self._msr_ref))

    @contextlib.contextmanager
    def _intercepts_off(self) -> Iterator[None]:
        """Unicorn's MSR access runs the guest's helper, intercept check included, and an
        intercept exit outside a run would crash the engine: lift them meanwhile."""
        if not self._intercepts:
            yield
            return
        offset = svm_layout().intercept
        self._save()
        _U64.pack_into(self._ctx, offset, 0)
        self._restore()
        try:
            yield
        finally:
            self._save()
            _U64.pack_into(self._ctx, offset, self._intercepts)
            self._restore()

    # --- guest-virtual memory (Unicorn's MMU, not wrapped by the binding) ---------------------

    def translate(self, linear: int, prot: int = UC_PROT_READ) -> int | None:
        """The guest-physical address of a linear address for an access of kind `prot`.

        None if the page walk fails. A failed walk would leave CR2 and the error code as a
        page fault sets them, so the CPU state is restored around it.
        """
        self._save()
        if _vmem_translate(self._h, linear, prot, self._phys_ref) == UC_ERR_OK:
            return self._phys.value
        self._restore()
        return None

    def read_virtual(self, linear: int, size: int, prot: int = UC_PROT_READ) -> bytes | None:
        """`size` bytes at a linear address, through the guest's page tables; None on a fault."""
        buf = ctypes.create_string_buffer(size)
        self._save()
        if _vmem_read(self._h, linear, prot, buf, size) == UC_ERR_OK:
            return buf.raw
        self._restore()
        return None

    def write_virtual(self, linear: int, data: bytes) -> bool:
        """Store `data` at a linear address through the guest's page tables; False on a fault."""
        self._save()
        if _vmem_write(self._h, linear, UC_PROT_WRITE, data, len(data)) == UC_ERR_OK:
            return True
        self._restore()
        return False

    def code_linear(self, ip: int) -> int:
        """The linear address of CS:ip (CS.base is ignored in 64-bit mode)."""
        self._save()
        layout, ctx = self.layout, self._ctx
        cs_base = _U64.unpack_from(ctx, layout.segs + _SEG_CS * SEGMENT_CACHE_SIZE + 8)[0]
        hflags = _U32.unpack_from(ctx, layout.hflags)[0]
        return int(ip if hflags & HF_CS64 else (cs_base + ip) & 0xFFFF_FFFF)

    def read_code(self, ip: int, size: int) -> bytes:
        """Up to `size` instruction bytes at CS:ip, cut short where the fetch would fault."""
        linear = self.code_linear(ip)
        first = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        head = self.read_virtual(linear, first, UC_PROT_EXEC)
        if head is None or first == size:
            return head or b""
        tail = self.read_virtual(linear + first, size - first, UC_PROT_EXEC)
        return head + (tail or b"")


class RegBatch:
    """A prebuilt `uc_reg_read_batch` over a fixed register list: one ctypes call for them all.

    The exit path reads a few registers at every exit; this costs about one register read.
    """

    def __init__(self, uc: Uc, ids: list[int]) -> None:
        self._h = uc._uch
        self._n = len(ids)
        self._ids = (ctypes.c_int * self._n)(*ids)
        self.values = (ctypes.c_uint64 * self._n)()
        self._ptrs = (ctypes.c_void_p * self._n)(
            *(ctypes.addressof(self.values) + 8 * i for i in range(self._n))
        )

    def read(self) -> ctypes.Array[ctypes.c_uint64]:
        """Refresh and return `values`, in the order of the ids given."""
        _check(uclib.uc_reg_read_batch(self._h, self._ids, self._ptrs, self._n))
        return self.values
