"""kvmlab.uapi against the host's <linux/kvm.h>, compiled with gcc.

For every exported ``kvm_*`` ctypes structure (and everything nested in it, e.g.
``kvm_run.io.data_offset`` or ``kvm_sregs.cs.selector``): sizeof, alignment, the offset and size of
every field, and the signedness of every integer field. For every upper-case integer constant
(ioctl numbers, exit reasons, capabilities, flags) that the header also defines: its value.
The C program is generated from the Python side (see `layout_cgen`), built once per session.
"""

from __future__ import annotations

import platform
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import layout_cgen
import pytest
from layout_cgen import CONSTANTS_GROUP, Check, Plan

from kvmlab.uapi import kvm, x86
from kvmlab.uapi.ioctl import _IOC_TYPE
from kvmlab.uapi.kvm import KVMIO

HEADER = Path("/usr/include/linux/kvm.h")
GCC = shutil.which("gcc")

if GCC is None:
    pytest.skip("gcc not found: the layout test compiles a C program", allow_module_level=True)
if not HEADER.is_file():
    pytest.skip(f"{HEADER} missing (install linux-libc-dev)", allow_module_level=True)
if platform.machine() != "x86_64":
    pytest.skip(
        "kvmlab.uapi describes the x86_64 ABI; host headers differ", allow_module_level=True
    )

MODULES = (kvm, x86)
STRUCTS = layout_cgen.exported_structs(MODULES)
CONSTANTS = layout_cgen.exported_constants(MODULES)


@dataclass
class Layout:
    """The checks, and what the compiled program printed for each (absent = #ifdef skipped)."""

    plan: Plan
    c_values: dict[int, int]

    def results(self, group: str) -> list[tuple[Check, int | None]]:
        return [
            (check, self.c_values.get(i))
            for i, check in enumerate(self.plan.checks)
            if check.group == group
        ]


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    assert GCC is not None
    workdir = tmp_path_factory.mktemp("uapi_layout")
    tags = layout_cgen.probe_c_tags(GCC, STRUCTS, workdir)
    plan = layout_cgen.plan_checks(STRUCTS, CONSTANTS, tags)
    return Layout(plan, layout_cgen.build_and_run(GCC, plan.checks, workdir))


def _mismatches(results: list[tuple[Check, int | None]]) -> list[str]:
    return [check.describe(c) for check, c in results if c is not None and c != check.python]


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_layout(layout: Layout, name: str) -> None:
    assert name not in layout.plan.unmapped, layout.plan.unmapped.get(name)
    results = layout.results(name)
    assert results, f"no checks were generated for {name}"
    missing = [check.label for check, c in results if c is None]
    assert not missing, f"{name}: the C program printed nothing for {missing}"
    mismatches = _mismatches(results)
    assert not mismatches, f"{name} differs from <linux/kvm.h>:\n" + "\n".join(mismatches)


def test_constants(layout: Layout) -> None:
    mismatches = _mismatches(layout.results(CONSTANTS_GROUP))
    assert not mismatches, "constants differ from <linux/kvm.h>:\n" + "\n".join(mismatches)


def test_core_names_are_in_the_header(layout: Layout) -> None:
    """Ioctls, exit reasons and capabilities kvmlab uses must not silently escape the check."""
    absent = {check.label for check, c in layout.results(CONSTANTS_GROUP) if c is None}
    core = {"KVMIO", "KVM_API_VERSION", "KVM_RUN", "KVM_GET_REGS", "KVM_GET_SREGS"}
    core |= {n for n in CONSTANTS if n.startswith("KVM_EXIT_") and CONSTANTS[n] <= 30}
    # Every ioctl number kvmlab defines is older than the 6.1 headers.
    core |= {n for n, v in CONSTANTS.items() if n.startswith("KVM_") and _IOC_TYPE(v) == KVMIO}
    assert not core & absent, f"not defined by {HEADER}: {sorted(core & absent)}"


def test_names_missing_from_header(layout: Layout) -> None:
    """Report (as a skip reason) the Python constants this header is too old or too narrow for."""
    absent = [check.label for check, c in layout.results(CONSTANTS_GROUP) if c is None]
    kvm_names = [name for name in absent if name.startswith("KVM")]
    if absent:
        pytest.skip(
            f"unchecked, not defined by {HEADER}: {', '.join(kvm_names) or 'no KVM names'}"
            f" (plus {len(absent) - len(kvm_names)} CPU-state names such as X86_CR0_PE, which"
            " <linux/kvm.h> never defines)"
        )


def test_summary(layout: Layout) -> None:
    """Sanity: the generated program covers every struct and printed a value per checked fact."""
    by_group: dict[str, int] = defaultdict(int)
    for i, check in enumerate(layout.plan.checks):
        if i in layout.c_values:
            by_group[check.group] += 1
    assert set(STRUCTS) <= set(by_group)
    assert by_group[CONSTANTS_GROUP] > 0
    assert not layout.plan.skipped_fields, f"bitfields not checked: {layout.plan.skipped_fields}"
