"""Every notebook runs in an environment built exactly from binder/, as mybinder.org builds it.

repo2docker, which builds mybinder.org's images, takes the Python version from
binder/runtime.txt, runs `pip install -r binder/requirements.txt` from the repository root, runs
binder/postBuild if there is one, and starts JupyterLab in that environment. This module does the
same in a fresh virtual environment under a temporary directory, then executes each notebook
there with that environment's nbclient and python3 kernel, on the simulator (Binder has no
/dev/kvm), with a temporary HOME as a fresh Binder user has.

pip's cache is used, so later runs are quicker. Where pip cannot reach a package index the tests
skip and say so; any other failure to build the environment fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINDER = REPO / "binder"
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
INSTALL_TIMEOUT = 900  # seconds for pip to build the environment (a cold cache downloads it all)
NOTEBOOK_TIMEOUT = 180  # seconds for one notebook, kernel start included
CELL_TIMEOUT = 60
# What pip prints when it cannot reach an index (as opposed to failing to install something)
UNREACHABLE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|No route to host|ConnectTimeoutError|ProxyError|"
    r"Could not fetch URL|Max retries exceeded"
)

# Run by the environment's own python: execute one notebook as JupyterLab would, from notebooks/.
EXECUTE = """
import shutil, sys, time
import nbclient, nbformat
from jupyter_client.kernelspec import get_kernel_spec

path, cwd, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
kernel = shutil.which(get_kernel_spec("python3").argv[0])
if kernel is None or not kernel.startswith(sys.prefix):
    sys.exit(f"the python3 kernel ({kernel}) is not this environment's ({sys.prefix})")
nb = nbformat.read(path, as_version=4)
start = time.monotonic()
client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": cwd}}
)
try:
    client.execute()
except nbclient.exceptions.CellExecutionError as e:
    sys.exit(str(e))
print(f"{time.monotonic() - start:.1f}")
"""


@dataclass(frozen=True)
class BinderEnv:
    """A virtual environment built from binder/, and the environment variables to run in it."""

    venv: Path
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def runtime_python() -> tuple[str, str | None]:
    """The interpreter binder/runtime.txt names, or python3 and a note saying it stands in."""
    runtime = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+\.\d+)", runtime)
    assert match, f"binder/runtime.txt says {runtime!r}; repo2docker expects python-X.Y"
    wanted = match[1]
    exe = shutil.which(f"python{wanted}")
    if exe is not None:
        probe = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == wanted:
            return exe, None
    current = shutil.which("python3") or sys.executable
    note = f"binder/runtime.txt asks for Python {wanted}, not found here: built with {current}"
    return current, note


def clean_env(venv: Path, home: Path | None = None) -> dict[str, str]:
    """This process's environment with `venv` activated and nothing of ours leaking in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "JUPYTER_PATH")
    }
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    return env


def run(args: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> str:
    """Run `args`; return its output, or fail the test with it."""
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} took more than {timeout} s", pytrace=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}", pytrace=False
        )
    return output


def pip_install(venv: Path, env: dict[str, str]) -> None:
    """`pip install -r binder/requirements.txt` from the repository root, as repo2docker runs it.

    Skips where pip cannot reach a package index; fails on any other error.
    """
    args = [str(venv / "bin" / "python"), "-m", "pip", "install", "-r", "binder/requirements.txt"]
    try:
        done = subprocess.run(
            args, cwd=REPO, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip install took more than {INSTALL_TIMEOUT} s", pytrace=False)
    output = done.stdout + done.stderr
    if done.returncode == 0:
        return
    unreachable = UNREACHABLE.search(output)
    if unreachable is not None:
        line = next(ln for ln in output.splitlines() if unreachable.group() in ln)
        pytest.skip(f"pip cannot reach a package index: {line.strip()[:200]}")
    pytest.fail(f"pip install -r binder/requirements.txt failed:\n{output[-4000:]}", pytrace=False)


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory: pytest.TempPathFactory) -> BinderEnv:
    """Build the environment once for this module: venv, requirements, postBuild."""
    root = tmp_path_factory.mktemp("binder")
    venv, home = root / "venv", root / "home"
    home.mkdir()
    python, note = runtime_python()
    if note is not None:
        warnings.warn(note, stacklevel=1)
    run([python, "-m", "venv", str(venv)], clean_env(venv), timeout=120)
    pip_install(venv, clean_env(venv))  # the user's HOME: its pip cache and configuration
    env = clean_env(venv, home)
    post_build = BINDER / "postBuild"
    if post_build.exists():
        run(["bash", str(post_build)], env, timeout=INSTALL_TIMEOUT)
    return BinderEnv(venv, env)


def test_binder_env_installs_this_checkout_and_the_lab(
    binder_env: BinderEnv, tmp_path: Path
) -> None:
    probe = "import sys, jupyterlab, ipykernel, nbclient, kvmlab.sys; print(kvmlab.__file__)"
    where = run([binder_env.python, "-c", probe], binder_env.env, timeout=60, cwd=tmp_path)
    assert Path(where.strip().splitlines()[-1]) == REPO / "kvmlab" / "__init__.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_binder_env(binder_env: BinderEnv, path: Path) -> None:
    args = [binder_env.python, "-c", EXECUTE, str(path), str(NOTEBOOKS_DIR), str(CELL_TIMEOUT)]
    try:
        done = subprocess.run(
            args,
            cwd=NOTEBOOKS_DIR,
            env=binder_env.env,
            capture_output=True,
            text=True,
            timeout=NOTEBOOK_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name} took more than {NOTEBOOK_TIMEOUT} s", pytrace=False)
    if done.returncode != 0:
        report = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)  # IPython colours its tracebacks
        pytest.fail(f"{path.name} in the Binder environment:\n{report[-4000:]}", pytrace=False)
