"""Camera arrays: an affine per tile against a translation per tile, on synthetic sets with truth.

Synthetic 3 x 3 sets of 512 px tiles (15 % overlap, 3 px RMS stage error, 500 e/px) whose
tiles are each turned and scaled a little (`SyntheticParams.camera_linear`: each entry of
A - I drawn with 0.004 RMS, as the cameras of an array differ), with and without a lens
(k1 0.01: the corners move by 5 px, the model given to the stitcher), and one camera's
tiles (no turn or scale) as the control. Per set and model: pairs used, and the seams
(`TileSet.seam_error`: how far apart two tiles put the same specimen point, RMS over the
true overlap, per pair; mean and max over the pairs). The baseline in the same run is the
translation per tile. Real camera-array tiles: bench_stitch_real.py.
Run: .venv/bin/python bench/bench_stitch_array.py   (SEEDS=5,6 for fewer draws)
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from tapescope.stitching.lens import RadialDistortion
from tapescope.stitching.section import strip_width
from tapescope.stitching.stream import StreamingStitcher
from tapescope.stitching.synthetic import SyntheticParams, TileSet, make_tileset

SEEDS = [int(s) for s in os.environ.get("SEEDS", "5,6,7,8").split(",")]
CASES = (("one camera", 0.0, 0.0), ("array", 0.004, 0.0), ("array + lens", 0.004, 0.01))


def stitched(ts: TileSet, model: str, lens: RadialDistortion) -> tuple[np.ndarray, int, float]:
    st = StreamingStitcher(gain=ts.gain, strip_px=strip_width(ts.tiles[0].shape, ts.stage_px, ts.grid))
    for rc, pos, tile in zip(ts.grid, ts.stage_px, ts.tiles, strict=True):
        st.add(rc, tile, pos)
    t0 = time.perf_counter()
    res = st.finish(lens=lens if not lens.is_identity else "none", tile_model=model)
    seconds = time.perf_counter() - t0
    seams = ts.seam_error(res.solution.positions, res.solution.linear, lens=lens)
    return seams, int(res.solution.pair_used.sum()), seconds


def main() -> int:
    header = f"{'set':<14} {'seed':>4} {'model':<12} {'pairs':>6} {'seam mean px':>12} {'seam max px':>11} {'s':>5}"
    print(header)
    print("-" * len(header))
    for name, linear, k1 in CASES:
        lens = RadialDistortion(k1=k1)
        for seed in SEEDS:
            ts = make_tileset(SyntheticParams(tile=512, rows=3, cols=3, overlap=0.15, stage_error_px=3, seed=seed,
                                              dose=500, camera_linear=linear, distortion=lens))
            for model in ("translation", "affine"):
                seams, used, seconds = stitched(ts, model, lens)
                print(f"{name:<14} {seed:>4} {model:<12} {used:>3}/12 {seams.mean():12.3f} {seams.max():11.3f} "
                      f"{seconds:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
