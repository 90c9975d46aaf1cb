"""The engine's state machine and operator controls, over the simulator's real transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tapescope.acquisition.engine import RunState
from tapescope.acquisition.events import Alarm, Event, SectionFinished, StateChanged, TileAcquired
from tapescope.acquisition.state import TRANSITIONS, IllegalTransition, check_transition
from tapescope.acquisition.store import RunStore
from tapescope.hardware.scope import Scope
from tapescope.sim_hardware.scope import SimulatedScope

from .support import make_engine


def states(events: list[Event]) -> list[str]:
    return [e.new for e in events if isinstance(e, StateChanged)]


async def test_runs_to_done_through_documented_states(scope: Scope, tmp_path: Path) -> None:
    eng, events = make_engine(scope, tmp_path, [0, 1])
    summary = await eng.run()
    assert summary.state is RunState.DONE and eng.state is RunState.DONE
    assert states(events) == ["preparing", "acquiring", "finishing", "done"]
    assert summary.tiles == 8
    assert summary.section_status == {0: "complete", 1: "complete"}
    tiles = [e for e in events if isinstance(e, TileAcquired)]
    assert len(tiles) == 8 and all(t.qc["faults"] == [] for t in tiles)
    assert all(abs(t.x_nm) < 1e4 and abs(t.y_nm) < 1e4 for t in tiles)   # encoder readback rides along
    assert len(eng.store.tiles()) == 8


async def test_pause_holds_at_a_tile_boundary_then_resume_completes(scope: Scope, tmp_path: Path) -> None:
    eng, events = make_engine(scope, tmp_path, [0, 1])
    paused = asyncio.Event()

    def on(ev: Event) -> None:
        if isinstance(ev, TileAcquired) and ev.slot == 0 and ev.index == 0:
            assert eng.pause("test")
        if isinstance(ev, StateChanged) and ev.new == "paused":
            paused.set()

    eng.bus.subscribe(on)
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(paused.wait(), 10)
    n_at_pause = len(eng.store.tiles())
    # While paused, the engine takes no tile: give the loop many turns and check.
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert eng.state is RunState.PAUSED
    assert len(eng.store.tiles()) == n_at_pause < 8
    assert eng.resume("test")
    summary = await asyncio.wait_for(task, 30)
    assert summary.state is RunState.DONE and summary.tiles == 8
    assert "paused" in states(events)


async def test_abort_while_paused_ends_aborted_and_keeps_stored_tiles(scope: Scope, tmp_path: Path) -> None:
    eng, _ = make_engine(scope, tmp_path, [0, 1])
    paused = asyncio.Event()
    eng.bus.subscribe(lambda ev: isinstance(ev, TileAcquired) and ev.index == 1 and eng.pause())
    eng.bus.subscribe(lambda ev: isinstance(ev, StateChanged) and ev.new == "paused" and paused.set())
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(paused.wait(), 10)
    assert eng.abort("test")
    summary = await asyncio.wait_for(task, 10)
    assert summary.state is RunState.ABORTED
    stored = eng.store.tiles()
    assert 2 <= len(stored) < 8
    assert all(RunStore.read_tile(r).shape == (128, 128) for r in stored)   # every counted tile is on disk
    assert not eng.pause() and not eng.resume() and not eng.abort()          # terminal: controls refuse


async def test_abort_before_start(scope: Scope, tmp_path: Path) -> None:
    eng, events = make_engine(scope, tmp_path, [0])
    assert not eng.skip_section()          # nothing to skip yet
    assert eng.abort()
    summary = await eng.run()
    assert summary.state is RunState.ABORTED and summary.tiles == 0
    assert states(events) == ["aborted"]


async def test_skip_section_records_it_and_goes_on(scope: Scope, tmp_path: Path) -> None:
    eng, events = make_engine(scope, tmp_path, [0, 1, 2])
    eng.bus.subscribe(lambda ev: isinstance(ev, TileAcquired) and ev.slot == 1 and ev.index == 0
                      and eng.skip_section("test"))
    summary = await eng.run()
    assert summary.state is RunState.DONE
    assert summary.section_status == {0: "complete", 1: "skipped", 2: "complete"}
    skipped = [e for e in events if isinstance(e, SectionFinished) and e.slot == 1]
    assert skipped[0].status == "skipped" and "test" in skipped[0].message
    assert len(eng.store.tiles(1)) < 4 and len(eng.store.tiles(2)) == 4


def test_transition_table_is_closed_and_terminal_states_are_final() -> None:
    for s, targets in TRANSITIONS.items():
        assert s not in targets
        for t in targets:
            assert t in TRANSITIONS
    for s in (RunState.DONE, RunState.FAILED, RunState.ABORTED):
        assert s.terminal and not TRANSITIONS[s]
    # every non-terminal state can be aborted out of (no lock-in)
    assert all(RunState.ABORTED in TRANSITIONS[s] for s in RunState if not s.terminal)
    with pytest.raises(IllegalTransition, match="done -> acquiring"):
        check_transition(RunState.DONE, RunState.ACQUIRING)


@pytest.fixture
async def scope_with_column(sim: SimulatedScope) -> AsyncIterator[Scope]:
    c = sim.scope_config()
    async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                camera_port=c.camera.port, column_url=c.column.url,
                                camera_timeout_s=0.5) as s:
        yield s


async def test_beam_trip_is_recovered_and_the_dark_tile_retaken(sim: SimulatedScope, scope_with_column: Scope,
                                                                tmp_path: Path) -> None:
    sim.world.inject("beam_trip", after=2)
    eng, _ = make_engine(scope_with_column, tmp_path, [0])
    summary = await eng.run()
    assert summary.state is RunState.DONE and summary.section_status == {0: "complete"}
    assert any(name == "beam_trip" for _, name in sim.world.faults.fired)
    rejected = [e for e in eng.store.events() if e["event"] == "tile_rejected"]
    assert rejected and rejected[0]["qc"]["faults"] == ["dark"]
    assert all(not r.meta["qc_failed"] and r.meta["qc"]["mean"] > 500 for r in eng.store.tiles())
    # A beam trip is an event the operator must see, in the journal as well as live.
    alarms = [e for e in eng.store.events() if e["event"] == "alarm"]
    assert any(e["source"] == "column" and "dark frame" in e["message"] for e in alarms)


async def test_device_that_keeps_failing_pauses_with_an_alarm_then_resumes(
        sim: SimulatedScope, scope_with_column: Scope, tmp_path: Path) -> None:
    sim.world.inject("frame_drop", count=3, after=1)          # more than the retries
    eng, events = make_engine(scope_with_column, tmp_path, [0], device_retries=1, on_device_failure="pause",
                              retry_backoff_s=0.01, retry_window_s=0.0, device_probe_s=600.0)
    paused = asyncio.Event()
    eng.bus.subscribe(lambda ev: isinstance(ev, StateChanged) and ev.new == "paused" and paused.set())
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(paused.wait(), 20)
    assert "recovering" in states(events)
    assert any(isinstance(e, Alarm) and e.source == "camera" and "failed 2 times in" in e.message
               and "(1 retry, each after a reconnect)" in e.message for e in events)
    assert eng.resume()
    summary = await asyncio.wait_for(task, 30)
    assert summary.state is RunState.DONE and summary.tiles == 4


async def test_device_failure_fails_the_run_when_so_configured(sim: SimulatedScope, scope_with_column: Scope,
                                                               tmp_path: Path) -> None:
    sim.world.inject("frame_drop", count=5)
    eng, _ = make_engine(scope_with_column, tmp_path, [0], device_retries=1, retry_backoff_s=0.01,
                         retry_window_s=0.0, on_device_failure="fail")
    summary = await asyncio.wait_for(eng.run(), 30)
    assert summary.state is RunState.FAILED and "camera trigger failed" in summary.reason


async def test_low_disk_pauses_before_the_section_and_abort_ends_it(scope: Scope, tmp_path: Path) -> None:
    eng, events = make_engine(scope, tmp_path, [0], min_free_bytes=1 << 62)      # more than any disk
    paused = asyncio.Event()
    eng.bus.subscribe(lambda ev: isinstance(ev, StateChanged) and ev.new == "paused" and paused.set())
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(paused.wait(), 20)
    assert any(isinstance(e, Alarm) and e.source == "disk" for e in events)
    assert eng.store.tiles() == []                        # nothing written once the disk was judged too full
    assert eng.abort()
    assert (await asyncio.wait_for(task, 10)).state is RunState.ABORTED


async def test_watchdog_pauses_a_stalled_run(sim: SimulatedScope, scope_with_column: Scope, tmp_path: Path) -> None:
    sim.world.inject("stage_stall", after=1)      # the second move never settles (until HALT at the timeout)
    scope_with_column.stage.settle_timeout_s = 3.0
    eng, events = make_engine(scope_with_column, tmp_path, [0], watchdog_stall_s=0.5)
    paused = asyncio.Event()
    eng.bus.subscribe(lambda ev: isinstance(ev, StateChanged) and ev.new == "paused" and paused.set())
    task = asyncio.create_task(eng.run())
    await asyncio.wait_for(paused.wait(), 30)
    assert any(isinstance(e, Alarm) and e.source == "watchdog" for e in events)
    assert eng.abort()
    assert (await asyncio.wait_for(task, 10)).state is RunState.ABORTED
