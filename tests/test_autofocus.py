"""Autofocus against the simulator's true focus, over the real column and camera transports:
found from anywhere in the working range, never reported on dark or flat sweeps, and a run
out of focus without it shows in QC."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tapescope.acquisition.calibration import Autofocus
from tapescope.acquisition.events import Alarm, CalibrationDone, Event, EventBus
from tapescope.acquisition.qc import QCLimits, evaluate, sharpness
from tapescope.cli.acquire import EXIT_ATTENTION, exit_code
from tapescope.config import parse_config
from tapescope.hardware.scope import Scope
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

from .support import make_engine

TISSUE_NM = (0.0, 0.0)          # the section's centre: tissue under the beam


@pytest.fixture
async def column_scope() -> AsyncIterator[tuple[SimulatedScope, Scope]]:
    async with SimulatedScope(WorldParams(seed=3, n_slots=2, tile_px=(256, 256), section_px=(1024, 1024))) as sim:
        c = sim.scope_config()
        async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                    camera_port=c.camera.port, column_url=c.column.url) as scope:
            await scope.tape.goto(0)
            yield sim, scope


@pytest.mark.parametrize("start_um", [-3.0, -1.0, 1.0, 3.0])
async def test_autofocus_finds_focus_from_anywhere_in_the_working_range(
        start_um: float, column_scope: tuple[SimulatedScope, Scope], tmp_path: Path) -> None:
    sim, scope = column_scope
    truth = sim.world.true_focus_nm(0)
    await scope.column.set_focus(truth + start_um * 1000)
    eng, events = make_engine(scope, tmp_path, [0])
    result = await Autofocus().run(eng, at_nm=TISSUE_NM)
    assert result["ok"], result
    assert abs(result["focus_nm"] - sim.world.true_focus_nm(0)) < 100
    assert abs(sim.world.column.focus_nm - result["focus_nm"]) < 1          # the column was set there
    assert not [e for e in events if isinstance(e, Alarm)]


async def test_a_beam_trip_during_the_sweep_is_an_alarm_and_a_retry_never_success_on_dark_frames(
        column_scope: tuple[SimulatedScope, Scope], tmp_path: Path) -> None:
    sim, scope = column_scope
    truth = sim.world.true_focus_nm(0)
    await scope.column.set_focus(truth + 1000)
    sim.inject("beam_trip", after=3)                    # the fourth exposure of the sweep trips
    eng, events = make_engine(scope, tmp_path, [0])
    result = await Autofocus().run(eng, at_nm=TISSUE_NM)
    assert [n for _, n in sim.world.faults.fired] == ["beam_trip"]
    alarms = [e for e in events if isinstance(e, Alarm) and e.source == "autofocus"]
    assert len(alarms) == 1 and "dark frame" in alarms[0].message and "restoring the beam" in alarms[0].message
    assert result["ok"] and abs(result["focus_nm"] - sim.world.true_focus_nm(0)) < 100


async def test_a_beam_that_stays_off_fails_the_autofocus_with_the_focus_put_back(
        column_scope: tuple[SimulatedScope, Scope], tmp_path: Path) -> None:
    sim, scope = column_scope
    start = sim.world.true_focus_nm(0) + 550
    await scope.column.set_focus(start)
    sim.world.column.valves_open = False                # closed valves: no electrons, ensure_beam cannot help
    eng, events = make_engine(scope, tmp_path, [0])
    result = await Autofocus(tries=2).run(eng, at_nm=TISSUE_NM)
    assert not result["ok"] and "dark frame" in result["error"]
    assert abs(sim.world.column.focus_nm - start) < 1                       # not left at a sweep's edge
    failed = [e for e in events if isinstance(e, Alarm) and "autofocus failed" in e.message]
    assert len(failed) == 1 and failed[0].severity == "error"
    journal = [e for e in eng.store.events() if e["event"] == "calibration"]
    assert journal[-1]["ok"] is False and journal[-1]["trail"][-1] == "FAILED"
    assert not [e for e in events if isinstance(e, CalibrationDone) and e.ok]


async def test_a_flat_sweep_is_a_failure_not_a_focus(column_scope: tuple[SimulatedScope, Scope],
                                                     tmp_path: Path) -> None:
    sim, scope = column_scope
    start = sim.world.true_focus_nm(0)
    await scope.column.set_focus(start)
    eng, _ = make_engine(scope, tmp_path, [0])
    # Inside the aperture beside the section: bare support film, nothing to focus on.
    result = await Autofocus().run(eng, at_nm=(0.0, 2950.0))
    assert not result["ok"] and "flat" in result["error"]
    assert abs(sim.world.column.focus_nm - start) < 1


async def test_sharpness_tells_focus_from_blur_on_the_simulator(column_scope: tuple[SimulatedScope, Scope]) -> None:
    """The floor in QCLimits: in-focus simulated tiles above it, 3 um out of focus below."""
    sim, _ = column_scope
    w = sim.world
    limit = QCLimits().sharpness_min
    for dz, above in ((0, True), (500, True), (3000, False), (-3000, False)):
        w.column.focus_nm = w.true_focus_nm(0) + dz
        frame = w.expose(20.0)
        assert (sharpness(frame) >= limit) is above, (dz, sharpness(frame))
        qc = evaluate(frame, QCLimits(), reference_focus=None)
        assert ("focus" in qc.faults) is not above and (above or "out of focus" in qc.messages[0])


REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (REAL / "sstem_vnc").is_dir(), reason="the shared real data is not next to this checkout")
def test_real_tem_tiles_in_focus_are_never_judged_out_of_focus() -> None:
    import cv2
    import tifffile

    limit = QCLimits().sharpness_min
    files = sorted((REAL / "sstem_vnc").glob("*.png")) + sorted((REAL / "sstem_cardona2010").glob("*.png"))
    files += sorted((REAL / "temca_tiles").glob("*/tiles/*.tif"))
    values = []
    for f in files:
        im = tifffile.imread(f) if f.suffix == ".tif" else cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        values.append(sharpness(np.asarray(im, np.float32)))
    assert len(values) >= 40 and min(values) > 2 * limit, (min(values), limit)


async def test_a_run_out_of_focus_without_autofocus_is_not_done_in_silence(tmp_path: Path) -> None:
    run = {"scope": {"camera": {"width": 128, "height": 128}},
           "run": {"slots": [0], "grid": [2, 2], "exposure_ms": 3.0, "seed": 3, "max_retakes": 1,
                   "reimage_at_end": False},
           "processing": {"enabled": False}}
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)

    def defocus(sim: SimulatedScope) -> None:
        sim.world.column.focus_nm = sim.world.true_focus_nm(0) + 2500

    result = await run_acquisition(parse_config(run), tmp_path / "run", bus, on_sim=defocus)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert result.summary.state.value == "done"
    assert exit_code(result.summary.state, report["sections"]) == EXIT_ATTENTION
    assert all(s["status"] != "complete" for s in report["sections"]), report["sections"]
    qc_alarms = [e for e in events if isinstance(e, Alarm) and e.source == "qc" and "out of focus" in e.message]
    assert len(qc_alarms) >= 2                       # small tiles: their sharpness varies with content


def test_a_blank_tile_with_a_gradient_is_not_called_out_of_focus() -> None:
    """Resin or film past the section's edge, brighter on one side: no structure to judge
    (the resin test misses it: the gradient lifts its variation above resin's)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.8, 1.2, 256, dtype=np.float32)[None, :] * np.ones((256, 1), np.float32)
    frame = (8000 * ramp + rng.normal(0, 90, (256, 256))).astype(np.uint16)
    qc = evaluate(frame, QCLimits(), reference_focus=None)
    assert not qc.resin and np.isnan(sharpness(frame)) and "focus" not in qc.faults
