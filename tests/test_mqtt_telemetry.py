"""Device telemetry rates and driver-cured faults, over a real Mosquitto and the simulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tapescope.acquisition.engine import Engine, RunState
from tapescope.acquisition.events import EventBus
from tapescope.acquisition.plan import tile_grid
from tapescope.acquisition.store import RunStore
from tapescope.hardware.scope import Scope
from tapescope.sim_hardware.scope import SimulatedScope

from .support import ROOT, Watcher, bridge_for, make_engine, needs_mosquitto

STAGE = f"{ROOT}/device/stage"


def _stamped(w: Watcher, topic: str) -> list[tuple[float, dict]]:
    return [(p["time"], p) for t, p in w.seen if t == topic]


@needs_mosquitto
async def test_stage_status_at_20_hz_while_moving_and_1_hz_idle(broker, watcher, scope: Scope,
                                                                 tmp_path: Path) -> None:
    # Two tiles 460 nm apart at 200 nm/s: a move of more than 2 s between them.
    await scope.stage.set_speed(0.0002)
    grid = tile_grid(1, 2, (128, 128), 4.0, 0.1)
    eng = Engine(scope, RunStore.create(tmp_path / "run", "{}"), EventBus(), slots=[0], grid=grid,
                 exposure_ms=2.0, tile_shape=(128, 128), pixel_nm=4.0)
    async with bridge_for(broker, eng):
        summary = await eng.run()
        assert summary.state is RunState.DONE
        t_end = time.time()
        await asyncio.sleep(3.2)            # idle now: the heartbeat goes on at 1 Hz
    msgs = _stamped(watcher, STAGE)
    moving = [(t, p) for t, p in msgs if p["moving"]]
    # The longest run of consecutive moving messages: the move between the two tiles.
    t0, t1 = moving[0][0], moving[-1][0]
    assert t1 - t0 > 1.5, (t0, t1)
    rate = len([1 for t, _ in moving if t0 <= t <= t1]) / (t1 - t0)
    assert rate >= 15, rate                 # >= 20 Hz, with room for a loaded machine
    # Live encoder readings, not one value repeated: the x readout walks from tile to tile.
    xs = sorted({round(p["x_nm"]) for _, p in moving if "x_nm" in p})
    assert len(xs) >= 10 and xs[-1] - xs[0] > 200, xs
    idle = [t for t, p in msgs if t > t_end + 0.1 and not p["moving"]]
    assert len(idle) >= 2, idle             # 1 Hz: 3 in 3.1 s, 2 with margin
    assert all(not p["moving"] for t, p in msgs if t > t_end + 0.1)


@needs_mosquitto
async def test_faults_the_drivers_cure_reach_mqtt_as_warnings(broker, watcher, sim: SimulatedScope,
                                                              scope: Scope, tmp_path: Path) -> None:
    scope.stage._line.timeout_s = 0.5          # a lost reply costs half a second, not two
    eng, _ = make_engine(scope, tmp_path, [0, 1])
    sim.inject("tape_jam", clears_after=3)                 # a jam that clears within the grace time
    sim.inject("stage_timeout", on="M", after=1)           # a lost reply; the re-query finds the move done
    sim.inject("camera_disconnect", after=6, down_s=0.2)   # the camera drops the line; reconnected
    async with bridge_for(broker, eng):
        summary = await eng.run()
        assert summary.state is RunState.DONE
        for needle in ("jam at slot", "took effect", "reconnected"):
            alarm = await watcher.wait_for(f"{ROOT}/alarm", lambda p, n=needle: n in p["message"])
            assert alarm["severity"] == "warning"
    journalled = [e["message"] for e in eng.store.events() if e["event"] == "alarm"]
    assert any("jam at slot" in m for m in journalled) and any("took effect" in m for m in journalled)
