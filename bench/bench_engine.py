"""Acquisition engine speed: its own overhead per tile against the simulated hardware time,
and end-to-end tiles/s with processing attached. Baselines measured in the same run.

- hardware loop (baseline): the bare driver calls of one tile, in sequence, over the
  simulator's real transports: stage move + settle, encoder read, camera trigger + frame,
  and the durable write (TIFF + fsync + journal line). No QC, no events, no state machine.
- engine: the same tiles through Engine.run (state machine, per-tile QC, events, progress,
  journal, the write overlapped with the next move, tile n read out while the stage moves
  to n+1); and "engine, no readout overlap" (overlap_readout=False: one TRIGGER per tile,
  the stage still until the frame is in), the engine before the camera's EXPOSE/READ split.
  overhead per tile = engine - hardware loop (negative: the engine's overlap wins more than
  its work costs); and the engine's own CPU work per tile, timed directly (QC + events).
- end to end: `run_acquisition` with processing on (stitch, align, write the volume) and
  off, tiles/s.

Target: engine overhead under 2 % of the tile cycle. Prints medians of REPEATS.
Run: make bench  (or python bench/bench_engine.py)
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tapescope.acquisition.engine import Engine, EngineSettings
from tapescope.acquisition.events import EventBus, TileAcquired
from tapescope.acquisition.plan import tile_grid
from tapescope.acquisition.qc import FocusReference, QCLimits, evaluate
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.hardware.scope import Scope
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

TILE = 512
GRID = (4, 4)
EXPOSURE_MS = 20.0
REPEATS = 3


async def hardware_loop(scope: Scope, store: RunStore, grid, slot: int) -> float:
    """Seconds per tile, first stored tile to last (as the engine is timed)."""
    stamps = []
    for t in grid:
        await scope.stage.move_to(t.x_nm, t.y_nm)
        x, y = await scope.stage.position()
        frame = await scope.camera.trigger()
        await asyncio.to_thread(store.write_tile, slot, t.row, t.col, frame.data, y_nm=y, x_nm=x,
                                meta={"frame_id": frame.frame_id})
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


async def engine_run(scope: Scope, store: RunStore, grid, slot: int, overlap: bool = True) -> float:
    """Seconds per tile, first stored tile to last: the steady tile cycle (set-up, tape move
    and planning are per section, not per tile)."""
    bus = EventBus()
    stamps: list[float] = []
    bus.subscribe(lambda e: isinstance(e, TileAcquired) and stamps.append(time.perf_counter()))
    eng = Engine(scope, store, bus, slots=[slot], grid=grid, exposure_ms=EXPOSURE_MS, tile_shape=(TILE, TILE),
                 pixel_nm=4.0, settings=EngineSettings(overlap_readout=overlap))
    summary = await eng.run()
    rejected = sum(1 for e in store.events() if e["event"] == "tile_rejected")
    assert summary.state.value == "done" and len(stamps) == len(grid) and not rejected, (summary, rejected)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def engine_cpu_per_tile(frames: list[np.ndarray]) -> float:
    """The engine's own work on a tile, off the hardware: QC + building and emitting events."""
    ref = FocusReference()
    lim = QCLimits()
    bus = EventBus()
    bus.subscribe(lambda e: None)
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        qc = evaluate(f, lim, reference_focus=ref.value, expected_shape=f.shape)
        ref.add(qc)
        bus.emit(TileAcquired(0, 0, i, i, qc.mean, 0.0, 0.0, qc.as_dict(), 1, len(frames)))
    return (time.perf_counter() - t0) / len(frames)


async def main() -> None:
    print(f"== engine overhead: {GRID[0]}x{GRID[1]} tiles of {TILE}x{TILE}, exposure {EXPOSURE_MS:g} ms, "
          f"simulator over pty + TCP")
    # Intact sections only: a damaged one would add QC retakes, which are not overhead.
    params = WorldParams(seed=2, n_slots=3 * REPEATS + 1, tile_px=(TILE, TILE), section_px=(3000, 3000),
                         p_empty=0.0, p_fold=0.0, p_tear=0.0, p_resin=0.0)
    grid = tile_grid(*GRID, (TILE, TILE), 4.0, 0.1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    hw, en, seq = [], [], []
    try:
        async with SimulatedScope(params) as sim:
            c = sim.scope_config()
            async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                        camera_port=c.camera.port) as scope:
                await scope.camera.set_exposure(EXPOSURE_MS)
                await scope.camera.arm()
                frames = [(await scope.camera.trigger()).data for _ in range(16)]
                for k in range(REPEATS):    # interleaved, so drift in the machine's load hits both
                    store_h = RunStore.create(tmp / f"hw{k}", "{}")
                    await scope.tape.goto(3 * k)
                    hw.append(await hardware_loop(scope, store_h, grid, 3 * k))
                    store_e = RunStore.create(tmp / f"en{k}", "{}")
                    await scope.tape.goto(3 * k + 1)
                    en.append(await engine_run(scope, store_e, grid, 3 * k + 1))
                    store_s = RunStore.create(tmp / f"seq{k}", "{}")
                    await scope.tape.goto(3 * k + 2)
                    seq.append(await engine_run(scope, store_s, grid, 3 * k + 2, overlap=False))
        cpu = engine_cpu_per_tile(frames)
        h, e, q = statistics.median(hw), statistics.median(en), statistics.median(seq)
        print(f"hardware loop (baseline)  {h * 1e3:8.2f} ms/tile  {1 / h:6.2f} tiles/s")
        print(f"engine, no readout overlap{q * 1e3:8.2f} ms/tile  {1 / q:6.2f} tiles/s   ratio {q / h:.3f}")
        print(f"engine                    {e * 1e3:8.2f} ms/tile  {1 / e:6.2f} tiles/s   ratio {e / h:.3f}")
        print(f"readout overlap gain      {1 / e / (1 / q):8.3f} x tiles/s (engine vs engine without the overlap)")
        print(f"overhead per tile         {(e - h) * 1e3:+8.2f} ms   = {(e - h) / h:+.1%} of the hardware cycle "
              "(target < 2 %)")
        print(f"engine CPU per tile       {cpu * 1e3:8.2f} ms   = {cpu / h:.1%} of the hardware cycle "
              "(QC + events, timed alone)")
        # End to end, with and without processing (stitch + align + volume) in the same process.
        for proc in (False, True):
            cfg = parse_config({"scope": {"camera": {"width": TILE, "height": TILE}},
                                "run": {"slot_range": [0, 2], "grid": list(GRID), "exposure_ms": EXPOSURE_MS},
                                "processing": {"enabled": proc}})
            d = tmp / f"e2e{int(proc)}"
            t0 = time.perf_counter()
            res = await run_acquisition(cfg, d, EventBus())
            dt = time.perf_counter() - t0
            n = res.summary.tiles
            print(f"end to end, processing {'on ' if proc else 'off'}  {n} tiles in {dt:6.2f} s = {n / dt:6.2f} "
                  f"tiles/s ({res.summary.state.value})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
