"""An affine per tile, for cameras that are turned or scaled against each other.

A camera array (TEMCA's, or any scope that tiles with several sensors) images each tile
through its own camera, mounted a fraction of a degree turned and a fraction of a percent
scaled against its neighbours: across a 1300 px overlap the offset between two such tiles
changes by several pixels, and no translation per tile closes the montage. Here tile k's
pixel q lands at

    t_k + A_k (q + D(q))          (D: the lens, shared; see lens.py)

in the montage. Patches in a grid over every overlap (`lens.measure_patches` with `size`,
then again through the first fit, `measure_warped`) each say where one point of tile b
sits in tile a: qb in b at qa = qb + m in a, so

    t_b + A_b qb' = t_a + A_a qa'        (q' = q + D(q))

linear in the unknowns. They are solved about each tile's centre (A_k = I + E_k, E_k in
pixels at the half-width of the tile so all unknowns share one scale), with

- the stage prior on each tile's centre (as the translation solve has it): the montage's
  free translation;
- sum_k E_k = 0, held hard: the montage's free linear map (without it the solve shrinks
  every tile, which shrinks every residual); the montage is in the pixels of the average
  camera;
- a weak pull of each E_k to 0 (AFFINE_PRIOR): an overlap is a band, which pins how a
  tile turns and scales along it better than across it, and a small grid leaves some of
  that free (a 2 x 2 grid: 2 of 18 degrees of freedom); there the tiles stay as the
  average camera.

Patches that disagree with the fit are dropped (as the lens fit drops them), then pairs
whose patches still disagree by more than OUTLIER_PX on average, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import lsqr

from .lens import PatchOffset, RadialDistortion, measure_patches
from .register import MIN_OVERLAP_PX
from .solve import MIN_CONFIDENCE, OUTLIER_PX, PRIOR_WEIGHT, Pair, Solution, axis_weights

PATCH_PX = 128           # the grid's patches: about this many pixels on a side
AFFINE_PRIOR = 0.1       # pull of E_k to 0: 1 px of turn/scale at a tile's half-width weighs 0.1 px of residual
GAUGE_WEIGHT = 100.0     # sum_k E_k = 0, held this hard (per tile)
PATCH_OUTLIER_PX = 1.0   # a patch this far from the fit (and 3x the median) is dropped
MIN_PATCHES = 2          # a pair with fewer patches left says nothing about how the tiles turn


@dataclass(frozen=True)
class AffineFit:
    positions: np.ndarray       # (n, 2): where each tile's pixel (0, 0) lands, (y, x)
    linear: np.ndarray          # (n, 2, 2): A_k, acting on (y, x)
    patch_residual: np.ndarray  # (n_patches,) px, for the patches given
    patch_used: np.ndarray      # (n_patches,) bool
    rms_translation: float      # patch residual RMS of a translation per tile, same patches
    rms: float                  # ... of an affine per tile


def _rows(patches: list[PatchOffset], n: int, shape: tuple[int, int], lens: RadialDistortion | None,
          stage: np.ndarray, prior: float) -> tuple[coo_matrix, np.ndarray, int]:
    centre = (np.array(shape, float) - 1) / 2
    half = max(shape) / 2
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs: list[float] = []
    r = 0
    weight = patch_weights(patches)
    for p, w in zip(patches, weight, strict=True):
        qa, qb = p.qb + p.m, p.qb.astype(float)
        if lens is not None:
            qa, qb = qa + lens.at(qa, shape), qb + lens.at(qb, shape)
        ua, ub = (qa - centre) / half, (qb - centre) / half
        for axis in range(2):
            # P_b + E_b ub - P_a - E_a ua = qa - qb   (P: the centre's place, less the centre)
            rows += [r, r, r, r, r, r]
            cols += [6 * p.j + axis, 6 * p.i + axis, 6 * p.j + 2 + 2 * axis, 6 * p.j + 3 + 2 * axis,
                     6 * p.i + 2 + 2 * axis, 6 * p.i + 3 + 2 * axis]
            vals += list(w[axis] * np.array([1.0, -1.0, ub[0], ub[1], -ua[0], -ua[1]]))
            rhs.append(w[axis] * (qa[axis] - qb[axis]))
            r += 1
    measured = r
    for t in range(n):
        for axis in range(2):
            rows.append(r)
            cols.append(6 * t + axis)
            vals.append(PRIOR_WEIGHT)
            rhs.append(PRIOR_WEIGHT * stage[t, axis])
            r += 1
        for k in range(4):
            rows.append(r)
            cols.append(6 * t + 2 + k)
            vals.append(prior)
            rhs.append(0.0)
            r += 1
    for k in range(4):
        rows += [r] * n
        cols += [6 * t + 2 + k for t in range(n)]
        vals += [GAUGE_WEIGHT / n] * n
        rhs.append(0.0)
        r += 1
    return coo_matrix((vals, (rows, cols)), shape=(r, 6 * n)), np.asarray(rhs), measured


def measure_warped(a: np.ndarray, b: np.ndarray, i: int, j: int, origin_a: np.ndarray, origin_b: np.ndarray,
                   relative: np.ndarray, size: int = PATCH_PX, backend: Any = None) -> list[PatchOffset]:
    """Patch offsets of the overlap of crops a and b (starting at origin_a and origin_b in
    their tiles' pixels), both first resampled into a frame half-way between them through
    `relative` (2 x 3, (y, x): tile-b pixel -> tile-a pixel, from a fit). What is left is a
    small shift, even within a patch: between turned cameras b's offset changes by pixels
    along a patch, and least squares on such a patch is pulled towards where its texture is
    (0.1-0.3 px on synthetic arrays). Half-way, as `register.refine_shift` resamples, so
    that both are smoothed alike."""
    lin, off = relative[:, :2], relative[:, 2]
    # In crop pixels, qa = lin @ qb + shift. The half-way frame u: a is sampled at
    # qa = half @ u + whole + frac / 2, b at qb = lin^-1 (half @ u - frac / 2).
    shift = lin @ origin_b + off - origin_a
    whole = np.round(shift)
    frac = shift - whole
    half = (np.eye(2) + lin) / 2
    to_a = np.column_stack([half, whole + frac / 2])
    back = np.linalg.inv(lin)
    to_b = np.column_stack([back @ half, -back @ frac / 2])
    box = _inner_box(to_a, a.shape) & _inner_box(to_b, b.shape)
    if box is None:
        return []
    y0, y1, x0, x1 = box.bounds
    if min(y1 - y0, x1 - x0) < MIN_OVERLAP_PX:
        return []
    sa, sb = (_sample(img, m, box) for img, m in ((a, to_a), (b, to_b)))
    found = measure_patches(sa, sb, i, j, (0.0, 0.0), np.zeros(2), np.zeros(2), backend=backend, size=size,
                            own_peak=False)
    out = []
    for p in found:
        u = p.qb + np.array([y0, x0])        # where b's patch sits, in the half-way frame
        qb = to_b[:, :2] @ u + to_b[:, 2] + origin_b
        qa = to_a[:, :2] @ (u + p.m) + to_a[:, 2] + origin_a
        out.append(PatchOffset(i, j, qb, qa - qb, p.information))
    return out


@dataclass(frozen=True)
class _Box:
    bounds: tuple[int, int, int, int]        # y0, y1, x0, x1 (ends excluded)

    def __and__(self, other: _Box | None) -> _Box | None:
        if other is None:
            return None
        a, b = self.bounds, other.bounds
        y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
        return _Box((y0, y1, x0, x1)) if y1 > y0 and x1 > x0 else None


def _inner_box(to_img: np.ndarray, shape: tuple[int, int]) -> _Box:
    """The frame's pixels whose place in an image of `shape` (through to_img, 2 x 3 (y, x))
    lies inside it with the cubic's reach (2 px) to spare: an axis-aligned box inside the
    image's near-rectangle."""
    inv = np.linalg.inv(to_img[:, :2])
    h, w = shape
    c = (np.array([[2, 2], [2, w - 3], [h - 3, 2], [h - 3, w - 3]], float) - to_img[:, 2]) @ inv.T
    return _Box((int(np.ceil(max(c[0, 0], c[1, 0]))), int(np.floor(min(c[2, 0], c[3, 0]))) + 1,
                 int(np.ceil(max(c[0, 1], c[2, 1]))), int(np.floor(min(c[1, 1], c[3, 1]))) + 1))


def _sample(img: np.ndarray, to_img: np.ndarray, box: _Box) -> np.ndarray:
    """img resampled on the frame's pixels in `box` by a cubic spline: exact to 1/1000 px on
    band-passed texture, where OpenCV's cubic moved it by 0.07 px and its Lanczos by 0.02
    (measured: the same crop resampled at mirrored phases and registered)."""
    y0, y1, x0, x1 = box.bounds
    return ndimage.affine_transform(np.asarray(img, np.float32), to_img[:, :2],
                                    offset=to_img[:, :2] @ np.array([y0, x0], float) + to_img[:, 2],
                                    output_shape=(y1 - y0, x1 - x0), order=3, mode="nearest")


def relative_affine(positions: np.ndarray, linear: np.ndarray, i: int, j: int) -> np.ndarray:
    """2 x 3 (y, x): tile j's pixel -> tile i's pixel under a fit (A_i^-1 (t_j + A_j q - t_i))."""
    inv = np.linalg.inv(linear[i])
    return np.column_stack([inv @ linear[j], inv @ (positions[j] - positions[i])])


def patch_weights(patches: list[PatchOffset]) -> np.ndarray:
    """(n, 2): the square root of each patch's precision per axis, relative to the median
    patch's (as the translation solve weighs pairs: `solve.axis_weights`); 1 without one."""
    pairs = [Pair(p.i, p.j, 0.0, 0.0, 1.0, information=p.information) for p in patches]
    return np.sqrt(axis_weights(pairs, np.ones(len(pairs), bool)))


def _solve(patches: list[PatchOffset], stage: np.ndarray, shape: tuple[int, int], lens: RadialDistortion | None,
           prior: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions of pixel (0, 0), linear parts, patch residuals) of one least-squares solve."""
    n = len(stage)
    a, b, measured = _rows(patches, n, shape, lens, stage, prior)
    a = a.tocsr()
    x = lsqr(a, b, atol=1e-12, btol=1e-12, iter_lim=20 * a.shape[1] + 1000)[0]
    res = np.linalg.norm((a @ x - b)[:measured].reshape(-1, 2), axis=1)
    x = x.reshape(n, 6)
    centre = (np.array(shape, float) - 1) / 2
    half = max(shape) / 2
    linear = np.eye(2)[None] + x[:, 2:].reshape(n, 2, 2) / half
    # The centre lands at P + centre; pixel (0, 0) at that minus A @ centre.
    positions = x[:, :2] + centre - linear @ centre
    return positions, linear, res


def fit_affine(patches: list[PatchOffset], stage: np.ndarray, shape: tuple[int, int],
               lens: RadialDistortion | None = None) -> AffineFit:
    """An affine per tile from patch offsets (module doc), with patch outliers dropped."""
    stage = np.asarray(stage, float).reshape(-1, 2)
    keep = np.ones(len(patches), bool)
    for _ in range(4):
        kept = [p for p, k in zip(patches, keep, strict=True) if k]
        positions, linear, res = _solve(kept, stage, shape, lens, AFFINE_PRIOR)
        bound = max(PATCH_OUTLIER_PX, 3 * float(np.median(res))) if len(res) else 0.0
        if (res <= bound).all():
            break
        idx = np.flatnonzero(keep)
        keep[idx[res > bound]] = False
    residual = np.full(len(patches), np.nan)
    if patches:
        residual = _residuals(patches, positions, linear, shape, lens)
    kept = [p for p, k in zip(patches, keep, strict=True) if k]
    # The same patches with each tile held to a translation (a prior too strong to move):
    # what the affine buys, for the summary.
    _, _, flat = _solve(kept, stage, shape, lens, 1e6)
    rms = float(np.sqrt(np.mean(residual[keep] ** 2))) if keep.any() else float("nan")
    rms_t = float(np.sqrt(np.mean(flat**2))) if len(flat) else float("nan")
    return AffineFit(positions, linear, residual, keep, rms_t, rms)


def _residuals(patches: list[PatchOffset], positions: np.ndarray, linear: np.ndarray, shape: tuple[int, int],
               lens: RadialDistortion | None) -> np.ndarray:
    """|where the patch lands through a - where through b|, px, per patch."""
    i = np.array([p.i for p in patches])
    j = np.array([p.j for p in patches])
    qb = np.array([p.qb for p in patches], float)
    qa = qb + np.array([p.m for p in patches], float)
    if lens is not None:
        qa, qb = qa + lens.at(qa, shape), qb + lens.at(qb, shape)
    wa = positions[i] + np.einsum("nij,nj->ni", linear[i], qa)
    wb = positions[j] + np.einsum("nij,nj->ni", linear[j], qb)
    return np.linalg.norm(wa - wb, axis=1)


def solve_affine(stage: np.ndarray, pairs: list[Pair], patches: list[PatchOffset], shape: tuple[int, int],
                 lens: RadialDistortion | None = None) -> tuple[Solution, AffineFit]:
    """The montage's Solution with an affine per tile (`Solution.linear`).

    A pair is used where registration trusted it (confidence over MIN_CONFIDENCE) and at
    least MIN_PATCHES of its patches fit; its residual is the RMS of its patches'. A pair
    whose patches disagree with the rest by more than OUTLIER_PX is left out, the worst
    first, and the rest solved again. Tiles no used pair reaches stay at the stage."""
    n = len(stage)
    stage = np.asarray(stage, float).reshape(-1, 2)
    used = np.array([p.confidence >= MIN_CONFIDENCE for p in pairs], bool)
    reason = [p.refused or (f"low agreement: NCC {p.confidence:.2f} below {MIN_CONFIDENCE} (blank or too little "
                            "texture in the overlap)") if not u else "" for p, u in zip(pairs, used, strict=True)]
    index = {(p.i, p.j): k for k, p in enumerate(pairs)}
    of_pair = np.array([index.get((p.i, p.j), -1) for p in patches], int)
    while True:
        chosen = [p for p, k in zip(patches, of_pair, strict=True) if k >= 0 and used[k]]
        fit = fit_affine(chosen, stage, shape, lens)
        owner = np.array([index[(p.i, p.j)] for p in chosen], int)
        res = np.full(len(pairs), np.nan)
        for k in np.flatnonzero(used):
            mine = (owner == k) & fit.patch_used
            if mine.sum() < MIN_PATCHES:
                used[k] = False
                reason[k] = (f"too few patches: {int(mine.sum())} of {int((owner == k).sum())} of the overlap "
                             f"fit the tiles' affines (at least {MIN_PATCHES} needed)")
                continue
            res[k] = float(np.sqrt(np.mean(fit.patch_residual[mine] ** 2)))
        worst = int(np.nanargmax(np.where(used, res, np.nan))) if used.any() else -1
        if worst < 0 or res[worst] <= OUTLIER_PX:
            break
        used[worst] = False
        reason[worst] = f"outlier: its patches disagree with the other pairs by {res[worst]:.1f} px RMS, left out"
    positions, linear = fit.positions.copy(), fit.linear.copy()
    tile_res = np.zeros(n)
    placed = np.zeros(n, bool)
    for k in np.flatnonzero(used):
        for t in (pairs[k].i, pairs[k].j):
            placed[t] = True
            tile_res[t] = max(tile_res[t], res[k])
    positions[~placed] = stage[~placed]
    linear[~placed] = np.eye(2)
    status = ["ok" if h else "stage" for h in placed]
    solution = Solution(positions, np.where(used, res, np.nan), used, tile_res, status, reason,
                        [(p.i, p.j) for p in pairs], linear)
    return solution, fit
