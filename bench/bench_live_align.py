"""Live alignment against the truth the simulator knows: a simulated run of N sections,
processed as they are imaged, each section's alignment shift at the canvas centre compared
with the tape's true placement error of its slot (relative to the first slot).

    python bench/bench_live_align.py [--sections 10] [--grid 2 2] [--neighbours 1 3] [--look-ahead 0 4]

The specimen's sections differ as real ones do (its membranes move from section to
section), so a few px of difference is the specimen's own; what matters is whether the
error grows along z. Each `--neighbours` value is one run ([processing] align_neighbours):
1 is each section against the last good one alone (a chain), more is the last good one
and the good ones below it together; each `--look-ahead` value ([processing]
align_look_ahead) runs them again with the live window.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from tapescope.acquisition.events import EventBus
from tapescope.config import TapescopeConfig
from tapescope.runner import acquire_and_process, sim_world_params
from tapescope.sim_hardware.world import SimWorld


def run(sections: int, grid: tuple[int, int], neighbours: int, seed: int, look_ahead: int,
        ) -> tuple[np.ndarray, float]:
    base = TapescopeConfig()
    cfg = base.model_copy(update={
        "run": base.run.model_copy(update={"slots": list(range(sections)), "grid": grid, "seed": seed}),
        "processing": base.processing.model_copy(update={"align_neighbours": neighbours,
                                                         "align_look_ahead": look_ahead})})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        asyncio.run(acquire_and_process(cfg, Path(tmp), EventBus()))
        seconds = time.perf_counter() - t0
        attrs = zarr.open_group(str(Path(tmp) / "volume.zarr"), mode="r").attrs["tapescope"]["sections"]
        shifts = np.array([attrs[str(z)]["shift_px"] if attrs[str(z)]["status"] == "ok" else [np.nan, np.nan]
                           for z in range(sections)])
    world = SimWorld(sim_world_params(cfg))
    truth = (world.slot_offsets_nm[:sections] - world.slot_offsets_nm[0]) / world.p.pixel_nm
    return np.hypot(*(shifts - truth).T), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", type=int, default=10)
    ap.add_argument("--grid", type=int, nargs=2, default=(2, 2))
    ap.add_argument("--neighbours", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--look-ahead", type=int, nargs="+", default=[0])
    a = ap.parse_args()
    print(f"== live alignment: {a.sections} sections of {a.grid[0]}x{a.grid[1]} tiles, error of the shift at the "
          "canvas centre against the tape's true placement (px)")
    for n, look_ahead in [(n, w) for w in a.look_ahead for n in a.neighbours]:
        err, seconds = run(a.sections, tuple(a.grid), n, a.seed, look_ahead)
        third = max(1, len(err) // 3)
        first, last = np.nanmean(err[1:third + 1]), np.nanmean(err[-third:])
        print(f"  neighbours {n}, look-ahead {look_ahead}: RMS {np.sqrt(np.nanmean(err ** 2)):5.2f} px, "
              f"first third {first:5.2f}, last third "
              f"{last:5.2f}, {seconds / a.sections:4.1f} s/section; by z: " + " ".join(f"{e:.1f}" for e in err))


if __name__ == "__main__":
    main()
