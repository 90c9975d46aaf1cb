"""Normal equations of the stack solve: a fill-reducing order that knows the grid, and
one factorisation reused across the robust re-weightings (docs/alignment.md, "Speed").

The unknowns are nodes of per-section grids coupled to their neighbours in the same
section (the thin plate) and to the nodes at the same place in the sections they are
matched to, plus a few unknowns (each section's affine) coupled to all of their section.
That is a 3-D grid, and a nested dissection along the sections' own x and y (never across
z: a section is matched to three others, so a cut across z is three sections thick) fills
in less than SuperLU's minimum degree order: on 12 sections of 33 x 33 nodes, 1.5 s
instead of 3.0 s for the same solution to 1e-12.

Between re-weightings the matrix changes little (a few matches weighed down, a pair
dropped), so the last factorisation preconditions conjugate gradients on the new one:
25-30 iterations, 0.65 s, against 3 s for a new factorisation. Where the priors' balance
moved (the bending's gain, set from the first solve's scatter) a new one is made.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

LEAF = 64            # nodes below which a part is not cut further
CG_RTOL = 1e-10      # of the right-hand side's norm: ~1e-12 of the solution, as the LU's
CG_MAXITER = 80      # beyond this a new factorisation is cheaper
REUSE_GAIN = 2.0     # the prior's gain may move this much (either way) and keep the factor


def nested_dissection(pattern: sp.spmatrix, xy: np.ndarray) -> np.ndarray:
    """A symmetric elimination order of the unknowns of `pattern` (n x n): those with a
    position (`xy`, (n, 2), px) by recursive bisection along the wider side of their box,
    each cut's separator (the nodes of one side with a neighbour on the other) after both
    halves; those without one (NaN: the affine unknowns) last."""
    a = sp.csr_matrix(pattern)
    placed = np.flatnonzero(~np.isnan(xy[:, 0]))
    order: list[np.ndarray] = []
    stack: list[tuple[np.ndarray, bool]] = [(placed, False)]
    # Depth first with an explicit stack: a part is pushed as (ids, done) and emitted after
    # its two halves, its separator after them.
    while stack:
        ids, done = stack.pop()
        if done or len(ids) <= LEAF:
            order.append(ids)
            continue
        c = xy[ids]
        axis = int(np.argmax(c.max(0) - c.min(0)))
        left = c[:, axis] < np.median(c[:, axis])
        if left.all() or not left.any():
            order.append(ids)
            continue
        right = ids[~left]
        touches = np.asarray(a[right][:, ids[left]].getnnz(axis=1)) > 0
        stack.append((right[touches], True))        # emitted last of the three
        stack.append((right[~touches], False))
        stack.append((ids[left], False))
    return np.concatenate([*order, np.flatnonzero(np.isnan(xy[:, 0]))]).astype(np.intp)


def _lu(normal: sp.csc_matrix) -> spla.SuperLU:
    """LU of the symmetric positive (semi-)definite matrix already in its elimination
    order: SuperLU's symmetric mode, no pivoting off the diagonal, the order as given."""
    return spla.splu(normal, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


class NormalSolver:
    """Solves a sequence of normal matrices with one sparsity structure and the same
    unknowns (the re-weightings of one system), each for two right-hand sides (x and y)."""

    def __init__(self, xy: np.ndarray) -> None:
        self.xy = xy
        self.order: np.ndarray | None = None
        self.lu: spla.SuperLU | None = None
        self.gain = 0.0
        self.x: np.ndarray | None = None
        self.factorisations = 0
        self.cg_iterations = 0

    def solve(self, normal: sp.spmatrix, rhs: np.ndarray, gain: float, refactor: bool = False) -> np.ndarray:
        """x (n, 2) with normal @ x = rhs. A singular matrix raises RuntimeError when it is
        factorised; conjugate gradients on the last factor (where `gain` is near the one it
        was made for, and not `refactor`) converge on it to a solution instead."""
        normal = sp.csc_matrix(normal)
        if self.order is None:
            self.order = nested_dissection(normal, self.xy)
        p = self.order
        kp = normal[p][:, p].tocsc()
        bp = rhs[p]
        reusable = not refactor and self.lu is not None and self.x is not None and \
            max(gain, self.gain) <= REUSE_GAIN * max(min(gain, self.gain), 1e-300)
        if reusable:
            got = self._cg(kp, bp)
            if got is not None:
                return self._store(got)
        self.lu = _lu(kp)
        self.gain = gain
        self.factorisations += 1
        return self._store(np.stack([self.lu.solve(bp[:, c]) for c in range(bp.shape[1])], 1))

    def _cg(self, kp: sp.csc_matrix, bp: np.ndarray) -> np.ndarray | None:
        assert self.lu is not None and self.x is not None
        lu = self.lu
        pre = spla.LinearOperator(kp.shape, matvec=lambda v: lu.solve(np.asarray(v, np.float64).ravel()))
        out = []

        def counted(_x: np.ndarray) -> None:
            self.cg_iterations += 1

        for c in range(bp.shape[1]):
            x, info = spla.cg(kp, bp[:, c], x0=self.x[self.order, c], rtol=CG_RTOL, maxiter=CG_MAXITER, M=pre,
                              callback=counted)
            if info != 0:
                return None
            out.append(x)
        return np.stack(out, 1)

    def _store(self, xp: np.ndarray) -> np.ndarray:
        assert self.order is not None
        x = np.empty_like(xp)
        x[self.order] = xp
        self.x = x
        return x
