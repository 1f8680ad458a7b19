"""Generate, build and read a C program that prints what <linux/kvm.h> says about kvmlab.uapi.

Everything is driven from the Python side: every exported ``kvm_*`` ctypes structure or union
and every upper-case integer constant of `kvmlab.uapi.kvm` and `kvmlab.uapi.x86` becomes a list of
`Check`s (a Python value and the C expression that should equal it). Adding a struct or a
constant to the uapi modules therefore adds it to the layout test with no edit here.

Mapping Python paths to C:

* a class whose name is a C struct tag (probed with gcc) is checked as ``struct <name>``;
* a class with no C type of its own (``kvm_run_io`` ...) is checked where it sits inside a
  tagged struct (``((struct kvm_run *)0)->io``), offsets taken relative to that member;
* a field listed in ``_anonymous_`` (``kvm_run.exit``) has no C name: its members are reached
  straight from the parent, as in C (``kvm_run.io``, not ``kvm_run.exit.io``);
* an array is checked whole, then through its first element (``interrupt_bitmap[0]``).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

CONSTANTS_GROUP = "constants"
_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SIGNED_CODES = frozenset("bhilq")
_INTEGER_CODES = frozenset("bBhHiIlLqQ")
_CompositeType = (ctypes.Structure, ctypes.Union)


@dataclass(frozen=True)
class Check:
    """One fact to compare: `python` must equal the value of `c_expr` in the compiled program."""

    group: str
    label: str
    python: int
    c_expr: str
    guard: str | None = None  # only evaluated when this macro is defined (#ifdef)

    def describe(self, c_value: int) -> str:
        return f"{self.label}: python={self.python} C={c_value}  [{self.c_expr}]"


@dataclass
class Plan:
    """The checks to compile, plus structs that could not be mapped to any C expression."""

    checks: list[Check] = field(default_factory=list)
    unmapped: dict[str, str] = field(default_factory=dict)  # struct name -> reason
    skipped_fields: list[str] = field(default_factory=list)  # bitfields (no offsetof in C)


# --- what kvmlab.uapi exports ------------------------------------------------------------------


def _is_composite(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, _CompositeType)


def exported_structs(modules: Iterable[ModuleType]) -> dict[str, type]:
    """Every ctypes Structure/Union subclass named ``kvm_*`` at module level, by name."""
    found: dict[str, type] = {}
    for module in modules:
        for name, value in vars(module).items():
            if not (name.startswith("kvm_") and _is_composite(value)):
                continue
            if name in found and found[name] is not value:
                raise AssertionError(f"two different classes export the name {name}")
            found[name] = value
    return dict(sorted(found.items()))


def exported_constants(modules: Iterable[ModuleType]) -> dict[str, int]:
    """Every upper-case module-level int (KVM_*, KVMIO, X86_* ...), by name."""
    found: dict[str, int] = {}
    for module in modules:
        for name, value in vars(module).items():
            if not _CONSTANT_NAME.match(name) or type(value) is not int:
                continue
            if name in found and found[name] != value:
                raise AssertionError(
                    f"{name} is {found[name]:#x} in one module, {value:#x} in another"
                )
            found[name] = value
    return dict(sorted(found.items()))


# --- Python layout -> checks -------------------------------------------------------------------


def _c_member(ctype: str, cpath: str) -> str:
    return f"(({ctype} *)0)->{cpath}" if cpath else f"(*({ctype} *)0)"


def _c_sizeof(ctype: str, cpath: str) -> str:
    return f"sizeof({_c_member(ctype, cpath)})" if cpath else f"sizeof({ctype})"


def _c_alignof(ctype: str, cpath: str) -> str:
    return f"__alignof__({_c_member(ctype, cpath)})" if cpath else f"__alignof__({ctype})"


def _c_offset(ctype: str, cpath: str, base: str) -> str:
    expr = f"offsetof({ctype}, {cpath})"
    return f"{expr} - offsetof({ctype}, {base})" if base else expr


def _join(cpath: str, name: str) -> str:
    return f"{cpath}.{name}" if cpath else name


class _Walker:
    """Turns one Python struct, placed at a C location, into size/offset/alignment checks."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        # The first C location seen for each composite class: (C type, member path).
        self.locations: dict[type, tuple[str, str]] = {}

    def walk(
        self,
        group: str,
        pytype: type,
        *,
        ctype: str,
        cpath: str,
        base: str,
        label: str,
        py_offset: int,
        check_offset: bool = True,
    ) -> None:
        """Checks for the object of Python type `pytype` found at C `ctype`'s member `cpath`.

        Offsets are relative to the member `base` ("" = the start of `ctype`).
        """
        add = self.plan.checks.append
        flexible = issubclass(pytype, ctypes.Array) and pytype._length_ == 0
        if not flexible:  # C's flexible array member (`entries[]`) has no sizeof
            add(Check(group, f"sizeof({label})", ctypes.sizeof(pytype), _c_sizeof(ctype, cpath)))
        if check_offset and cpath != base:
            add(Check(group, f"offsetof({label})", py_offset, _c_offset(ctype, cpath, base)))
        if _is_composite(pytype):
            self.locations.setdefault(pytype, (ctype, cpath))
            add(
                Check(
                    group,
                    f"alignof({label})",
                    ctypes.alignment(pytype),
                    _c_alignof(ctype, cpath),
                )
            )
            self._fields(group, pytype, ctype, cpath, base, label, py_offset)
        elif issubclass(pytype, ctypes.Array):
            self.walk(
                group,
                pytype._type_,
                ctype=ctype,
                cpath=f"{cpath}[0]",
                base=base,
                label=f"{label}[0]",
                py_offset=py_offset,
                check_offset=False,
            )
        elif getattr(pytype, "_type_", None) in _INTEGER_CODES:
            member = _c_member(ctype, cpath)
            add(
                Check(
                    group,
                    f"is_signed({label})",
                    int(pytype._type_ in _SIGNED_CODES),
                    f"((__typeof__({member}))-1 < 0)",
                )
            )

    def _fields(
        self, group: str, pytype: type, ctype: str, cpath: str, base: str, label: str, offset: int
    ) -> None:
        """Walk `pytype`'s fields; `offset` is where `pytype` starts, relative to `base`."""
        anonymous = set(getattr(pytype, "_anonymous_", ()))
        for spec in pytype._fields_:  # type: ignore[attr-defined]
            name, ftype = spec[0], spec[1]
            if len(spec) > 2:  # a bitfield: C has no offsetof; its bits are found instead
                self._bitfield(group, pytype, name, ctype, _join(cpath, name), base, label, offset)
                continue
            field_offset = offset + getattr(pytype, name).offset
            if name in anonymous:
                # C's anonymous struct/union: its members are named straight from the parent.
                self._fields(group, ftype, ctype, cpath, base, label, field_offset)
                continue
            self.walk(
                group,
                ftype,
                ctype=ctype,
                cpath=_join(cpath, name),
                base=base,
                label=f"{label}.{name}",
                py_offset=field_offset,
            )

    def _bitfield(
        self,
        group: str,
        pytype: type,
        name: str,
        ctype: str,
        cpath: str,
        base: str,
        label: str,
        offset: int,
    ) -> None:
        """A bitfield's first bit and width, relative to `base`, found by setting it in C."""
        field_ = getattr(pytype, name)
        bit_offset, width = field_.size & 0xFFFF, field_.size >> 16
        first_bit = (offset + field_.offset) * 8 + bit_offset
        base_bits = f"offsetof({ctype}, {base}) * 8" if base else "0"
        add = self.plan.checks.append
        add(Check(group, f"first_bit({label}.{name})", first_bit, _c_bits(ctype, cpath, base_bits)))
        add(Check(group, f"width({label}.{name})", width, _c_bits(ctype, cpath, None)))


def _c_bits(ctype: str, cpath: str, base_bits: str | None) -> str:
    """C for the bits `cpath` covers: its first bit minus `base_bits`, or (None) its width."""
    body = (
        f"union {{ {ctype} s; unsigned char b[sizeof({ctype})]; }} u_;"
        " __builtin_memset(&u_, 0, sizeof u_);"
        f" u_.s.{cpath} = -1;"
        " unsigned long long i_ = 0, n_ = 0, first_ = ~0ULL;"
        " for (; i_ < sizeof u_ * 8; i_++)"
        " if ((u_.b[i_ / 8] >> (i_ % 8)) & 1) { n_++; if (first_ == ~0ULL) first_ = i_; }"
    )
    result = "n_" if base_bits is None else f"first_ - {base_bits}"
    return f"({{ {body} {result}; }})"


def plan_checks(
    structs: Mapping[str, type], constants: Mapping[str, int], c_tags: Iterable[str]
) -> Plan:
    """All checks: structs with a C tag directly, the others where they sit in a tagged one."""
    plan = Plan()
    walker = _Walker(plan)
    tagged = set(c_tags)
    for name, pytype in structs.items():
        if name in tagged:
            ctype = f"struct {name}"
            walker.walk(name, pytype, ctype=ctype, cpath="", base="", label=name, py_offset=0)
    pending = {name: tp for name, tp in structs.items() if name not in tagged}
    while pending:
        placed = {name: tp for name, tp in pending.items() if tp in walker.locations}
        if not placed:
            break
        for name, pytype in placed.items():
            ctype, cpath = walker.locations[pytype]
            walker.walk(name, pytype, ctype=ctype, cpath=cpath, base=cpath, label=name, py_offset=0)
            del pending[name]
    for name in pending:
        plan.unmapped[name] = (
            f"{name}: no `struct {name}` in the header and not a member of any struct that has one"
        )
    for name, value in constants.items():
        plan.checks.append(Check(CONSTANTS_GROUP, name, value, name, guard=name))
    return plan


# --- C generation, build, run ----------------------------------------------------------------

_PRELUDE = """\
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

static void put(int id, int negative, unsigned long long value)
{
\tprintf("%d %d %llu\\n", id, negative, value);
}

int main(void)
{
"""


def generate_c(checks: Iterable[Check]) -> str:
    """One `put(id, ...)` per check, each `#ifdef`-guarded when it names a macro."""
    lines = [_PRELUDE]
    for i, check in enumerate(checks):
        expr = check.c_expr
        call = f"\tput({i}, ({expr}) < 0, (unsigned long long)({expr}));\n"
        if check.guard is not None:
            call = f"#ifdef {check.guard}\n{call}#endif\n"
        lines.append(call)
    lines.append("\treturn 0;\n}\n")
    return "".join(lines)


def _gcc(gcc: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run([gcc, *args], capture_output=True, text=True, env=env, check=False)


def probe_c_tags(gcc: str, names: Iterable[str], workdir: Path) -> set[str]:
    """Which of `names` are complete ``struct <name>`` types in <linux/kvm.h>.

    One syntax-only compile: a line per name, and gcc's errors say (by line number) which
    `sizeof(struct name)` it could not evaluate.
    """
    names = list(names)
    header = "#include <linux/kvm.h>\n"
    body = [f"typedef char kvmlab_probe_{i}[sizeof(struct {n})];\n" for i, n in enumerate(names)]
    source = workdir / "probe_tags.c"
    source.write_text(header + "".join(body))
    result = _gcc(gcc, "-fsyntax-only", "-Wno-error", str(source))
    first_line = header.count("\n") + 1
    failed_lines = {
        int(m.group(1))
        for m in re.finditer(rf"^{re.escape(str(source))}:(\d+):\d+: error:", result.stderr, re.M)
    }
    if result.returncode != 0 and not failed_lines:
        raise RuntimeError(f"gcc could not compile the struct-tag probe:\n{result.stderr}")
    return {n for i, n in enumerate(names) if first_line + i not in failed_lines}


def build_and_run(gcc: str, checks: list[Check], workdir: Path) -> dict[int, int]:
    """Compile the generated program once, run it, and return {check index: C value}."""
    source = workdir / "kvm_layout.c"
    binary = workdir / "kvm_layout"
    source.write_text(generate_c(checks))
    built = _gcc(gcc, "-std=gnu11", "-O0", "-o", str(binary), str(source))
    if built.returncode != 0:
        raise RuntimeError(f"gcc failed on {source}:\n{built.stderr}")
    ran = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    if ran.returncode != 0:
        raise RuntimeError(f"{binary} exited {ran.returncode}:\n{ran.stderr}")
    return parse_output(ran.stdout)


def parse_output(text: str) -> dict[int, int]:
    """Lines of ``<id> <negative> <unsigned value>`` -> {id: signed Python int}."""
    values: dict[int, int] = {}
    for line in text.splitlines():
        ident, negative, raw = line.split()
        value = int(raw)
        values[int(ident)] = value - (1 << 64) if negative == "1" else value
    return values
