"""The operator's main window: every panel, fed from one event bus, never blocking.

Events may arrive on any thread (engine loop, MQTT link, processing worker). ``Inbox`` takes
them in a plain thread-safe deque and a 50 Hz timer on the GUI thread drains it; the model is
only touched there. No Qt call is ever made off the GUI thread: emitting a PySide6 signal from a
Python thread has crashed and deadlocked (PYSIDE-3124; a CI run hung for 90 min in C with the
GIL taken), and a deque needs neither Qt's locks nor the GIL dance. Panels are redrawn by a
10 Hz timer from dirty flags, so a burst of events costs one redraw (docs/gui.md).
"""

from __future__ import annotations

import logging
import sys
import webbrowser
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PySide6 import QtCore, QtWidgets

from tapescope.acquisition.events import Alarm, Event, EventBus, RunStarted, SectionProcessed, TileAcquired
from tapescope.acquisition.store import RunStore
from tapescope.mqtt.topics import EngineOnline
from tapescope.view.background import BackgroundViewer

from .collector import GuiThreadCollector
from .latest import FrameLoader, LatestFrame, TileImage
from .live_view import LiveView
from .model import RunModel
from .panels import AlarmBanner, LogPanel, MontagePreview, Readouts, RunControl, TapePanel
from .section_map import SectionMap

log = logging.getLogger(__name__)

REFRESH_HZ = 10
DRAIN_MS = 20               # how often the GUI thread takes what other threads handed it
PREVIEW_MAX_PX = 1024


class Controller(Protocol):
    """What run control talks to: a local engine, or a run attached over MQTT."""

    mode: str

    def can(self, verb: str) -> bool: ...

    def do(self, verb: str) -> None: ...


class Inbox:
    """What other threads hand the GUI thread: events, the display's own faults, montage images.

    ``deque.append`` and ``popleft`` are atomic, so producers never wait and never touch Qt.
    """

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.montages: deque[tuple[int, np.ndarray]] = deque()

    def handler(self, ev: Event) -> None:          # any thread
        self.events.append(ev)

    def message(self, severity: str, text: str) -> None:   # any thread: a fault of the display itself
        self.events.append(Alarm("gui", text, severity))


def read_montage(volume: Path | tuple[Path, ...], z: int, max_px: int = PREVIEW_MAX_PX) -> np.ndarray:
    """Plane z of the volume (the first of several candidate paths that exists) at the finest
    pyramid level no larger than max_px on a side."""
    import zarr

    if isinstance(volume, tuple):
        volume = next((v for v in volume if v.exists()), volume[0])
    group = zarr.open_group(str(volume), mode="r")
    levels = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
    if not levels:
        raise ValueError(f"{volume} has no pyramid levels")
    for key in levels:
        arr = group[key]
        if max(arr.shape[1:]) <= max_px or key == levels[-1]:
            return np.asarray(arr[z], dtype=np.float32)
    raise AssertionError("unreachable")


class MainWindow(QtWidgets.QMainWindow):
    def __init__(self, bus: EventBus, controller: Controller, model: RunModel | None = None,
                 *, confirm_abort: bool = True) -> None:
        super().__init__()
        self.setWindowTitle(f"tapescope: {controller.mode}")
        self.bus = bus
        self.controller = controller
        self.model = model or RunModel()
        self.latest = LatestFrame()
        self.inbox = Inbox()
        self.loader = FrameLoader(self.latest, on_error=lambda m: self.inbox.message("warning", m))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tapescope-preview")
        self._collector = GuiThreadCollector(self)   # Qt objects die on this thread only
        self._dirty: set[str] = set()
        self._store: RunStore | None = None
        self.events_seen = 0
        self._closed = False

        self.live = LiveView(self.latest)
        self.map = SectionMap(self.model)
        self.tape = TapePanel(self.model)
        self.readouts = Readouts(self.model)
        self.banner = AlarmBanner(self.model)
        self.logpanel = LogPanel(self.model)
        self.preview = MontagePreview()
        self.preview.view_volume.clicked.connect(self._view_volume)
        self._volume: Path | None = None
        self._viewer: BackgroundViewer | None = None
        self.control = RunControl(self.model, controller.can, self.command, confirm_abort=confirm_abort)
        self.control.mode.setText(controller.mode)
        self.tile_info = QtWidgets.QLabel("Click a tile on the map to see it and its QC numbers.")
        self.tile_info.setWordWrap(True)

        right = QtWidgets.QWidget()
        rl = QtWidgets.QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.control)
        rl.addWidget(self.readouts)
        rl.addWidget(self.tape, 1)
        mapbox = QtWidgets.QWidget()
        ml = QtWidgets.QVBoxLayout(mapbox)
        ml.setContentsMargins(0, 0, 0, 0)
        ml.addWidget(self.map, 1)
        ml.addWidget(self.tile_info)
        top = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        for w in (self.live, mapbox, right):
            top.addWidget(w)
        top.setSizes([560, 520, 400])
        bottom = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        bottom.addWidget(self.logpanel)
        bottom.addWidget(self.preview)
        bottom.setSizes([900, 580])
        main = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        main.addWidget(top)
        main.addWidget(bottom)
        main.setSizes([620, 280])
        central = QtWidgets.QWidget()
        cl = QtWidgets.QVBoxLayout(central)
        cl.setContentsMargins(4, 4, 4, 4)
        cl.addWidget(self.banner)
        cl.addWidget(main, 1)
        self.setCentralWidget(central)
        self.resize(1500, 950)

        self.map.tileClicked.connect(self.on_tile_clicked)
        self._unsubscribe = bus.subscribe(self.inbox.handler)
        self.drain_timer = QtCore.QTimer(self)
        self.drain_timer.setInterval(DRAIN_MS)
        self.drain_timer.timeout.connect(self.drain)
        self.drain_timer.start()
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(1000 // REFRESH_HZ)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self._dirty |= {"run", "progress", "readouts"}
        self.refresh()

    # -- events (GUI thread) --------------------------------------------------------------
    def drain(self) -> None:
        """Apply everything other threads handed over since the last tick, in order."""
        events, montages = self.inbox.events, self.inbox.montages
        while events:
            self.on_event(events.popleft())
        while montages:
            self.preview.show_image(montages.popleft()[1])

    def on_event(self, ev: Event) -> None:
        self.events_seen += 1
        self._dirty |= self.model.apply(ev)
        if isinstance(ev, RunStarted):
            self._store = RunStore(ev.run_dir)
        elif isinstance(ev, EngineOnline) and ev.run_dir:
            self._attach_run_dir(ev.run_dir)
        elif isinstance(ev, TileAcquired):
            self.map.current_tile = (ev.row, ev.col)
            self._feed_tile(ev)
        elif isinstance(ev, SectionProcessed):
            self.preview.show_report(ev.slot, ev.z, ev.status, ev.max_residual_px, ev.shift_px,
                                     ev.alignment_confidence, ev.message)
            if ev.status != "failed" and self._store is not None:
                # A headless run keeps its volume in the run directory; a demo or GUI run beside it
                # (looked for on the preview thread: a shared disk may be slow).
                run_dir = self._store.dir
                candidates = (run_dir / "volume.zarr", run_dir.parent / "volume.zarr")
                self._volume = next((v for v in candidates if (v / "zarr.json").exists()), self._volume)
                self.preview.view_volume.setEnabled(self._volume is not None)
                fut = self._executor.submit(read_montage, candidates, ev.z)
                fut.add_done_callback(lambda f, z=ev.z: self._montage_done(z, f))

    def _view_volume(self) -> None:
        """The volume in Neuroglancer: its server started on first use (127.0.0.1, a free
        port), the browser opened on it; the URL also goes to the log."""
        if self._volume is None:
            return
        try:
            if self._viewer is None or self._viewer.volume != self._volume:
                if self._viewer is not None:
                    self._viewer.stop()
                self._viewer = BackgroundViewer(self._volume)
        except (OSError, ValueError, TimeoutError) as exc:
            self.on_event(Alarm("gui", f"cannot serve {self._volume}: {exc}", "warning"))
            return
        url = f"{self._viewer.base}/"
        self.preview.view_volume.setText(f"View the volume: {url}")
        self.preview.view_volume.setToolTip(f"{self._volume} served at {url}")
        webbrowser.open(url)

    def _attach_run_dir(self, run_dir: str) -> None:
        """Attached over MQTT to a run whose directory this machine can read (the same host, a
        shared disk): tiles are shown from it and the map gets the configured grid."""
        from .plans import plan_from_run_dir

        if not (Path(run_dir) / "journal.jsonl").is_file():
            self.on_event(Alarm("gui", f"run directory {run_dir} is not readable here: no tile images, "
                                "the map places tiles where the stage read back", "warning"))
            return
        self._store = RunStore(run_dir)
        plan = plan_from_run_dir(run_dir)
        if plan is not None and not self.model.plan:
            self.model.set_plan(*plan)
            self._dirty.add("map")

    def _feed_tile(self, ev: Event) -> None:
        data = getattr(ev, "frame", None)
        if data is None and self._store is None:
            return
        slot, row, col = ev.slot, ev.row, ev.col  # type: ignore[attr-defined]
        path = "" if self._store is None else str(self._store.tile_path(slot, row, col))
        self.loader.submit(TileImage(slot, row, col, path, data))

    def _montage_done(self, z: int, fut: object) -> None:   # on the preview thread
        try:
            img = fut.result()  # type: ignore[attr-defined]
        except Exception as exc:
            self.inbox.message("warning", f"montage preview of z={z} could not be read: {exc}")
            return
        self.inbox.montages.append((z, img))

    def on_tile_clicked(self, slot: int, row: int, col: int) -> None:
        tile = self.model.tiles_of(slot).get((row, col))
        if tile is None:
            return
        nums = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in tile.qc.items())
        self.tile_info.setText(f"slot {slot} tile r{row} c{col}: {tile.state.value}, "
                               f"attempts {tile.attempts}" + (f"; {nums}" if nums else ""))
        if tile.counted and self._store is not None:
            self.loader.submit(TileImage(slot, row, col, str(self._store.tile_path(slot, row, col)),
                                         info=dict(tile.qc)))

    def command(self, verb: str) -> None:
        try:
            self.controller.do(verb)
        except Exception as exc:   # a refused command is shown, never a traceback only
            self.on_event(Alarm("control", f"{verb.replace('_', ' ')} refused: {exc}", "warning"))
        self._dirty.add("run")

    # -- drawing --------------------------------------------------------------------------
    def refresh(self) -> None:
        d, self._dirty = self._dirty, set()
        while self.loader.thumbs:
            self.map.add_thumbnail(*self.loader.thumbs.popleft())
        if {"map", "tape"} & d:
            if self.model.current_slot != self.map.slot:
                self.map.show_slot(self.model.current_slot)
            else:
                self.map.refresh()
        if "tape" in d or "run" in d:
            self.tape.refresh()
        if "readouts" in d:
            self.readouts.refresh()
        if "alarm" in d or "run" in d:
            self.banner.refresh()
        if "log" in d:
            self.logpanel.refresh()
        # Buttons and ETA follow the clock and the session, not only events.
        self.control.refresh()
        mode = self.controller.mode
        if mode != self.control.mode.text():       # over MQTT: role and broker link change
            self.control.mode.setText(mode)
            self.control.mode.setStyleSheet("color: #e65100; font-weight: bold;" if "read-only" in mode
                                            or "unreachable" in mode else "")
            self.setWindowTitle(f"tapescope: {mode}")

    def closeEvent(self, event: object) -> None:
        self.shutdown()
        super().closeEvent(event)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._collector.stop()
        self.timer.stop()
        self.drain_timer.stop()
        self.live.timer.stop()
        self._unsubscribe()
        self.loader.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._viewer is not None:
            self._viewer.stop()

    def screenshot(self, path: Path) -> None:
        self.refresh()
        if not self.grab().save(str(path)):
            raise OSError(f"could not write a screenshot to {path}")


def exec_window(app: Any, win: Any, screenshot: Path | None, after_s: float) -> int:
    """Run Qt's loop until the window closes, or until SCREENSHOT is saved AFTER_S seconds in; the exit code."""
    code = 0
    if screenshot is not None:
        def shoot() -> None:
            nonlocal code
            try:
                win.screenshot(screenshot)
            except OSError as exc:
                print(f"error: {exc}", file=sys.stderr)
                code = 1
            app.quit()

        QtCore.QTimer.singleShot(int(after_s * 1000), shoot)
    app.exec()
    return code
