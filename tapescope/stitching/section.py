"""Stitch one section: register every neighbouring pair, then solve globally."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import CPU, Backend
from .lens import RadialDistortion
from .stream import StitchResult, StreamingStitcher

__all__ = ["StitchResult", "neighbour_pairs", "stitch_section"]


def neighbour_pairs(grid: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of tiles adjacent in the grid (right and down neighbours)."""
    where = {rc: k for k, rc in enumerate(grid)}
    out = []
    for k, (r, c) in enumerate(grid):
        for nb in ((r, c + 1), (r + 1, c)):
            if nb in where:
                out.append((k, where[nb]))
    return out


def stitch_section(
    tiles: Sequence[np.ndarray], stage_px: np.ndarray, grid: Sequence[tuple[int, int]],
    backend: Backend = CPU, lens: str | RadialDistortion = "none",
) -> StitchResult:
    """Positions (top-left, pixels) of flat-fielded tiles of one section.

    lens: "none", "estimate" (fit a radial model to this montage's overlaps and correct
    for it when it explains them) or a known RadialDistortion; see StreamingStitcher.finish.
    """
    if not (len(tiles) == len(stage_px) == len(grid)):
        raise ValueError("tiles, stage positions and grid indices must have the same length")
    stage_px = np.asarray(stage_px, dtype=float)
    if len(set(grid)) != len(grid):
        raise ValueError("two tiles share one grid position")
    stitcher = StreamingStitcher(backend=backend)   # tiles here are flat-fielded already
    for tile, rc, pos in zip(tiles, grid, stage_px, strict=True):
        stitcher.add(rc, tile, pos)
    return stitcher.finish(lens=lens)
