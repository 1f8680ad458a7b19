"""Session fixtures for the real-browser tests: Debian's chromium, Playwright, and a JupyterLab.

Nothing here downloads a browser build: `chromium_path` installs Debian's `chromium` package with
apt-get when it is missing, and Playwright drives that binary (`executable_path`). JupyterLab runs
from this venv once per session, on a free 127.0.0.1 port with a fresh token, serving a copy of
notebooks/ so that neither its autosave nor a test ever writes to the committed notebooks.

Where chromium is missing and cannot be installed (no apt-get, or not root, as on mybinder.org)
the browser tests skip and say why; where apt-get is there and fails, they fail: on a machine
that can install it, a missing browser is a broken set-up, not a reason to test less.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported in the fixtures, so that a missing package skips, not errors
    from playwright.sync_api import Browser

    from .lab import Lab

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"
MISSING = "{} missing: pip install -e '.[dev]'"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Debian's chromium, and fonts for the notebooks' text and their few emoji (chromium needs none).
APT_PACKAGES = ("chromium", "fonts-dejavu-core", "fonts-noto-color-emoji")
APT_TIMEOUT = 600  # seconds for apt-get update + install on a fresh machine
LAB_START_TIMEOUT = 60  # seconds for JupyterLab to answer /api/status
LAB_STOP_TIMEOUT = 10  # seconds for JupyterLab to stop on SIGTERM before it is killed
# JupyterLab settings for a quiet, reproducible page: no news or update toasts over the outputs.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
}


def find_chromium() -> str | None:
    """The path of an installed chromium binary, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> str:
    """Install Debian's chromium (and fonts) with apt-get; skip where that cannot work, fail
    where it broke."""
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed; installing it needs root: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
        )
        if done.returncode != 0:
            pytest.fail(
                f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}",
                pytrace=False,
            )
    path = find_chromium()
    if path is None:
        pytest.fail("apt-get installed chromium, but no chromium binary is on PATH", pytrace=False)
    return path


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium binary, installed with apt-get on first use when missing."""
    return find_chromium() or install_chromium()


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Browser]:
    """Headless chromium driven by Playwright; Playwright's own browser builds are never used."""
    sync_api = pytest.importorskip("playwright.sync_api", reason=MISSING.format("playwright"))
    with sync_api.sync_playwright() as pw:
        # Playwright adds --no-sandbox (chromium refuses to run as root with its sandbox).
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab: where it is, how to get in, and what it serves."""

    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the served copy of notebooks/
    log: Path

    def api(self, path: str, method: str = "GET", body: object = None) -> object:
        """Call the Jupyter server's REST API; the decoded JSON answer (None when empty)."""
        req = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            data=None if body is None else json.dumps(body).encode(),
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = resp.read()
        return json.loads(answer) if answer else None

    def start_session(self, path: str) -> None:
        """Start notebook `path`'s kernel now; JupyterLab connects to it when it opens `path`."""
        kernel = {"name": "python3"}
        self.api("sessions", "POST", {"path": path, "type": "notebook", "kernel": kernel})

    def end_sessions(self, paths: set[str]) -> None:
        """Shut down the kernels of the notebooks at `paths`."""
        sessions = self.api("sessions")
        assert isinstance(sessions, list)
        for session in sessions:
            if session["path"] in paths:
                self.api(f"sessions/{session['id']}", method="DELETE")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_lab(server: LabServer, proc: subprocess.Popen[bytes]) -> None:
    """Poll /api/status until JupyterLab answers; fail with its log if it exits or times out."""
    deadline = time.monotonic() + LAB_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"JupyterLab exited ({proc.returncode}) while starting:\n{server.log_tail()}",
                pytrace=False,
            )
        try:
            server.api("status")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)  # polling a server that is not listening yet
    pytest.fail(
        f"JupyterLab did not answer within {LAB_START_TIMEOUT} s:\n{server.log_tail()}",
        pytrace=False,
    )


def shutdown_kernels(server: LabServer) -> None:
    """Shut down every kernel the server runs."""
    kernels = server.api("kernels")
    assert isinstance(kernels, list)
    for kernel in kernels:
        server.api(f"kernels/{kernel['id']}", method="DELETE")


def stop_lab(server: LabServer, proc: subprocess.Popen[bytes]) -> None:
    """Shut down every kernel, then the server; kill it if it does not stop in time."""
    if proc.poll() is None:
        # If the server is already going, SIGTERM below stops what is left.
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            shutdown_kernels(server)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(LAB_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """JupyterLab from this venv on a free port with a fresh token, stopped at the session's end.

    It serves a copy of notebooks/, with its own config, data and settings directories, so that
    the user's JupyterLab settings, workspaces and kernels play no part. Every notebook's kernel
    is started at once, as a fresh kernel a student would get, so that the tests do not wait
    for each start in turn.
    """
    pytest.importorskip("jupyterlab", reason=MISSING.format("jupyterlab"))
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, root)
    settings = base / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(24)
    server = LabServer(f"http://127.0.0.1:{port}", token, root, base / "jupyterlab.log")
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={base / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # the tests read outputs from the notebook model
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
    }
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_for_lab(server, proc)
        for notebook in sorted(root.glob("*.ipynb")):  # start while chromium loads JupyterLab
            server.start_session(notebook.name)
        yield server
    finally:
        stop_lab(server, proc)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a failing browser test leaves its screenshot (pytest keeps the last few runs)."""
    return tmp_path_factory.mktemp("browser-artifacts")


@pytest.fixture(scope="session")
def lab_page(browser: Browser, lab_server: LabServer, artifacts: Path) -> Iterator[Lab]:
    """One page with JupyterLab loaded, for the whole session (loading it takes seconds)."""
    from .lab import Lab

    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    try:
        lab = Lab(context.new_page(), lab_server.url, lab_server.token, artifacts)
        lab.load()
        yield lab
    finally:
        context.close()


@pytest.fixture
def lab(lab_page: Lab, lab_server: LabServer) -> Iterator[Lab]:
    """The page helper on the session's JupyterLab: open a notebook, run it, read what it shows.

    After the test its tabs are closed and the kernels of the notebooks it opened shut down, so
    that nothing it did (a dialog, a running guest) reaches the next test.
    """
    try:
        yield lab_page
        lab_page.close_all()
    finally:
        lab_server.end_sessions(lab_page.opened)
        lab_page.opened.clear()
