"""Stitch one section: register every neighbouring pair, then solve globally."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import CPU, Backend
from .lens import RadialDistortion
from .stream import StitchResult, StreamingStitcher

__all__ = ["StitchResult", "neighbour_pairs", "stitch_section", "strip_width"]


def neighbour_pairs(grid: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of tiles adjacent in the grid (right and down neighbours)."""
    where = {rc: k for k, rc in enumerate(grid)}
    out = []
    for k, (r, c) in enumerate(grid):
        for nb in ((r, c + 1), (r + 1, c)):
            if nb in where:
                out.append((k, where[nb]))
    return out


def strip_width(shape: tuple[int, int], stage_px: np.ndarray, grid: Sequence[tuple[int, int]]) -> int | None:
    """Edge strips wide enough for every overlap: the widest nominal overlap between grid
    neighbours plus as much again for the stage's error (at least 64 px); None (whole
    tiles) when the tiles have no neighbours or the strips would be most of a tile."""
    overlaps = []
    for i, j in neighbour_pairs(grid):
        axis = 1 if grid[i][0] == grid[j][0] else 0      # right neighbour: x; down: y
        overlaps.append(shape[axis] - abs(stage_px[j, axis] - stage_px[i, axis]))
    if not overlaps:
        return None
    widest = max(overlaps)
    strip = int(np.ceil(widest + max(64.0, widest)))
    return None if strip * 2 >= min(shape) else max(strip, 8)


def stitch_section(
    tiles: Sequence[np.ndarray], stage_px: np.ndarray, grid: Sequence[tuple[int, int]],
    backend: Backend = CPU, lens: str | RadialDistortion = "none", *,
    gain: np.ndarray | None = None, dark: float | np.ndarray = 0.0, strips: bool = False,
    tile_model: str = "translation",
) -> StitchResult:
    """Positions (top-left, pixels) of the tiles of one section.

    lens: "none", "estimate" (fit a radial model to this montage's overlaps and correct
    for it when it explains them) or a known RadialDistortion; see StreamingStitcher.finish.
    gain, dark: the flat-field, applied to what registration reads (none: tiles are
    flat-fielded already). strips: keep only edge strips wide enough for the overlaps
    (`strip_width`), not whole tiles: for raw tiles that are mapped, not held. tile_model:
    "translation", or "affine" for a camera array (StreamingStitcher.finish).
    """
    if not (len(tiles) == len(stage_px) == len(grid)):
        raise ValueError("tiles, stage positions and grid indices must have the same length")
    stage_px = np.asarray(stage_px, dtype=float)
    if len(set(grid)) != len(grid):
        raise ValueError("two tiles share one grid position")
    strip_px = strip_width(tiles[0].shape, stage_px, grid) if strips and len(tiles) else None
    stitcher = StreamingStitcher(gain=gain, dark=dark, strip_px=strip_px, backend=backend)
    for tile, rc, pos in zip(tiles, grid, stage_px, strict=True):
        stitcher.add(rc, tile, pos)
    return stitcher.finish(lens=lens, tile_model=tile_model)
