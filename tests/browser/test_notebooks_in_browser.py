"""Every notebook runs in JupyterLab in a real browser, and shows what its kernel computed;
the Workbench answers its buttons there.

Each test opens one notebook in headless chromium, runs Run > Run All Cells, waits for the kernel
to go idle, fails with the first failing cell's source and traceback, and checks that every line a
cell printed is on screen. It then keeps a PNG of the notebook's key view, its last cell with
output: in pytest's temporary directory always, and in docs/screenshots/ when that file is
missing or when KVMLAB_UPDATE_SCREENSHOTS=1 (outputs carry addresses and timings that change
from run to run, so an unconditional rewrite would churn the committed pictures). A failing test
leaves a screenshot of the whole page beside the kept ones and names it in its message.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import MISSING, NOTEBOOKS_DIR, REPO

expect = pytest.importorskip("playwright.sync_api", reason=MISSING.format("playwright")).expect

from .lab import Cell, Lab  # noqa: E402 (needs playwright)

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SCREENSHOTS = REPO / "docs" / "screenshots"
WORKBENCH_WIDGET = REPO / "kvmlab" / "workbench" / "widget.py"  # looked at, not imported here
WORKBENCH_NOTEBOOK = NOTEBOOKS_DIR / "09-debugging.ipynb"
WORKBENCH_PORT = 0x3F8  # COM1, where the guest of that notebook's Workbench writes first


def keep(shot: Path) -> None:
    """Copy a screenshot taken under the artifacts dir into docs/screenshots/ (see above)."""
    dest = SCREENSHOTS / shot.name
    if not dest.exists() or os.environ.get("KVMLAB_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)


def check_shown(lab: Lab, cell: Cell) -> None:
    """Every line the cell printed is on screen in its output area."""
    printed = [" ".join(line.split()) for line in cell.stream_text().splitlines()]
    printed = [line for line in printed if line]
    if not printed:
        return
    shown = " ".join(lab.shown_text(cell.index, printed[-1]).split())
    missing = [line for line in printed if line not in shown]
    assert not missing, f"cell {cell.index} printed lines the page does not show: {missing[:3]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_browser(lab: Lab, path: Path) -> None:
    with lab.keep_on_failure(path.stem):
        lab.open(path.name)
        cells = lab.run_all()
        shown = [cell for cell in cells if cell.outputs]
        assert shown, f"{path.name}: no cell shows any output"
        for cell in shown:
            check_shown(lab, cell)
        key = shown[-1].index
    keep(lab.screenshot(lab.cell(key), lab.artifacts / f"{path.stem}.png"))


@pytest.mark.skipif(
    not WORKBENCH_WIDGET.exists(), reason="kvmlab/workbench/widget.py is absent: no Workbench"
)
@pytest.mark.skipif(not WORKBENCH_NOTEBOOK.exists(), reason=f"{WORKBENCH_NOTEBOOK.name} is absent")
def test_workbench_assemble_and_step_kvm_run(lab: Lab) -> None:
    with lab.keep_on_failure("workbench"):
        lab.open(WORKBENCH_NOTEBOOK.name)
        lab.run_all()
        workbench = lab.notebook().locator(".kvmlab-workbench").first
        expect(workbench).to_be_visible()
        lab.click("Assemble", within=workbench)
        lab.click("Step KVM_RUN", within=workbench)
        panel = workbench.locator(".kvmlab-kvm-run")
        expect(panel.locator(".kvmlab-exit-reason")).to_contain_text("KVM_EXIT_IO")
        expect(panel.locator(".kvmlab-io-port")).to_contain_text(f"{WORKBENCH_PORT:#x}")
        expect(workbench.locator(".kvmlab-errors .kvmlab-error")).to_have_count(0)
    keep(lab.screenshot(workbench, lab.artifacts / "workbench.png"))
