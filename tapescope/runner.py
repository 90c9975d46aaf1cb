"""Wire a run together: scope (real or simulated), store, engine, processing, volume."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapescope.acquisition.engine import Engine, RunSummary
from tapescope.acquisition.events import EventBus
from tapescope.acquisition.pipeline import ProcessingWorker
from tapescope.acquisition.plan import TilePlan, tile_grid
from tapescope.acquisition.store import RunStore
from tapescope.config import ScopeConfig, TapescopeConfig
from tapescope.hardware.scope import Scope
from tapescope.montage.omezarr import Volume
from tapescope.montage.pipeline import Canvas, SectionProcessor

ALIGN_MARGIN_PX = 256   # canvas border that absorbs section offsets on the tape


@dataclass
class RunResult:
    summary: RunSummary
    run_dir: Path
    volume: Path
    worker: ProcessingWorker


def sim_world_params(cfg: TapescopeConfig):  # -> WorldParams; imported lazily (sim only)
    from tapescope.sim_hardware.world import WorldParams

    cam, run = cfg.scope.camera, cfg.run
    rows, cols = run.grid
    ext_y = cam.height * (1 + (rows - 1) * (1 - run.overlap))
    ext_x = cam.width * (1 + (cols - 1) * (1 - run.overlap))
    pad = 2 * ALIGN_MARGIN_PX + 128
    return WorldParams(
        seed=run.seed, n_slots=max(run.slots) + 1, tile_px=(cam.height, cam.width),
        pixel_nm=cam.pixel_size_nm, section_px=(int(ext_y) + pad, int(ext_x) + pad),
        thickness_nm=cfg.processing.section_thickness_nm,
    )


@contextlib.asynccontextmanager
async def open_scope(cfg: TapescopeConfig) -> AsyncIterator[tuple[Scope, ScopeConfig]]:
    """Connect to the configured scope; start the simulator for ports left unset."""
    sim = None
    scope_cfg = cfg.scope
    if scope_cfg.simulated:
        from tapescope.sim_hardware.scope import SimulatedScope

        sim = SimulatedScope(sim_world_params(cfg))
        await sim.start()
        scope_cfg = sim.scope_config(scope_cfg)
    s, t, c = scope_cfg.stage, scope_cfg.tape, scope_cfg.camera
    assert s.url and t.url and c.port is not None
    scope = Scope.from_ports(
        stage_url=s.url, tape_url=t.url, camera_host=c.host, camera_port=c.port,
        serial_timeout_s=s.timeout_s, settle_timeout_s=s.settle_timeout_s,
        tape_move_timeout_s=t.move_timeout_s, camera_timeout_s=c.timeout_s, baudrate=s.baudrate,
        column_url=scope_cfg.column.url, column_ramp_timeout_s=scope_cfg.column.ramp_timeout_s,
    )
    try:
        async with scope:
            yield scope, scope_cfg
    finally:
        if sim is not None:
            await sim.stop()


def plan_grid(cfg: TapescopeConfig) -> list[TilePlan]:
    cam = cfg.scope.camera
    return tile_grid(*cfg.run.grid, (cam.height, cam.width), cam.pixel_size_nm, cfg.run.overlap)


async def acquire_and_process(cfg: TapescopeConfig, out_dir: Path, bus: EventBus, *,
                              on_engine: Callable[[Engine], None] | None = None) -> RunResult:
    """Image every planned slot and write the aligned volume to OUT/volume.zarr.

    ``on_engine`` receives the engine before it starts (the GUI uses it for run control)."""
    # Set-up I/O happens once, before any device moves; blocking here is harmless.
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    run_dir, vol_path = out_dir / "run", out_dir / "volume.zarr"
    store = RunStore.create(run_dir, cfg.model_dump_json(indent=2))
    grid = plan_grid(cfg)
    cam = cfg.scope.camera
    slots = sorted(cfg.run.slots)          # tape order
    z_of_slot = {s: k for k, s in enumerate(slots)}
    centres = np.array([[t.y_nm, t.x_nm] for t in grid]) / cam.pixel_size_nm
    canvas = Canvas.around(centres - (cam.height / 2, cam.width / 2), (cam.height, cam.width),
                           ALIGN_MARGIN_PX)
    proc = cfg.processing
    volume = Volume.create(vol_path, (len(slots), *canvas.shape), pixel_nm=cam.pixel_size_nm,
                           thickness_nm=proc.section_thickness_nm, levels=proc.pyramid_levels,
                           chunk=proc.chunk)
    processor = SectionProcessor(volume, canvas, align=proc.align)
    worker = ProcessingWorker(store, processor, bus, z_of_slot=z_of_slot, pixel_nm=cam.pixel_size_nm,
                              flatfield=proc.flatfield)
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    async with open_scope(cfg) as (scope, _):
        engine = Engine(scope, store, bus, slots=slots, grid=grid, exposure_ms=cfg.run.exposure_ms,
                        section_queue=queue, tile_shape=(cam.height, cam.width), pixel_nm=cam.pixel_size_nm)
        if on_engine is not None:
            on_engine(engine)
        consumer = asyncio.create_task(worker.run(queue))
        try:
            summary = await engine.run()
        finally:
            # Processing finishes what was acquired even if acquisition failed.
            await consumer
    for slot in slots:
        if slot not in worker.reports and slot not in worker.failed:
            processor.record_missing(z_of_slot[slot], {"slot": slot, "z": z_of_slot[slot]},
                                     f"not acquired (run {summary.state.value})")
    return RunResult(summary, run_dir, vol_path, worker)
