"""Flat-field: estimate the camera's gain field from the tiles themselves, and apply it.

Vignetting is smooth, so the estimate is the per-pixel median of many mean-normalised
tiles, fitted with a low-order 2D polynomial: the median removes specimen content that
differs tile to tile, the fit removes what little is left. Tiles that are nearly blank
(no contrast) or saturated carry no information about the specimen-free gain and would
bias the median toward their own content, so they are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

FIT_GRID = 64      # the median is fitted on a FIT_GRID x FIT_GRID reduction of the tile
FIT_DEGREE = 4


def _poly_basis(h: int, w: int, degree: int) -> np.ndarray:
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    terms = [(x**i) * (y**j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    return np.stack([t.ravel() for t in terms], axis=1)


def usable_for_flatfield(tile: np.ndarray, saturation: int = 65535) -> bool:
    t = tile.astype(np.float32)
    sat = float(np.mean(tile >= saturation))
    mean = float(t.mean())
    return mean > 0 and sat < 0.001


def estimate_flatfield(tiles: Iterable[np.ndarray], dark: float | np.ndarray = 0.0) -> np.ndarray:
    """Gain field (float32, mean 1) of the camera, from at least three usable tiles."""
    small = []
    shape: tuple[int, ...] | None = None
    for tile in tiles:
        if shape is None:
            shape = tile.shape
        elif tile.shape != shape:
            raise ValueError(f"tiles of different shapes: {shape} and {tile.shape}")
        if not usable_for_flatfield(tile):
            continue
        t = tile.astype(np.float32) - dark
        small.append(cv2.resize(t / np.median(t), (FIT_GRID, FIT_GRID), interpolation=cv2.INTER_AREA))
    if shape is None or len(small) < 3:
        raise ValueError(f"need at least 3 usable tiles to estimate a flat-field, got {len(small)}")
    med = np.median(np.stack(small), axis=0)
    basis = _poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE)
    coef, *_ = np.linalg.lstsq(basis, med.ravel(), rcond=None)
    full = (_poly_basis(shape[0], shape[1], FIT_DEGREE) @ coef).reshape(shape)
    return (full / full.mean()).astype(np.float32)


def apply_flatfield(tile: np.ndarray, gain: np.ndarray | None, dark: float | np.ndarray = 0.0) -> np.ndarray:
    """(tile - dark) / gain, as float32."""
    t = tile.astype(np.float32) - np.float32(dark) if np.any(dark) else tile.astype(np.float32)
    if gain is None:
        return t
    if gain.shape != tile.shape:
        raise ValueError(f"flat-field shape {gain.shape} does not match tile shape {tile.shape}")
    return t / gain
