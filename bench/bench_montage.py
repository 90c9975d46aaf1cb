"""Montage benchmark: alignment accuracy against known transforms, render throughput
against the disk's own write speed, and peak memory of a large section rendered by blocks.

    python bench/bench_montage.py [--quick] [--big-px N]

1. Accuracy: stacks cut from one simulated specimen image, each section turned by up to
   5 degrees, shifted by up to 200 px, warped elastically by a few px, one section blank.
   RMS residual displacement against the truth after coarse (rigid/affine) and after fine
   (elastic) alignment, over the area each section shares with its chain of references.
   Target: RMS <= 0.5 px after fine alignment.
2. Throughput: a section of 4x4 tiles rendered shard by shard into the sharded, zstd
   OME-Zarr with its pyramid, in Mpx/s, against writing the same level-0 bytes (uint16)
   with NumPy and fsync in the same run. Target: >= 50 % of the disk.
3. Memory: a big section (default 16384^2 px) from tiles made on demand (as a TIFF
   reader would serve them), in a child process: its peak RSS against the size of the
   section as float32. Then the live processor on two 8192^2 sections (tiles in memory, as
   the run store hands them over): what it needs beyond the tiles, against the section.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tapescope.alignment.stack import AlignParams, align_stack, write_stack
from tapescope.allocator import keep_large_blocks
from tapescope.montage.omezarr import Volume
from tapescope.montage.render import render_block, render_montage
from tapescope.montage.shard_render import render_section
from tapescope.montage.synthetic import make_stack
from tapescope.montage.transform import SectionTransform


def _rms_text(r: np.ndarray | str) -> str:
    return f"{np.sqrt((r ** 2).mean()):.3f}" if isinstance(r, np.ndarray) else r


def accuracy(n: int, size: int, seeds: list[int]) -> None:
    print(f"== alignment accuracy: {len(seeds)} stacks of {n} sections, {size}x{size} px, "
          "rotation <= 5 deg, shift <= 200 px, elastic ~3 px, z=3 blank")
    all_fine, all_coarse = [], []
    for seed in seeds:
        st = make_stack(n, (size, size), seed=seed, max_rotation_deg=5, max_shift_px=200, elastic_px=3,
                        missing=(3,))
        with tempfile.TemporaryDirectory() as d:
            write_stack(Path(d) / "stack", [im * 30000 for im in st.images])
            rows = []
            for label, params in (("coarse", AlignParams(elastic=False)), ("fine", AlignParams())):
                t0 = time.perf_counter()
                res = align_stack(Path(d) / "stack", Path(d) / label, params=params)
                dt = time.perf_counter() - t0
                vol = Volume.open(res.volume)
                chain: dict[int, SectionTransform] = {}
                per = {}
                for o in res.sections:
                    if o.status != "ok" or o.z == 0:
                        if o.status != "ok":
                            per[o.z] = o.status
                        if o.z == 0:
                            chain[0] = vol.load_transform(0)
                        continue
                    t = vol.load_transform(o.z)
                    r = st.residual(o.z, t, chain={k: v for k, v in chain.items() if k})
                    chain[o.z] = t
                    per[o.z] = r
                    (all_fine if label == "fine" else all_coarse).append(r)
                rows.append((label, dt, per))
        for label, dt, per in rows:
            cells = " ".join(f"z{z}:{_rms_text(r)}" for z, r in sorted(per.items()))
            print(f"  seed {seed} {label:<6} ({dt:5.1f} s incl. render)  RMS px  {cells}")
    fine = np.concatenate(all_fine)
    coarse = np.concatenate(all_coarse)
    print(f"  overall RMS: coarse {np.sqrt((coarse ** 2).mean()):.3f} px, fine {np.sqrt((fine ** 2).mean()):.3f} px "
          f"(p99 {np.percentile(fine, 99):.3f} px, {fine.size} points); target <= 0.5 px")


def disk_write_mpx_s(path: Path, nbytes: int) -> float:
    """The disk's ceiling: the same number of bytes written with NumPy, then fsync'd."""
    buf = np.random.default_rng(0).integers(0, 65535, nbytes // 2, dtype=np.uint16)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        buf.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / 2 / dt / 1e6


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def throughput(tile: int, grid: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    step = int(tile * 0.9)
    base = make_stack(1, (step * (grid - 1) + tile, step * (grid - 1) + tile), missing=(), max_shift_px=0,
                      max_rotation_deg=0, elastic_px=0).images[0] * 20000
    tiles, pos = [], []
    for r in range(grid):
        for c in range(grid):
            y, x = r * step + rng.normal(0, 3), c * step + rng.normal(0, 3)
            iy, ix = int(np.clip(y, 0, base.shape[0] - tile)), int(np.clip(x, 0, base.shape[1] - tile))
            tiles.append(base[iy:iy + tile, ix:ix + tile].copy())
            pos.append((iy, ix))
    pos_a = np.array(pos, float)
    shape = base.shape
    c, s = np.cos(np.radians(1.5)), np.sin(np.radians(1.5))
    t = SectionTransform(np.array([[c, -s, 20.0], [s, c, -10.0]]))
    mpx = shape[0] * shape[1] / 1e6
    print(f"== render throughput: {grid}x{grid} tiles of {tile} px -> {shape[0]}x{shape[1]} px ({mpx:.0f} Mpx), "
          f"rotated 1.5 deg, sharded zstd OME-Zarr + pyramid, fsync'd; {os.cpu_count()} cores")

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def timed(fn: Callable[[], object], path: Path) -> tuple[float, float]:
        """(Mpx/s, CPU ms per Mpx over all threads) of fn, fsync of `path` included."""
        c0, t0 = cpu_s(), time.perf_counter()
        fn()
        fsync_tree(path)
        return mpx / (time.perf_counter() - t0), (cpu_s() - c0) * 1e3 / mpx

    rendered = render_montage(tiles, pos_a, np.zeros(2), shape, transform=t)[0]
    rows: dict[str, list[tuple[float, float]]] = {"disk": [], "write": [], "1": [], "2": []}
    with tempfile.TemporaryDirectory(dir=".") as d:
        for i in range(repeats):
            rows["disk"].append((disk_write_mpx_s(Path(d) / "baseline.bin", shape[0] * shape[1] * 2), 0.0))
            # The volume's own write of the same section, nothing rendered: what the format costs.
            path = Path(d) / f"w{i}.zarr"
            vol = Volume.create(path, (1, *shape), pixel_nm=4, thickness_nm=40, levels=4)
            rows["write"].append(timed(lambda v=vol: v.write_section(0, rendered, {}), path))
            for threads in (1, 2):
                path = Path(d) / f"v{i}_{threads}.zarr"
                vol = Volume.create(path, (1, *shape), pixel_nm=4, thickness_nm=40, levels=4)
                def render(v: Volume = vol, n: int = threads) -> None:
                    render_section(v, 0, tiles, pos_a, t, threads=n)
                rows[str(threads)].append(timed(render, path))
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in rows.items()}
    disk = med["disk"][0]
    print(f"  disk (NumPy, same bytes as uint16)      {disk:7.1f} Mpx/s")
    w, wc = med["write"]
    print(f"  volume write alone (no render)          {w:7.1f} Mpx/s   {w / disk:6.1%} of disk   CPU {wc:5.1f} ms/Mpx")
    for threads in ("1", "2"):
        r, rc = med[threads]
        print(f"  threads {threads}: render + write             {r:7.1f} Mpx/s   {r / disk:6.1%} of disk   "
              f"CPU {rc:5.1f} ms/Mpx   (target >= 50 % of disk)")
    # Per repeat, the render's CPU against the write's measured beside it (the machine's load
    # moves both); the median of those ratios.
    ratios = [r[1] / max(w_[1], 1e-9) for r, w_ in zip(rows["1"], rows["write"], strict=True)]
    print(f"  render + write CPU / write alone CPU     {np.median(ratios):7.2f} x   (one thread, per repeat "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; target <= 1.5 x)")
    need = 0.5 * disk * med["2"][1] / 1e3
    print(f"  50 % of this disk at this CPU cost needs about {need:.0f} cores like these "
          f"(write units are independent); the write alone needs {0.5 * disk * wc / 1e3:.0f}   (medians of {repeats})")


def lens_cost(tile: int, grid: int, repeats: int) -> None:
    """What taking the lens out costs a render: no lens, through the per-camera LensMap, and
    through the exact per-pixel inverse, alternated in one process (render only, no write)."""
    import tapescope.montage.render as render
    from tapescope.stitching.lens import RadialDistortion

    rng = np.random.default_rng(0)
    step = int(tile * 0.9)
    tiles = [rng.uniform(0, 1000, (tile, tile)).astype(np.float32) for _ in range(grid * grid)]
    pos = np.array([(r * step + rng.normal(0, 3), c * step + rng.normal(0, 3))
                    for r in range(grid) for c in range(grid)])
    side = step * (grid - 1) + tile
    lens = RadialDistortion(k1=3.0 / (2**1.5 * tile / 2))        # 3 px at the sensor's corners
    mapped = render.lens_map

    def run(which: str) -> float:
        render.lens_map = mapped if which == "map" else (lambda *a: None)
        t0 = time.perf_counter()
        for y in range(0, side, 1024):
            for x in range(0, side, 1024):
                render_block(tiles, pos, SectionTransform.identity(), (y, x, min(1024, side - y), min(1024, side - x)),
                             lens=None if which == "none" else lens)
        return side * side / 1e6 / (time.perf_counter() - t0)

    rows: dict[str, list[float]] = {"none": [], "map": [], "exact": []}
    for _ in range(repeats):
        for which in rows:
            rows[which].append(run(which))
    render.lens_map = mapped
    base = np.median(rows["none"])
    print(f"== lens: {grid}x{grid} tiles of {tile} px, 3 px at the corners, render only (median of {repeats})")
    for which, v in rows.items():
        print(f"  {which:<5} {np.median(v):6.1f} Mpx/s   time x{base / np.median(v):.2f} of no lens")


ALLOCATOR_CHILD = r"""
import sys, time, tempfile, os
import numpy as np
from pathlib import Path
if sys.argv[1] == "keep":
    from tapescope.allocator import keep_large_blocks
    assert keep_large_blocks()
from tapescope.montage.shard_render import render_section
from tapescope.montage.omezarr import Volume
from tapescope.montage.render import render_block
from tapescope.montage.transform import SectionTransform
tile, grid = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
step = int(tile * 0.9)
tiles = [rng.uniform(0, 1000, (tile, tile)).astype(np.float32) for _ in range(grid * grid)]
pos = np.array([(r * step + rng.normal(0, 3), c * step + rng.normal(0, 3)) for r in range(grid) for c in range(grid)])
c, s = np.cos(np.radians(1.5)), np.sin(np.radians(1.5))
t = SectionTransform(np.array([[c, -s, 20.0], [s, c, -10.0]]))
side = step * (grid - 1) + tile
t0 = time.perf_counter()
for y in range(0, side, 1024):
    for x in range(0, side, 1024):
        render_block(tiles, pos, t, (y, x, min(1024, side - y), min(1024, side - x)))
only = side * side / 1e6 / (time.perf_counter() - t0)
with tempfile.TemporaryDirectory(dir=os.getcwd()) as d:
    vol = Volume.create(Path(d) / "v.zarr", (1, side, side), pixel_nm=4, thickness_nm=40, levels=4)
    t0 = time.perf_counter()
    render_section(vol, 0, tiles, pos, t, threads=2)
    written = side * side / 1e6 / (time.perf_counter() - t0)
print(only, written)
"""


def allocator_effect(tile: int, grid: int, repeats: int) -> None:
    """glibc's default thresholds against `keep_large_blocks`, in fresh child processes run
    alternately: render only, and render + write (2 threads, no fsync)."""
    rows: dict[str, list[tuple[float, float]]] = {"default": [], "keep": []}
    for _ in range(repeats):
        for mode in rows:
            out = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, mode, str(tile), str(grid)],
                                 capture_output=True, text=True, check=True).stdout.split()
            rows[mode].append((float(out[0]), float(out[1])))
    print(f"== allocator: {grid}x{grid} tiles of {tile} px, rotated 1.5 deg, fresh process each (median of {repeats})")
    for mode, v in rows.items():
        print(f"  {mode:<8} render only {np.median([r[0] for r in v]):6.1f} Mpx/s   "
              f"render + write {np.median([r[1] for r in v]):6.1f} Mpx/s")


def drift(n: int, size: int, seed: int) -> None:
    """How the error grows along a chain: a longer stack (no blank section), residual
    against the truth per z over the area the chain shares (as `accuracy`), split by
    distance from the image's edge (nan: no part of that band is shared by the chain)."""
    st = make_stack(n, (size, size), seed=seed, max_rotation_deg=5, max_shift_px=100, elastic_px=3, missing=())
    bands = ((0, 32), (32, 96), (96, size))
    print(f"== drift along the chain: {n} sections of {size}x{size} px, each aligned to the one before "
          "(rigid/affine + elastic); RMS px against the truth by distance from the edge")
    step = 8
    y, x = np.mgrid[0:size:step, 0:size:step].astype(float)
    edge = np.minimum.reduce([y, x, size - 1 - y, size - 1 - x])
    with tempfile.TemporaryDirectory() as d:
        write_stack(Path(d) / "stack", [im * 30000 for im in st.images])
        res = align_stack(Path(d) / "stack", Path(d) / "out", params=AlignParams())
        vol = Volume.open(res.volume)
        chain: dict[int, SectionTransform] = {}
        for o in res.sections:
            if o.z == 0 or o.status != "ok":
                continue
            t = vol.load_transform(o.z)
            err = st.residual_map(o.z, t, step=step, chain=chain)
            chain[o.z] = t
            cells = []
            for lo, hi in bands:
                e = err[(edge >= lo) & (edge < hi)]
                e = e[np.isfinite(e)]
                cells.append(f"{lo}-{min(hi, size // 2)} px: {np.sqrt((e ** 2).mean()) if e.size else np.nan:5.2f}")
            print(f"  z{o.z:<3d} " + "   ".join(cells))


def zstd_tradeoff(size: int, repeats: int) -> None:
    """Level 0's zstd level: bytes on disk against write speed, the same section both ways."""
    img = make_stack(1, (size, size), missing=(), max_shift_px=0, max_rotation_deg=0, elastic_px=0).images[0] * 20000
    mpx = size * size / 1e6
    print(f"== zstd level of level 0: one {size}x{size} px simulated section ({mpx:.0f} Mpx), write_section + fsync")
    with tempfile.TemporaryDirectory(dir=".") as d:
        res: dict[int, list[tuple[float, int]]] = {1: [], 3: []}
        for i in range(repeats):
            for level in (1, 3):
                path = Path(d) / f"z{level}_{i}.zarr"
                vol = Volume.create(path, (1, size, size), pixel_nm=4, thickness_nm=40, levels=4, zstd_level0=level)
                t0 = time.perf_counter()
                vol.write_section(0, img, {})
                fsync_tree(path)
                dt = time.perf_counter() - t0
                nbytes = sum(f.stat().st_size for f in (path / "0").rglob("*") if f.is_file())
                res[level].append((mpx / dt, nbytes))
        for level, rows in res.items():
            speed = np.median([r[0] for r in rows])
            print(f"  zstd {level}: write {speed:6.1f} Mpx/s   level 0 {rows[0][1] / 2**20:6.1f} MiB "
                  f"({rows[0][1] / (size * size * 2):.1%} of raw uint16)")


MEMORY_CHILD = r"""
import sys, numpy as np, tempfile, time
from pathlib import Path
from tapescope.allocator import keep_large_blocks
keep_large_blocks()     # as the application runs
from tapescope.montage.shard_render import render_section
from tapescope.montage.omezarr import Volume
from tapescope.montage.transform import SectionTransform

class MadeOnDemand:
    '''A tile whose pixels are computed for the part that is read, as a TIFF reader serves them.'''
    def __init__(self, oy, ox, n):
        self.oy, self.ox, self.shape = oy, ox, (n, n)
    def __getitem__(self, key):
        ys, xs = key
        y = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None] + self.oy
        x = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :] + self.ox
        return (20000 + 8000 * np.sin(x / 37.0) * np.cos(y / 23.0)).astype(np.float32)

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
size, tile = int(sys.argv[1]), int(sys.argv[2])
step = int(tile * 0.9)
n = -(-(size - tile) // step) + 1
tiles, pos = [], []
for r in range(n):
    for c in range(n):
        tiles.append(MadeOnDemand(r * step, c * step, tile)); pos.append((r * step, c * step))
before = hwm()
with tempfile.TemporaryDirectory(dir='.') as d:
    vol = Volume.create(Path(d) / 'big.zarr', (1, size, size), pixel_nm=4, thickness_nm=40, levels=5)
    t0 = time.perf_counter()
    st = render_section(vol, 0, tiles, np.array(pos, float), SectionTransform.translation(3.5, -2.25))
    dt = time.perf_counter() - t0
print(f'{len(tiles)} {before:.0f} {hwm():.0f} {dt:.1f}')
"""


def memory(size: int, tile: int) -> None:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(size), str(tile)], capture_output=True,
                         text=True, check=True).stdout.split()
    n, before, peak, dt = int(out[0]), float(out[1]), float(out[2]), float(out[3])
    whole = size * size * 4 / 2**20
    print(f"== memory: {size}x{size} px section from {n} tiles of {tile} px, rendered by blocks in {dt:.0f} s")
    print(f"  peak RSS {peak:.0f} MiB (after imports {before:.0f} MiB); the section whole as float32 "
          f"would be {whole:.0f} MiB: peak/whole {peak / whole:.1%}")


LIVE_MEMORY_CHILD = r"""
import sys, numpy as np, tempfile, threading, time, cv2
from pathlib import Path
from tapescope.montage.omezarr import Volume
from tapescope.alignment.pipeline import Canvas, SectionProcessor

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
def hwm():
    return status('VmHWM')
# Anonymous memory is what the process really holds; file-backed pages (the memory-mapped
# scratch files) count in RSS but the kernel drops them under pressure: sampled apart.
peak_anon = [0.0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status('RssAnon'))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
size, tile = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
step = int(tile * 0.9)
n = -(-(size - tile) // step) + 1
before = hwm()
# Texture with a 6 px grain, made a tile at a time (never the whole section): tiles as the
# store hands them to processing, uint16.
def tile_at(y, x, seed):
    r = np.random.default_rng([seed, y, x]).normal(0, 1, (tile + 64, tile + 64)).astype(np.float32)
    return np.clip(20000 + 4000 * cv2.GaussianBlur(r, (0, 0), 6)[32:-32, 32:-32] * 6, 0, 65535).astype(np.uint16)
grid = [(r, c) for r in range(n) for c in range(n)]
pos = np.array([(r * step, c * step) for r, c in grid], float)
tiles = [tile_at(int(y), int(x), 1) for y, x in pos]
with_tiles = hwm()
anon_tiles = status('RssAnon')
with tempfile.TemporaryDirectory(dir='.') as d:
    canvas = Canvas.around(pos, (tile, tile), 64)
    vol = Volume.create(Path(d) / 'live.zarr', (2, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=4)
    proc = SectionProcessor(vol, canvas, elastic=False, lens='none')
    t0 = time.perf_counter()
    proc.process(0, tiles, pos, grid, {})
    proc.process(1, tiles, pos + 2.5, grid, {})
    dt = time.perf_counter() - t0
time.sleep(0.05)
print(f'{len(tiles)} {canvas.shape[0]} {canvas.shape[1]} {before:.0f} {with_tiles:.0f} {hwm():.0f} {dt:.1f} '
      f'{anon_tiles:.0f} {peak_anon[0]:.0f}')
"""


def live_memory(size: int, tile: int) -> None:
    """The live processor (stitch, align to the previous section, write) on two sections:
    its peak RSS beyond the tiles it is handed, against the section as float32."""
    out = subprocess.run([sys.executable, "-c", LIVE_MEMORY_CHILD, str(size), str(tile)], capture_output=True,
                         text=True, check=True).stdout.split()
    n, h, w = int(out[0]), int(out[1]), int(out[2])
    before, with_tiles, peak, dt, anon_tiles, anon_peak = (float(v) for v in out[3:])
    whole = h * w * 4 / 2**20
    print(f"== live memory: two {h}x{w} px sections from {n} tiles of {tile} px each, processed "
          f"(stitch, rigid/affine alignment, volume write) in {dt:.0f} s")
    print(f"  peak RSS {peak:.0f} MiB (imports {before:.0f}, + tiles handed in {with_tiles - before:.0f}); "
          f"anonymous memory beyond the tiles at its peak {anon_peak - anon_tiles:.0f} MiB; the section as "
          f"float32 {whole:.0f} MiB: anonymous/section {(anon_peak - anon_tiles) / whole:.0%} "
          "(the rest of RSS is memory-mapped scratch the kernel can drop)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one stack")
    ap.add_argument("--big-px", type=int, default=16384, help="side of the memory test's section")
    a = ap.parse_args()
    keep_large_blocks()       # as the application runs (tapescope.allocator)
    if a.quick:
        accuracy(6, 640, [0])
        drift(8, 640, 0)
        throughput(1024, 3, 2)
        allocator_effect(1024, 3, 2)
        lens_cost(1024, 3, 2)
        zstd_tradeoff(2048, 2)
        memory(4096, 1024)
        live_memory(3072, 512)
    else:
        accuracy(6, 1024, [0, 1])
        drift(16, 768, 0)
        throughput(2048, 4, 5)
        allocator_effect(2048, 4, 3)
        lens_cost(2048, 3, 3)
        zstd_tradeoff(4096, 3)
        memory(a.big_px, 4096)
        live_memory(8192, 1024)


if __name__ == "__main__":
    main()
