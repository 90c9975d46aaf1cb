"""The operator GUI, offscreen, against the simulator over its real transports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

try:  # Qt needs system libraries (libGL, libEGL, fontconfig...) that a bare machine may lack
    import pyqtgraph  # noqa: F401
    from PySide6 import QtWidgets  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"Qt cannot load here: {exc}", allow_module_level=True)

from tapescope.acquisition.events import (
    Alarm,
    EventBus,
    OverviewAvailable,
    RunFinished,
    RunStarted,
    SectionPlanned,
    SectionProcessed,
    SectionStarted,
    TileAcquired,
)
from tapescope.config import CameraConfig, RunConfig, ScopeConfig, TapescopeConfig
from tapescope.gui.app import LocalController
from tapescope.gui.latest import Frame, LatestFrame, bin_mean
from tapescope.gui.model import SECTIONS_KEPT, RunModel, SlotState, TileState, allowed
from tapescope.gui.plans import plan_of
from tapescope.gui.section_map import COLOURS
from tapescope.gui.session import LocalSession, SimFault
from tapescope.gui.window import MainWindow

from .support import click

ROOT = Path(__file__).resolve().parents[1]

# Qt objects must be destroyed on the GUI thread (tapescope/gui/collector.py).
pytestmark = pytest.mark.usefixtures("collect_on_this_thread")


def small_cfg(slots: int = 3, grid: tuple[int, int] = (3, 3)) -> TapescopeConfig:
    return TapescopeConfig(scope=ScopeConfig(camera=CameraConfig(width=128, height=128)),
                           run=RunConfig(slots=list(range(slots)), grid=grid))


# -- pure parts -----------------------------------------------------------------------------

def test_latest_frame_keeps_only_the_newest() -> None:
    buf = LatestFrame()
    for k in range(3):
        buf.put(Frame.of(np.full((8, 8), k, np.uint16), f"f{k}"))
    got = buf.take()
    assert got is not None and got.label == "f2" and buf.dropped == 2
    assert buf.take() is None


def test_display_copy_is_binned_and_cursor_reads_full_resolution() -> None:
    data = np.arange(2048 * 2048, dtype=np.uint16).reshape(2048, 2048)
    f = Frame.of(data, "big")
    assert f.scale == 2 and f.display is not None and f.display.shape == (1024, 1024)
    assert abs(float(f.display[0, 0]) - float(bin_mean(data[:2, :2], 2)[0, 0])) <= 1
    assert f.data is data


def test_model_follows_tiles_sections_and_run_end() -> None:
    m = RunModel()
    m.set_plan([(0, 0, 0.0, 0.0), (0, 1, 0.0, 100.0)], (100.0, 100.0))
    m.apply(RunStarted("/tmp/x", (4, 5), 2))
    m.apply(SectionStarted(4, "BC4"))
    m.apply(TileAcquired(4, 0, 0, 0, 10.0))
    tiles = m.tiles_of(4)
    assert tiles[(0, 0)].state is TileState.ACQUIRED and tiles[(0, 1)].state is TileState.PLANNED
    m.apply(TileAcquired(4, 0, 1, 1, 11.0, qc={"faults": ["focus"]}, attempt=3))
    assert tiles[(0, 1)].state is TileState.QC_FAILED and m.tiles_done == 2
    assert m.slots[4].state is SlotState.CURRENT and m.slots[5].state is SlotState.PENDING
    m.apply(Alarm("camera", "no frame"))
    m.apply(RunFinished("failed", 0, 2, 1.0))
    assert m.slots[4].state is SlotState.FAILED and m.run_state == "failed"
    assert any("camera" in line for line in m.log)


def test_model_keeps_per_section_detail_for_recent_sections_only() -> None:
    """A run of days: each section's tiles, ROI, overview and verdict are kept for the most
    recent SECTIONS_KEPT sections, the one being imaged always among them."""
    m = RunModel()
    m.set_plan([(0, 0, 0.0, 0.0), (0, 1, 0.0, 100.0)], (100.0, 100.0))
    n = SECTIONS_KEPT * 3
    m.apply(RunStarted("/tmp/x", tuple(range(n)), 2))
    m.apply(SectionStarted(0, "BC0"))                     # the current slot: never dropped
    for slot in range(1, n):
        m.apply(OverviewAvailable(slot, np.zeros((64, 64), np.float32), (0.0, 0.0), 10.0))
        m.apply(SectionPlanned(slot, f"BC{slot}", ((0.0, 0.0),), ((0, 0, 0.0, 0.0), (0, 1, 0.0, 100.0)),
                               (100.0, 100.0)))
        m.apply(TileAcquired(slot, 0, 0, 0, 10.0))
        m.apply(SectionProcessed(slot, slot, "ok", 0.1, (0.0, 0.0), 0.9))
    for per_section in (m.section_tiles, m.rois, m.overviews, m.sections_processed):
        assert len(per_section) <= SECTIONS_KEPT + 1
        assert n - 1 in per_section and n - SECTIONS_KEPT + 1 in per_section and 1 not in per_section
    assert 0 in m.section_tiles and m.tiles_of(0)                # the current slot's tiles stay
    assert m.tiles_of(n - 1)[(0, 0)].state is TileState.ACQUIRED
    assert len(m.slots) == n                                     # every section keeps its line


def test_run_control_offers_only_what_the_state_allows() -> None:
    assert allowed("start", "idle", running=False) and not allowed("pause", "idle", running=False)
    assert allowed("pause", "acquiring", True) and not allowed("resume", "acquiring", True)
    assert allowed("resume", "paused", True) and not allowed("pause", "paused", True)
    assert not allowed("abort", "done", True) and not allowed("start", "acquiring", True)


def test_sim_fault_parse_names_the_format() -> None:
    assert SimFault.parse("camera@5") == SimFault("camera", 5)
    with pytest.raises(ValueError, match="camera@N"):
        SimFault.parse("stage@x")


# -- the window over a local engine and the simulator ---------------------------------------

@pytest.fixture
def window(qtbot, tmp_path):  # type: ignore[no-untyped-def]
    def make(cfg: TapescopeConfig, fault: SimFault | None = None) -> tuple[MainWindow, LocalSession]:
        bus = EventBus()
        session = LocalSession(cfg, tmp_path, bus, fault=fault)
        model = RunModel()
        model.set_plan(*plan_of(cfg))
        win = MainWindow(bus, LocalController(session, model), model, confirm_abort=False)
        qtbot.addWidget(win)
        made.append((win, session))
        return win, session

    made: list[tuple[MainWindow, LocalSession]] = []
    yield make
    for win, session in made:
        session.abort()
        assert session.join(60), "the engine thread did not end"
        win.shutdown()


def map_states(win: MainWindow) -> list[TileState]:
    return [t.state for t in win.map.outlines.tiles]


def test_start_pause_resume_to_done_and_map_follows(qtbot, window) -> None:  # type: ignore[no-untyped-def]
    win, session = window(small_cfg())
    win.refresh()
    assert win.control.buttons["start"].isEnabled() and not win.control.buttons["pause"].isEnabled()
    click(win, "start")
    qtbot.waitUntil(lambda: win.model.tiles_done >= 2 and win.control.buttons["pause"].isEnabled(),
                    timeout=30_000)
    click(win, "pause")
    qtbot.waitUntil(lambda: win.model.run_state == "paused", timeout=30_000)
    win.refresh()
    assert win.control.buttons["resume"].isEnabled() and not win.control.buttons["pause"].isEnabled()
    # While paused, the map shows exactly the tiles stored so far as acquired, the rest planned.
    states = map_states(win)
    slot = win.map.slot
    acquired = {(t.row, t.col) for t in win.map.outlines.tiles if t.state is TileState.ACQUIRED}
    stored = {(r.row, r.col) for r in session_store_tiles(win, slot)}
    assert acquired == stored and TileState.PLANNED in states
    click(win, "resume")
    qtbot.waitUntil(lambda: win.model.run_state == "done", timeout=60_000)
    win.refresh()
    assert win.model.tiles_done == 27
    assert set(map_states(win)) == {TileState.ACQUIRED}
    assert "27 / 27" in win.control.bar.text() or win.control.bar.value() == 27
    # The thumbnails of the section on the map are drawn (no holes where tiles were acquired).
    # They come through the loader thread and the 10 Hz paint timer, so they may still be
    # arriving when the engine says done: wait for the condition, bounded.
    def mosaic_filled() -> bool:
        win.refresh()
        return win.map.mosaic is not None and bool(np.isfinite(win.map.mosaic).mean() > 0.9)

    qtbot.waitUntil(mosaic_filled, timeout=30_000)
    # Live view drew frames; a tile click shows its QC numbers.
    qtbot.waitUntil(lambda: win.live.drawn > 0, timeout=10_000)
    t = win.map.outlines.tiles[0]
    win.on_tile_clicked(win.map.slot, t.row, t.col)
    assert f"r{t.row} c{t.col}" in win.tile_info.text() and "mean" in win.tile_info.text()
    assert session.join(60)


def test_a_gui_run_honours_the_config(qtbot, window) -> None:  # type: ignore[no-untyped-def]
    """The GUI's run is wired as `tapescope acquire` wires one: the config's expected barcodes
    (and retakes, device failure policy, ROI, ...) apply. Slot 1 expects another barcode."""
    base = small_cfg(slots=2, grid=(1, 2))
    cfg = base.model_copy(update={"run": base.run.model_copy(update={"barcodes": {"1": "NOT-THIS-ONE"}})})
    win, session = window(cfg)
    click(win, "start")
    qtbot.waitUntil(lambda: win.model.run_state == "done", timeout=60_000)
    assert session.join(60)
    done = {e["slot"]: e["status"] for e in session_store(win).events() if e["event"] == "section_done"}
    assert done == {0: "complete", 1: "wrong_barcode"}
    report = json.loads((session_store(win).dir / "report.json").read_text())
    assert [s["status"] for s in report["sections"]] == ["complete", "wrong_barcode"]


def session_store(win: MainWindow):  # type: ignore[no-untyped-def]
    assert win._store is not None
    return win._store


def test_the_montage_panel_serves_the_volume_to_neuroglancer(qtbot, window, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    opened: list[str] = []
    monkeypatch.setattr("tapescope.gui.window.webbrowser.open", opened.append)   # no browser in tests
    win, session = window(small_cfg(slots=1, grid=(2, 2)))
    assert not win.preview.view_volume.isEnabled()
    click(win, "start")
    qtbot.waitUntil(lambda: win.preview.view_volume.isEnabled(), timeout=60_000)
    win.preview.view_volume.click()
    assert len(opened) == 1 and opened[0].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(opened[0].rstrip("/") + "/state.json", timeout=10) as r:
        state = json.loads(r.read())
    assert state["layout"] == "xy" and state["layers"][0]["source"].endswith("/volume/")
    with urllib.request.urlopen(opened[0].rstrip("/") + "/volume/zarr.json", timeout=10) as r:
        assert json.loads(r.read())["node_type"] == "group"
    assert session.join(60)


def session_store_tiles(win: MainWindow, slot: int | None) -> list:  # type: ignore[type-arg]
    assert win._store is not None and slot is not None
    return win._store.tiles(slot)


def test_abort_stops_the_run_and_the_map_keeps_what_was_stored(qtbot, window) -> None:  # type: ignore[no-untyped-def]
    win, session = window(small_cfg(slots=3, grid=(4, 4)))
    click(win, "start")
    qtbot.waitUntil(lambda: win.model.tiles_done >= 3, timeout=30_000)
    click(win, "abort")
    qtbot.waitUntil(lambda: win.model.run_state == "aborted", timeout=30_000)
    assert session.join(60)
    win.refresh()
    assert win.model.tiles_done < 48
    acquired = {(t.row, t.col) for t in win.map.outlines.tiles if t.state is not TileState.PLANNED}
    assert acquired == {(r.row, r.col) for r in session_store_tiles(win, win.map.slot)}
    assert win.control.buttons["start"].isEnabled() and not win.control.buttons["abort"].isEnabled()


def test_a_device_fault_shows_the_banner(qtbot, window) -> None:  # type: ignore[no-untyped-def]
    win, _ = window(small_cfg(), fault=SimFault("camera", 4))
    click(win, "start")
    qtbot.waitUntil(lambda: any(a.severity == "error" for a in win.model.alarms), timeout=60_000)
    win.refresh()
    # The banner names the fault and what the engine did about it (the run's state).
    text = win.banner.label.text()
    assert not win.banner.isHidden() and "camera" in text and "ERROR" in text and "[run " in text
    win.banner.acknowledge()
    assert win.banner.isHidden()


def test_colours_differ_per_tile_state() -> None:
    assert len(set(COLOURS.values())) == len(TileState)


def test_cli_screenshot_of_an_idle_scope(tmp_path: Path) -> None:
    png = tmp_path / "idle.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-m", "tapescope.cli", "gui", "--sim", "--out", str(tmp_path),
                           "--screenshot", str(png), "--after", "0.2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from PySide6 import QtGui

    img = QtGui.QImage(str(png))
    assert img.width() >= 1000 and img.height() >= 600


def test_cli_refuses_sim_with_mqtt() -> None:
    proc = subprocess.run([sys.executable, "-m", "tapescope.cli", "gui", "--sim", "--mqtt", "mqtt://x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exclude" in proc.stderr


def test_automatic_collection_is_off_while_a_window_is_open() -> None:
    """Collection runs on the GUI thread only while windows are open, and comes back as it
    was when the last one closes (tapescope/gui/collector.py)."""
    import gc

    from PySide6 import QtCore

    from tapescope.gui.collector import GuiThreadCollector

    was = gc.isenabled()
    parent = QtCore.QObject()
    first, second = GuiThreadCollector(parent), GuiThreadCollector(parent)
    assert not gc.isenabled() and first.timer.isActive()
    first.stop()
    assert not gc.isenabled()                    # another window is still open
    second.stop()
    second.stop()                                # a second close changes nothing
    assert gc.isenabled() == was and not second.timer.isActive()
