"""The Workbench: assemble guest code, step KVM_RUN and watch every structure change.

`Workbench` (model.py) holds all state and logic and is driven by tests without a browser;
`panels` turns its state into HTML; `WorkbenchWidget` (widget.py, ipywidgets 8) only renders it.

    from kvmlab.workbench import Workbench, WorkbenchWidget
    WorkbenchWidget(Workbench(source="out 0x10, al\\nhlt"))   # a notebook cell
"""

from kvmlab.workbench.model import MODES, Workbench, WorkbenchError

__all__ = ["MODES", "Workbench", "WorkbenchError", "WorkbenchWidget"]


def __getattr__(name: str) -> object:
    """`WorkbenchWidget` is imported on first use, so the model works without ipywidgets."""
    if name == "WorkbenchWidget":
        from kvmlab.workbench.widget import WorkbenchWidget

        return WorkbenchWidget
    raise AttributeError(name)
