"""Capacity: what one scope's processing costs, stage by stage, and how many cores keep pace.

    python bench/bench_capacity.py [--grid N] [--tile-px PX] [--sections N] [--quick]

1. Stages, on two consecutive synthetic sections of N x N tiles of PX px, 8-bit, 10 %
   overlap (default 4 x 4 of 1024 px), each through the code the live processor runs:
   flat-field estimate, registration (every neighbouring pair, edge strips), the global
   solve, the unaligned render (into scratch, for the aligner), the alignment (rigid,
   affine and the live elastic pass, `pipeline.LIVE_FLOW`), the final render into the
   volume and the volume write alone. Each timed in CPU seconds of this process with one
   render thread and OpenCV at one thread, so the figure is Mpx per core-second: the
   section's acquired (tile) megapixels over the stage's CPU time.
2. From those: core-seconds per acquired Mpx, and the cores that keep pace with one TEMCA
   scope (93 Mpx/s net: 5504^2 px 8-bit tiles, ~3 a second) and with six.
3. End to end on the simulator (a run of --sections sections, 3 x 3 tiles of 512 px): the
   acquisition's tiles/s and the run's time with processing off, in the engine's process,
   and on a cluster of two `dask worker` processes with the scheduler in its own process
   (`[processing] scheduler`), both with the live elastic alignment and with rigid/affine
   alone (`elastic = false`), all in this run, on this machine; --repeats runs of each,
   interleaved, and their medians. Beside the measured pace, the best this machine allows:
   the CPU seconds per tile that acquisition needs (engine and simulator, processing off)
   and that processing adds (every process's CPU time), over the cores there are, give the
   pace at which processing keeps up, and the dask tasks' own times the pace the ordered
   part allows (pairs are made between unaligned montages and run side by side; each section
   is placed and rendered in z order).
   `--pace-only` runs this part alone.
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
import psutil

from tapescope.acquisition.events import EventBus, SectionProcessed, TileAcquired
from tapescope.alignment.align import align_section
from tapescope.alignment.pipeline import LIVE_FLOW, Canvas
from tapescope.config import parse_config
from tapescope.montage.omezarr import Volume
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
                                                       device=device, **LIVE_FLOW.section_args()))
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


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of the processes `pids` and their children, as they stand."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for q in [root, *root.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def task_seconds(stream: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Compute seconds of each dask task, by its function's name."""
    out: dict[str, list[float]] = {}
    for t in stream:
        busy = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
        out.setdefault(t["key"].split("-")[0], []).append(busy)
    return out


def one_run(tmp: Path, sections: int, processing: dict[str, Any], cluster: list[int]) -> dict[str, Any]:
    cfg = parse_config({"scope": {"camera": {"width": 512, "height": 512, "bit_depth": 8}},
                        "run": {"slot_range": [0, sections - 1], "grid": [3, 3], "exposure_ms": 5.0, "seed": 3,
                                "reimage_at_end": False},
                        "processing": processing})
    bus = EventBus()
    stamps: list[float] = []
    done: list[float] = []
    bus.subscribe(lambda e: stamps.append(time.perf_counter()) if isinstance(e, TileAcquired) else
                  done.append(time.perf_counter()) if isinstance(e, SectionProcessed) else None)
    tasks: dict[str, list[float]] = {}
    c0, k0, t0 = time.process_time(), tree_cpu_s(cluster), time.perf_counter()
    if "scheduler" in processing:
        from distributed import Client, get_task_stream

        with Client(processing["scheduler"], timeout="30s") as client, get_task_stream(client) as ts:
            result = asyncio.run(run_acquisition(cfg, tmp / "run", bus, volume=tmp / "volume.zarr"))
        tasks = task_seconds(ts.data)
    else:
        result = asyncio.run(run_acquisition(cfg, tmp / "run", bus, volume=tmp / "volume.zarr"))
    end = time.perf_counter() - t0
    own_cpu, cluster_cpu = time.process_time() - c0, tree_cpu_s(cluster) - k0
    assert result.summary.state.value == "done", result.summary.reason
    tiles = len(stamps)
    return {"tiles_per_s": (tiles - 1) / (stamps[-1] - stamps[0]), "acquired_s": stamps[-1] - t0, "run_s": end,
            "processed": len(done), "tiles": tiles, "own_cpu_s": own_cpu, "cluster_cpu_s": cluster_cpu,
            "tasks": tasks}


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def end_to_end(sections: int, repeats: int) -> dict[str, list[dict[str, Any]]]:
    print(f"== end to end: {sections} sections of 3x3 tiles of 512 px, 8-bit, the simulator; processing "
          f"elastic (the live default) or rigid/affine (elastic = false); {repeats} runs of each, interleaved")
    out: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        address, procs = start_cluster(root, 2)
        cluster = [p.pid for p in procs]
        try:
            modes = {"processing off": {"enabled": False}, "in-process": {},
                     "dask: 2 workers": {"scheduler": address},
                     "in-process, rigid": {"elastic": False},
                     "dask, rigid": {"scheduler": address, "elastic": False}}
            for k in range(repeats):
                for name, proc in modes.items():
                    where = root / f"{name}-{k}"
                    where.mkdir()
                    r = one_run(where, sections, proc, cluster if "scheduler" in proc else [])
                    out.setdefault(name, []).append(r)
                    print(f"  {name:<18} acquisition {r['tiles_per_s']:6.2f} tiles/s, tiles done at "
                          f"{r['acquired_s']:6.1f} s, run done at {r['run_s']:6.1f} s ({r['processed']} sections "
                          f"processed; CPU {r['own_cpu_s']:6.1f} s here, {r['cluster_cpu_s']:6.1f} s in the "
                          "cluster's processes)", flush=True)
        finally:
            for p in procs[1:]:
                p.kill()
            procs[0].terminate()
            for p in procs:
                p.wait(20)
    return out


def pace_bounds(e2e: dict[str, list[dict[str, Any]]], sections: int) -> None:
    """The measured pace beside what the machine's cores and the section chain allow."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    off = e2e["processing off"]
    pace = median(off, "tiles_per_s")
    tiles = median(off, "tiles")
    acquire = float(np.median([r["own_cpu_s"] / r["tiles"] for r in off]))
    print(f"== pace (medians of {len(off)} runs): processing off {pace:.2f} tiles/s; acquisition (engine and "
          f"simulator) {acquire:.3f} CPU s per tile; {cores} cores")
    for name, runs in e2e.items():
        ratio = median(runs, "tiles_per_s") / pace
        through = median(runs, "run_s") / median(off, "run_s")
        line = f"  {name:<18} acquisition pace {100 * ratio:5.1f} % of processing off; the run (to the last " \
               f"section processed) {through:5.1f} x as long"
        if name != "processing off":
            process = float(np.median([(r["own_cpu_s"] + r["cluster_cpu_s"]) / r["tiles"] - acquire for r in runs]))
            fits = min(1.0, cores / (pace * (acquire + process)))
            line += f"; processing {process:.3f} CPU s per tile -> at most {100 * fits:5.1f} % keeping up on " \
                    f"{cores} cores; {0.85 * pace * (acquire + process):.1f} cores for 85 %"
            tasks: dict[str, list[float]] = {}
            for r in runs:
                for k, v in r["tasks"].items():
                    tasks.setdefault(k, []).extend(v)
            if "align_task" in tasks and "render_task" in tasks:
                ordered = float(np.median(tasks["render_task"]))
                imaged = tiles / sections / pace
                line += f"; in z order only the placement and a render ({ordered:.2f} s a section; the pairs, " \
                        f"{np.median(tasks['align_task']):.1f} s each, and the montages, " \
                        f"{np.median(tasks.get('montage_task', [0.0])):.2f} s, run side by side) against " \
                        f"{imaged:.1f} s to image one: at most {100 * min(1.0, imaged / ordered):5.1f} % " \
                        "whatever the cores"
        print(line)


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
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end runs of each kind (medians)")
    ap.add_argument("--pace-only", action="store_true", help="the end-to-end runs only")
    ap.add_argument("--quick", action="store_true", help="3x3 tiles of 512 px, 3 sections end to end")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"),
                    help="where the stages warp and compute flow fields (processing.device); on a GPU the "
                    "figures are per GPU with one host core, not per core")
    a = ap.parse_args()
    if a.quick:
        a.grid, a.tile_px, a.sections = 3, 512, 3
    print(f"machine: {machine()}")
    if not a.pace_only:
        stage_table(a.grid, a.tile_px, a.device, a.neighbours)
    pace_bounds(end_to_end(a.sections, a.repeats), a.sections)


def stage_table(grid: int, tile_px: int, device: str, neighbours: int) -> None:
    rates = stages(grid, tile_px, device)
    total, parts = capacity(rates, neighbours)
    print(f"== capacity (live path: registration, solve, unaligned render, {neighbours} alignments, final render "
          "and write; the flat-field is estimated once a run)")
    for name, s in parts:
        if s:
            print(f"  {name:<22} {s:7.3f} core-s per Mpx  ({100 * s / total:4.1f} %)")
    print(f"  {'total':<22} {total:7.3f} core-s per Mpx = {1 / total:.2f} Mpx/s per core")
    print(f"  one scope at {SCOPE_MPX_S:g} Mpx/s: {SCOPE_MPX_S * total:.0f} cores; {SCOPES} scopes: "
          f"{SCOPES * SCOPE_MPX_S * total:.0f} cores")
    rigid, _ = capacity(rates, neighbours, elastic=False)
    print(f"  with processing.elastic = false: {rigid:.3f} core-s per Mpx = {1 / rigid:.2f} Mpx/s per core; one "
          f"scope {SCOPE_MPX_S * rigid:.0f} cores, {SCOPES} scopes {SCOPES * SCOPE_MPX_S * rigid:.0f} cores")


if __name__ == "__main__":
    main()
