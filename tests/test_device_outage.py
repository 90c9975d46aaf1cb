"""A device that is down does not end the run: short outages are ridden out by the retries,
longer ones pause the run with an alarm, tape and plan kept, and it resumes once the device
answers again. Over the simulator's real transports (TCP camera, pty tape)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tapescope.acquisition.events import Alarm, Event, EventBus, StateChanged
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.runner import run_acquisition

SMALL = {"scope": {"camera": {"width": 128, "height": 128}},
         "run": {"slots": [0, 1], "grid": [3, 3], "exposure_ms": 2.0, "seed": 3},
         "processing": {"enabled": False}}


def config(**run: Any):
    return parse_config({**SMALL, "run": {**SMALL["run"], **run}})


async def run_with(tmp_path: Path, fault: str, cfg=None, **options: Any) -> tuple[Any, list[Event], list[str]]:
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    books = []

    def arm(sim) -> None:
        sim.world.inject(fault, **options)
        books.append(sim.world.faults)

    result = await run_acquisition(cfg or config(), tmp_path / "run", bus, on_sim=arm)
    fired = [n for _, n in books[0].fired]
    return result, events, fired


async def test_a_two_second_camera_outage_is_ridden_out(tmp_path: Path) -> None:
    result, events, fired = await run_with(tmp_path, "camera_disconnect", after=8, down_s=2.0)
    assert fired == ["camera_disconnect"]
    assert result.summary.state.value == "done", result.summary.reason
    assert len(RunStore(tmp_path / "run").tiles()) == 18          # every tile of both sections
    assert "recovering" in [e.new for e in events if isinstance(e, StateChanged)]


async def test_a_longer_outage_pauses_with_an_alarm_and_resumes_when_the_camera_is_back(tmp_path: Path) -> None:
    cfg = config(retry_window_s=0.5, device_retries=1, device_probe_s=1.0)
    result, events, fired = await run_with(tmp_path, "camera_disconnect", cfg, after=8, down_s=4.0)
    assert fired == ["camera_disconnect"]
    assert result.summary.state.value == "done", result.summary.reason
    states = [e.new for e in events if isinstance(e, StateChanged)]
    assert "paused" in states and states[-1] == "done"
    alarms = [a for a in events if isinstance(a, Alarm) and a.source == "camera"]
    assert any("paused" in a.message and a.severity == "error" for a in alarms)
    assert any("answers again" in a.message for a in alarms)
    journal = [e for e in RunStore(tmp_path / "run").events() if e["event"] == "alarm"]
    assert any("answers again" in e["message"] for e in journal)
    assert len(RunStore(tmp_path / "run").tiles()) == 18


async def test_a_jam_that_never_clears_by_itself_is_cleared(tmp_path: Path) -> None:
    result, events, fired = await run_with(tmp_path, "tape_jam", clears_after=0)
    assert fired == ["tape_jam"]
    assert result.summary.state.value == "done", result.summary.reason
    assert any(isinstance(a, Alarm) and a.source == "tape" and "sent CLEAR" in a.message for a in events)
    assert result.summary.section_status == {0: "complete", 1: "complete"}


async def test_column_faults_are_reached_by_a_grid_run_and_recovered(tmp_path: Path) -> None:
    """The run asks the column for its beam before each section, as an operator would: the
    column's faults fire in an ordinary run, and the retries cure them."""
    for fault in ("column_timeout", "column_garbled"):
        result, events, fired = await run_with(tmp_path / fault, fault, after=2)
        assert fired == [fault]
        assert result.summary.state.value == "done", result.summary.reason
        assert "recovering" in [e.new for e in events if isinstance(e, StateChanged)]


async def test_an_operator_pause_during_recovery_is_not_resumed_by_the_probe(tmp_path: Path) -> None:
    cfg = config(retry_window_s=0.5, device_retries=1, device_probe_s=0.2)
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    engines: list[Any] = []

    def on(ev: Event) -> None:
        if isinstance(ev, StateChanged) and ev.new == "recovering" and engines:
            engines[0].pause("operator")          # the operator asks for a pause meanwhile
        if isinstance(ev, StateChanged) and ev.new == "paused" and engines:
            # ... and resumes it themselves, once the run shows it paused.
            asyncio.get_running_loop().call_soon(engines[0].resume, "operator")

    bus.subscribe(on)
    # Down for longer than the retry window: the device pause comes while the operator's is asked.
    result = await run_acquisition(cfg, tmp_path / "run", bus, on_engine=engines.append,
                                   on_sim=lambda sim: sim.world.inject("camera_disconnect", after=8, down_s=3.0))
    assert result.summary.state.value == "done", result.summary.reason
    alarms = [a.message for a in events if isinstance(a, Alarm) and a.source == "camera"]
    assert any("paused, as was asked" in m for m in alarms)
    assert not any("answers again" in m for m in alarms)        # the probe did not take the operator's pause
    resumed = [e.reason for e in events if isinstance(e, StateChanged) and e.old == "paused"]
    assert resumed and all(r == "operator" for r in resumed)
