"""Global solve: tile positions from pairwise offsets by weighted sparse least squares.

Each pair (i, j) says p_j - p_i = d_ij, weighted per axis by its confidence times its
measured precision on that axis (`axis_weights`): a narrow strip pins the shift along it
far better than across it, and a strip whose texture runs one way says little about the
other. A weak prior
p_i = stage_i keeps tiles with no trustworthy neighbour where the stage put them and
fixes the free translation of the whole montage. Pairs whose residual is far above the
rest are dropped and the solve repeated (iterative outlier rejection): in pixels, not
against a pair's own precision, since a pair that converged on the wrong offset may still
look precise there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve

from tapescope.graph import closed_loops

PRIOR_WEIGHT = 1e-3        # a stage prior is worth 1/1000 of a confident pair
MIN_CONFIDENCE = 0.2       # pairs below this NCC are not used at all
OUTLIER_PX = 2.0           # residual above which the worst pair is dropped and the rest re-solved
MIN_PRECISION = 1e-2       # an axis's precision relative to the median pair's, at least
MAX_PRECISION = 1e1        # and at most: outliers are judged in pixels, so no pair may hold its
                           # tiles against its neighbours by more than this

SEAM_PX = 1.0              # a used pair still off by more than this after the solve is a flagged seam


@dataclass(frozen=True)
class Pair:
    i: int
    j: int
    dy: float
    dx: float
    confidence: float
    refused: str = ""       # why registration gave no usable offset ("" if it did)
    information: tuple[float, float, float] | None = None   # of (dy, dx) as (yy, yx, xx); None: isotropic
    note: str = ""          # what a person should know about a used pair (e.g. its offset changes along it)


@dataclass
class Solution:
    positions: np.ndarray          # (n, 2) top-left (y, x) in pixels: where each tile's pixel (0, 0) lands
    pair_residual: np.ndarray      # (n_pairs,) px; NaN for pairs not used
    pair_used: np.ndarray          # (n_pairs,) bool
    tile_residual: np.ndarray      # (n,) px: worst residual of the tile's used pairs
    status: list[str]              # per tile: "ok" or "stage" (placed by the prior alone)
    pair_reason: list[str] = field(default_factory=list)   # per pair: why it is not used ("" if used)
    pair_ends: list[tuple[int, int]] = field(default_factory=list)   # per pair: (i, j)
    # (n, 2, 2) where each tile has its own linear part (affine.py): tile pixel q lands at
    # positions[k] + linear[k] @ q. None: a translation per tile.
    linear: np.ndarray | None = None

    @property
    def loops(self) -> int:
        """Independent closed loops among the used pairs: 0 means no pair is checked by any
        other, and the residual after the solve says nothing about their accuracy."""
        return closed_loops([e for e, u in zip(self.pair_ends, self.pair_used, strict=True) if u])

    @property
    def seams(self) -> np.ndarray:
        """Indices of used pairs whose residual exceeds SEAM_PX: visible seams, for QC."""
        return np.flatnonzero(self.pair_used & (np.nan_to_num(self.pair_residual) > SEAM_PX))


def axis_weights(pairs: list[Pair], used: np.ndarray) -> np.ndarray:
    """(n_pairs, 2) weights of each pair's dy and dx equations: confidence times precision.

    Precision is the inverse of the measured variance on that axis (from the pair's
    information matrix), relative to the median of the used pairs', so a typical pair weighs
    its confidence as before and the stage prior keeps its meaning; it is held within
    [MIN_PRECISION, MAX_PRECISION] of the median. Pairs without information count 1.
    """
    precision = np.ones((len(pairs), 2))
    has = np.array([p.information is not None for p in pairs], bool)
    for k, p in enumerate(pairs):
        if p.information is None:
            continue
        iyy, iyx, ixx = p.information
        det = iyy * ixx - iyx * iyx
        # Marginal variances of the inverse: (ixx, iyy) / det.
        precision[k] = (det / ixx, det / iyy) if det > 0 and ixx > 0 and iyy > 0 else (0.0, 0.0)
    ref = precision[has & used]
    if len(ref):
        scale = float(np.median(ref))
        if scale > 0:
            precision[has] = np.clip(precision[has] / scale, MIN_PRECISION, MAX_PRECISION)
    conf = np.array([max(p.confidence, 0.0) for p in pairs])
    return conf[:, None] * precision


def trusted(pairs: list[Pair]) -> tuple[np.ndarray, list[str]]:
    """Which pairs a solve starts from (confidence MIN_CONFIDENCE or more), and why each of
    the others is not used."""
    used = np.array([p.confidence >= MIN_CONFIDENCE for p in pairs], dtype=bool)
    reason = [p.refused or (f"low agreement: NCC {p.confidence:.2f} below {MIN_CONFIDENCE} (blank or too little "
                            "texture in the overlap)") if not u else "" for p, u in zip(pairs, used, strict=True)]
    return used, reason


def placed_tiles(n: int, pairs: list[Pair], used: np.ndarray, residual: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per tile: its worst used pair's residual, whether a used pair placed it, and its
    status ("ok", or "stage": placed by the stage prior alone)."""
    tile_res = np.zeros(n)
    placed = np.zeros(n, dtype=bool)
    for k in np.flatnonzero(used):
        for t in (pairs[k].i, pairs[k].j):
            placed[t] = True
            tile_res[t] = max(tile_res[t], residual[k])
    return tile_res, placed, ["ok" if h else "stage" for h in placed]


def stage_prior(stage: np.ndarray, first_row: int, stride: int = 2, weight: float = PRIOR_WEIGHT,
                axes: tuple[int, ...] = (0, 1)) -> tuple[list[int], list[int], list[float], list[float]]:
    """(rows, columns, values, right-hand side) of the stage prior, rows numbered from
    `first_row`: unknown stride * t + k (tile t's position on axes[k]) equals the stage's,
    weighed `weight`."""
    rows, cols, vals, rhs = [], [], [], []
    for t in range(len(stage)):
        for k, axis in enumerate(axes):
            rows.append(first_row + len(axes) * t + k)
            cols.append(stride * t + k)
            vals.append(weight)
            rhs.append(weight * float(stage[t, axis]))
    return rows, cols, vals, rhs


def solve_positions(stage_px: np.ndarray, pairs: list[Pair], max_rounds: int | None = None) -> Solution:
    n = len(stage_px)
    stage_px = np.asarray(stage_px, dtype=float)
    used, reason = trusted(pairs)
    positions = stage_px.copy()
    weights = axis_weights(pairs, used)
    # Consistent pairs agree to well under a pixel, so an absolute bound is the right test;
    # one wrong pair spreads its error over its neighbours, so drop only the worst at a time.
    for _ in range(len(pairs) if max_rounds is None else max_rounds):
        positions = _lsq(stage_px, pairs, used, weights)
        res = _residuals(positions, pairs)
        worst = int(np.argmax(np.where(used, res, -1))) if used.any() else -1
        if worst < 0 or res[worst] <= OUTLIER_PX:
            break
        used[worst] = False
        reason[worst] = f"outlier: disagrees with the other pairs by {res[worst]:.1f} px, left out"
    else:
        positions = _lsq(stage_px, pairs, used, weights)  # rounds ran out right after a drop
    res = _residuals(positions, pairs)
    tile_res, has_pair, status = placed_tiles(n, pairs, used, res)
    if n:
        # A tile tied to nothing but the prior sits at the stage position exactly.
        positions[~has_pair] = stage_px[~has_pair]
    return Solution(positions, np.where(used, res, np.nan), used, tile_res, status, reason,
                    [(p.i, p.j) for p in pairs])


def _lsq(stage_px: np.ndarray, pairs: list[Pair], used: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each axis on its own (the pairs weigh the axes differently): one small sparse solve each."""
    n = len(stage_px)
    out = np.empty((n, 2))
    for axis in (0, 1):
        rows, cols, vals, rhs = [], [], [], []
        r = 0
        for k, p in enumerate(pairs):
            if not used[k]:
                continue
            w = float(np.sqrt(weights[k, axis]))
            rows += [r, r]
            cols += [p.j, p.i]
            vals += [w, -w]
            rhs.append(w * (p.dy, p.dx)[axis])
            r += 1
        prior = stage_prior(stage_px, r, stride=1, axes=(axis,))
        rows, cols, vals, rhs = rows + prior[0], cols + prior[1], vals + prior[2], rhs + prior[3]
        r += n
        a = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
        # Normal equations: A^T A is positive definite thanks to the prior, and sparse
        # (a tile has at most four neighbours), so a direct solve is exact and fast.
        out[:, axis] = np.asarray(spsolve((a.T @ a).tocsc(), a.T @ np.asarray(rhs))).reshape(n)
    return out


def _residuals(positions: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    if not pairs:
        return np.zeros(0)
    i = np.array([p.i for p in pairs])
    j = np.array([p.j for p in pairs])
    d = np.array([[p.dy, p.dx] for p in pairs])
    return np.linalg.norm(positions[j] - positions[i] - d, axis=1)
