"""Render a section montage from tiles and their solved positions, feathered."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .transform import SectionTransform


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


def _ramp(s: np.ndarray, n: int, ramp: float) -> np.ndarray:
    """feather_weight's 1D profile at (fractional) tile coordinates s; 0 outside the tile."""
    inside = (s >= 0) & (s <= n - 1)
    return np.where(inside, np.clip((np.minimum(s, n - 1 - s) + 1.0) / ramp, 0, 1), 0).astype(np.float32)


def render_block(
    tiles: Sequence[np.ndarray], positions: np.ndarray, transform: SectionTransform,
    block: tuple[int, int, int, int], ramp: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the output block (y0, x0, h, w) of a section, feathered: (image, coverage).

    Output pixel p shows the section at `transform.apply(p)`, in the coordinates the tile
    `positions` (top-left, (y, x)) are given in. Only the tiles that reach into the block
    are touched, and only the part of each that is needed is read (a memory-mapped tile is
    never loaded whole), so memory is bounded by the block, not by the section.
    """
    if not len(tiles):
        raise ValueError("no tiles to render")
    y0, x0, h, w = block
    th, tw = tiles[0].shape[:2]
    ramp = ramp or max(4, min(th, tw) // 16)
    mx, my = transform.block_maps(y0, x0, h, w)
    lo_x, hi_x, lo_y, hi_y = float(mx.min()), float(mx.max()), float(my.min()), float(my.max())
    acc = np.zeros((h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    for tile, pos in zip(tiles, np.asarray(positions, float), strict=True):
        py, px = pos
        # Box of the tile that the block needs, one pixel of margin for interpolation.
        cx0, cx1 = max(int(np.floor(lo_x - px)) - 1, 0), min(int(np.ceil(hi_x - px)) + 2, tw)
        cy0, cy1 = max(int(np.floor(lo_y - py)) - 1, 0), min(int(np.ceil(hi_y - py)) + 2, th)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        crop = np.asarray(tile[cy0:cy1, cx0:cx1], np.float32)
        tx = mx - np.float32(px)
        ty = my - np.float32(py)
        wt = _ramp(ty, th, ramp) * _ramp(tx, tw, ramp)
        if not wt.any():
            continue
        t = cv2.remap(crop, tx - np.float32(cx0), ty - np.float32(cy0), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
        acc += t * wt
        wsum += wt
    out = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 1e-6)
    return out, wsum


def render_montage(
    tiles: Sequence[np.ndarray], positions: np.ndarray, origin: np.ndarray,
    shape: tuple[int, int], ramp: int | None = None, transform: SectionTransform | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend tiles into a float32 canvas of `shape` whose (0, 0) is at `origin`, in RAM.

    Returns (image, coverage); coverage is 0 where no tile lands. Each tile is placed
    with its sub-pixel position (bilinear) and weighted by a feather ramp, so seams fade
    over `ramp` pixels instead of stepping. `transform` (canvas pixel -> canvas pixel of
    the unaligned section) aligns the section while rendering. For sections too large
    for RAM, `blocks.render_section` renders shard by shard with the same `render_block`.
    """
    oy, ox = np.asarray(origin, float)
    t = transform or SectionTransform.identity()
    # Canvas pixel -> stage pixel: shift by the canvas origin after the transform.
    t = t.shifted(oy, ox)
    return render_block(tiles, positions, t, (0, 0, shape[0], shape[1]), ramp)
