"""Global solve: tile positions from pairwise offsets by weighted sparse least squares.

Each pair (i, j) says p_j - p_i = d_ij with weight w_ij (its confidence). A weak prior
p_i = stage_i keeps tiles with no trustworthy neighbour where the stage put them and
fixes the free translation of the whole montage. Pairs whose residual is far above the
rest are dropped and the solve repeated (iterative outlier rejection).
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
SEAM_PX = 1.0              # a used pair still off by more than this after the solve is a flagged seam


@dataclass(frozen=True)
class Pair:
    i: int
    j: int
    dy: float
    dx: float
    confidence: float
    refused: str = ""       # why registration gave no usable offset ("" if it did)


@dataclass
class Solution:
    positions: np.ndarray          # (n, 2) top-left (y, x) in pixels
    pair_residual: np.ndarray      # (n_pairs,) px; NaN for pairs not used
    pair_used: np.ndarray          # (n_pairs,) bool
    tile_residual: np.ndarray      # (n,) px: worst residual of the tile's used pairs
    status: list[str]              # per tile: "ok" or "stage" (placed by the prior alone)
    pair_reason: list[str] = field(default_factory=list)   # per pair: why it is not used ("" if used)
    pair_ends: list[tuple[int, int]] = field(default_factory=list)   # per pair: (i, j)

    @property
    def loops(self) -> int:
        """Independent closed loops among the used pairs: 0 means no pair is checked by any
        other, and the residual after the solve says nothing about their accuracy."""
        return closed_loops([e for e, u in zip(self.pair_ends, self.pair_used, strict=True) if u])

    @property
    def seams(self) -> np.ndarray:
        """Indices of used pairs whose residual exceeds SEAM_PX: visible seams, for QC."""
        return np.flatnonzero(self.pair_used & (np.nan_to_num(self.pair_residual) > SEAM_PX))


def solve_positions(stage_px: np.ndarray, pairs: list[Pair], max_rounds: int | None = None) -> Solution:
    n = len(stage_px)
    stage_px = np.asarray(stage_px, dtype=float)
    used = np.array([p.confidence >= MIN_CONFIDENCE for p in pairs], dtype=bool)
    reason = [p.refused or (f"low agreement: NCC {p.confidence:.2f} below {MIN_CONFIDENCE} (blank or too little "
                            "texture in the overlap)") if not u else "" for p, u in zip(pairs, used, strict=True)]
    positions = stage_px.copy()
    # Consistent pairs agree to well under a pixel, so an absolute bound is the right test;
    # one wrong pair spreads its error over its neighbours, so drop only the worst at a time.
    for _ in range(len(pairs) if max_rounds is None else max_rounds):
        positions = _lsq(stage_px, pairs, used)
        res = _residuals(positions, pairs)
        worst = int(np.argmax(np.where(used, res, -1))) if used.any() else -1
        if worst < 0 or res[worst] <= OUTLIER_PX:
            break
        used[worst] = False
        reason[worst] = f"outlier: disagrees with the other pairs by {res[worst]:.1f} px, left out"
    else:
        positions = _lsq(stage_px, pairs, used)  # rounds ran out right after a drop
    res = _residuals(positions, pairs)
    tile_res = np.zeros(n)
    has_pair = np.zeros(n, dtype=bool)
    for k, p in enumerate(pairs):
        if used[k]:
            for t in (p.i, p.j):
                has_pair[t] = True
                tile_res[t] = max(tile_res[t], res[k])
    status = ["ok" if h else "stage" for h in has_pair]
    if n:
        # A tile tied to nothing but the prior sits at the stage position exactly.
        positions[~has_pair] = stage_px[~has_pair]
    return Solution(positions, np.where(used, res, np.nan), used, tile_res, status, reason,
                    [(p.i, p.j) for p in pairs])


def _lsq(stage_px: np.ndarray, pairs: list[Pair], used: np.ndarray) -> np.ndarray:
    n = len(stage_px)
    rows, cols, vals, rhs_y, rhs_x = [], [], [], [], []
    r = 0
    for k, p in enumerate(pairs):
        if not used[k]:
            continue
        w = float(np.sqrt(p.confidence))
        rows += [r, r]
        cols += [p.j, p.i]
        vals += [w, -w]
        rhs_y.append(w * p.dy)
        rhs_x.append(w * p.dx)
        r += 1
    for t in range(n):
        rows.append(r)
        cols.append(t)
        vals.append(PRIOR_WEIGHT)
        rhs_y.append(PRIOR_WEIGHT * stage_px[t, 0])
        rhs_x.append(PRIOR_WEIGHT * stage_px[t, 1])
        r += 1
    a = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    # Normal equations: A^T A is positive definite thanks to the prior, and sparse
    # (a tile has at most four neighbours), so a direct solve is exact and fast.
    ata = (a.T @ a).tocsc()
    b = np.column_stack([rhs_y, rhs_x])
    return np.asarray(spsolve(ata, a.T @ b)).reshape(n, 2)


def _residuals(positions: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    if not pairs:
        return np.zeros(0)
    i = np.array([p.i for p in pairs])
    j = np.array([p.j for p in pairs])
    d = np.array([[p.dy, p.dx] for p in pairs])
    return np.linalg.norm(positions[j] - positions[i] - d, axis=1)
