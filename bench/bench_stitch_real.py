"""Stitching real TEMCA tiles: tapescope against ashlar and the published `render` positions.

Data: `temca_tiles/` of the shared real-data folder next to the repository (2 x 2 montages of
8-bit TEMCA camera frames, each with the positions that the Janelia/Allen `render` project
stores for them, lens terms left out: a reference within 1-2 px, not a truth). Skipped where
the folder is absent.

1. Each set as a user would stitch it (`run_stitch`: flat-field estimated, lens
   "estimate"; a translation per tile, and an affine per tile as for a camera array,
   `--tile-model affine`), ashlar's EdgeAligner on the same files (the peers' venv, see
   bench_stitch.py), and render's positions. Per method: pairs used, distance from render's
   positions (where each tile's centre lands in tile 0's pixels, less the centre, as the
   reference gives them; RMS and max over tiles, after removing the mean translation), and
   the seams: mean NCC of each overlap after placing the tiles (`seam_ncc`, the same
   measure for every method).
2. Narrow overlaps on real tiles: each pair's tiles are cropped so that they share only a
   strip of W px in the middle of their overlap, registered from a nominal off by 2.5 px
   RMS, and compared with the same pair registered on a 64 px window centred on the same
   place (so that the lens's change across a wide overlap does not enter the comparison).
   Real neighbours are not related by a pure translation (lens, scan distortion: windows
   128 px wide at the middle of one overlap differ from the whole overlap's offset by up
   to half a pixel), so this bounds the narrow strip's error from above; what it shows is
   whether narrowing the strip adds error to what a wide window measures there.

Run: .venv/bin/python bench/bench_stitch_real.py
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_stitch import run_peer  # the peers' runner: one place that knows their venv
from scipy import ndimage

from tapescope.stitching.backend import CPU
from tapescope.stitching.register import register_pair
from tapescope.stitching.tileset import load_tiles, read_tiles_csv, run_stitch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "temca_tiles"
SETS = ("render_perf", "render_temca")
WIDTHS = (6, 8, 10, 12, 16, 24, 32)
REFERENCE_PX = 64      # the narrow strips' reference: the pair registered on this wide a window
MARGIN = 96            # px each cropped tile keeps beyond the strip
DRAWS = 8              # nominal perturbations per pair and width
STAGE_ERROR_PX = 2.5   # RMS, 2-D


def render_positions(root: Path, files: list[str]) -> np.ndarray:
    with open(root / "render_positions.csv") as fh:
        by_file = {r["file"]: (float(r["y"]), float(r["x"])) for r in csv.DictReader(fh)}
    return np.array([by_file[f] for f in files])


def centred(p: np.ndarray) -> np.ndarray:
    return p - p.mean(axis=0)


def seam_ncc(tiles: list[np.ndarray], pos: np.ndarray, pairs: list[tuple[int, int]],
             linear: np.ndarray | None = None) -> float:
    """Mean NCC of the overlaps: tile j resampled (cubic spline) on tile i's pixels through
    where the method puts both (a translation each, or with `linear` an affine each), over
    the pixels of i that j covers, 4 px in from j's edges. One measure for every method."""
    lin = np.tile(np.eye(2), (len(pos), 1, 1)) if linear is None else linear
    out = []
    for i, j in pairs:
        inv = np.linalg.inv(lin[i])
        rel, off = inv @ lin[j], inv @ (pos[j] - pos[i])      # tile-j pixel -> tile-i pixel
        back = np.linalg.inv(rel)
        b = ndimage.affine_transform(tiles[j].astype(np.float32), back, offset=-back @ off,
                                     output_shape=tiles[i].shape, order=3, cval=np.nan)
        q = np.stack(np.mgrid[0:tiles[i].shape[0], 0:tiles[i].shape[1]], -1).reshape(-1, 2) @ back.T - back @ off
        h, w = tiles[j].shape
        inside = ((q[:, 0] >= 4) & (q[:, 0] <= h - 5) & (q[:, 1] >= 4) & (q[:, 1] <= w - 5)).reshape(tiles[i].shape)
        if inside.sum() < 64:
            continue
        ca, cb = tiles[i].astype(np.float32)[inside], b[inside]
        ca, cb = ca - ca.mean(), cb - cb.mean()
        out.append(float((ca * cb).sum() / np.sqrt((ca * ca).sum() * (cb * cb).sum())))
    return float(np.mean(out))


def in_first_tile(pos: np.ndarray, linear: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Each tile's place as render's reference gives it: where its centre lands, in tile 0's
    pixels, less the centre (for a translation each: the positions less tile 0's)."""
    if linear is None:
        return pos - pos[0]
    c = (np.array(shape, float) - 1) / 2
    inv = np.linalg.inv(linear[0])
    return (pos + linear @ c - pos[0]) @ inv.T - c


def whole_sets() -> None:
    print("1. Real 2 x 2 TEMCA montages: distance from render's positions, and the seams")
    header = f"{'set':<14} {'method':<17} {'pairs used':>10} {'RMS px':>7} {'max px':>7} {'seam NCC':>9}"
    print(header)
    print("-" * len(header))
    for name in SETS:
        root = DATA / name
        ts = read_tiles_csv(root / "tiles")
        tiles = load_tiles(ts)
        ref = render_positions(root, ts.files)
        pairs = [(i, j) for i in range(len(ts.grid)) for j in range(len(ts.grid))
                 if abs(ts.grid[i][0] - ts.grid[j][0]) + abs(ts.grid[i][1] - ts.grid[j][1]) == 1 and i < j]
        with tempfile.TemporaryDirectory() as tmp:
            run = run_stitch(root / "tiles", Path(tmp), CPU)
            affine = run_stitch(root / "tiles", Path(tmp), CPU, tile_model="affine")
            # ashlar's runner writes links beside the tiles: it gets a copy, not the data.
            copy = shutil.copytree(root / "tiles", Path(tmp) / "tiles")
            peer, _, note = run_peer("ashlar", copy)
        sol, aff = run.result.solution, affine.result.solution
        rows: dict[str, tuple[np.ndarray | None, np.ndarray | None, str]] = {
            "tapescope": (sol.positions, None, f"{int(sol.pair_used.sum())}/{len(sol.pair_used)}"),
            "tapescope affine": (aff.positions, aff.linear, f"{int(aff.pair_used.sum())}/{len(aff.pair_used)}"),
        }
        rows["ashlar"] = (peer, None, "-" if peer is not None else note)
        rows["render"] = (ref, None, "-")
        for method, (pos, lin, used) in rows.items():
            if pos is None:
                print(f"{name:<14} {method:<17} {used}")
                continue
            dist = np.linalg.norm(centred(in_first_tile(pos, lin, tiles[0].shape)) - centred(ref), axis=1)
            print(f"{name:<14} {method:<17} {used:>10} {np.sqrt((dist**2).mean()):7.2f} {dist.max():7.2f} "
                  f"{seam_ncc(tiles, pos, pairs, lin):9.3f}")
        for label, r in (("tapescope", run), ("tapescope affine", affine)):
            for p, why in zip(r.result.pairs, r.result.solution.pair_reason, strict=True):
                if why:
                    print(f"{'':<14} {label} left out {ts.files[p.i]} - {ts.files[p.j]}: {why}")
        fit = affine.result.affine
        if fit is not None:
            print(f"{'':<14} affine: patch residual RMS {fit.rms:.3f} px ({fit.rms_translation:.3f} px with a "
                  f"translation per tile), {int(fit.patch_used.sum())} patches")
    print()


def window(a: np.ndarray, b: np.ndarray, d: np.ndarray, axis: int, centre: float, width: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """a and b cut to the same shape so that they share only `width` px across `axis`, centred
    on `centre` (a's pixels), each keeping MARGIN px beyond the strip on its own side. Returns
    the crops and how the cut changes b's offset from a (the crops' offset is d + that)."""
    x0 = round(centre - width / 2)
    size = width + MARGIN
    sa = x0 + width - size                     # a keeps [sa, x0 + width): the strip at its far edge
    sb = x0 - round(d[axis])              # b keeps [sb, sb + size): the strip at its near edge
    if sa < 0 or sb < 0 or sb + size > b.shape[axis] or x0 < round(d[axis]):
        return None                            # the overlap is narrower than this window
    ca, cb = [slice(None), slice(None)], [slice(None), slice(None)]
    ca[axis], cb[axis] = slice(sa, sa + size), slice(sb, sb + size)
    other = 1 - axis                           # along the strip: the common extent
    lo = max(0, round(d[other]))
    hi = min(a.shape[other], b.shape[other] + round(d[other]))
    ca[other], cb[other] = slice(lo, hi), slice(lo - round(d[other]), hi - round(d[other]))
    moved = np.zeros(2)                        # b's crop origin minus a's, in a's frame
    moved[axis] = sb - sa
    moved[other] = -round(d[other])
    return a[tuple(ca)], b[tuple(cb)], moved


def narrow_strips() -> None:
    print(f"2. Real tiles cut to narrow overlaps: |offset on a W px strip - offset on a {REFERENCE_PX} px window "
          f"centred on it|, px ({DRAWS} nominals per pair off by {STAGE_ERROR_PX} px RMS)")
    header = f"{'strip px':>8} {'pairs x draws':>13} {'used':>5} {'median':>7} {'90 %':>7} {'max':>7}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    cases = []
    for name in SETS:
        ts = read_tiles_csv(DATA / name / "tiles")
        tiles = [t.astype(np.float32) for t in load_tiles(ts)]
        where = {rc: k for k, rc in enumerate(ts.grid)}
        for (r, c), i in where.items():
            for axis, nb in ((1, (r, c + 1)), (0, (r + 1, c))):
                if nb not in where:
                    continue
                j = where[nb]
                nominal = ts.nominal[j] - ts.nominal[i]
                whole = register_pair(tiles[i], tiles[j], (float(nominal[0]), float(nominal[1])))
                if whole is None or whole.confidence == 0:
                    continue
                d = np.array([whole.dy, whole.dx])
                centre = (d[axis] + tiles[i].shape[axis]) / 2           # the middle of the overlap
                cut = window(tiles[i], tiles[j], d, axis, centre, REFERENCE_PX)
                if cut is None:
                    continue
                ra, rb, moved = cut
                ref = register_pair(ra, rb, (float(d[0] + moved[0]), float(d[1] + moved[1])))
                if ref is not None and ref.confidence > 0:
                    cases.append((tiles[i], tiles[j], np.array([ref.dy, ref.dx]) - moved, axis, centre))
    for width in WIDTHS:
        errs, used = [], 0
        for a, b, d, axis, centre in cases:
            cut = window(a, b, d, axis, centre, width)
            assert cut is not None                 # narrower than the reference window, which fitted
            na, nb, moved = cut
            for _ in range(DRAWS):
                start = d + moved + rng.normal(0, STAGE_ERROR_PX / np.sqrt(2), 2)
                got = register_pair(na, nb, (float(start[0]), float(start[1])))
                if got is None or got.confidence == 0:
                    continue
                used += 1
                errs.append(float(np.hypot(*(np.array([got.dy, got.dx]) - moved - d))))
        e = np.array(errs) if errs else np.array([np.nan])
        print(f"{width:>8} {len(cases):>6} x {DRAWS:<4} {used:>5} {np.median(e):7.3f} {np.percentile(e, 90):7.3f} "
              f"{e.max():7.3f}")


def main() -> int:
    if not DATA.is_dir():
        print(f"skipped: no real TEMCA tiles at {DATA}")
        return 0
    whole_sets()
    narrow_strips()
    return 0


if __name__ == "__main__":
    sys.exit(main())
