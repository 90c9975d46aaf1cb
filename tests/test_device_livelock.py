"""A device that fails its step every time but reconnects every time: the retries judge the
step, not the reconnect, so the run pauses with one alarm (over MQTT too) instead of spinning
on cures, and resumes by itself once the step itself works again. Over the simulator's real
transports (TCP camera, pty stage) and a real Mosquitto."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tapescope.acquisition.engine import Engine, RunState
from tapescope.acquisition.events import Alarm, Event, StateChanged
from tapescope.acquisition.notices import CureNotices
from tapescope.hardware.scope import Scope
from tapescope.sim_hardware.scope import SimulatedScope

from .support import ROOT, bridge_for, make_engine, needs_mosquitto

RETRY_WINDOW_S = 1.5
COUNT = 12                 # failures in a row: more than one pause's worth of retries


@pytest.fixture
async def quick_scope(sim: SimulatedScope) -> AsyncIterator[Scope]:
    """The simulator's drivers with short timeouts: a lost reply costs a second, not five."""
    c = sim.scope_config()
    async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                camera_port=c.camera.port, serial_timeout_s=0.5, camera_timeout_s=1.0) as s:
        yield s


def engine(scope: Scope, tmp_path: Path) -> tuple[Engine, list[Event]]:
    return make_engine(scope, tmp_path, [0, 1], device_retries=1, retry_window_s=RETRY_WINDOW_S,
                       retry_backoff_s=0.05, device_probe_s=0.3, watchdog_stall_s=600)


@needs_mosquitto
@pytest.mark.parametrize(("fault", "options", "device", "step"), [
    ("frame_drop", {"after": 5}, "camera", "camera trigger"),
    ("stage_timeout", {"after": 5, "on": "M", "executed": False}, "stage", "stage to"),
])
async def test_a_step_that_fails_through_every_reconnect_pauses_then_resumes_when_it_works(
        fault: str, options: dict[str, Any], device: str, step: str, sim: SimulatedScope, quick_scope: Scope,
        broker, watcher, tmp_path: Path) -> None:
    sim.inject(fault, COUNT, **options)
    eng, events = engine(quick_scope, tmp_path)
    seen_at: dict[int, float] = {}
    eng.bus.subscribe(lambda ev: seen_at.setdefault(id(ev), time.monotonic()))
    async with bridge_for(broker, eng):
        summary = await asyncio.wait_for(eng.run(), 240)
        over_mqtt = await watcher.wait_for(f"{ROOT}/alarm", lambda p: "paused" in p["message"])
        await watcher.wait_for(f"{ROOT}/run", lambda p: p["state"] == "done")
    assert [n for _, n in sim.world.faults.fired] == [fault] * COUNT       # the fault ran out
    assert summary.state is RunState.DONE, summary.reason
    tiles = eng.store.tiles()
    keys = [(t.slot, t.row, t.col) for t in tiles]
    assert len(keys) == 8 and len(set(keys)) == 8                           # every tile, once
    alarms = [e for e in events if isinstance(e, Alarm)]
    pauses = [a for a in alarms if "paused" in a.message]
    # One pause, one alarm: it names the device, the step, the attempts and how long.
    assert len(pauses) == 1 and pauses[0].severity == "error" and pauses[0].source == device
    assert re.search(rf"{step}.* failed \d+ times in \d+ s \(\d+ retries", pauses[0].message)
    assert over_mqtt["message"] == pauses[0].message and over_mqtt["source"] == device
    # ... within the retry window plus one attempt of the first failure.
    first_retry = next(a for a in alarms if "retry 1" in a.message)
    attempt_s = 1.0 if device == "camera" else 0.5
    assert seen_at[id(pauses[0])] - seen_at[id(first_retry)] <= RETRY_WINDOW_S + attempt_s + 1.0
    states = [e.new for e in events if isinstance(e, StateChanged)]
    assert states.count("paused") == 1 and states[-1] == "done"
    resumed = [a for a in alarms if "answers again" in a.message]
    assert len(resumed) == 1 and f"{step}" in resumed[0].message and "succeeded" in resumed[0].message
    # No "cured" notice per failure: the retries and the pause speak for them (the camera's
    # driver says once, when frames flow again, how many were lost).
    assert len([a for a in alarms if "the run goes on" in a.message]) <= 1
    probes = [e for e in eng.store.events() if e["event"] == "device_probe"]
    assert probes and all(e["device"] == device for e in probes)           # the failed tries, journalled


async def test_a_cure_repeated_is_said_once_and_then_summarised(sim: SimulatedScope, quick_scope: Scope,
                                                                tmp_path: Path) -> None:
    """Six lost replies to stage moves, each cured by the driver's re-query (the move took
    effect): one warning, then one summary with the count, not six warnings."""
    sim.inject("stage_timeout", 6, after=1, on="M")
    eng, events = engine(quick_scope, tmp_path)
    summary = await asyncio.wait_for(eng.run(), 120)
    assert summary.state is RunState.DONE and len(eng.store.tiles()) == 8
    stage = [a.message for a in events if isinstance(a, Alarm) and a.source == "stage"]
    assert len(stage) == 2, stage
    assert "took effect" in stage[0] and "cured by the driver" in stage[0]
    assert re.match(r"cured 5 more times in \d+ s after the warning; the last: .*took effect", stage[1])
    journalled = [e["message"] for e in eng.store.events() if e["event"] == "alarm" and e["source"] == "stage"]
    assert journalled == stage                                     # the journal says the same, no more


def test_cure_notices_open_a_new_warning_after_the_window() -> None:
    said: list[tuple[str, str]] = []
    notices = CureNotices(lambda src, msg, sev: said.append((src, msg)), window_s=60)
    for t in (0.0, 1.0, 2.0):
        notices.notice("camera", f"reconnected at {t}", now=t)
    notices.notice("stage", "re-query: took effect", now=3.0)
    assert said == [("camera", "reconnected at 0.0"), ("stage", "re-query: took effect")]
    notices.notice("camera", "reconnected at 61", now=61.0)            # past the window: summary, then anew
    assert said[2:] == [("camera", "cured 2 more times in 61 s after the warning; the last: reconnected at 2.0"),
                        ("camera", "reconnected at 61")]
    notices.flush(now=70.0, older_than_s=60)                           # the stage's: 67 s old, no repeats
    notices.flush(now=70.0)
    assert len(said) == 4                                              # nothing repeated, nothing more said
