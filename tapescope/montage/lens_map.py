"""Taking the camera's lens out of tiles while rendering: which camera pixel saw a point.

The radial model (stitching/lens.py) says where camera pixel q looks: t = q + D(q).
Rendering needs the inverse, q(t), at every output pixel. `camera_pixels` (stitching/lens.py)
solves it by fixed-point steps, exact to 1e-4 px but some ten array passes per step; the inverse is
the same for every tile of a camera, so `LensMap` solves it once on a coarse grid over the
tile and interpolates between nodes (docs/montage.md). The grid is as coarse as keeps it
within LENS_MAP_TOL_PX of the exact inverse, checked when it is made; a lens too strong
for any grid tried is solved exactly per pixel.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from tapescope.stitching.lens import RadialDistortion, camera_pixels

# The interpolated inverse's largest error allowed, checked on a dense sample: a tenth of what
# the estimated lens model is itself off by at the corners (k1 within 2-4 %, docs/stitching.md),
# a fifth of the stitching's error. Bilinear between nodes errs by ~spacing^2 x E'' / 8.
LENS_MAP_TOL_PX = 0.01
LENS_MAP_SPACINGS = (32, 16, 8, 4)


class LensMap:
    """q(t) - t on a grid of `spacing` px over a tile and `margin` px around it, interpolated
    bilinearly; beyond the grid the edge value holds, which keeps far points far (they
    sample outside the tile either way)."""

    def __init__(self, lens: RadialDistortion, shape: tuple[int, int], spacing: int, margin: int) -> None:
        self.lens, self.shape, self.spacing, self.margin = lens, shape, spacing, margin
        gy = np.arange(-margin, shape[0] + margin + spacing, spacing, dtype=np.float32)
        gx = np.arange(-margin, shape[1] + margin + spacing, spacing, dtype=np.float32)
        ty, tx = (np.ascontiguousarray(a) for a in np.meshgrid(gy, gx, indexing="ij"))
        # Nodes where the steps diverge are inf/nan, and so are the points near them, as with
        # the exact inverse (render.py sends such points off the tile); nodes near the tile
        # that are not finite fail `error_px`, and then the grid is not used.
        qy, qx = camera_pixels(lens, ty, tx, shape)
        # Two one-channel tables, not one of two channels: OpenCV 5 interpolates a 1-channel
        # float image with exact weights but a 2-channel one with weights rounded to 1/32
        # (measured: 4x the error at 16 px spacing, and slower).
        self.dx = np.ascontiguousarray(qx - tx, np.float32)
        self.dy = np.ascontiguousarray(qy - ty, np.float32)

    def apply(self, ty: np.ndarray, tx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Camera pixels of tile-frame points (float32 arrays of one shape), in place."""
        inv = np.float32(1.0 / self.spacing)
        m = np.float32(self.margin)
        gx = tx + m
        gx *= inv
        gy = ty + m
        gy *= inv
        tx += cv2.remap(self.dx, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        ty += cv2.remap(self.dy, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return ty, tx

    def error_px(self, n: int = 20000, seed: int = 0) -> float:
        """Largest distance from the exact inverse over random points of the tile and the
        pixel around it, corners and edges included."""
        h, w = self.shape
        rng = np.random.default_rng(seed)
        ty = rng.uniform(-1, h, n).astype(np.float32)
        tx = rng.uniform(-1, w, n).astype(np.float32)
        ty[:4], tx[:4] = [-1, -1, h, h], [-1, w, -1, w]
        ey, ex = camera_pixels(self.lens, ty.reshape(1, -1), tx.reshape(1, -1), self.shape)
        ay, ax = self.apply(ty.reshape(1, -1).copy(), tx.reshape(1, -1).copy())
        with np.errstate(invalid="ignore"):     # a diverging point (nan) fails the check
            return float(np.hypot(ay - ey, ax - ex).max())


@functools.lru_cache(maxsize=16)
def lens_map(lens: RadialDistortion, shape: tuple[int, int], margin: int) -> LensMap | None:
    """The coarsest LensMap within LENS_MAP_TOL_PX for this camera, or None where even the
    finest grid tried is not (a strong lens on a small sensor: solve it exactly)."""
    for spacing in LENS_MAP_SPACINGS:
        lm = LensMap(lens, shape, spacing, margin)
        if lm.error_px() <= LENS_MAP_TOL_PX:
            return lm
    return None
