"""Capacity: what one scope's processing costs, stage by stage, and how many cores keep pace.

    python bench/bench_capacity.py [--grid N] [--tile-px PX] [--sections N] [--quick]

1. Stages, on two consecutive synthetic sections of N x N tiles of PX px, 8-bit, 10 %
   overlap (default 4 x 4 of 1024 px), each through the code the live processor runs:
   flat-field estimate, registration (every neighbouring pair, edge strips), the global
   solve, the unaligned render (into scratch, for the aligner), the alignment (rigid,
   affine and the live elastic pass, `pipeline.LIVE_ELASTIC`), the final render into the
   volume and the volume write alone. Each timed in CPU seconds of this process with one
   render thread and OpenCV at one thread, so the figure is Mpx per core-second: the
   section's acquired (tile) megapixels over the stage's CPU time.
2. From those: core-seconds per acquired Mpx, and the cores that keep pace with one TEMCA
   scope (93 Mpx/s net: 5504^2 px 8-bit tiles, ~3 a second) and with six.
3. End to end on the simulator (a run of --sections sections, 3 x 3 tiles of 512 px): the
   acquisition's tiles/s and the run's time with processing off, in the engine's process,
   and on a cluster of two `dask worker` processes with the scheduler in its own process
   (`[processing] scheduler`), all in this run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tapescope.acquisition.events import EventBus, SectionProcessed, TileAcquired
from tapescope.config import parse_config
from tapescope.montage.align import align_section
from tapescope.montage.omezarr import Volume
from tapescope.montage.pipeline import LIVE_ELASTIC, Canvas
from tapescope.montage.shard_render import render_section, render_to
from tapescope.montage.synthetic import make_stack
from tapescope.montage.transform import SectionTransform
from tapescope.runner import run_acquisition
from tapescope.stitching.flatfield import FlatFielded, estimate_flatfield
from tapescope.stitching.section import strip_width
from tapescope.stitching.stream import StreamingStitcher

SCOPE_MPX_S = 93.0      # one TEMCA scope, net (docs/capacity.md)
SCOPES = 6


def cpu_timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, CPU seconds of this process, wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def section_tiles(img: np.ndarray, grid: int, tile: int, step: int, gain: np.ndarray,
                  rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, list[tuple[int, int]]]:
    """One section's 8-bit tiles (with the camera's gain and shot noise), their stage
    positions (a few px off, as a stage places them) and grid cells."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    tiles, pos = [], []
    for r, c in cells:
        crop = img[r * step:r * step + tile, c * step:c * step + tile] * gain
        tiles.append(np.clip(crop * 200 + rng.normal(0, 3, crop.shape), 0, 255).astype(np.uint8))
        pos.append((r * step + rng.normal(0, 4), c * step + rng.normal(0, 4)))
    return tiles, np.array(pos), cells


def stages(grid: int, tile: int, device: str = "cpu") -> dict[str, float]:
    """Mpx of acquired tiles per CPU second, per stage (one thread)."""
    cv2.setNumThreads(1)
    step = round(tile * 0.9)
    side = step * (grid - 1) + tile
    print(f"== stages: 2 sections of {grid}x{grid} tiles of {tile} px, 8-bit, 10 % overlap "
          f"(canvas {side}x{side} px); one thread, CPU seconds")
    t0 = time.perf_counter()
    st = make_stack(2, (side, side), seed=4, max_rotation_deg=1.0, max_shift_px=12, elastic_px=1.0, missing=())
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:tile, 0:tile] / tile - 0.5
    cam_gain = (1 - 0.25 * (yy ** 2 + xx ** 2)).astype(np.float32)        # vignetting
    sections = [section_tiles(im, grid, tile, step, cam_gain, rng) for im in st.images]
    print(f"   (made in {time.perf_counter() - t0:.1f} s)")
    tiles0, pos0, cells = sections[0]
    tiles1, pos1, _ = sections[1]
    mpx = len(tiles1) * tile * tile / 1e6                 # one section's acquired pixels
    rates: dict[str, float] = {}

    def report(name: str, cpu: float, wall: float, px: float = mpx) -> None:
        rates[name] = px / cpu
        print(f"  {name:<22} {px:7.1f} Mpx  {cpu:7.2f} s CPU  {wall:7.2f} s wall  {px / cpu:8.2f} Mpx/s per core")

    gain, cpu, wall = cpu_timed(lambda: estimate_flatfield(tiles0 + tiles1))
    report("flat-field estimate", cpu, wall, 2 * mpx)
    strip = strip_width(tiles1[0].shape, pos1, cells)

    def register() -> StreamingStitcher:
        s = StreamingStitcher(gain=gain, strip_px=strip)
        for t, rc, p in zip(tiles1, cells, pos1, strict=True):
            s.add(rc, t, p)
        return s

    stitcher, cpu, wall = cpu_timed(register)
    report("registration", cpu, wall)
    result, cpu, wall = cpu_timed(lambda: stitcher.finish(lens="none"))
    report("solve", cpu, wall)
    positions = result.solution.positions
    ff = [FlatFielded(t, gain) for t in tiles1]
    canvas = Canvas.around(positions, (tile, tile), 64)
    oy, ox = np.asarray(canvas.origin, float)
    with tempfile.TemporaryDirectory() as d:
        image = np.lib.format.open_memmap(Path(d) / "i.npy", "w+", np.float32, canvas.shape)
        cover = np.lib.format.open_memmap(Path(d) / "c.npy", "w+", np.float32, canvas.shape)
        _, cpu, wall = cpu_timed(lambda: render_to(image, cover, ff, positions,
                                                   SectionTransform.identity().shifted(oy, ox), threads=1,
                                                   device=device))
        report("render (unaligned)", cpu, wall)
        # The reference: section 0 stitched by its stage positions, rendered the same way.
        ref = np.zeros(canvas.shape, np.float32)
        ref_cover = np.zeros(canvas.shape, np.float32)
        render_to(ref, ref_cover, [FlatFielded(t, gain) for t in tiles0], pos0,
                  SectionTransform.identity().shifted(oy, ox), threads=1)
        a, cpu, wall = cpu_timed(lambda: align_section(ref, image, ref_cover > 0.5, cover > 0.5, elastic=True,
                                                       device=device, **LIVE_ELASTIC))
        report("alignment (1 neighbour)", cpu, wall)
        _, cpu, wall = cpu_timed(lambda: align_section(ref, image, ref_cover > 0.5, cover > 0.5, elastic=False,
                                                       device=device))
        report("  the same, elastic off", cpu, wall)
        vol = Volume.create(Path(d) / "v.zarr", (2, *canvas.shape), pixel_nm=4, thickness_nm=40, dtype="uint8")
        _, cpu, wall = cpu_timed(lambda: render_section(vol, 1, ff, positions, a.transform.shifted(oy, ox),
                                                        threads=1, device=device))
        report("render + write", cpu, wall)
        plane = np.asarray(vol.levels[0][1])
        _, cpu, wall = cpu_timed(lambda: vol.write_section(0, plane, {}))
        report("write alone", cpu, wall)
    return rates


def capacity(rates: dict[str, float], neighbours: int, elastic: bool = True) -> tuple[float, list[tuple[str, float]]]:
    """Core-seconds per acquired Mpx for the live path (the final render includes the write;
    alignment once per neighbour), and each stage's share."""
    align = rates["alignment (1 neighbour)" if elastic else "  the same, elastic off"]
    per = {
        "flat-field estimate": 0.0,   # once a run (256 tiles): nothing per section
        "registration": 1 / rates["registration"],
        "solve": 1 / rates["solve"],
        "render (unaligned)": 1 / rates["render (unaligned)"],
        "alignment": neighbours / align,
        "render + write": 1 / rates["render + write"],
    }
    return sum(per.values()), list(per.items())


# -- end to end ---------------------------------------------------------------------------------

def start_cluster(tmp: Path, workers: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A `dask scheduler` process and `workers` `dask worker` processes on 127.0.0.1."""
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for i in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
             "--nthreads", "1", "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    address = json.loads(sched_file.read_text())["address"]
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(workers, timeout=60)
    return address, procs


def one_run(tmp: Path, sections: int, processing: dict[str, Any]) -> dict[str, float]:
    cfg = parse_config({"scope": {"camera": {"width": 512, "height": 512, "bit_depth": 8}},
                        "run": {"slot_range": [0, sections - 1], "grid": [3, 3], "exposure_ms": 5.0, "seed": 3,
                                "reimage_at_end": False},
                        "processing": processing})
    bus = EventBus()
    stamps: list[float] = []
    done: list[float] = []
    bus.subscribe(lambda e: stamps.append(time.perf_counter()) if isinstance(e, TileAcquired) else
                  done.append(time.perf_counter()) if isinstance(e, SectionProcessed) else None)
    t0 = time.perf_counter()
    result = asyncio.run(run_acquisition(cfg, tmp / "run", bus, volume=tmp / "volume.zarr"))
    end = time.perf_counter() - t0
    assert result.summary.state.value == "done", result.summary.reason
    tiles = len(stamps)
    return {"tiles_per_s": (tiles - 1) / (stamps[-1] - stamps[0]), "acquired_s": stamps[-1] - t0, "run_s": end,
            "processed": len(done), "tiles": tiles}


def end_to_end(sections: int) -> dict[str, dict[str, float]]:
    print(f"== end to end: {sections} sections of 3x3 tiles of 512 px, 8-bit, the simulator; processing "
          "elastic (the live default)")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        address, procs = start_cluster(root, 2)
        try:
            modes = {"processing off": {"enabled": False}, "in-process": {},
                     "dask: 2 workers": {"scheduler": address}}
            for name, proc in modes.items():
                (root / name).mkdir()
                r = one_run(root / name, sections, proc)
                out[name] = r
                print(f"  {name:<16} acquisition {r['tiles_per_s']:6.2f} tiles/s, tiles done at "
                      f"{r['acquired_s']:6.1f} s, run done at {r['run_s']:6.1f} s ({r['processed']} sections "
                      "processed)", flush=True)
        finally:
            for p in procs[1:]:
                p.kill()
            procs[0].terminate()
            for p in procs:
                p.wait(20)
    return out


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, load {load:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--tile-px", type=int, default=1024)
    ap.add_argument("--sections", type=int, default=6)
    ap.add_argument("--neighbours", type=int, default=2, help="alignments per section (processing.align_neighbours)")
    ap.add_argument("--quick", action="store_true", help="3x3 tiles of 512 px, 3 sections end to end")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"),
                    help="where the stages warp and compute flow fields (processing.device); on a GPU the "
                    "figures are per GPU with one host core, not per core")
    a = ap.parse_args()
    if a.quick:
        a.grid, a.tile_px, a.sections = 3, 512, 3
    print(f"machine: {machine()}")
    rates = stages(a.grid, a.tile_px, a.device)
    total, parts = capacity(rates, a.neighbours)
    print(f"== capacity (live path: registration, solve, unaligned render, {a.neighbours} alignments, final render "
          "and write; the flat-field is estimated once a run)")
    for name, s in parts:
        if s:
            print(f"  {name:<22} {s:7.3f} core-s per Mpx  ({100 * s / total:4.1f} %)")
    print(f"  {'total':<22} {total:7.3f} core-s per Mpx = {1 / total:.2f} Mpx/s per core")
    print(f"  one scope at {SCOPE_MPX_S:g} Mpx/s: {SCOPE_MPX_S * total:.0f} cores; {SCOPES} scopes: "
          f"{SCOPES * SCOPE_MPX_S * total:.0f} cores")
    rigid, _ = capacity(rates, a.neighbours, elastic=False)
    print(f"  with processing.elastic = false: {rigid:.3f} core-s per Mpx = {1 / rigid:.2f} Mpx/s per core; one "
          f"scope {SCOPE_MPX_S * rigid:.0f} cores, {SCOPES} scopes {SCOPES * SCOPE_MPX_S * rigid:.0f} cores")
    e2e = end_to_end(a.sections)
    off = e2e["processing off"]["tiles_per_s"]
    for name, r in e2e.items():
        print(f"  {name:<16} acquisition pace {100 * r['tiles_per_s'] / off:5.1f} % of processing off")


if __name__ == "__main__":
    main()
