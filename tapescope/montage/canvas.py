"""The canvas of a run: where the volume's pixel (0, 0) lies in stage pixels, and its size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import tile_corners


@dataclass(frozen=True)
class Canvas:
    origin: np.ndarray            # (y, x) stage pixel coordinate of the volume's (0, 0)
    shape: tuple[int, int]

    @classmethod
    def around(cls, positions: np.ndarray, tile_shape: tuple[int, int], margin: int,
               linear: np.ndarray | None = None) -> Canvas:
        """The canvas that holds every tile (each with its own linear part, if given)."""
        corners = tile_corners(np.asarray(positions, float), tile_shape, linear).reshape(-1, 2)
        lo = np.floor(corners.min(axis=0)).astype(int) - margin
        hi = np.ceil(corners.max(axis=0)).astype(int) + margin
        return cls(lo, (int(hi[0] - lo[0]), int(hi[1] - lo[1])))
