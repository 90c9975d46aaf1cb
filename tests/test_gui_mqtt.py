"""The GUI attached over MQTT to a headless run, against a real Mosquitto with the shipped ACL."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

try:  # Qt needs system libraries (libGL, libEGL, fontconfig...) that a bare machine may lack
    import pyqtgraph  # noqa: F401
    from PySide6 import QtWidgets  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"Qt cannot load here: {exc}", allow_module_level=True)

from tapescope.acquisition.events import Alarm, DeviceStatus, EventBus, StateChanged, TileAcquired
from tapescope.gui.model import RunModel, TileState
from tapescope.gui.remote import MqttController, MqttLink, MqttTarget
from tapescope.gui.window import MainWindow
from tapescope.mqtt.broker import MosquittoBroker
from tapescope.mqtt.topics import EngineOnline, events_of

from .support import USERS, click, headless_config, needs_mosquitto

ROOT = Path(__file__).resolve().parents[1]

# Qt objects must be destroyed on the GUI thread (tapescope/gui/collector.py).
pytestmark = pytest.mark.usefixtures("collect_on_this_thread")


# -- pure parts -----------------------------------------------------------------------------

def test_url_names_host_port_user_and_scope() -> None:
    t = MqttTarget.parse("mqtt://viewer:s%40cret@127.0.0.1:1884/sim-scope")
    assert (t.host, t.port, t.username, t.password, t.scope) == ("127.0.0.1", 1884, "viewer", "s@cret", "sim-scope")
    assert t.root == "tapescope/sim-scope" and "s@cret" not in t.describe()
    t = MqttTarget.parse("mqtt://operator@localhost/a", env={"TAPESCOPE_MQTT_PASSWORD": "pw"})
    assert (t.port, t.password) == (1883, "pw")
    for url, words in [("http://h/s", "mqtt://"), ("mqtt://h", "scope name"), ("mqtt://h/a/b", "scope name"),
                       ("mqtt://h:99999/s", "port"), ("mqtt:///s", "no host"),
                       ("mqtt://viewer@scope-pc/s", "use mqtts://")]:
        with pytest.raises(ValueError, match=words):
            MqttTarget.parse(url, env={})


def test_telemetry_becomes_the_engine_events_it_came_from() -> None:
    [st] = events_of("state", {"state": "paused", "old": "acquiring", "reason": "op", "time": 1.0})
    assert st == StateChanged("acquiring", "paused", "op")
    [tile] = events_of("tile", {"slot": 2, "row": 1, "col": 0, "index": 4, "n_tiles": 9, "attempt": 2, "x_nm": 5.0,
                                "y_nm": 6.0, "mean": 100.0, "std": None, "focus": 3.0, "saturation": 0.0,
                                "resin": None, "faults": ["focus"], "time": 1.0})
    assert isinstance(tile, TileAcquired) and (tile.slot, tile.row, tile.col, tile.attempt) == (2, 1, 0, 2)
    assert tile.qc == {"focus": 3.0, "saturation": 0.0, "faults": ["focus"]}
    [dev] = events_of("device/stage", {"x_nm": 1.0, "moving": True, "age_s": 0.1, "time": 1.0})
    assert dev == DeviceStatus("stage", {"x_nm": 1.0}, True)
    assert events_of("alarm/last", {"source": "s", "message": "m"}) == []       # live: the alarm topic has it
    [late] = events_of("alarm/last", {"source": "s", "message": "m"}, retained=True)
    assert isinstance(late, Alarm) and "before this window attached" in late.message
    assert events_of("online", {"online": False, "reason": "connection lost"}) == [
        EngineOnline(False, "", "connection lost")]
    assert events_of("something/new", {"x": 1}) == []


def test_tiles_without_a_plan_are_placed_at_the_stage_readback() -> None:
    m = RunModel()
    for col, x in ((0, 0.0), (1, 900.0)):
        m.apply(TileAcquired(0, 0, col, col, 10.0, x_nm=x, y_nm=50.0))
    tiles = m.tiles_of(0)
    assert tiles[(0, 1)].x_nm == 900.0 and m.tile_nm == (900.0, 900.0)
    m.set_plan([(0, 0, 0.0, 0.0), (0, 1, 0.0, 1000.0), (1, 0, 1000.0, 0.0)], (1100.0, 1100.0))
    assert tiles[(0, 1)].x_nm == 1000.0 and tiles[(1, 0)].state is TileState.PLANNED and m.tile_nm[0] == 1100.0


# -- a headless run, a viewer and an operator ------------------------------------------------

@pytest.fixture
def headless(broker: MosquittoBroker, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`tapescope acquire` with the MQTT bridge on: long enough to be paused and resumed, then aborted."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(headless_config(broker.port, last_slot=29, exposure_ms=20.0))
    env = {**os.environ, "TAPESCOPE_MQTT_PASSWORD": USERS["engine"]}
    proc = subprocess.Popen([sys.executable, "-m", "tapescope.cli", "acquire", str(cfg), "--run-dir",
                             str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@pytest.fixture
def attach(qtbot, broker: MosquittoBroker):  # type: ignore[no-untyped-def]
    made: list[tuple[MainWindow, MqttLink]] = []

    def make(user: str) -> tuple[MainWindow, MqttLink]:
        bus, model = EventBus(), RunModel()
        link = MqttLink(MqttTarget("127.0.0.1", broker.port, "sim-scope", user, USERS[user]), bus,
                        reply_timeout_s=2.0, reconnect_max_s=1.0)
        win = MainWindow(bus, MqttController(link, model), model, confirm_abort=False)
        qtbot.addWidget(win)
        link.start()
        made.append((win, link))
        return win, link

    yield make
    for win, link in made:
        link.stop()
        win.shutdown()


def acquired_on_map(win: MainWindow) -> set[tuple[int, int]]:
    win.refresh()
    return {(t.row, t.col) for t in win.map.outlines.tiles if t.state is not TileState.PLANNED}


def click_now(win: MainWindow, verb: str) -> None:
    win.refresh()      # buttons follow the 10 Hz redraw; a disabled button ignores a click
    click(win, verb)


def no_reply_alarm(win: MainWindow, verb: str) -> bool:
    return any(f"no reply to {verb}" in a.message for a in win.model.alarms)


def tiles_advance(qtbot, win: MainWindow) -> None:  # type: ignore[no-untyped-def]
    n = win.model.tiles_done
    qtbot.waitUntil(lambda: win.model.tiles_done > n, timeout=30_000)


@needs_mosquitto
def test_viewer_follows_but_cannot_command_and_operator_pauses_and_resumes(  # type: ignore[no-untyped-def]
        qtbot, headless, attach, broker) -> None:
    viewer, vlink = attach("viewer")
    operator, olink = attach("operator")

    # The viewer follows the run: progress, state, and tiles on the map where the run put them.
    qtbot.waitUntil(lambda: viewer.model.tiles_done >= 3 and viewer.model.run_state == "acquiring", timeout=60_000)
    qtbot.waitUntil(lambda: len(acquired_on_map(viewer)) >= 2, timeout=30_000)
    slot = viewer.map.slot
    assert slot is not None and viewer.model.slots[slot].barcode
    assert all(not math.isnan(t.x_nm) for t in viewer.model.tiles_of(slot).values())
    assert viewer.model.engine_progress is not None and viewer.model.tiles_total >= 16
    assert viewer.model.readouts.get("stage")

    # Read-only: it says so, and every control is disabled.
    assert "viewer (read-only)" in viewer.control.mode.text()
    assert not any(b.isEnabled() for b in viewer.control.buttons.values())
    viewer.command("abort")            # as if the button were forced: refused here, shown in the banner
    assert any("read-only" in a.message for a in viewer.model.alarms)
    # A command that does reach the broker with viewer credentials is dropped by the ACL: no reply,
    # the window says so, and the run keeps going.
    vlink.send("abort")
    qtbot.waitUntil(lambda: no_reply_alarm(viewer, "abort"), timeout=15_000)
    tiles_advance(qtbot, viewer)
    assert viewer.model.run_state == "acquiring"

    # The operator's probe was answered: run control is enabled, except start.
    qtbot.waitUntil(lambda: olink.role == "operator", timeout=15_000)
    operator.refresh()
    assert operator.control.mode.text().startswith("operator")
    assert operator.control.buttons["pause"].isEnabled() and not operator.control.buttons["start"].isEnabled()
    click_now(operator, "pause")
    qtbot.waitUntil(lambda: viewer.model.run_state == "paused" and operator.model.run_state == "paused",
                    timeout=30_000)
    assert any("reply to pause" in line and ": ok" in line for line in operator.model.log)
    # Paused, the viewer's resume changes nothing either.
    vlink.send("resume")
    qtbot.waitUntil(lambda: no_reply_alarm(viewer, "resume"), timeout=15_000)
    assert viewer.model.run_state == "paused" and headless.poll() is None
    operator.refresh()
    assert operator.control.buttons["resume"].isEnabled() and not operator.control.buttons["pause"].isEnabled()
    click_now(operator, "resume")
    qtbot.waitUntil(lambda: viewer.model.run_state == "acquiring", timeout=30_000)
    tiles_advance(qtbot, viewer)

    # The broker restarts: the windows say so, reconnect, and follow the run again.
    broker.stop()
    qtbot.waitUntil(lambda: not vlink.connected, timeout=30_000)
    viewer.refresh()
    assert "reconnecting" in viewer.control.mode.text() and not viewer.banner.isHidden()
    broker.start()
    qtbot.waitUntil(lambda: vlink.connected and olink.connected, timeout=30_000)
    tiles_advance(qtbot, viewer)

    # The operator aborts (the confirmation is off in tests): the headless run ends.
    qtbot.waitUntil(lambda: olink.role == "operator" and operator.controller.can("abort"), timeout=15_000)
    click_now(operator, "abort")
    qtbot.waitUntil(lambda: viewer.model.run_state == "aborted", timeout=30_000)
    assert headless.wait(60) is not None


def test_plans_and_verdicts_cross_the_wire_whole() -> None:
    """What a window attached from elsewhere needs for the map and the montage panel: the
    section's planned tiles and processing's verdict, through JSON and back."""
    import json

    from tapescope.acquisition.events import SectionPlanned, SectionProcessed, SectionStarted
    from tapescope.mqtt.topics import messages_for

    plan = SectionPlanned(7, "TS-7", ((0.0, 0.0), (0.0, 900.5), (800.0, 900.5)),
                          ((0, 0, 100.0, 200.0), (0, 1, 100.0, 1100.25)), (1024.0, 1024.0), "auto")
    verdict = SectionProcessed(7, 3, "unaligned", float("nan"), (1.5, -2.0), 0.08, "the wrong tissue?")
    back = []
    for ev in (plan, verdict):
        [msg] = messages_for(ev, "s")
        assert msg.retain and msg.qos == 1
        back += events_of(msg.topic.removeprefix("tapescope/s/"), json.loads(json.dumps(msg.payload)))
    started, planned, processed = back
    assert started == SectionStarted(7, "TS-7")
    # Tile centres travel to 0.1 nm (a tile is ~1000 nm; the map needs no more); the rest exactly.
    assert planned.tiles == ((0, 0, 100.0, 200.0), (0, 1, 100.0, 1100.2))
    assert (planned.roi_nm, planned.tile_nm, planned.roi_source) == (plan.roi_nm, plan.tile_nm, plan.roi_source)
    assert (processed.slot, processed.z, processed.status, processed.shift_px, processed.message) == (
        7, 3, "unaligned", (1.5, -2.0), "the wrong tissue?")
    assert math.isnan(processed.max_residual_px)        # NaN travels as null and comes back as NaN
    m = RunModel()
    for ev in back:
        m.apply(ev)
    assert set(m.tiles_of(7)) == {(0, 0), (0, 1)} and m.tile_nm == (1024.0, 1024.0)
    assert m.sections_processed[7].status == "unaligned"
