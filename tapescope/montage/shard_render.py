"""Render a section into the volume shard by shard: memory bounded by a shard, not a section.

A 30,000 x 30,000 px section is 3.6 GB as float32; it is never held whole. The unit of
work is the area of one level-1 shard (2 x 2 level-0 shards): each of its level-0 shards
is rendered from the tiles that reach into it (`render.render_block`), the unit is
written with its level-1 shard downsampled in memory, then the coarser levels are built
shard by shard from the level below (`Volume.build_pyramid`). Every shard has exactly
one writer, so units can be rendered by threads here or by Dask workers elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tapescope.stitching.lens import RadialDistortion

from .omezarr import Volume
from .render import check_tile_shapes, render_block
from .transform import SectionTransform
from .warp import one_opencv_thread, warp_for

T = TypeVar("T")
R = TypeVar("R")
BLOCK_PX = 2048     # render_to's block: ~100 MB of maps and accumulators at most


def _each(fn: Callable[[T], R], items: list[T], threads: int | None) -> list[R]:
    """fn of every item, in order, on `threads` threads at once (None: one per core)."""
    threads = min(threads or os.cpu_count() or 1, len(items))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))
    return [fn(item) for item in items]


@dataclass(frozen=True)
class RenderStats:
    pixels: int         # level-0 pixels written
    covered: int        # of which at least one tile landed on


def render_section(
    volume: Volume, z: int, tiles: Sequence[np.ndarray], positions: np.ndarray,
    transform: SectionTransform, *, ramp: int | None = None, threads: int | None = None,
    lens: RadialDistortion | None = None, device: str = "cpu", linear: np.ndarray | None = None,
) -> RenderStats:
    """Render section z into every level of `volume`, one level-0 shard at a time.

    `transform` maps volume pixels to the coordinates the tile `positions` are given in
    (for a montage image given as one tile at (0, 0): its own pixels). `threads` renders
    that many write units at once (None: one per core); OpenCV and NumPy release the GIL
    in the heavy parts, and OpenCV itself runs one thread meanwhile (`one_opencv_thread`).
    `device` picks where pixels are warped (warp.py). `linear`: each tile's own linear part
    (render_block).
    """
    volume.check_z(z)
    check_tile_shapes(tiles)        # once for the section, before any block is written
    warp = warp_for(device)
    units = volume.write_units()
    shard = volume.shard_blocks(0)[0][2:]

    def one(unit: tuple[int, int, int, int]) -> tuple[int, int]:
        uy, ux, uh, uw = unit
        img = np.empty((uh, uw), np.float32)
        cover = np.empty((uh, uw), np.float32)
        # Rendered one level-0 shard at a time (the unit of the tile crops), straight into
        # the unit, written with its level-1 shard from memory.
        for y in range(uy, uy + uh, shard[0]):
            for x in range(ux, ux + uw, shard[1]):
                h, w = min(shard[0], uy + uh - y), min(shard[1], ux + uw - x)
                at = (slice(y - uy, y - uy + h), slice(x - ux, x - ux + w))
                render_block(tiles, positions, transform, (y, x, h, w), ramp, lens, warp, out=(img[at], cover[at]),
                             linear=linear)
        covered = int(np.count_nonzero(cover > 1e-6))
        volume.write_unit(z, unit, img)
        return img.size, covered

    # On an error, no write of it goes on behind the caller.
    with one_opencv_thread(), volume.section_writes():
        counts = _each(one, units, threads)
        volume.build_pyramid(z, start=1 if units == volume.shard_blocks(0) else 2)
    return RenderStats(sum(c[0] for c in counts), sum(c[1] for c in counts))


def render_to(
    image: np.ndarray, cover: np.ndarray, tiles: Sequence[np.ndarray], positions: np.ndarray,
    transform: SectionTransform, *, ramp: int | None = None, lens: RadialDistortion | None = None,
    block: int = BLOCK_PX, device: str = "cpu", linear: np.ndarray | None = None, threads: int | None = None,
) -> None:
    """Render a section into `image` and its coverage into `cover` (arrays of the output's
    shape, e.g. memory-mapped files), block by block: memory bounded by a block per thread.
    `threads`: blocks rendered at once (None: one per core), as in `render_section`."""
    h, w = image.shape
    check_tile_shapes(tiles)
    warp = warp_for(device)
    blocks = [(y, x, min(block, h - y), min(block, w - x)) for y in range(0, h, block) for x in range(0, w, block)]

    def one(b: tuple[int, int, int, int]) -> None:
        y, x, bh, bw = b
        part, cov = render_block(tiles, positions, transform, b, ramp, lens, warp, linear=linear)
        image[y:y + bh, x:x + bw] = part
        cover[y:y + bh, x:x + bw] = cov

    with one_opencv_thread():
        _each(one, blocks, threads)
