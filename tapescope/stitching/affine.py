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
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.linalg import splu

from .lens import PatchOffset, RadialDistortion, camera_points, measure_patches
from .register import MIN_OVERLAP_PX
from .solve import OUTLIER_PX, Pair, Solution, axis_weights, placed_tiles, stage_prior, trusted

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


def _frame(shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The tile's centre and half-width: the unknowns are solved about the one, in units of the other."""
    return (np.array(shape, float) - 1) / 2, max(shape) / 2


def _rows(patches: list[PatchOffset], n: int, shape: tuple[int, int], lens: RadialDistortion | None,
          stage: np.ndarray, prior: float) -> tuple[csr_matrix, np.ndarray, csr_matrix]:
    """The weighted least-squares rows (patches, then priors) with their right-hand side, and
    the gauge's rows (sum_k E_k = 0; dense: kept apart for the solve)."""
    centre, half = _frame(shape)
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
    held = stage_prior(stage, r, stride=6)
    rows, cols, vals, rhs = rows + held[0], cols + held[1], vals + held[2], rhs + held[3]
    r += len(held[0])
    for t in range(n):
        for k in range(4):
            rows.append(r)
            cols.append(6 * t + 2 + k)
            vals.append(prior)
            rhs.append(0.0)
            r += 1
    gauge = coo_matrix(([GAUGE_WEIGHT / n] * (4 * n), ([k for k in range(4) for _ in range(n)],
                                                       [6 * t + 2 + k for k in range(4) for t in range(n)])),
                       shape=(4, 6 * n))
    return coo_matrix((vals, (rows, cols)), shape=(r, 6 * n)).tocsr(), np.asarray(rhs), gauge.tocsr()


def measure_warped(a: np.ndarray, b: np.ndarray, i: int, j: int, origin_a: np.ndarray, origin_b: np.ndarray,
                   relative: np.ndarray, size: int = PATCH_PX, backend: Any = None,
                   lens: RadialDistortion | None = None, shape: tuple[int, int] | None = None) -> list[PatchOffset]:
    """Patch offsets of the overlap of crops a and b (starting at origin_a and origin_b in
    their tiles' pixels), both first resampled into a frame half-way between them through
    `relative` (2 x 3, (y, x): tile b -> tile a, in pixels with the lens taken out, q + D(q);
    `lens` and the tiles' `shape` say what D is). What is left is a small shift, even within
    a patch: between turned cameras b's offset changes by pixels along a patch, and least
    squares on such a patch is pulled towards where its texture is (0.1-0.3 px on synthetic
    arrays). Half-way, as `register.refine_shift` resamples, so that both are smoothed
    alike. The offsets returned are in the tiles' own pixels, as measure_patches gives them."""
    lin, off = relative[:, :2], relative[:, 2]
    # In crop pixels (lens taken out), qa = lin @ qb + shift. The half-way frame u: a is
    # sampled at qa = half @ u + whole + frac / 2, b at qb = lin^-1 (half @ u - frac / 2).
    shift = lin @ origin_b + off - origin_a
    whole = np.round(shift)
    frac = shift - whole
    half = (np.eye(2) + lin) / 2
    to_a = np.column_stack([half, whole + frac / 2])
    back = np.linalg.inv(lin)
    to_b = np.column_stack([back @ half, -back @ frac / 2])
    box = _inner_box(to_a, a.shape) & _inner_box(to_b, b.shape)
    if lens is None or lens.is_identity or shape is None:
        lens = None
    # The lens moves a pixel by this much at most: the box keeps clear of the crops' edges by it.
    bend = 0 if lens is None else lens.bend_px(shape)
    if box is None:
        return []
    y0, y1, x0, x1 = box.bounds
    y0, y1, x0, x1 = y0 + bend, y1 - bend, x0 + bend, x1 - bend
    if min(y1 - y0, x1 - x0) < MIN_OVERLAP_PX:
        return []
    frame = np.stack(np.mgrid[y0:y1, x0:x1], -1).astype(np.float64)

    def raw(to: np.ndarray, u: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """Crop pixels (the tile's own, not lens-corrected) of frame points u."""
        v = u @ to[:, :2].T + to[:, 2]
        if lens is None or shape is None:
            return v
        return camera_points(lens, v + origin, shape) - origin

    sa, sb = (ndimage.map_coordinates(np.asarray(img, np.float32), np.moveaxis(raw(to, frame, origin), -1, 0),
                                      order=3, mode="nearest")
              for img, to, origin in ((a, to_a, origin_a), (b, to_b, origin_b)))
    found = measure_patches(sa, sb, i, j, (0.0, 0.0), np.zeros(2), np.zeros(2), backend=backend, size=size,
                            own_peak=False)
    out = []
    for p in found:
        u = p.qb + np.array([y0, x0])        # where b's patch sits, in the half-way frame
        qb = raw(to_b, u, origin_b) + origin_b
        qa = raw(to_a, u + p.m, origin_a) + origin_a
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
           prior: float) -> tuple[np.ndarray, np.ndarray]:
    """(positions of pixel (0, 0), linear parts) of one least-squares solve.

    Normal equations, factorised once (sparse: a tile meets four neighbours); the gauge's
    four dense rows enter as a rank-4 update (Woodbury), so a montage of thousands of tiles
    stays a sparse solve."""
    n = len(stage)
    a, b, g = _rows(patches, n, shape, lens, stage, prior)
    lu = splu((a.T @ a).tocsc())
    x = lu.solve(a.T @ b)
    u = g.T.toarray()                             # (6n, 4)
    y = lu.solve(u)
    x -= y @ np.linalg.solve(np.eye(4) + u.T @ y, u.T @ x)
    x = x.reshape(n, 6)
    centre, half = _frame(shape)
    linear = np.eye(2)[None] + x[:, 2:].reshape(n, 2, 2) / half
    # The centre lands at P + centre; pixel (0, 0) at that minus A @ centre.
    positions = x[:, :2] + centre - linear @ centre
    return positions, linear


def fit_affine(patches: list[PatchOffset], stage: np.ndarray, shape: tuple[int, int],
               lens: RadialDistortion | None = None) -> AffineFit:
    """An affine per tile from patch offsets (module doc), with patch outliers dropped:
    judged in pixels (where the two tiles put the patch), not weighted, as the translation
    solve judges pairs."""
    stage = np.asarray(stage, float).reshape(-1, 2)
    keep = np.ones(len(patches), bool)
    for _ in range(8):
        kept = [p for p, k in zip(patches, keep, strict=True) if k]
        positions, linear = _solve(kept, stage, shape, lens, AFFINE_PRIOR)
        res = _residuals(kept, positions, linear, shape, lens)
        bound = max(PATCH_OUTLIER_PX, 3 * float(np.median(res))) if len(res) else 0.0
        if (res <= bound).all():
            break
        keep[np.flatnonzero(keep)[res > bound]] = False
    residual = _residuals(patches, positions, linear, shape, lens)
    kept = [p for p, k in zip(patches, keep, strict=True) if k]
    # The same patches with each tile held to a translation (a prior too strong to move):
    # what the affine buys, for the summary; both in pixels.
    flat_pos, flat_lin = _solve(kept, stage, shape, lens, 1e6)
    flat = _residuals(kept, flat_pos, flat_lin, shape, lens)
    rms = float(np.sqrt(np.mean(residual[keep] ** 2))) if keep.any() else float("nan")
    rms_t = float(np.sqrt(np.mean(flat**2))) if len(flat) else float("nan")
    return AffineFit(positions, linear, residual, keep, rms_t, rms)


def _residuals(patches: list[PatchOffset], positions: np.ndarray, linear: np.ndarray, shape: tuple[int, int],
               lens: RadialDistortion | None) -> np.ndarray:
    """|where the patch lands through a - where through b|, px, per patch."""
    if not patches:
        return np.zeros(0)
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

    A pair is used where registration trusted it (confidence over MIN_CONFIDENCE) and half
    of its patches (MIN_PATCHES at least) fit; its residual is the RMS of its patches'. A pair
    whose patches disagree with the rest by more than OUTLIER_PX is left out, the worst
    first, and the rest solved again. Tiles no used pair reaches stay at the stage."""
    n = len(stage)
    stage = np.asarray(stage, float).reshape(-1, 2)
    used, reason = trusted(pairs)
    index = {(p.i, p.j): k for k, p in enumerate(pairs)}
    of_pair = np.array([index.get((p.i, p.j), -1) for p in patches], int)
    while True:
        chosen = [p for p, k in zip(patches, of_pair, strict=True) if k >= 0 and used[k]]
        fit = fit_affine(chosen, stage, shape, lens)
        owner = np.array([index[(p.i, p.j)] for p in chosen], int)
        res = np.full(len(pairs), np.nan)
        total = np.bincount(owner, minlength=len(pairs))
        fitting = np.bincount(owner[fit.patch_used], minlength=len(pairs))
        for k in np.flatnonzero(used & (fitting > 0)):
            mine = (owner == k) & fit.patch_used
            res[k] = float(np.sqrt(np.mean(fit.patch_residual[mine] ** 2)))
        # Half of a pair's patches at least (MIN_PATCHES at least) must fit: a pair that is
        # wrong as a whole loses most of them, and the few left by chance must not vouch for
        # it. The one with the smallest share goes first, and the rest are fitted again: a
        # wrong pair bends the fit, and its neighbours lose patches while it is in.
        short = np.flatnonzero(used & (fitting < np.maximum(MIN_PATCHES, total / 2)))
        if len(short):
            k = int(short[np.argmin(fitting[short] / np.maximum(total[short], 1))])
            used[k] = False
            reason[k] = (f"too few patches: {int(fitting[k])} of {int(total[k])} of the overlap fit the tiles' "
                         f"affines (half, and {MIN_PATCHES} at least, needed)")
            continue
        worst = int(np.nanargmax(np.where(used, res, np.nan))) if used.any() else -1
        if worst < 0 or res[worst] <= OUTLIER_PX:
            break
        used[worst] = False
        reason[worst] = f"outlier: its patches disagree with the other pairs by {res[worst]:.1f} px RMS, left out"
    positions, linear = fit.positions.copy(), fit.linear.copy()
    tile_res, placed, status = placed_tiles(n, pairs, used, res)
    positions[~placed] = stage[~placed]
    linear[~placed] = np.eye(2)
    solution = Solution(positions, np.where(used, res, np.nan), used, tile_res, status, reason,
                        [(p.i, p.j) for p in pairs], linear)
    return solution, fit
