"""The stack solve's linear algebra: the grid-aware elimination order and the reuse of one
factorisation across re-weightings give the solution a direct solve gives."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from tapescope.alignment.flow import second_differences
from tapescope.alignment.sparse_solve import NormalSolver, nested_dissection


def _system(rng: np.random.Generator, sections: int = 4, side: int = 12, weight: float = 1.0,
            bend: float = 1.0) -> tuple[sp.csc_matrix, np.ndarray]:
    """Normal matrix of `sections` grids tied node to node to the next section (random
    weights), each bent by a thin plate and each with 3 unknowns coupled to all its nodes
    (as a section's affine), and the unknowns' positions (NaN for those 3)."""
    nd = side * side
    per = nd + 3
    n = sections * per
    rows = []
    d2 = second_differences(side, side)
    for s in range(sections):
        blocks = [sp.csr_matrix((d2.shape[0], per * s)), np.sqrt(bend) * sp.hstack(
            [sp.csr_matrix((d2.shape[0], 3)), d2]), sp.csr_matrix((d2.shape[0], n - per * (s + 1)))]
        rows.append(sp.hstack(blocks))
        if s + 1 < sections:
            w = np.sqrt(weight * rng.uniform(0.2, 1.0, nd))
            tie = sp.lil_matrix((nd, n))
            for k in range(nd):
                tie[k, per * s + 3 + k] = -w[k]
                tie[k, per * (s + 1) + 3 + k] = w[k]
                tie[k, per * s + k % 3] = -0.1 * w[k]
            rows.append(tie.tocsr())
    a = sp.vstack(rows).tocsr()
    normal = (a.T @ a + 1e-3 * sp.identity(n)).tocsc()
    xy = np.full((n, 2), np.nan)
    for s in range(sections):
        ids = np.arange(nd)
        xy[per * s + 3 + ids] = np.stack([ids % side, ids // side], 1) * 32.0
    return normal, xy


def test_the_order_is_a_permutation_with_the_unplaced_unknowns_last() -> None:
    normal, xy = _system(np.random.default_rng(0))
    order = nested_dissection(normal, xy)
    assert sorted(order) == list(range(normal.shape[0]))
    unplaced = np.flatnonzero(np.isnan(xy[:, 0]))
    assert set(order[-len(unplaced):]) == set(unplaced)


def test_solutions_equal_a_direct_solve_whether_factorised_or_by_the_reused_factor() -> None:
    rng = np.random.default_rng(1)
    normal, xy = _system(rng)
    rhs = rng.normal(size=(normal.shape[0], 2))
    solver = NormalSolver(xy)
    first = solver.solve(normal, rhs, gain=1.0)
    direct = np.stack([spla.spsolve(normal, rhs[:, c]) for c in (0, 1)], 1)
    np.testing.assert_allclose(first, direct, rtol=0, atol=1e-8 * np.abs(direct).max())
    assert solver.factorisations == 1

    # A re-weighting (other tie weights, the same structure) at nearly the same gain: the
    # last factor preconditions conjugate gradients, and the answer is the direct one.
    reweighted, _ = _system(np.random.default_rng(2))
    again = solver.solve(reweighted, rhs, gain=1.2)
    direct = np.stack([spla.spsolve(reweighted, rhs[:, c]) for c in (0, 1)], 1)
    np.testing.assert_allclose(again, direct, rtol=0, atol=1e-7 * np.abs(direct).max())
    assert solver.factorisations == 1 and solver.cg_iterations > 0

    # The prior's balance moved far: a new factorisation, and still the direct answer.
    stiffer, _ = _system(np.random.default_rng(2), bend=100.0)
    third = solver.solve(stiffer, rhs, gain=10.0)
    direct = np.stack([spla.spsolve(stiffer, rhs[:, c]) for c in (0, 1)], 1)
    np.testing.assert_allclose(third, direct, rtol=0, atol=1e-8 * np.abs(direct).max())
    assert solver.factorisations == 2
