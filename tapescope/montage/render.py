"""Render a section montage from tiles and their solved positions, feathered."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from tapescope.stitching.lens import RadialDistortion

from .transform import SectionTransform

LENS_TOL_PX = 1e-4  # the lens is inverted by fixed-point steps until they move a pixel less than this
LENS_MAX_STEPS = 30


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
    r = np.minimum(s, np.float32(n - 1) - s)
    inside = r >= 0
    r += np.float32(1.0)
    r *= np.float32(1.0 / ramp)
    np.clip(r, 0, 1, out=r)
    r *= inside
    return r


def camera_pixels(lens: RadialDistortion, ty: np.ndarray, tx: np.ndarray,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The camera pixel q that sees tile-frame point t (lens.py: q + D(q) = t), in place of t.

    Rendering through this un-distorts the tiles: each output pixel samples the camera
    pixel that saw its point of the specimen, so overlapping tiles agree at the seams."""
    cy, cx = np.float32((shape[0] - 1) / 2), np.float32((shape[1] - 1) / 2)
    inv_r2 = np.float32(1.0 / (max(shape) / 2) ** 2)
    k1, k2 = np.float32(lens.k1), np.float32(lens.k2)
    # float32 cannot resolve 1e-4 px at coordinates of thousands: stop at a few of its steps there.
    tol = max(LENS_TOL_PX, 4 * float(np.spacing(np.float32(max(shape)))))
    qy, qx = ty, tx
    for _ in range(LENS_MAX_STEPS):
        vy, vx = qy - cy, qx - cx
        f = (vy * vy + vx * vx) * inv_r2
        f = f * (k1 + k2 * f) if k2 else f * k1
        ny, nx = ty - f * vy, tx - f * vx
        step = max(float(np.abs(ny - qy).max(initial=0)), float(np.abs(nx - qx).max(initial=0)))
        qy, qx = ny, nx
        if step < tol:
            break
    return qy, qx


def render_block(
    tiles: Sequence[np.ndarray], positions: np.ndarray, transform: SectionTransform,
    block: tuple[int, int, int, int], ramp: int | None = None, lens: RadialDistortion | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the output block (y0, x0, h, w) of a section, feathered: (image, coverage).

    Output pixel p shows the section at `transform.apply(p)`, in the coordinates the tile
    `positions` (top-left, (y, x)) are given in. Only the tiles that reach into the block
    are touched, and only the part of each that is needed is read (a memory-mapped tile is
    never loaded whole), so memory is bounded by the block, not by the section. `lens`,
    the camera's distortion, is taken out of every tile on the way (none: tiles as taken).
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
    inv = np.linalg.inv(np.vstack([np.asarray(transform.matrix, np.float64), [0, 0, 1]]))
    fmax = float(np.abs(transform.field).max()) if transform.field is not None else 0.0
    if lens is not None and lens.is_identity:
        lens = None
    # How far the lens moves a pixel at most (at the sensor's corner): crops and parts widen by it,
    # like the field, through the inverse affine into output pixels.
    bend = 0 if lens is None else int(np.ceil(np.abs(lens.at(np.zeros(2), (th, tw))).max())) + 1
    slack = (fmax + bend) * float(np.abs(inv[:2, :2]).sum(axis=1).max()) + 2.0
    for tile, pos in zip(tiles, np.asarray(positions, float), strict=True):
        py, px = pos
        # Box of the tile that the block needs, one pixel of margin for interpolation.
        cx0, cx1 = max(int(np.floor(lo_x - px)) - 1 - bend, 0), min(int(np.ceil(hi_x - px)) + 2 + bend, tw)
        cy0, cy1 = max(int(np.floor(lo_y - py)) - 1 - bend, 0), min(int(np.ceil(hi_y - py)) + 2 + bend, th)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        # The part of the block the tile can land on: its corners through the inverse
        # affine, widened by what the field can add. The per-pixel work below runs on that
        # part only, so a block costs about its own size however many tiles reach into it.
        corners = np.array([[px - 1, py - 1, 1], [px + tw, py - 1, 1], [px - 1, py + th, 1], [px + tw, py + th, 1]])
        out_xy = corners @ inv[:2].T
        bx0 = max(int(np.floor(out_xy[:, 0].min() - slack)) - x0, 0)
        bx1 = min(int(np.ceil(out_xy[:, 0].max() + slack)) - x0 + 1, w)
        by0 = max(int(np.floor(out_xy[:, 1].min() - slack)) - y0, 0)
        by1 = min(int(np.ceil(out_xy[:, 1].max() + slack)) - y0 + 1, h)
        if bx0 >= bx1 or by0 >= by1:
            continue
        # Feather weight in the tile's own pixels (separable: one outer product over the
        # crop), the crop premultiplied by it, both pulled through the same maps: the
        # weight needs no per-pixel arithmetic in block coordinates (13 % faster). Outside
        # the tile both are 0 (BORDER_CONSTANT), so a tile's weight ends within one pixel.
        wy = _ramp(np.arange(cy0, cy1, dtype=np.float32), th, ramp)
        wx = _ramp(np.arange(cx0, cx1, dtype=np.float32), tw, ramp)
        wt = np.outer(wy, wx)
        crop = np.multiply(tile[cy0:cy1, cx0:cx1], wt, dtype=np.float32)
        # Stage -> tile, then tile -> crop by an integer: exact, so a pixel samples the same
        # point whichever block it is rendered in (blocks equal the whole render, bit for bit).
        tx = mx[by0:by1, bx0:bx1] - np.float32(px)
        ty = my[by0:by1, bx0:bx1] - np.float32(py)
        if lens is not None:
            ty, tx = camera_pixels(lens, ty, tx, (th, tw))
        tx -= np.float32(cx0)
        ty -= np.float32(cy0)
        acc[by0:by1, bx0:bx1] += cv2.remap(crop, tx, ty, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        wsum[by0:by1, bx0:bx1] += cv2.remap(wt, tx, ty, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    out = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 1e-6)
    return out, wsum


def render_montage(
    tiles: Sequence[np.ndarray], positions: np.ndarray, origin: np.ndarray,
    shape: tuple[int, int], ramp: int | None = None, transform: SectionTransform | None = None,
    lens: RadialDistortion | None = None,
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
    return render_block(tiles, positions, t, (0, 0, shape[0], shape[1]), ramp, lens)
