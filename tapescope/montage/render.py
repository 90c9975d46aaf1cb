"""Render a section montage from tiles and their solved positions, feathered."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def feather_weight(shape: tuple[int, int], ramp: int) -> np.ndarray:
    """Weight that rises linearly from the tile edge over `ramp` pixels, 1 inside."""
    h, w = shape
    y = np.minimum(np.arange(h), np.arange(h)[::-1]) + 1.0
    x = np.minimum(np.arange(w), np.arange(w)[::-1]) + 1.0
    wy = np.clip(y / ramp, 0, 1)
    wx = np.clip(x / ramp, 0, 1)
    return np.outer(wy, wx).astype(np.float32)


def montage_bounds(positions: np.ndarray, tile_shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Integer origin (y, x) and shape of the canvas that holds every tile."""
    lo = np.floor(positions.min(axis=0)).astype(int)
    hi = np.ceil(positions.max(axis=0) + np.array(tile_shape)).astype(int)
    return lo, (int(hi[0] - lo[0]), int(hi[1] - lo[1]))


def render_montage(
    tiles: Sequence[np.ndarray], positions: np.ndarray, origin: np.ndarray,
    shape: tuple[int, int], ramp: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend tiles into a float32 canvas of `shape` whose (0, 0) is at `origin`.

    Returns (image, coverage); coverage is 0 where no tile lands. Each tile is placed
    with its sub-pixel position (bilinear) and weighted by a feather ramp, so seams fade
    over `ramp` pixels instead of stepping.
    """
    if not tiles:
        raise ValueError("no tiles to render")
    th, tw = tiles[0].shape
    ramp = ramp or max(4, min(th, tw) // 16)
    weight = feather_weight((th, tw), ramp)
    acc = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for tile, pos in zip(tiles, positions, strict=True):
        rel = np.asarray(pos, float) - origin
        iy, ix = np.floor(rel).astype(int)
        fy, fx = rel - (iy, ix)
        # Warp into a box one pixel larger than the tile, at the integer corner.
        bh, bw = th + 1, tw + 1
        m = np.float32([[1, 0, fx], [0, 1, fy]])
        t = cv2.warpAffine(tile.astype(np.float32), m, (bw, bh), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        wt = cv2.warpAffine(weight, m, (bw, bh), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        y0, x0 = max(iy, 0), max(ix, 0)
        y1, x1 = min(iy + bh, shape[0]), min(ix + bw, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        sy, sx = y0 - iy, x0 - ix
        acc[y0:y1, x0:x1] += (t * wt)[sy:sy + y1 - y0, sx:sx + x1 - x0]
        wsum[y0:y1, x0:x1] += wt[sy:sy + y1 - y0, sx:sx + x1 - x0]
    out = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 1e-6)
    return out, wsum
