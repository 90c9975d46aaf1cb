"""Flat-field: estimate the camera's gain field from the tiles themselves, and apply it.

Vignetting is smooth, so the estimate is a per-pixel statistic of many normalised tiles,
fitted with a low-order 2D polynomial: the statistic removes specimen content that differs
tile to tile, the fit removes what little is left. Which statistic depends on the specimen
(`QUANTILES`, chosen per set by split halves, below): the median for dense texture (EM),
a low quantile for bright objects on a dark background (fluorescent nuclei), where the
median of a pixel is often a nucleus. Tiles that are nearly blank (no contrast) or
saturated carry no information about the specimen-free gain and would bias the
statistic toward their own content, so they are left out; so are the parts of a tile off
the section's edge (bare resin or film: flat, and brighter than the specimen beside it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache

import cv2
import numpy as np

log = logging.getLogger(__name__)

FIT_GRID = 64      # the median is fitted on a FIT_GRID x FIT_GRID reduction of the tile
FIT_DEGREE = 4


@lru_cache(maxsize=4)
def _poly_basis(h: int, w: int, degree: int) -> np.ndarray:
    """(h * w, terms) monomials x**i * y**j on [-1, 1]^2 (read-only: shared between calls)."""
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    terms = [(x**i) * (y**j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    basis = np.stack([t.ravel() for t in terms], axis=1)
    basis.flags.writeable = False
    return basis


@lru_cache(maxsize=1)
def _fit_matrix() -> np.ndarray:
    """Least squares on the whole FIT_GRID basis as one matrix product (the fit of every
    percentile tried: a fifth of the estimate's time as lstsq calls)."""
    m = np.linalg.pinv(_poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE))
    m.flags.writeable = False
    return m


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
    if np.issubdtype(tile.dtype, np.unsignedinteger):
        # One pass answers both for most tiles: a positive maximum under saturation.
        top = tile.max()
        if top == 0:
            return False
        if top < sat:
            return True
    elif float(tile.mean()) <= 0:
        return False
    return float(np.mean(tile >= sat)) < 0.001


def _dark_at(dark: float | np.ndarray, side: int) -> np.ndarray:
    """The dark level averaged down to side x side, as `_reduced` subtracts it (a scalar stays one)."""
    d = np.asarray(dark, np.float32)
    return cv2.resize(d, (side, side), interpolation=cv2.INTER_AREA) if d.ndim == 2 else d


def _reduced(tile: np.ndarray, side: int, dark: np.ndarray) -> np.ndarray:
    """The tile averaged down to side x side (float32), less `dark` (`_dark_at` the same
    side: averaging is linear, so the dark frame is reduced once, not with every tile).
    Integer tiles are averaged in their own type and only the small result converted (their
    rounding is half a count of a mean of hundreds of pixels)."""
    if np.issubdtype(tile.dtype, np.integer) and tile.dtype.itemsize <= 2:
        small = cv2.resize(tile, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    else:
        small = cv2.resize(tile.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    return small - dark


def _band(tile: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the tile less dark reduced to 2 FIT_GRID square, its band-pass; `dark` at that side):
    specimen has fine structure, bare resin only shot noise, which the reduction averages away."""
    small = _reduced(tile, FIT_GRID * 2, dark)
    return small, cv2.GaussianBlur(small, (0, 0), 1.0) - cv2.GaussianBlur(small, (0, 0), 4.0)


def detail_contrast(tile: np.ndarray, dark: float | np.ndarray = 0.0) -> float:
    """Fine-structure contrast (band-pass std / mean) at a reduced size."""
    return _contrast(*_band(tile, _dark_at(dark, FIT_GRID * 2)))


def _contrast(small: np.ndarray, band: np.ndarray) -> float:
    return float(band.std() / max(float(small.mean()), 1e-6))


MASK_BLOCKS = 16   # a tile's field is judged for bare resin in MASK_BLOCKS x MASK_BLOCKS blocks
MIN_OFF_BLOCKS = 24   # of them (10 % of the field): the least area taken to be off the section
RESIN_ABOVE = 90.0    # percentile of the set's textured blocks (through the gain) resin is brighter than


def _blocks(a: np.ndarray, reduce: str = "mean") -> np.ndarray:
    """MASK_BLOCKS x MASK_BLOCKS block means (or RMS) of a square reduced image."""
    b = a.shape[0] // MASK_BLOCKS
    v = a.reshape(MASK_BLOCKS, b, MASK_BLOCKS, b)
    return np.sqrt((v * v).mean((1, 3))) if reduce == "rms" else v.mean((1, 3))


def resin_masks(band_rms: np.ndarray, level: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(n, FIT_GRID, FIT_GRID) True where a tile shows specimen, False off the section's edge.

    band_rms, level: (n, MASK_BLOCKS, MASK_BLOCKS) band-pass RMS and mean per block; gain:
    a first estimate on the FIT_GRID grid. A block is off the section where its fine
    contrast (relative to its level) is under BLANK_CONTRAST of the set's median block and
    it is brighter, through the gain, than RESIN_ABOVE % of the set's textured blocks: bare
    resin and film pass more electrons than any stained part of the section. Flat and
    darker (the inside of most cells; a dark field's background between stained nuclei; a
    round beam's dark corners) stays: that is specimen, or what the gain is estimated from.
    Off the section is one region reaching the tile's border (the section's edge crosses
    the field) of MIN_OFF_BLOCKS or more; the flat bright insides of cells are islands
    among textured blocks, and stay. Blocks next to those off the section go too (the edge
    itself is textured, half resin)."""
    rel = band_rms / np.maximum(level, 1e-6)
    flat = rel < BLANK_CONTRAST * float(np.median(rel))
    through = level / np.maximum(_blocks(gain)[None], 1e-6)
    off = np.zeros_like(flat)
    if flat.all() or not flat.any():
        return ~np.zeros((len(flat), FIT_GRID, FIT_GRID), bool)
    # Brighter than nearly all textured blocks of the set: resin passes more electrons than
    # any stained part of the section.
    textured = float(np.percentile(through[~flat], RESIN_ABOVE))
    for k in range(len(flat)):
        bright = (flat[k] & (through[k] > textured)).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
        for c in range(1, count):
            x, y, w, h, area = stats[c]
            if area >= MIN_OFF_BLOCKS and (x == 0 or y == 0 or x + w == MASK_BLOCKS or y + h == MASK_BLOCKS):
                off[k] |= labels == c
    off = np.array([cv2.dilate(o.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 for o in off])
    rep = FIT_GRID // MASK_BLOCKS
    return ~np.repeat(np.repeat(off, rep, axis=1), rep, axis=2)


def estimate_flatfield(tiles: Iterable[np.ndarray], dark: float | np.ndarray = 0.0) -> np.ndarray:
    """Gain field (float32, mean 1) of the camera, from at least three usable tiles.

    Saturated tiles and blank ones (bare resin: detail contrast far under the set's
    median) are left out: a blank tile's flat field is its own, uniform brightness over
    the gain, at a different level and often with a section edge across it.
    """
    small, contrast, band_rms, block_level = [], [], [], []
    shape: tuple[int, ...] | None = None
    dark_fit, dark_band = _dark_at(dark, FIT_GRID), _dark_at(dark, FIT_GRID * 2)
    for tile in tiles:
        if shape is None:
            shape = tile.shape
            if np.ndim(dark) == 2 and np.shape(dark) != shape:
                raise ValueError(f"dark frame {np.shape(dark)} does not match the tiles' {shape}")
        elif tile.shape != shape:
            raise ValueError(f"tiles of different shapes: {shape} and {tile.shape}")
        if not usable_for_flatfield(tile):
            continue
        # Normalised later by a percentile of the reduced tile: one of a full tile costs more
        # than all the rest of the estimate together, and the scale is all it sets.
        reduced = _reduced(tile, FIT_GRID, dark_fit)
        if float(np.median(reduced)) <= 0:
            continue
        small.append(reduced)
        half, band = _band(tile, dark_band)
        contrast.append(_contrast(half, band))
        band_rms.append(_blocks(band, "rms"))
        block_level.append(_blocks(half))
    if small:
        keep = np.array(contrast) >= BLANK_CONTRAST * float(np.median(contrast))
        small = [s for s, k in zip(small, keep, strict=True) if k]
        band_rms = [b for b, k in zip(band_rms, keep, strict=True) if k]
        block_level = [b for b, k in zip(block_level, keep, strict=True) if k]
    if shape is None or len(small) < 3:
        raise ValueError(f"need at least 3 usable tiles to estimate a flat-field, got {len(small)}")
    stack = np.stack(small)
    q = choose_quantile(stack)
    coef = _fit_quantile(stack, q)
    if coef is None:
        raise ValueError(f"the tiles' {q:g}th percentile is not positive on 3 of them (dark frames?)")
    # Parts of tiles off the section's edge, judged through this first estimate, are left
    # out and the statistic taken again (each tile levelled through the gain, as its
    # specimen may lie in one corner of the field only).
    basis = _poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE)
    masks = resin_masks(np.stack(band_rms), np.stack(block_level), _held(basis @ coef).reshape(FIT_GRID, FIT_GRID))
    if not masks.all():
        edged = int((~masks).any(axis=(1, 2)).sum())
        log.info("flat-field: %d of %d tiles show the section's edge; %.0f %% of their area (bare resin "
                 "past it) left out of the estimate", edged, len(masks),
                 100 * float((~masks).mean()) * len(masks) / edged)
        q = choose_quantile(stack, masks)
        masked = _fit_quantile(stack, q, masks)
        if masked is None:
            raise ValueError(f"the tiles' {q:g}th percentile is not positive on 3 of them (dark frames?)")
        coef = masked
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


def choose_quantile(stack: np.ndarray, masks: np.ndarray | None = None) -> float:
    """The percentile whose estimates from the even and the odd tiles agree best: a
    statistic biased by the specimen gives two different answers on different tiles (the
    median where nuclei cover a third of the field), one too noisy (a low quantile of EM)
    gives two noisy ones; the vignetting is the same in both halves. Percentiles whose fit on
    all tiles is under MIN_GAIN on more than MAX_LOW_AREA of the tile are not candidates.
    `masks`: where each tile shows specimen (resin_masks); None: everywhere."""
    if len(stack) < MIN_SPLIT_TILES:
        return 50.0
    basis = _poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE)
    best, best_q = np.inf, 50.0
    for q in QUANTILES:
        fits = [_fit_quantile(stack[part], q, None if masks is None else masks[part])
                for part in (slice(0, None, 2), slice(1, None, 2), slice(None))]
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


def _fit_quantile(stack: np.ndarray, q: float, masks: np.ndarray | None = None) -> np.ndarray | None:
    """Polynomial coefficients fitted to the per-pixel q-th percentile of tiles each divided
    by its own q-th percentile (reduced tiles, FIT_GRID x FIT_GRID); tiles whose percentile
    is not positive (mostly dark) are left out; None if fewer than 3 are left.

    `masks` (resin_masks): only where each tile shows specimen. A tile is then levelled by
    its percentile through a first fit (its specimen may lie where the gain is low), the
    statistic of a pixel is taken over the tiles that show specimen there, and pixels
    that fewer than 3 tiles show are left out of the fit."""
    basis = _poly_basis(FIT_GRID, FIT_GRID, FIT_DEGREE)
    if masks is None:
        level = np.percentile(stack.reshape(len(stack), -1), q, axis=1)
        usable = level > 0
        if usable.sum() < 3:
            return None
        stat = np.percentile(stack[usable] / level[usable][:, None, None], q, axis=0)
        return _fit_matrix() @ stat.ravel()
    shown = np.where(masks, stack, np.nan).reshape(len(stack), -1)
    gain = np.ones(shown.shape[1])
    coef = None
    for _ in range(2):
        level = _nan_percentile(shown / gain, q, axis=1)
        usable = level > 0
        if usable.sum() < 3:
            return None
        per_tile = shown[usable] / level[usable][:, None]
        stat = _nan_percentile(per_tile, q, axis=0)
        fit = np.isfinite(stat) & (np.isfinite(per_tile).sum(0) >= 3)
        if fit.sum() < basis.shape[1]:
            return None
        coef, *_ = np.linalg.lstsq(basis[fit], stat[fit], rcond=None)
        gain = _held(basis @ coef)
    return coef


def _nan_percentile(a: np.ndarray, q: float, axis: int) -> np.ndarray:
    """np.nanpercentile (linear interpolation) by one sort: NaN sorts last, so the k-th
    finite value of a column is its k-th; nan where a column has none. A fifth of the time."""
    s = np.sort(a, axis=axis)
    n = np.isfinite(a).sum(axis=axis)
    pos = q / 100.0 * np.maximum(n - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    a_lo = np.take_along_axis(s, np.expand_dims(lo, axis), axis).squeeze(axis)
    a_hi = np.take_along_axis(s, np.expand_dims(hi, axis), axis).squeeze(axis)
    out = a_lo + (pos - lo) * (a_hi - a_lo)
    return np.where(n > 0, out, np.nan)


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
