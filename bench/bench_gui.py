"""GUI responsiveness while tiles stream: Qt event-loop latency, against a baseline.

A probe timer asks to run every PROBE_MS; its lateness (actual gap minus PROBE_MS) is the
time the event loop was busy with something else, which is what an operator feels as lag.

- baseline: the same probe in a bare QApplication, nothing else running;
- load: the full main window while a producer thread stores 2048x2048 uint16 tiles at
  10 per second through the real RunStore (TIFF + fsync + journal) and emits the engine's
  events, so the GUI reads every tile back, bins it for display, pastes its thumbnail
  into the section map and redraws the live view, as in a run.

Prints the 50th/99th percentile and maximum lateness of each, and the ratio. Target:
p99 under 50 ms with the load. Run: make bench (or .venv/bin/python bench/bench_gui.py)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np

try:
    from PySide6 import QtCore, QtWidgets
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(f"skipped: Qt cannot load here ({exc})")
    sys.exit(0)

from tapescope.acquisition.events import (
    EventBus,
    RunFinished,
    RunStarted,
    SectionAcquired,
    SectionStarted,
    TileAcquired,
)
from tapescope.acquisition.plan import tile_grid
from tapescope.acquisition.store import RunStore
from tapescope.gui.model import RunModel
from tapescope.gui.window import MainWindow

PROBE_MS = 5
SECONDS = float(os.environ.get("BENCH_GUI_SECONDS", "10"))
TILE_PX = 2048
RATE_HZ = 10.0
GRID = (6, 6)
PIXEL_NM = 4.0


class NoControl:
    mode = "bench: events from a producer thread"

    def can(self, verb: str) -> bool:
        return False

    def do(self, verb: str) -> None:
        raise RuntimeError("bench")


def probe(app: QtWidgets.QApplication, seconds: float) -> list[float]:
    """Lateness of a PROBE_MS timer, in ms, for SECONDS of Qt's event loop."""
    late: list[float] = []
    last = time.perf_counter()

    def tick() -> None:
        nonlocal last
        now = time.perf_counter()
        late.append(max(0.0, (now - last) * 1000 - PROBE_MS))
        last = now

    timer = QtCore.QTimer()
    timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
    timer.setInterval(PROBE_MS)
    timer.timeout.connect(tick)
    timer.start()
    QtCore.QTimer.singleShot(int(seconds * 1000), app.quit)
    app.exec()
    timer.stop()
    return late[1:]


def producer(bus: EventBus, run_dir: Path, stop: threading.Event, counts: dict[str, int]) -> None:
    store = RunStore.create(run_dir, "{}")
    grid = tile_grid(*GRID, (TILE_PX, TILE_PX), PIXEL_NM, 0.1)
    rng = np.random.default_rng(0)
    base = rng.integers(2000, 9000, (TILE_PX, TILE_PX), dtype=np.uint16)
    bus.emit(RunStarted(str(run_dir), tuple(range(100)), len(grid)))
    period = 1 / RATE_HZ
    t_next = time.perf_counter()
    slot = 0
    while not stop.is_set():
        bus.emit(SectionStarted(slot, f"BENCH-{slot:05d}"))
        for i, t in enumerate(grid):
            if stop.is_set():
                break
            frame = np.roll(base, i * 37, axis=1)
            store.write_tile(slot, t.row, t.col, frame, y_nm=t.y_nm, x_nm=t.x_nm, meta={})
            bus.emit(TileAcquired(slot, t.row, t.col, i, float(frame[::16, ::16].mean()), x_nm=t.x_nm,
                                  y_nm=t.y_nm))
            counts["tiles"] += 1
            t_next += period
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                counts["late"] += 1
        bus.emit(SectionAcquired(slot, len(grid)))
        slot += 1
    bus.emit(RunFinished("aborted", slot, counts["tiles"], 0.0))


def summary(name: str, late: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(late, n=100)
    p50, p99 = statistics.median(late), q[98]
    print(f"{name:<34} n={len(late):5d}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {max(late):7.2f} ms")
    return p50, p99


def main() -> None:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    base = probe(app, SECONDS)

    bus = EventBus()
    model = RunModel()
    grid = tile_grid(*GRID, (TILE_PX, TILE_PX), PIXEL_NM, 0.1)
    model.set_plan([(t.row, t.col, t.y_nm, t.x_nm) for t in grid], (TILE_PX * PIXEL_NM, TILE_PX * PIXEL_NM))
    win = MainWindow(bus, NoControl(), model)
    win.show()
    stop = threading.Event()
    counts = {"tiles": 0, "late": 0}
    with tempfile.TemporaryDirectory() as tmp:
        th = threading.Thread(target=producer, args=(bus, Path(tmp) / "run", stop, counts), daemon=True)
        th.start()
        loaded = probe(app, SECONDS)
        stop.set()
        th.join(30)
        drawn = win.live.drawn
        win.shutdown()

    print(f"GUI event-loop latency (probe every {PROBE_MS} ms, {SECONDS:g} s each; "
          f"{TILE_PX}x{TILE_PX} uint16 tiles at {RATE_HZ:g}/s)")
    _, b99 = summary("baseline: bare Qt loop", base)
    _, l99 = summary("main window + tile stream", loaded)
    print(f"tiles stored {counts['tiles']} ({counts['tiles'] / SECONDS:.1f}/s, producer late {counts['late']}), "
          f"live view drew {drawn}, display drops {win.latest.dropped + win.loader.dropped}")
    print(f"p99 ratio load/baseline {l99 / max(b99, 1e-3):.1f}x; target p99 < 50 ms: "
          f"{'met' if l99 < 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
