"""Autofocus and focus QC against a truth: the simulator's true focus, and real TEM tiles.

1. Autofocus (calibration.Autofocus) over the real column and camera transports, from
   starts of -3, -1, +1 and +3 um off the section's true focus: the final focus against the
   truth (nm), the frames the sweeps took, the time.
2. A beam trip during the sweep (an alarm and a retry, the focus still found), and a beam
   that stays off (closed column valves: a failure, the focus put back, never `ok`).
3. The absolute sharpness of QC (qc.sharpness): simulated tiles at defocus 0..3 um, low and
   normal dose; real in-focus TEM tiles (../shared/data, skipped without it) as they are
   and blurred by 1.5 and 2 px. The floor is QCLimits.sharpness_min.
4. A run started 2 um out of focus without autofocus: tiles failing focus QC, alarms, the
   exit code (3: a section needs a person).

Run: .venv/bin/python bench/bench_autofocus.py   (SEEDS=3,5 by default)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

from tapescope.acquisition.calibration import Autofocus
from tapescope.acquisition.engine import Engine, EngineSettings
from tapescope.acquisition.events import Alarm, Event, EventBus
from tapescope.acquisition.plan import tile_grid
from tapescope.acquisition.qc import QCLimits, sharpness
from tapescope.acquisition.store import RunStore
from tapescope.cli.acquire import exit_code
from tapescope.config import parse_config
from tapescope.hardware.scope import Scope
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

SEEDS = [int(s) for s in os.environ.get("SEEDS", "3,5").split(",")]
STARTS_UM = (-3.0, -1.0, 1.0, 3.0)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_engine(scope: Scope, run_dir: Path) -> tuple[Engine, list[Event]]:
    """An engine on `scope` that a routine can run with, no run started."""
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    eng = Engine(scope, RunStore.create(run_dir / "run", "{}"), bus, slots=[0],
                 grid=tile_grid(1, 1, (512, 512), 4.0, 0.1), exposure_ms=20.0, tile_shape=(512, 512),
                 pixel_nm=4.0, settings=EngineSettings())
    return eng, events


async def with_scope(seed: int, fn) -> None:
    async with SimulatedScope(WorldParams(seed=seed, n_slots=2, tile_px=(512, 512), section_px=(2048, 2048))) as sim:
        c = sim.scope_config()
        async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                    camera_port=c.camera.port, column_url=c.column.url) as scope:
            await scope.tape.goto(0)
            await fn(sim, scope)


async def accuracy() -> None:
    print("1. autofocus from a start off the true focus (512 px tiles)")
    print(f"{'seed':>4} {'start um':>8} {'error nm':>9} {'frames':>6} {'s':>5}")
    errors = []
    for seed in SEEDS:
        for start in STARTS_UM:
            async def one(sim: SimulatedScope, scope: Scope, start: float = start, seed: int = seed) -> None:
                await scope.column.set_focus(sim.world.true_focus_nm(0) + start * 1000)
                with tempfile.TemporaryDirectory() as d:
                    eng, _ = make_engine(scope, Path(d))
                    t0 = time.perf_counter()
                    r = await Autofocus().run(eng, at_nm=(0.0, 0.0))
                    dt = time.perf_counter() - t0
                err = r["focus_nm"] - sim.world.true_focus_nm(0) if r["ok"] else float("nan")
                errors.append(abs(err))
                print(f"{seed:>4} {start:>8.1f} {err:>9.1f} {r.get('frames', 0):>6} {dt:>5.1f}"
                      + ("" if r["ok"] else f"  FAILED: {r['error']}"))
            await with_scope(seed, one)
    print(f"   |error|: median {statistics.median(errors):.1f} nm, max {max(errors):.1f} nm (target <= 100)\n")


async def beam_faults() -> None:
    print("2. the beam during the sweep")
    for seed in SEEDS:
        async def trip(sim: SimulatedScope, scope: Scope, seed: int = seed) -> None:
            await scope.column.set_focus(sim.world.true_focus_nm(0) + 1000)
            sim.inject("beam_trip", after=3)
            with tempfile.TemporaryDirectory() as d:
                eng, events = make_engine(scope, Path(d))
                r = await Autofocus().run(eng, at_nm=(0.0, 0.0))
            alarms = [e.message for e in events if isinstance(e, Alarm)]
            err = abs(r["focus_nm"] - sim.world.true_focus_nm(0)) if r["ok"] else float("nan")
            print(f"   seed {seed} beam trip at the 4th frame: ok {r['ok']}, error {err:.1f} nm, alarms {alarms}")

        async def off(sim: SimulatedScope, scope: Scope, seed: int = seed) -> None:
            start = sim.world.true_focus_nm(0) + 700
            await scope.column.set_focus(start)
            sim.world.column.valves_open = False
            with tempfile.TemporaryDirectory() as d:
                eng, events = make_engine(scope, Path(d))
                r = await Autofocus().run(eng, at_nm=(0.0, 0.0))
            alarms = [f"{e.severity}: {e.message}" for e in events if isinstance(e, Alarm)]
            print(f"   seed {seed} beam off throughout: ok {r['ok']}, focus put back "
                  f"{abs(sim.world.column.focus_nm - start) < 1}, alarms {len(alarms)}, last: {alarms[-1]}")
        await with_scope(seed, trip)
        await with_scope(seed, off)
    print()


async def sharpness_table() -> None:
    limit = QCLimits().sharpness_min
    print(f"3. QC sharpness (floor {limit:g}); simulated tiles by defocus")
    dzs = (0, 500, 1000, 1500, 2000, 3000)
    print(f"{'seed':>4} {'px':>4} {'ms':>4} " + " ".join(f"{dz:>6}" for dz in dzs))
    for seed in (1, *SEEDS):
        for px, ms in ((128, 3.0), (128, 20.0), (512, 20.0)):
            async with SimulatedScope(WorldParams(seed=seed, n_slots=2, tile_px=(px, px))) as sim:
                w = sim.world
                row = []
                for dz in dzs:
                    w.column.focus_nm = w.true_focus_nm(w.tape.beam_slot) + dz
                    row.append(sharpness(w.expose(ms)))
            print(f"{seed:>4} {px:>4} {ms:>4g} " + " ".join(f"{v:>6.2f}" for v in row))
    if not DATA.is_dir():
        print("   real data: ../shared/data not found, skipped\n")
        return
    print("   real tiles: in focus, blurred 1.5 px, blurred 2 px")
    sets = {"sstem_vnc": sorted((DATA / "sstem_vnc").glob("*.png")),
            "sstem_cardona2010": sorted((DATA / "sstem_cardona2010").glob("*.png")),
            "temca_tiles": sorted((DATA / "temca_tiles").glob("*/tiles/*.tif")),
            "fibsem_medulla (10 nm)": sorted((DATA / "fibsem_medulla").glob("*.png"))[::20]}
    for name, files in sets.items():
        vals: list[list[float]] = [[], [], []]
        for f in files:
            im = tifffile.imread(f) if f.suffix == ".tif" else cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            im = np.asarray(im, np.float32)
            vals[0].append(sharpness(im))
            vals[1].append(sharpness(cv2.GaussianBlur(im, (0, 0), 1.5)))
            vals[2].append(sharpness(cv2.GaussianBlur(im, (0, 0), 2.0)))
        print(f"   {name:24} n={len(files):3} " + "  ".join(f"{min(v):.2f}-{max(v):.2f}" for v in vals))
    print()


async def out_of_focus_run() -> None:
    print("4. a run 2 um out of focus, no autofocus (128 px tiles, 3 x 3, seed 3)")
    run = {"scope": {"camera": {"width": 128, "height": 128}},
           "run": {"slots": [0, 1], "grid": [3, 3], "exposure_ms": 3.0, "seed": 3, "reimage_at_end": False},
           "processing": {"enabled": False}}
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)

    def defocus(sim: SimulatedScope) -> None:
        sim.world.column.focus_nm = sim.world.true_focus_nm(0) + 2000

    with tempfile.TemporaryDirectory() as d:
        result = await run_acquisition(parse_config(run), Path(d) / "run", bus, on_sim=defocus)
        report = json.loads((Path(d) / "run" / "report.json").read_text())
    failed = sum(len(s["tiles_failed_qc"]) for s in report["sections"])
    alarms = [e for e in events if isinstance(e, Alarm) and "out of focus" in e.message]
    print(f"   state {result.summary.state.value}, exit code {exit_code(result.summary.state, report['sections'])}, "
          f"tiles failing focus QC {failed} of {report['tiles']}, focus alarms {len(alarms)}, sections "
          + ", ".join(f"{s['slot']}: {s['status']}" for s in report["sections"]))


async def main() -> None:
    await accuracy()
    await beam_faults()
    await sharpness_table()
    await out_of_focus_run()


if __name__ == "__main__":
    asyncio.run(main())
