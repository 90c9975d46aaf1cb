"""The simulator's TEM served through temscript's HTTP API: the same drivers that pass against
temscript's own null server meet the simulator's physics through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tapescope.acquisition.events import EventBus
from tapescope.config import parse_config
from tapescope.hardware.errors import DeviceError
from tapescope.hardware.stage import StageLimits
from tapescope.hardware.temscript_column import TemscriptColumn
from tapescope.hardware.temscript_stage import TemscriptStage
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

SMALL = WorldParams(seed=3, n_slots=4, tile_px=(128, 128), section_px=(512, 512))


async def test_the_column_driver_meets_the_simulated_physics() -> None:
    async with SimulatedScope(SMALL, column_driver="temscript") as sim:
        w = sim.world
        async with TemscriptColumn(sim.tem.url) as col:
            st = await col.status()
            assert st.beam_on and st.kv == w.p.ht_kv and st.magnification == w.column.magnification
            await col.set_focus(-1234.0)
            assert w.column.focus_nm == pytest.approx(-1234.0)
            await col.set_magnification(300.0)
            assert w.column.magnification == 300.0 and w.pixel_nm_now() == pytest.approx(w.p.pixel_nm * 16)
            await col.blank()
            assert not w.beam_on()
            await col.ensure_beam()
            assert w.beam_on()
            w.column.trip()                       # the gun trips: temscript reads 0 kV
            st = await col.status()
            assert st.high_tension == "OFF" and not st.beam_on
            with pytest.raises(DeviceError, match="at the microscope"):
                await col.ensure_beam()
            assert "PUT defocus" in sim.tem.requests


async def test_the_goniometer_driver_moves_the_simulated_stage() -> None:
    async with SimulatedScope(SMALL, stage_driver="temscript") as sim:
        w = sim.world
        async with TemscriptStage(sim.tem.url, limits=StageLimits.centred((1e6, 1e6)), poll_s=0.005) as stage:
            await stage.move_to(20_000.0, -8_000.0)
            assert await stage.position() == pytest.approx((20_000.0, -8_000.0), abs=2.0)
            assert w.stage.readback() == pytest.approx(np.array([-8_000.0, 20_000.0]), abs=2.0)
            assert "GET stage_status" in sim.tem.requests


async def test_a_run_on_the_simulated_tem_through_temscript(tmp_path: Path) -> None:
    cfg = parse_config({"run": {"slots": [0, 1], "grid": [2, 2]},
                        "scope": {"stage": {"driver": "temscript"}, "column": {"driver": "temscript"}}})
    scopes = []
    result = await run_acquisition(cfg, tmp_path / "run", EventBus(), volume=tmp_path / "volume.zarr",
                                   on_engine=lambda e: scopes.append(e.scope))
    assert isinstance(scopes[0].stage, TemscriptStage) and isinstance(scopes[0].column, TemscriptColumn)
    assert result.summary.state.value == "done", result.summary.reason
    vol = zarr.open_group(str(tmp_path / "volume.zarr"), mode="r")["0"]
    assert vol.shape[0] == 2 and float(np.std(vol[0][:])) > 0
