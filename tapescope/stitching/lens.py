"""Lens distortion: a radial model of the camera, q -> q + D(q).

Convention (the one the synthetic sets and the solve share): camera pixel q = (y, x) of a
tile at top-left position p sees the specimen at p + q + D(q), with

    D(q) = (k1 * rho^2 + k2 * rho^4) * (q - c),   rho = |q - c| / R,

c the sensor centre and R the half-width of the sensor. k1 > 0 is barrel-like in the sense
that corners see further out than a perfect lens would show them. D is zero at the centre,
so a tile's position is still the position of its centre pixel minus the centre offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix, hstack
from scipy.sparse.linalg import lsqr

from .backend import CPU
from .register import band_pass, overlap_slices, piece_spans, refine_pieces
from .solve import stage_prior


@dataclass(frozen=True)
class RadialDistortion:
    k1: float = 0.0
    k2: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0

    def basis(self, q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(..., 2, 2) array: the displacement at points q (..., 2) per unit k1 and per unit k2."""
        return radial_basis(q, shape)

    def at(self, q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Displacement D(q) at points q (..., 2) in pixels of a tile of `shape`."""
        b = radial_basis(np.asarray(q, float), shape)
        return b[..., 0] * self.k1 + b[..., 1] * self.k2

    def bend_px(self, shape: tuple[int, int]) -> int:
        """How far the lens moves a pixel at most (at the sensor's corner), rounded up, plus
        one: the margin that crops and boxes keep for it."""
        return int(np.ceil(np.abs(self.at(np.zeros(2), shape)).max())) + 1

    def displacement(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(dy, dx) fields of D over every pixel of a tile of `shape`."""
        if self.is_identity:
            return np.zeros(shape), np.zeros(shape)
        q = np.stack(np.mgrid[0:shape[0], 0:shape[1]], -1).astype(float)
        d = self.at(q, shape)
        return d[..., 0], d[..., 1]


def radial_basis(q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    c = (np.array(shape, float) - 1) / 2
    r_norm = max(shape) / 2
    v = q - c
    rho2 = (v**2).sum(-1, keepdims=True) / r_norm**2
    return np.stack([rho2 * v, rho2**2 * v], -1)


LENS_TOL_PX = 1e-4      # camera_pixels' fixed-point steps stop when they move a pixel less than this
LENS_MAX_STEPS = 30


def camera_pixels(lens: RadialDistortion, ty: np.ndarray, tx: np.ndarray,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The camera pixel q that sees tile-frame point t (lens.py: q + D(q) = t), exactly.

    Rendering through this un-distorts the tiles: each output pixel samples the camera
    pixel that saw its point of the specimen, so overlapping tiles agree at the seams.
    Far outside a strongly bent sensor the steps diverge: such points come back inf or nan
    (no warning), and the caller treats them as seeing nothing."""
    cy, cx = np.float32((shape[0] - 1) / 2), np.float32((shape[1] - 1) / 2)
    inv_r2 = np.float32(1.0 / (max(shape) / 2) ** 2)
    k1, k2 = np.float32(lens.k1), np.float32(lens.k2)
    # float32 cannot resolve 1e-4 px at coordinates of thousands: stop at a few of its steps there.
    tol = max(LENS_TOL_PX, 4 * float(np.spacing(np.float32(max(shape)))))
    qy, qx = ty, tx
    moving = np.ones(np.shape(ty), bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(LENS_MAX_STEPS):
            vy, vx = qy - cy, qx - cx
            f = (vy * vy + vx * vx) * inv_r2
            f = f * (k1 + k2 * f) if k2 else f * k1
            ny, nx = ty - f * vy, tx - f * vx
            # Each point stops on its own step, so its result does not depend on which others
            # it is solved with (a block rendered alone equals the whole render).
            ny, nx = np.where(moving, ny, qy), np.where(moving, nx, qx)
            moving &= np.maximum(np.abs(ny - qy), np.abs(nx - qx)) >= tol
            qy, qx = ny, nx
            if not moving.any():
                break
    return qy, qx


def camera_points(lens: RadialDistortion, t: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`camera_pixels` of points t (..., 2) as (y, x)."""
    qy, qx = camera_pixels(lens, t[..., 0], t[..., 1], shape)
    return np.stack([qy, qx], -1)


# -- estimation from the overlaps of a montage --------------------------------------------
#
# A patch of the overlap of tiles a and b, centred at pixel qb of b, is measured (by the
# same least-squares refinement as whole pairs) to sit at qa = qb + m in a. The same
# specimen point seen twice gives  pa + qa + D(qa) = pb + qb + D(qb),  so
#
#     m = (pb - pa) + k1 * (B1(qb) - B1(qa))
#
# which is linear in the tile positions and k1 together: one sparse least-squares solve
# over all patches of all pairs gives both. The constant part of a pair's distortion is
# indistinguishable from its offset; k1 is fixed by how the offset varies along the seam.

LENS_PATCHES = 8          # patches along each overlap
MIN_SLAB_PX = 24          # measure_patches' grid cuts an overlap across into slabs this wide at least
MIN_PATCHES = 24          # fewer than this: no estimate
PATCH_OUTLIER_PX = 0.5   # a patch this far from the fit (and 3x the median) is dropped
MIN_GAIN = 0.9            # keep a model only if it cuts the patch residual RMS by 10 % or more


@dataclass(frozen=True)
class PatchOffset:
    i: int                 # tile a
    j: int                 # tile b
    qb: np.ndarray         # (2,) patch centre in b's pixels
    m: np.ndarray          # (2,) measured: the patch sits at qb + m in a's pixels
    information: tuple[float, float, float] | None = None   # of m, as (yy, yx, xx) (`Refined`)


@dataclass(frozen=True)
class LensFit:
    model: RadialDistortion
    rms_before: float      # patch residual RMS (px) of a translation-only fit
    rms_after: float       # ... with the model
    n_patches: int
    accepted: bool         # the model is worth applying (cuts the residual by MIN_GAIN)


def measure_patches(
    a: np.ndarray, b: np.ndarray, i: int, j: int, offset: tuple[float, float], origin_a: np.ndarray,
    origin_b: np.ndarray, n: int = LENS_PATCHES, backend: Any = None, size: int | None = None,
    own_peak: bool | None = None,
) -> list[PatchOffset]:
    """Patch offsets along the overlap of a and b (crops of the tiles starting at origin_a and
    origin_b in tile pixels; `offset` is b's position relative to a in crop pixels).

    By default n patches along the overlap, each as wide as it and refined from `offset`
    (a lens moves them by fractions of a pixel). With `size`, patches of about size px
    in a grid along and across the overlap, each from its own correlation peak: tiles
    turned or scaled against each other (a camera array) move them by pixels, and the
    change across a wide overlap is what pins a tile's scale along it. `own_peak` False
    refines the grid's pieces from `offset` too (crops already resampled onto each other)."""
    backend = backend or CPU
    nd = (round(offset[0]), round(offset[1]))
    sl = overlap_slices(a.shape, *nd)
    if sl is None:
        return []
    ca, cb = backend.to_host(band_pass(a[sl[0]], backend)), backend.to_host(band_pass(b[sl[1]], backend))
    long_axis = int(np.argmax(ca.shape))
    across = 1 - long_axis
    start = (offset[0] - nd[0], offset[1] - nd[1])
    # Patches at least as long as the overlap is wide (shorter ones hold too little texture),
    # or in a grid, `size` long.
    count = max(2, ca.shape[long_axis] // (size or max(ca.shape[across], 1)))
    if size is None:
        count = min(n, count)
    own_peak = size is not None if own_peak is None else own_peak
    pieces = refine_pieces(ca, cb, count, start, own_peak=own_peak, backend=backend)
    spans = [(0, ca.shape[across])]
    if size is not None and pieces:
        # Each piece again in slabs across, each refined from its whole piece's shift (a slab
        # a few tens of pixels wide finds its own peak less surely than the whole width does).
        # Two slabs at least where the overlap is wide enough: a tile's scale across a band
        # is only seen as the offset changing across it.
        slabs = max(1, min(2, ca.shape[across] // MIN_SLAB_PX), ca.shape[across] // size)
        spans = piece_spans(ca.shape[across], slabs)
        whole = {(lo, hi): fine.shift for lo, hi, fine in pieces}
        pieces = []
        for c0, c1 in spans:
            cut = (slice(None), slice(c0, c1)) if across == 1 else (slice(c0, c1), slice(None))
            starts = [whole.get(span, start) for span in piece_spans(ca.shape[long_axis], count)]
            pieces += [(lo, hi, fine, (c0, c1)) for lo, hi, fine in
                       refine_pieces(ca[cut], cb[cut], count, starts, along=long_axis, backend=backend)]
    else:
        pieces = [(lo, hi, fine, spans[0]) for lo, hi, fine in pieces]
    out = []
    for lo, hi, fine, (c0, c1) in pieces:
        box = [slice(None), slice(None)]
        box[long_axis], box[across] = slice(lo, hi), slice(c0, c1)
        centre = texture_centre(cb[tuple(box)]) + np.array([box[0].start or 0, box[1].start or 0])
        qb = centre + np.array([sl[1][0].start, sl[1][1].start]) + origin_b
        m = np.array(nd, float) + np.array(fine.shift) + origin_a - origin_b
        out.append(PatchOffset(i, j, qb, m, fine.information))
    return out


def texture_centre(piece: np.ndarray) -> np.ndarray:
    """Where in a band-passed piece its shift was measured: the centroid of its gradient
    energy (y, x). Least squares weighs each pixel by its gradient squared, so where the
    offset changes across a piece (tiles turned or scaled against each other) the shift found
    is the one at that centroid: on sparse EM texture up to a third of a 128 px piece away
    from its middle (0.3-1 px of error at 0.4 % of scale, measured on synthetic arrays)."""
    gy, gx = np.gradient(np.asarray(piece, np.float64))
    energy = gy * gy + gx * gx
    total = float(energy.sum())
    if total <= 0:
        return (np.array(piece.shape, float) - 1) / 2
    return np.array([float((energy.sum(1) * np.arange(piece.shape[0])).sum()),
                     float((energy.sum(0) * np.arange(piece.shape[1])).sum())]) / total


def fit_lens(
    patches: list[PatchOffset], stage_px: np.ndarray, shape: tuple[int, int], prior_weight: float = 1e-3,
) -> LensFit | None:
    """Joint least squares of tile positions and k1 over patch offsets; None if too few.

    Patches that disagree with the fit (residual over PATCH_OUTLIER_PX and over three
    times the median) are dropped and the fit repeated: a patch of blank resin or a
    refinement caught on a false minimum must not bend the lens of the whole camera.
    """
    keep = list(patches)
    fit = None
    for _ in range(4):
        if len(keep) < MIN_PATCHES:
            return fit
        fit, res = _fit_once(keep, stage_px, shape, prior_weight)
        bound = max(PATCH_OUTLIER_PX, 3 * float(np.median(res)))
        if (res <= bound).all():
            break
        keep = [p for p, r in zip(keep, res, strict=True) if r <= bound]
    return fit


def _fit_once(
    patches: list[PatchOffset], stage_px: np.ndarray, shape: tuple[int, int], prior_weight: float,
) -> tuple[LensFit, np.ndarray]:
    n = len(stage_px)
    rows, cols, vals, rhs = [], [], [], []
    kcol = []
    for r, p in enumerate(patches):
        qa = p.qb + p.m
        d = radial_basis(p.qb, shape)[:, 0] - radial_basis(qa, shape)[:, 0]   # (2,) per unit k1
        for axis in range(2):
            row = 2 * r + axis
            rows += [row, row]
            cols += [2 * p.j + axis, 2 * p.i + axis]
            vals += [1.0, -1.0]
            rhs.append(p.m[axis])
            kcol.append(d[axis])
    n_meas = 2 * len(patches)
    prior = stage_prior(stage_px, n_meas, weight=prior_weight)
    rows, cols, vals, rhs = rows + prior[0], cols + prior[1], vals + prior[2], rhs + prior[3]
    kcol += [0.0] * len(prior[0])
    n_rows = n_meas + len(prior[0])
    base = coo_matrix((vals, (rows, cols)), shape=(n_rows, 2 * n)).tocsr()
    b = np.asarray(rhs)
    k = np.asarray(kcol)

    def residuals(x: np.ndarray, k1: float) -> np.ndarray:
        res = (base @ x + k * k1 - b)[:n_meas].reshape(-1, 2)
        return np.linalg.norm(res, axis=1)

    x0 = lsqr(base, b, atol=1e-12, btol=1e-12)[0]
    # Scale the k1 column to the others' size so the solver treats it evenly.
    scale = float(np.abs(k).max()) or 1.0
    full = hstack([base, coo_matrix(k[:, None] / scale)]).tocsr()
    x1 = lsqr(full, b, atol=1e-12, btol=1e-12)[0]
    k1 = float(x1[-1] / scale)
    before = residuals(x0, 0.0)
    after = residuals(x1[:-1], k1)
    rms_b, rms_a = (float(np.sqrt((r**2).mean())) for r in (before, after))
    return LensFit(RadialDistortion(k1), rms_b, rms_a, len(patches), rms_a < MIN_GAIN * rms_b), after


def pair_correction(model: RadialDistortion, shape: tuple[int, int], offset: np.ndarray,
                    samples: int = 16) -> np.ndarray:
    """What the lens adds to the offset of a pair measured over its whole overlap: the mean of
    D(qb) - D(qb + offset) over the overlap (in tile pixels). Subtract it from the offset."""
    h, w = shape
    dy, dx = float(offset[0]), float(offset[1])
    # The overlap in b's pixels: where qb + offset is inside a.
    y0, y1 = max(0.0, -dy), min(h, h - dy)
    x0, x1 = max(0.0, -dx), min(w, w - dx)
    if y1 <= y0 or x1 <= x0:
        return np.zeros(2)
    yy, xx = np.meshgrid(np.linspace(y0, y1 - 1, samples), np.linspace(x0, x1 - 1, samples), indexing="ij")
    qb = np.stack([yy, xx], -1).reshape(-1, 2)
    return (model.at(qb, shape) - model.at(qb + np.array([dy, dx]), shape)).mean(0)
