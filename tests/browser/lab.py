"""A Playwright helper that uses JupyterLab as a student does: open, Run All Cells, look, click.

One page loads JupyterLab once per session; each notebook opens in it as a new tab and is closed,
with its kernel, after its test (or the page is reloaded when a test left a dialog open). Waits
are on JupyterLab's own state (the kernel's status and the cells' execution counts, read
from the notebook model through `window.jupyterapp`), never on sleeps. What a test checks on
screen is read from the page's DOM: output text, widget panels, buttons by their labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

NOTEBOOK_TIMEOUT = 60  # seconds for Run All Cells of one notebook, or for a click's handling
OPEN_TIMEOUT = 30  # seconds for JupyterLab to load, or to show a notebook with its kernel idle
SHOT_MAX_HEIGHT = 4000  # pixels: the tallest viewport a screenshot grows the page to
SHOT_MARGIN = 200  # pixels above and below a screenshot's target: menu, toolbar, status bar
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks

# JavaScript run in the page. `nb` is the notebook panel in JupyterLab's main area.
NB = "const nb = window.jupyterapp.shell.currentWidget;"
APP_READY = "() => !!window.jupyterapp && window.jupyterapp.shell.isAttached"
COLLAPSE_LEFT = "() => window.jupyterapp.shell.collapseLeft()"  # the notebook gets the width
OPEN = "(path) => window.jupyterapp.commands.execute('docmanager:open', {path})"
KERNEL_IDLE = f"""(path) => {{ {NB}
    return !!nb && !!nb.sessionContext && nb.context.path === path && nb.sessionContext.isReady
        && nb.sessionContext.kernelDisplayStatus === 'idle';
}}"""
# Close every tab without the "save your changes?" dialog: the served notebooks are a copy.
CLOSE_ALL = """async () => {
    const app = window.jupyterapp;
    for (const w of Array.from(app.shell.widgets('main'))) {
        if (w.context) w.context.model.dirty = false;
    }
    await app.commands.execute('application:close-all');
}"""
# After Run All Cells: "done" once the kernel is idle and every non-empty code cell has run,
# "error" once the kernel is idle after a cell raised (JupyterLab stops the run there),
# "dead" if the kernel died; false (keep waiting) otherwise.
RUN_STATE = f"""() => {{ {NB}
    const status = nb.sessionContext.kernelDisplayStatus;
    if (['dead', 'unknown', 'autorestarting', 'restarting'].includes(status)) return 'dead';
    if (status !== 'idle') return false;
    const cells = nb.content.widgets.filter(c => c.model.type === 'code');
    if (cells.some(c => c.promptNode && c.promptNode.textContent.includes('*'))) return false;
    const failed = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
    if (failed) return 'error';
    const ran = cells.every(
        c => c.model.sharedModel.getSource().trim() === '' || c.model.executionCount !== null);
    return ran ? 'done' : false;
}}"""
# Every code cell as {index, source, outputs, busy} from the notebook model and its
# prompt (`[*]` while the cell runs or waits to).
CELLS = f"""() => {{ {NB}
    return nb.content.widgets
        .map((c, index) => ({{index, type: c.model.type, cell: c}}))
        .filter(c => c.type === 'code')
        .map(({{index, cell}}) => ({{
            index,
            source: cell.model.sharedModel.getSource(),
            outputs: cell.model.outputs.toJSON(),
            busy: !!cell.promptNode && cell.promptNode.textContent.includes('*'),
        }}));
}}"""
# Bring cell `i` into the DOM and view (the notebook renders only what is near the viewport).
SCROLL_TO = f"""async (i) => {{ {NB}
    await nb.content.scrollToItem(i, 'start');
}}"""
# Select the first cell, in command mode: no cursor, cell toolbar or selection mark on the others.
DESELECT = f"""() => {{ {NB}
    nb.content.activeCellIndex = 0;
    nb.content.mode = 'command';
    nb.content.deselectAll();
}}"""


@dataclass(frozen=True)
class Cell:
    """A code cell as the notebook model holds it after a run."""

    index: int
    source: str
    outputs: list[dict[str, Any]]  # nbformat outputs, as JSON
    busy: bool  # running, or queued to run

    def errors(self) -> list[str]:
        """The text of each error output: `ename: evalue` and its traceback, uncoloured."""
        return [
            ANSI.sub("", "\n".join(str(line) for line in out.get("traceback") or []))
            or f"{out.get('ename')}: {out.get('evalue')}"
            for out in self.outputs
            if out.get("output_type") == "error"
        ]

    def stream_text(self) -> str:
        """Everything the cell printed to stdout."""
        return "".join(
            str(out.get("text", ""))
            for out in self.outputs
            if out.get("output_type") == "stream" and out.get("name") == "stdout"
        )


class Lab:
    """One browser page on a running JupyterLab, with the steps a notebook test is made of."""

    def __init__(self, page: Page, url: str, token: str, artifacts: Path) -> None:
        self.page = page
        self.url = url
        self.token = token
        self.artifacts = artifacts
        self.path = ""  # the open notebook's path
        self.opened: set[str] = set()  # every notebook path opened since the last clear

    def load(self) -> None:
        """Load JupyterLab in the page, with a fresh workspace."""
        self.page.goto(f"{self.url}/lab?reset&token={self.token}")
        self.page.wait_for_function(APP_READY, timeout=OPEN_TIMEOUT * 1000, polling=100)
        self.page.evaluate(COLLAPSE_LEFT)

    def open(self, path: str) -> None:
        """Open notebook `path` (relative to the served root) in a new tab; wait for its kernel
        to be idle."""
        self.path = path
        self.opened.add(path)
        self.page.evaluate(OPEN, path)
        self.page.wait_for_function(KERNEL_IDLE, arg=path, timeout=OPEN_TIMEOUT * 1000)

    def close_all(self) -> None:
        """Close every tab, unsaved; reload JupyterLab instead if a dialog is in the way."""
        if self.page.locator(".jp-Dialog").count():
            self.load()
        else:
            self.page.evaluate(CLOSE_ALL)

    def run_all(self) -> list[Cell]:
        """Run > Run All Cells from the menu bar; wait until the run ends; the cells after it.

        Fails with the first failing cell's source and traceback, when the kernel dies, or
        after NOTEBOOK_TIMEOUT with the source of the cell still running.
        """
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            state = self.page.wait_for_function(
                RUN_STATE, timeout=NOTEBOOK_TIMEOUT * 1000, polling=100
            ).json_value()
        except PlaywrightTimeoutError:
            state = "timeout"
        if state == "timeout":
            busy = next((c for c in self.cells() if c.busy), None)
            where = f"cell {busy.index} still running:\n{busy.source}" if busy else "no cell busy"
            pytest.fail(f"Run All Cells took over {NOTEBOOK_TIMEOUT} s; {where}", pytrace=False)
        cells = self.cells()
        if state == "dead":
            pytest.fail("the kernel died during Run All Cells", pytrace=False)
        for cell in cells:
            for error in cell.errors():
                pytest.fail(f"cell {cell.index} failed:\n{cell.source}\n\n{error}", pytrace=False)
        return cells

    def cells(self) -> list[Cell]:
        """Every code cell of the open notebook, from the model JupyterLab renders."""
        return [Cell(**c) for c in self.page.evaluate(CELLS)]

    def cell(self, index: int) -> Locator:
        """Cell `index` of the open notebook on the page, scrolled into view."""
        self.page.evaluate(SCROLL_TO, index)
        return self.notebook().locator(f".jp-Cell[data-windowed-list-index='{index}']")

    def output_area(self, index: int) -> Locator:
        """Cell `index`'s output area on the page, scrolled into view."""
        return self.cell(index).locator(".jp-OutputArea")

    def shown_text(self, index: int, last_line: str) -> str:
        """The text cell `index`'s output area shows on screen, once it shows `last_line`."""
        area = self.output_area(index)
        expect(area).to_contain_text(last_line, use_inner_text=True)  # rendered by now
        return area.inner_text()

    def notebook(self) -> Locator:
        """The open notebook's panel on the page."""
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def click(self, label: str, within: Locator | None = None) -> None:
        """Click the button labelled `label` (a widget's, say) in the notebook or in `within`,
        then wait for the kernel to have handled the click."""
        scope = within if within is not None else self.notebook()
        scope.get_by_role("button", name=label, exact=True).click()
        self.wait_idle()

    def wait_idle(self) -> None:
        """Wait until the kernel is idle (messages from a click are handled by then)."""
        self.page.wait_for_function(KERNEL_IDLE, arg=self.path, timeout=NOTEBOOK_TIMEOUT * 1000)

    def screenshot(self, target: Locator, path: Path) -> Path:
        """Save a PNG of `target` at `path`, with no other cell selected and the cursor hidden.

        JupyterLab scrolls inside a page of the viewport's size, so for a tall target the
        viewport grows to fit it (up to SHOT_MAX_HEIGHT) while the picture is taken.
        """
        self.page.evaluate(DESELECT)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.page.viewport_size
        assert size is not None
        box = target.bounding_box()
        assert box is not None, "the target of a screenshot is not on the page"
        height = min(SHOT_MAX_HEIGHT, max(size["height"], int(box["height"]) + SHOT_MARGIN))
        self.page.set_viewport_size({"width": size["width"], "height": height})
        try:
            target.scroll_into_view_if_needed()
            target.screenshot(path=path, animations="disabled", caret="hide")
        finally:
            self.page.set_viewport_size(size)
        return path

    @contextmanager
    def keep_on_failure(self, name: str) -> Iterator[None]:
        """On any failure inside, save the whole page as `<artifacts>/<name>-failure.png` and add
        its path to the failure message."""
        try:
            yield
        except (Exception, pytest.fail.Exception) as e:
            shot = self.artifacts / f"{name}-failure.png"
            try:
                self.page.screenshot(path=shot, full_page=True)
            except Exception as shot_error:  # the page itself may be gone
                note = f"(no screenshot: {shot_error})"
            else:
                note = f"screenshot: {shot}"
            if isinstance(e, pytest.fail.Exception):
                raise pytest.fail.Exception(f"{name}: {e.msg}\n{note}", pytrace=False) from None
            e.add_note(note)
            raise
