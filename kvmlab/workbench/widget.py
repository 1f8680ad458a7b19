"""The Workbench view: ipywidgets 8 controls over a `Workbench` model, which holds all logic.

Every handler runs inside `guarded`, so an exception lands in the model's error list and on
screen instead of vanishing into JupyterLab's log. While the guest runs, a refresher thread
redraws the live panels at most REFRESH_HZ times a second.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from kvmlab.workbench import panels
from kvmlab.workbench.model import BACKENDS, MODES, Workbench
from kvmlab.workbench.model import backend as load_backend

REFRESH_HZ = 10
BUTTONS = (
    ("Assemble", "assemble", "kvmlab-assemble"),
    ("Reset", "reset", "kvmlab-reset"),
    ("Step instruction", "step_instruction", "kvmlab-step-instruction"),
    ("Step KVM_RUN", "step_kvm_run", "kvmlab-step-kvm-run"),
    ("Run", "run", "kvmlab-run"),
    ("Stop", "stop", "kvmlab-stop"),
    ("Back", "back", "kvmlab-back"),
)


class WorkbenchWidget(w.VBox):
    """Buttons, mode and backend choice, the code editor and every panel of a Workbench."""

    def __init__(self, model: Workbench | None = None, **kwargs: Any) -> None:
        self.model = model if model is not None else Workbench()
        self.buttons: dict[str, w.Button] = {}
        for label, action, css in BUTTONS:
            button = w.Button(description=label, tooltip=label)
            button.add_class(css)
            button.on_click(self.guarded(functools.partial(self._do, action)))
            self.buttons[action] = button
        backends = [b for b in BACKENDS if b == "sim" or _host_available()]
        self.mode = w.Dropdown(options=MODES, value=self.model.mode, description="mode")
        self.backend = w.Dropdown(options=backends, value=self.model.backend, description="backend")
        self.mode.observe(self.guarded(lambda change: self.model.set_mode(change["new"])), "value")
        self.backend.observe(
            self.guarded(lambda change: self.model.set_backend(change["new"])), "value"
        )
        self.editor = w.Textarea(
            value=self.model.source, layout=w.Layout(width="100%", height="220px")
        )
        self.editor.add_class("kvmlab-editor")
        self.serial_in = w.Text(placeholder="type for the guest's COM1", description="serial in")
        send = w.Button(description="Send")
        send.add_class("kvmlab-serial-send")
        send.on_click(self.guarded(lambda _: self._do("serial_input")))
        self.html = {name: w.HTML() for name in panels.PANELS}
        for name, view in self.html.items():
            view.add_class(f"kvmlab-{name.replace('_', '-')}-panel")
        style = w.HTML(panels.STYLE)
        left = w.VBox(
            [self.editor, self.html["listing"], self.html["disassembly"], self.html["trace"]],
            layout=w.Layout(width="50%"),
        )
        right = w.VBox(
            [self.html[n] for n in ("registers", "kvm_run", "exits", "memory", "serial")],
            layout=w.Layout(width="50%"),
        )
        super().__init__(
            [
                style,
                w.HBox(list(self.buttons.values())),
                w.HBox([self.mode, self.backend, self.html["status"]]),
                w.HBox([left, right]),
                w.HBox([self.serial_in, send]),
                self.html["errors"],
            ],
            **kwargs,
        )
        self.add_class("kvmlab-workbench")
        self._refresher: threading.Thread | None = None
        self.model.listeners.append(self.refresh)
        self.refresh()

    def guarded(self, handler: Callable[..., Any]) -> Callable[..., None]:
        """`handler` with every exception kept in the model's errors and shown."""

        @functools.wraps(handler)
        def run(*args: Any) -> None:
            try:
                handler(*args)
            except Exception as e:
                self.model.report("callback", e)
            self.refresh()

        return run

    def _do(self, action: str, *_: Any) -> None:
        model = self.model
        if action == "assemble":
            model.source = self.editor.value
            model.assemble()
        elif action == "serial_input":
            model.serial_input(self.serial_in.value)
            self.serial_in.value = ""
        elif action == "run":
            model.run()
            self._start_refresher()
        else:
            getattr(model, action)()

    def refresh(self, names: tuple[str, ...] | None = None) -> None:
        """Redraw `names` (default: every panel) from the model."""
        try:
            if self.model.running and names is None:
                names = panels.LIVE
            for name, html in panels.render_all(self.model, names).items():
                if self.html[name].value != html:
                    self.html[name].value = html
        except Exception as e:  # a panel's bug: show it, keep the rest working
            self.model.report("callback", e)
            self.html["errors"].value = panels.errors(self.model)
        running = self.model.running
        for action, button in self.buttons.items():
            button.disabled = running != (action == "stop")

    def _start_refresher(self) -> None:
        def loop() -> None:
            stop = threading.Event()
            while self.model.running:
                self.refresh(panels.LIVE)
                stop.wait(1 / REFRESH_HZ)
            self.refresh()

        self._refresher = threading.Thread(target=loop, name="workbench-refresh", daemon=True)
        self._refresher.start()


def _host_available() -> bool:
    try:
        load_backend("host")
    except RuntimeError:
        return False
    return True
