"""Flat-field: estimate the camera's gain field from the tiles themselves, and apply it.

Vignetting is smooth, so the estimate is a per-pixel statistic of many normalised tiles,
fitted with a low-order 2D polynomial: the statistic removes specimen content that differs
tile to tile, the fit removes what little is left. Which statistic depends on the specimen
(`QUANTILES`, chosen per set by split halves, below): the median for dense texture (EM),
a low quantile for bright objects on a dark background (fluorescent nuclei), where the
median of a pixel is often a nucleus. Tiles that are nearly blank (no contrast) or
saturated carry no information about the specimen-free gain and would bias the
statistic toward their own content, so they are left out.
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


BLANK_CONTRAST = 0.35   # detail contrast below this fraction of the set's median: a blank tile


def _poly_eval(coef: np.ndarray, h: int, w: int, degree: int) -> np.ndarray:
    """The fitted polynomial on the full h x w grid, as Y @ C @ X^T: a dense basis of every
    pixel times every term would cost h * w * terms memory (120 MB for a 1k tile)."""
    y = np.linspace(-1, 1, h)[:, None] ** np.arange(degree + 1)
    x = np.linspace(-1, 1, w)[:, None] ** np.arange(degree + 1)
    c = np.zeros((degree + 1, degree + 1))
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]   # as _poly_basis orders them
    for (i, j), v in zip(terms, coef, strict=True):
        c[j, i] = v                       # x**i * y**j
    return (y @ c @ x.T).astype(np.float32)


def saturation_level(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else np.inf


def usable_for_flatfield(tile: np.ndarray, saturation: float | None = None) -> bool:
    """Not saturated (under 0.1 % of pixels at the top of the range) and not dark."""
    sat = saturation_level(tile.dtype) if saturation is None else saturation
    return float(tile.mean()) > 0 and float(np.mean(tile >= sat)) < 0.001


def detail_contrast(tile: np.ndarray) -> float:
    """Fine-structure contrast (band-pass std / mean) at a reduced size: specimen has it,
    bare resin has only shot noise, which the reduction averages away."""
    small = cv2.resize(tile.astype(np.float32), (FIT_GRID * 2, FIT_GRID * 2), interpolation=cv2.INTER_AREA)
    band = cv2.GaussianBlur(small, (0, 0), 1.0) - cv2.GaussianBlur(small, (0, 0), 4.0)
    return float(band.std() / max(float(small.mean()), 1e-6))


def estimate_flatfield(tiles: Iterable[np.ndarray], dark: float | np.ndarray = 0.0) -> np.ndarray:
    """Gain field (float32, mean 1) of the camera, from at least three usable tiles.

    Saturated tiles and blank ones (bare resin: detail contrast far under the set's
    median) are left out: a blank tile's flat field is its own, uniform brightness over
    the gain, at a different level and often with a section edge across it.
    """
    small, contrast = [], []
    shape: tuple[int, ...] | None = None
    for tile in tiles:
        if shape is None:
            shape = tile.shape
        elif tile.shape != shape:
            raise ValueError(f"tiles of different shapes: {shape} and {tile.shape}")
        if not usable_for_flatfield(tile):
            continue
        t = tile.astype(np.float32) - dark
        # Normalised later by a percentile of the reduced tile: one of a full tile costs more
        # than all the rest of the estimate together, and the scale is all it sets.
        reduced = cv2.resize(t, (FIT_GRID, FIT_GRID), interpolation=cv2.INTER_AREA)
        if float(np.median(reduced)) <= 0:
            continue
        small.append(reduced)
        contrast.append(detail_contrast(t))
    if small:
        keep = np.array(contrast) >= BLANK_CONTRAST * float(np.median(contrast))
        small = [s for s, k in zip(small, keep, strict=True) if k]
    if shape is None or len(small) < 3:
        raise ValueError(f"need at least 3 usable tiles to estimate a flat-field, got {len(small)}")
    stack = np.stack(small)
    q = choose_quantile(stack)
    coef = _fit_quantile(stack, q)
    if coef is None:
        raise ValueError(f"the tiles' {q:g}th percentile is not positive on 3 of them (dark frames?)")
    full = _poly_eval(coef, shape[0], shape[1], FIT_DEGREE)
    low = float((full < MIN_GAIN * full.mean()).mean())
    if low > MAX_LOW_AREA:
        raise ValueError(f"the fitted gain is under {MIN_GAIN:g} of its mean on {100 * low:.0f} % of the tile "
                         "(the tiles are too sparse or too dark for a flat-field)")
    return _held(full).astype(np.float32)


def _held(gain: np.ndarray) -> np.ndarray:
    """A fitted gain over its mean, held at MIN_GAIN or more: a polynomial through the dark
    corners of a round beam (real TEMCA frames) dips to or below zero there, and those
    pixels must stay dark, not flip sign."""
    g = np.maximum(gain / gain.mean(), MIN_GAIN)
    return g / g.mean()


MIN_GAIN = 0.05          # of the mean: the least gain a fitted flat-field is allowed
MAX_LOW_AREA = 0.25      # more of the tile than this under MIN_GAIN: no flat-field at all


# Per-pixel statistics tried, as percentiles over the tiles (each tile first divided by its
# own percentile of the same rank). On synthetic sets of 20 tiles the median is best on EM
# (1.0-1.8 % RMS off the true gain; the 5th percentile 3-7 %), the 5th percentile on
# stained nuclei (0.3-1.3 %; the median 6-21 %).
QUANTILES = (5.0, 10.0, 20.0, 35.0, 50.0)
MIN_SPLIT_TILES = 6      # fewer usable tiles: the median, as no half can check the other


def choose_quantile(stack: np.ndarray) -> float:
    """The percentile whose estimates from the even and the odd tiles agree best: a
    statistic biased by the specimen gives two different answers on different tiles (the
    median where nuclei cover a third of the field), one too noisy (a low quantile of EM)
    gives two noisy ones; the vignetting is the same in both halves. Percentiles whose fit on
    all tiles is under MIN_GAIN on more than MAX_LOW_AREA of the tile are not candidates."""
    if len(stack) < MIN_SPLIT_TILES:
        return 50.0
    basis = _poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE)
    best, best_q = np.inf, 50.0
    for q in QUANTILES:
        fits = [_fit_quantile(part, q) for part in (stack[0::2], stack[1::2], stack)]
        if any(c is None for c in fits):
            continue
        a, b, whole = (_held(basis @ c) for c in fits if c is not None)
        if float((whole <= MIN_GAIN).mean()) > MAX_LOW_AREA:
            continue
        ratio = a / b
        disagree = float(np.sqrt(np.mean((ratio - 1) ** 2)))
        if disagree < best:
            best, best_q = disagree, q
    return best_q


def _fit_quantile(stack: np.ndarray, q: float) -> np.ndarray | None:
    """Polynomial coefficients fitted to the per-pixel q-th percentile of tiles each divided
    by its own q-th percentile (reduced tiles, FIT_GRID x FIT_GRID); tiles whose percentile
    is not positive (mostly dark) are left out; None if fewer than 3 are left."""
    level = np.percentile(stack.reshape(len(stack), -1), q, axis=1)
    usable = level > 0
    if usable.sum() < 3:
        return None
    stat = np.percentile(stack[usable] / level[usable][:, None, None], q, axis=0)
    coef, *_ = np.linalg.lstsq(_poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE), stat.ravel(), rcond=None)
    return coef


def flatfield_from_references(bright: np.ndarray, dark: float | np.ndarray = 0.0) -> np.ndarray:
    """Gain (mean 1) from a bright reference (a uniform exposure) and a dark one."""
    b = bright.astype(np.float32) - np.asarray(dark, np.float32)
    if not np.all(np.isfinite(b)) or float(b.mean()) <= 0:
        raise ValueError("bright reference minus dark is not positive: not a bright exposure")
    if float(np.mean(b <= 0)) > 0.001:
        raise ValueError(f"{100 * float(np.mean(b <= 0)):.1f} % of the bright reference is at or below dark")
    b = np.maximum(b, float(b.mean()) * 1e-3)
    return (b / b.mean()).astype(np.float32)


def apply_flatfield(tile: np.ndarray, gain: np.ndarray | None, dark: float | np.ndarray = 0.0) -> np.ndarray:
    """(tile - dark) / gain, as float32."""
    t = tile.astype(np.float32) - np.float32(dark) if np.any(dark) else tile.astype(np.float32)
    if gain is None:
        return t
    if gain.shape != tile.shape:
        raise ValueError(f"flat-field shape {gain.shape} does not match tile shape {tile.shape}")
    return t / gain


class FlatFielded:
    """A tile flat-fielded a slice at a time, as it is read: ``FlatFielded(raw, gain, dark)[ys, xs]``
    equals ``apply_flatfield(raw, gain, dark)[ys, xs]`` without the whole float32 copy."""

    def __init__(self, raw: np.ndarray, gain: np.ndarray | None, dark: float | np.ndarray = 0.0) -> None:
        if gain is not None and gain.shape != raw.shape:
            raise ValueError(f"flat-field shape {gain.shape} does not match tile shape {raw.shape}")
        self.raw, self.gain, self.dark = raw, gain, dark
        self.shape = raw.shape
        self.ndim = raw.ndim
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        dark = self.dark[key] if isinstance(self.dark, np.ndarray) and self.dark.ndim == 2 else self.dark
        return apply_flatfield(self.raw[key], None if self.gain is None else self.gain[key], dark)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = apply_flatfield(self.raw, self.gain, self.dark)
        return whole if dtype is None else whole.astype(dtype)
