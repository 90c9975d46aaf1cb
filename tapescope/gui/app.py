"""`tapescope gui`: the window over a local engine (``--sim`` or a configured scope)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tapescope.acquisition.events import EventBus
from tapescope.config import TapescopeConfig

from .model import RunModel, allowed
from .plans import plan_of
from .session import LocalSession, SimFault


class LocalController:
    """Run control of a local engine; the buttons the engine cannot honour stay disabled."""

    def __init__(self, session: LocalSession, model: RunModel) -> None:
        self.session = session
        self.model = model
        sim = "simulated scope" if session.cfg.scope.simulated else f"scope {session.cfg.scope.name}"
        self.mode = f"local engine, {sim}, output {session.out_root}"

    def can(self, verb: str) -> bool:
        return self.session.can(verb) and allowed(verb, self.model.run_state, self.session.running)

    def do(self, verb: str) -> None:
        if verb == "start":
            self.session.start()
        elif verb == "abort":
            self.session.abort()
        else:
            self.session.command(verb)


def run_gui(cfg: TapescopeConfig, out_root: Path, *, start: bool = False, fault: SimFault | None = None,
            screenshot: Path | None = None, after_s: float = 3.0) -> int:
    """Open the window and run Qt's loop until it closes (or the screenshot is taken)."""
    from PySide6 import QtCore, QtWidgets

    from .window import MainWindow, exec_window

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    bus = EventBus()
    session = LocalSession(cfg, out_root, bus, fault=fault)
    model = RunModel()
    model.set_plan(*plan_of(cfg))
    win = MainWindow(bus, LocalController(session, model), model)
    win.show()
    if start:
        QtCore.QTimer.singleShot(0, lambda: win.command("start"))
    code = exec_window(app, win, screenshot, after_s)
    session.abort()
    session.join(30)
    win.shutdown()
    return code


def ensure_display() -> None:
    """With no display (ssh, CI), render offscreen rather than fail to open one."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
