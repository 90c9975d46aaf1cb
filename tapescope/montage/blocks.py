"""Render a section into the volume shard by shard: memory bounded by a shard, not a section.

A 30,000 x 30,000 px section is 3.6 GB as float32; it is never held whole. Each level-0
shard block is rendered from the tiles that reach into it (`render.render_block`) and
written at once, then each coarser level is built shard by shard from the level below
(`Volume.build_pyramid`). Every shard has exactly one writer, so blocks can be rendered
by threads here or by Dask workers on other machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .omezarr import Volume
from .render import render_block
from .transform import SectionTransform


@dataclass(frozen=True)
class RenderStats:
    pixels: int         # level-0 pixels written
    covered: int        # of which at least one tile landed on


def render_section(
    volume: Volume, z: int, tiles: Sequence[np.ndarray], positions: np.ndarray,
    transform: SectionTransform, *, ramp: int | None = None, threads: int = 1,
) -> RenderStats:
    """Render section z into every level of `volume`, one level-0 shard at a time.

    `transform` maps volume pixels to the coordinates the tile `positions` are given in
    (for a montage image given as one tile at (0, 0): its own pixels). `threads` renders
    that many shards at once; OpenCV and NumPy release the GIL in the heavy parts.
    """
    volume._check_z(z)
    blocks = volume.shard_blocks(0)

    def one(block: tuple[int, int, int, int]) -> tuple[int, int]:
        img, cover = render_block(tiles, positions, transform, block, ramp)
        volume.write_block(z, block, img)
        return img.size, int((cover > 1e-6).sum())

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            counts = list(pool.map(one, blocks))
    else:
        counts = [one(b) for b in blocks]
    volume.build_pyramid(z)
    return RenderStats(sum(c[0] for c in counts), sum(c[1] for c in counts))
