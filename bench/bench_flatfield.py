"""Flat-field from the tiles when the section's edge crosses the field.

The outer tiles of a montage see bare resin (or film) past the section's edge: flat, and
brighter than the stained section. Left in, a third of such a tile pulls the per-pixel
statistic and the tile's own level toward the resin. `estimate_flatfield` leaves those
parts out (`flatfield.resin_masks`). Measured here, with the masks and without them (the
estimate as it was, the masks switched off in the same run), as RMS and max of the
estimate over the true gain, in %, 16 px from the tile's edge excluded:

- synthetic sets (tapescope.stitching.synthetic, 4 x 4 tiles of 512 px, 300 e/px, 25 %
  vignetting), EM and stained nuclei, with the section's edge a third of a tile inside the
  montage (`resin_border=0.3`) and without;
- real EM texture: the 16 Cardona ssTEM sections (../shared/data, skipped without it), each
  one tile, through a known gain and shot noise; clean (no resin: the masks must not take
  real cell interiors for resin), and with a third of 10 of the 16 tiles replaced by resin
  as bright as the tissue's 99th percentile (no brighter than the palest cytoplasm: the
  hard case) and at the synthetic specimen's resin level (0.97 transmission).

Run: .venv/bin/python bench/bench_flatfield.py   (SEEDS=1,2 by default; 1,2,3,4 gave the numbers in docs)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

import tapescope.stitching.flatfield as flatfield
from tapescope.stitching.synthetic import SyntheticParams, camera_gain, make_tileset

SEEDS = [int(s) for s in os.environ.get("SEEDS", "1,2").split(",")]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sstem_cardona2010"
CORE = (slice(16, -16), slice(16, -16))
DOSE, COUNTS, DARK = 300.0, 4.0, 100.0


def off_gain(estimate: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """(RMS, max) of estimate / gain - 1 in %, both normalised to mean 1."""
    e = (estimate / estimate.mean()) / (gain / gain.mean()) - 1
    return 100 * float(np.sqrt(np.mean(e[CORE] ** 2))), 100 * float(np.abs(e[CORE]).max())


def both(tiles: list[np.ndarray], gain: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], float]:
    """off_gain with the resin masks and without, and the share of tile area masked."""
    masked: list[float] = []
    original = flatfield.resin_masks

    def spy(*args: np.ndarray) -> np.ndarray:
        m = original(*args)
        masked.append(1 - float(m.mean()))
        return m

    def none(*args: np.ndarray) -> np.ndarray:
        return np.ones((len(args[0]), flatfield.FIT_GRID, flatfield.FIT_GRID), bool)

    out = []
    for masks in (spy, none):
        flatfield.resin_masks = masks  # type: ignore[assignment]
        try:
            out.append(off_gain(flatfield.estimate_flatfield(tiles, dark=DARK), gain))
        finally:
            flatfield.resin_masks = original  # type: ignore[assignment]
    return out[0], out[1], masked[0]


def row(label: str, result: tuple[tuple[float, float], tuple[float, float], float]) -> None:
    (r, m), (r0, m0), share = result
    print(f"  {label:44s} masks {r:5.2f} % (max {m:5.2f})   without {r0:5.2f} % (max {m0:5.2f})   "
          f"masked {100 * share:4.1f} % of the area")


def synthetic() -> None:
    print("== synthetic sets: 4 x 4 tiles of 512 px, 300 e/px, 25 % vignetting; estimate / true gain - 1")
    for texture in ("em", "fluorescence"):
        for border in (0.0, 0.3):
            for seed in SEEDS:
                ts = make_tileset(SyntheticParams(tile=512, rows=4, cols=4, overlap=0.1, dose=DOSE, seed=seed,
                                                  dust=0, vignetting=0.25, resin_border=border, texture=texture))
                row(f"{texture:12s} edge {border:.1f} tile in, seed {seed}", both(ts.tiles, ts.gain))


def resin_third(shape: tuple[int, int], k: int) -> np.ndarray:
    """True over a wavy third of the field, on the side k % 4 (top, right, bottom, left)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    depth = np.array([yy, w - 1 - xx, h - 1 - yy, xx])[k % 4]
    along = np.array([xx, yy, xx, yy])[k % 4]
    return depth < h / 3 + 0.1 * h * np.sin(2 * np.pi * along / (0.8 * w) + k)


def real_texture() -> None:
    if not DATA.is_dir():
        print(f"== real EM texture: skipped ({DATA} not found)")
        return
    sections = [cv2.imread(str(DATA / f"{k}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float64) / 255 for k in range(16)]
    print("== real EM texture (16 Cardona ssTEM sections, one tile each) through a known gain, 300 e/px")
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        gain = camera_gain(sections[0].shape, 0.25, 0, rng)
        hi = float(np.percentile(np.stack(sections), 99))
        cases: list[tuple[str, Callable[[int, np.ndarray], np.ndarray]]] = [
            ("clean", lambda k, s: s),
            (f"resin at the tissue's 99th pct ({hi:.2f})",
             lambda k, s, hi=hi: np.where(resin_third(s.shape, k), hi, s) if k < 10 else s),
            ("resin at 0.97", lambda k, s: np.where(resin_third(s.shape, k), 0.97, s) if k < 10 else s),
        ]
        for label, make in cases:
            noise = np.random.default_rng(seed + 100)
            tiles = []
            for k, s in enumerate(sections):
                electrons = DOSE * make(k, s) * gain
                counts = noise.poisson(electrons) * COUNTS + DARK + noise.normal(0, 6.0, s.shape)
                tiles.append(np.clip(np.rint(counts), 0, 65535).astype(np.uint16))
            row(f"{label}, seed {seed}", both(tiles, gain))


def main() -> None:
    synthetic()
    real_texture()


if __name__ == "__main__":
    main()
