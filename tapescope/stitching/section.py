"""Stitch one section: register every neighbouring pair, then solve globally."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backend import CPU, Backend
from .register import register_pair
from .solve import Pair, Solution, solve_positions


@dataclass
class StitchResult:
    solution: Solution
    pairs: list[Pair]


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
    backend: Backend = CPU,
) -> StitchResult:
    """Positions (top-left, pixels) of flat-fielded tiles of one section."""
    if not (len(tiles) == len(stage_px) == len(grid)):
        raise ValueError("tiles, stage positions and grid indices must have the same length")
    stage_px = np.asarray(stage_px, dtype=float)
    pairs = []
    for i, j in neighbour_pairs(grid):
        nominal = stage_px[j] - stage_px[i]
        shift = register_pair(tiles[i], tiles[j], (float(nominal[0]), float(nominal[1])), backend=backend)
        if shift is not None:
            pairs.append(Pair(i, j, shift.dy, shift.dx, shift.confidence))
    return StitchResult(solve_positions(stage_px, pairs), pairs)
