"""Live processing on a dask cluster (`[processing] scheduler`): a real scheduler and two
worker processes on 127.0.0.1, the simulator over its real transports, MQTT through
Mosquitto; one worker killed mid-run."""

from __future__ import annotations

import json
from pathlib import Path

from tapescope.acquisition.events import Alarm, Event, EventBus, ProcessingBacklog, SectionProcessed
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.montage.omezarr import Volume
from tapescope.mqtt.broker import MosquittoBroker
from tapescope.runner import run_acquisition

from .support import ROOT, USERS, DaskProcesses, Watcher, needs_mosquitto

SLOTS = 10
BACKLOG_LIMIT = 2


@needs_mosquitto
async def test_a_run_on_a_dask_cluster_survives_a_dead_worker(
        tmp_path: Path, dask_processes: DaskProcesses, broker: MosquittoBroker, watcher: Watcher) -> None:
    dask_processes.wait_for_workers(2)
    cfg = parse_config({
        "scope": {"camera": {"width": 256, "height": 256}},
        "run": {"slot_range": [0, SLOTS - 1], "grid": [2, 2], "exposure_ms": 3.0, "seed": 2},
        "processing": {"elastic": False, "scheduler": dask_processes.address, "max_backlog": BACKLOG_LIMIT},
        "mqtt": {"enabled": True, "port": broker.port, "username": "engine"},
    })
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    killed: list[int] = []

    def kill_a_worker(ev: Event) -> None:
        # Once the cluster has work of the next sections in flight, one worker dies.
        if isinstance(ev, SectionProcessed) and ev.z >= 1 and not killed:
            dask_processes.workers[0].kill()
            killed.append(ev.z)

    bus.subscribe(kill_a_worker)
    result = await run_acquisition(cfg, tmp_path / "run", bus, password=USERS["engine"])
    assert result.summary.state.value == "done", result.summary.reason
    assert killed

    # Every take acquired was processed exactly once: none lost, none twice.
    journal = list(RunStore(tmp_path / "run").events())
    takes = [int(e["slot"]) for e in journal if e["event"] == "section_done" and e["status"] in ("complete", "flagged")]
    processed = [int(e["slot"]) for e in journal if e["event"] == "section_processed"]
    assert sorted(processed) == sorted(takes) and set(takes) == set(range(SLOTS)), (takes, processed)
    assert not [e for e in journal if e["event"] == "processing_failed"]
    volume = Volume.open(tmp_path / "run" / "volume.zarr")
    sections = volume.group.attrs["tapescope"]["sections"]
    assert sorted(map(int, sections)) == list(range(SLOTS))
    assert all(sections[str(z)]["status"] in ("ok", "unaligned") for z in range(SLOTS)), sections
    assert sum(sections[str(z)]["status"] == "ok" for z in range(SLOTS)) >= SLOTS - 3
    for z in range(SLOTS):
        assert volume.levels[0][z].max() > 0                  # rendered by the workers, every section

    # An alarm says what happened to the worker.
    alarms = [e.message for e in events if isinstance(e, Alarm)]
    assert any("left the cluster" in m for m in alarms), alarms
    # The backlog is published after each section, over MQTT too, and ends at nothing waiting;
    # past the limit it raised an alarm (and only then).
    backlog = [e for e in events if isinstance(e, ProcessingBacklog)]
    assert len(backlog) >= SLOTS and backlog[-1].waiting == 0
    most = max(e.waiting for e in backlog)
    assert any("sections behind acquisition" in m for m in alarms) == (most > BACKLOG_LIMIT), (most, alarms)
    last = await watcher.wait_for(f"{ROOT}/processing", lambda p: p["waiting"] == 0, within_s=10)
    assert last["limit"] == BACKLOG_LIMIT
    seen = [p for t, p in watcher.seen if t == f"{ROOT}/processing"]
    assert seen and max(p["waiting"] for p in seen) <= SLOTS
    assert json.loads(json.dumps(seen[-1]))["oldest_s"] is not None


def test_the_backlog_crosses_mqtt_and_reaches_the_gui_model() -> None:
    from tapescope.gui.model import RunModel
    from tapescope.mqtt.topics import events_of, messages_for

    ev = ProcessingBacklog(5, 42.5, 2, 8)
    (msg,) = messages_for(ev, "sim-scope")
    assert msg.topic == f"{ROOT}/processing" and msg.retain
    (back,) = events_of("processing", json.loads(json.dumps(msg.payload)), retained=True)
    assert back == ev
    model = RunModel()
    assert "progress" in model.apply(back) and model.backlog == ev


def test_an_unreachable_scheduler_refuses_the_run_before_anything_is_made(tmp_path: Path) -> None:
    import socket

    from typer.testing import CliRunner

    from tapescope.cli import app

    with socket.socket() as s:           # a port where nothing listens once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[processing]\nscheduler = "tcp://127.0.0.1:{port}"\n')
    res = CliRunner().invoke(app, ["acquire", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert f"scheduler tcp://127.0.0.1:{port}: cannot connect" in res.output.replace("\n", "")
    assert not (tmp_path / "run").exists()
