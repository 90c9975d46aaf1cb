"""Runs a peer stitcher on a tile set written by bench_stitch.py; executed by the peers' own
Python (a separate venv: ashlar and m2stitch pin versions that tapescope does not).

usage: python stitch_peers.py PEER TILESET_DIR   -> one JSON line {"positions": [[y, x], ...], "seconds": t}
Tiles are named tile_{series:05}_r{row:03}_c{col:03}.tif in raster order (tileset.write_tileset).
"""

from __future__ import annotations

import csv
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile

# m2stitch's NCC divides by the norms of the images, not of their deviations from the mean,
# so on camera counts (a large offset, small contrast) every pair scores near 0 and it
# asserts "no good top pair". Tiles are handed to it mean-subtracted; its threshold stays.
NCC_THRESHOLD = 0.5


def _read(root: Path):
    with open(root / "tiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    tiles = [tifffile.imread(root / r["file"]) for r in rows]
    grid = np.array([[int(r["row"]), int(r["col"])] for r in rows])
    nominal = np.array([[float(r["y"]), float(r["x"])] for r in rows])
    return rows, tiles, grid, nominal


def run_ashlar(root: Path, filter_sigma: float = 0.0) -> tuple[np.ndarray, float]:
    from ashlar import reg
    from ashlar.filepattern import FilePatternReader

    rows, tiles, grid, nominal = _read(root)
    # FilePatternReader places tiles on a regular grid, (row, col) * size * (1 - overlap):
    # one overlap per axis (an array broadcasts there), from the nominal steps.
    steps = []
    for axis in (0, 1):
        other = grid[:, 1 - axis]
        sel = other == other.min()
        idx, pos = grid[sel, axis], nominal[sel, axis]
        steps.append(float(np.polyfit(idx, pos, 1)[0]) if len(set(idx)) > 1 else float(tiles[0].shape[axis]))
    overlap = 1 - np.array(steps) / np.array(tiles[0].shape[:2], float)
    links = root / "ashlar"
    links.mkdir(exist_ok=True)
    for r, (gr, gc) in zip(rows, grid, strict=True):
        dst = links / f"r{gr:03d}_c{gc:03d}.tif"
        if not dst.exists():
            dst.symlink_to(root / r["file"])
    t0 = time.perf_counter()
    reader = FilePatternReader(str(links), "r{row:03}_c{col:03}.tif", overlap, pixel_size=1.0)
    # filter_sigma is ashlar's documented remedy for noisy tiles (a Gaussian before correlation).
    aligner = reg.EdgeAligner(reader, channel=0, max_shift=40, verbose=False, do_make_thumbnail=False,
                              filter_sigma=filter_sigma)
    aligner.run()
    seconds = time.perf_counter() - t0
    # Ashlar's series order is raster over its own (row, col): map back to ours.
    pos = np.zeros((len(rows), 2))
    width = int(grid[:, 1].max()) + 1
    for k, (gr, gc) in enumerate(grid):
        pos[k] = aligner.positions[gr * width + gc]
    return pos, seconds


def run_m2stitch(root: Path) -> tuple[np.ndarray, float]:
    import m2stitch

    _, tiles, grid, nominal = _read(root)
    t0 = time.perf_counter()   # the mean subtraction counts toward its time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = np.array(tiles, dtype=np.float32)
        stack -= stack.mean(axis=(1, 2), keepdims=True)
        result, _ = m2stitch.stitch_images(stack, rows=list(grid[:, 0]), cols=list(grid[:, 1]),
                                           position_initial_guess=nominal, row_col_transpose=False,
                                           ncc_threshold=NCC_THRESHOLD)
    seconds = time.perf_counter() - t0
    return result[["y_pos", "x_pos"]].to_numpy(float), seconds


if __name__ == "__main__":
    peer, root = sys.argv[1], Path(sys.argv[2])
    runners = {"ashlar": run_ashlar, "ashlar-sigma2": lambda r: run_ashlar(r, 2.0), "m2stitch": run_m2stitch}
    pos, seconds = runners[peer](root)
    print(json.dumps({"positions": pos.tolist(), "seconds": seconds}))
