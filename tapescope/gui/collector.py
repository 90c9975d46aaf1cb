"""Cyclic garbage collection on the GUI thread only, while a window is open.

Python's cyclic collector runs in whichever thread happens to allocate. A cycle holding Qt
objects (pyqtgraph's widgets are full of them) collected on the engine's thread runs Qt
destructors there: Qt then calls back into Python for the GIL while holding its own lock,
and a GUI thread that holds the GIL and waits for that lock never wakes (seen: a pyqtgraph
ViewBox collected by the engine thread during a run). So while a window is open automatic
collection is off and the GUI thread collects on a timer, as pyqtgraph's GarbageCollector
does; closing the last window collects once more, on the GUI thread, and puts automatic
collection back as it was.
"""

from __future__ import annotations

import gc

from PySide6 import QtCore

INTERVAL_MS = 1000

# Collectors running (the first turns automatic collection off), and how it was before.
_shared = {"open": 0, "was_enabled": True}


class GuiThreadCollector:
    def __init__(self, parent: QtCore.QObject) -> None:
        if _shared["open"] == 0:
            _shared["was_enabled"] = gc.isenabled()
            gc.disable()
        _shared["open"] += 1
        self._running = True
        self.timer = QtCore.QTimer(parent)
        self.timer.timeout.connect(self.collect)
        self.timer.start(INTERVAL_MS)

    @staticmethod
    def collect() -> None:
        """What automatic collection would have done by now (the generations over threshold)."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = -1
        for g in range(3):
            if counts[g] > thresholds[g]:
                generation = g
        if generation >= 0:
            gc.collect(generation)

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.timer.stop()
        gc.collect()
        _shared["open"] -= 1
        if _shared["open"] == 0 and _shared["was_enabled"]:
            gc.enable()
