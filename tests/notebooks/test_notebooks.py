"""Every notebook under notebooks/ runs top to bottom, and is committed clean.

Each notebook runs in a fresh `python3` kernel (this venv's ipykernel), once as committed, on
the simulator (what a Binder visitor gets), and once switched to the host's /dev/kvm, which
skips where that is unusable. A failing cell fails the test with the cell's source and
traceback. Committed notebooks carry no outputs and no execution counts, so that a diff shows
only what an author changed.

nbclient's event loop clears the process's signal wakeup fd when it closes, and that fd is how
the simulator learns of signals (kvmlab.kernel.signals); `run` puts it back, or every later test
in this pytest process would run with signals silently unseen.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="ipykernel missing: pip install -e '.[dev]'")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SIM_LINE = "from kvmlab import sys as k"  # every notebook's backend choice, the default...
HOST_LINE = "from kvmlab import host as k"  # ...and the alternative, commented out
ARM64_LINE = "from kvmlab import sys_arm64 as k"  # 11-arm64: simulator only, no arm64 host
CELL_TIMEOUT = 60  # seconds for one cell (a whole notebook takes a few)
NOTEBOOK_BUDGET = 20  # seconds for a whole notebook, kernel start included


def execute(path: Path, backend: str) -> None:
    """Run the notebook at `path` on `backend` ("sim" or "host"); raise on the first failed cell."""
    nb = nbformat.read(path, as_version=4)
    if backend == "host":
        for cell in nb.cells:
            if cell.cell_type == "code" and SIM_LINE in cell.source:
                cell.source = cell.source.replace(SIM_LINE, HOST_LINE, 1)
                break
    nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # the cwd JupyterLab gives it
    ).execute()


def run(path: Path, backend: str) -> None:
    """Execute the notebook here, leaving the process's signal wakeup fd as it found it."""
    saved = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(saved)
    start = time.monotonic()
    try:
        execute(path, backend)
    except nbclient.exceptions.CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython colours its tracebacks
        pytest.fail(f"{path.name} on {backend}: a cell failed\n{plain}", pytrace=False)
    finally:
        signal.set_wakeup_fd(saved, warn_on_full_buffer=False)  # as kvmlab installs it
    elapsed = time.monotonic() - start
    assert elapsed < NOTEBOOK_BUDGET, f"{path.name} took {elapsed:.1f} s (budget {NOTEBOOK_BUDGET})"


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"
    assert NOTEBOOKS[0].name == "00-start-here.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; clear them before "
        "committing (JupyterLab: Edit > Clear Outputs of All Cells, then save)"
    )
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    first_code = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    if ARM64_LINE in first_code:
        return
    assert SIM_LINE in first_code and f"# {HOST_LINE}" in first_code, (
        f"{path.name}: the first code cell must choose the backend: `{SIM_LINE}`, "
        f"with `# {HOST_LINE}` commented out below it"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_on_simulator(path: Path) -> None:
    run(path, "sim")


@pytest.mark.host
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_on_host(path: Path) -> None:
    from kvmlab import host

    cells = nbformat.read(path, as_version=4).cells
    if ARM64_LINE in next(cell.source for cell in cells if cell.cell_type == "code"):
        pytest.skip("an arm64 notebook: this host's /dev/kvm runs x86_64 guests only")
    reason = host.available()
    if reason is not None:
        pytest.skip(f"host /dev/kvm unusable: {reason}")
    run(path, "host")
