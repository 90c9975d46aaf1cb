"""Stack-wide solve of section transforms from pairwise point matches.

Every section z has a forward map F_z from its own raw pixels to the stack's frame,
``F_z(q) = A_z (q - c) + b_z + D_z(q)``: an affine about the image centre c plus a smooth
distortion field D_z on a coarse grid of the section's raw pixels. A pair match says that
raw point p of section i and raw point q of section j show the same tissue, so

    F_j(q) - F_i(p) = V_ij(F_i(p)),

where V_ij is the tissue's own movement between the two sections: a membrane or neurite
cut obliquely moves by several pixels from one 40-50 nm section to the next. V_ij is the
sum of per-step flows v_k (k = z_i .. z_j - 1) on a grid of the stack's frame. All of it
is linear in the unknowns, and x and y share one matrix, so the whole stack is one sparse
least-squares problem (BigFeta's form, K x = A^T W b + priors), solved a few times with
robust re-weighting of the matches.

What tells distortion from the tissue's movement is what each is like (docs/alignment.md):
- a distortion belongs to one section: it shows in every pair that section is in, and it
  is smooth across the section (bent on a coarse grid, a thin-plate penalty);
- the tissue's movement changes slowly from step to step along z (a neurite keeps its
  angle to the cut over many sections), and may be as rough across the section as the
  matches resolve.
So v is penalised for changing along z, D for bending and (weakly) for its size, and the
affine for stretching away from a rotation; a section matched to several predecessors
(z-1, z-2, z-3) ties these apart. Nothing is chained: an error in one pair moves one
section a little instead of every section after it.

The solution is returned as `SectionTransform`s (output pixel -> raw pixel, for rendering):
the inverse of F_z, found by fixed-point iteration on the transform's field grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import scipy.sparse as sp

from tapescope.graph import groups
from tapescope.montage.transform import SectionTransform

from .align import SectionAlignment
from .flow import second_differences
from .sparse_solve import NormalSolver

MATCH_GRID = 9    # points a side where only the coarse (affine) transform is matched
MAX_PRIOR_GAIN = 100.0   # most the bending's weight grows (as a factor on px; squared in energy)
RIDGE = 1e-9      # of the mean diagonal of the normal equations: holds unknowns no data sees


@dataclass
class PairMatch:
    """Raw point p (n, 2, x first) of section `fixed_z` shows what raw point q of section
    `moving_z` shows; `w` (n,) weighs each point (0..1)."""
    fixed_z: int
    moving_z: int
    p: np.ndarray
    q: np.ndarray
    w: np.ndarray


def matches_of(a: SectionAlignment, fixed_z: int, moving_z: int, fixed_valid: object,
               moving_valid: object) -> PairMatch:
    """A pair's alignment as point matches: the flow nodes its last pass kept (weighted by
    their peak sharpness), or a grid where it had no flow, each p with q = T(p), where both
    sections were imaged (`*_valid`: boolean arrays or lazy views indexed by pixel)."""
    h, w = a.shape
    if a.flow_weight is not None:
        iy, ix = np.nonzero(a.flow_weight > 0)
        pts = np.stack([ix * a.stride, iy * a.stride], 1).astype(np.float64)
        wt = a.flow_weight[iy, ix].astype(np.float64)
    else:
        gy, gx = np.mgrid[0:MATCH_GRID, 0:MATCH_GRID] / (MATCH_GRID - 1)
        pts = np.stack([gx.ravel() * (w - 1), gy.ravel() * (h - 1)], 1)
        wt = np.ones(len(pts))
    sx, sy = a.transform.apply(pts[:, 0], pts[:, 1])
    q = np.stack([sx, sy], 1)
    inside = (q[:, 0] >= 0) & (q[:, 0] <= w - 1) & (q[:, 1] >= 0) & (q[:, 1] <= h - 1)
    ok = inside.copy()
    ok[inside] &= np.asarray(fixed_valid[pts[inside, 1].astype(int), pts[inside, 0].astype(int)], bool) & \
        np.asarray(moving_valid[np.rint(q[inside, 1]).astype(int), np.rint(q[inside, 0]).astype(int)], bool)
    return PairMatch(fixed_z, moving_z, pts[ok], q[ok], wt[ok])


@dataclass(frozen=True)
class SolveParams:
    field_spacing: float = 32.0   # px between distortion nodes (raw pixels)...
    flow_spacing: float = 32.0    # ...and the tissue-flow nodes (stack frame)...
    max_nodes: int = 33           # ...or wider, so that a side holds at most this many nodes
    bend: float = 0.1             # thin-plate penalty on each distortion field
    field_size: float = 0.01      # penalty on a distortion's size (keeps its linear part in A)
    stretch: float = 1.0          # penalty on A_z - rotation, in px at the section's half-size
    flow_z: float = 1.0           # penalty on the tissue flow changing between z steps
    flow_size: float = 1e-4       # penalty on the tissue flow's size (keeps the system regular)
    elastic: bool = True          # False: affine only (no D, no v)
    # v, the tissue's own movement, is not yet calibrated (docs/alignment.md): off by default,
    # every difference between sections left by the matches is taken as distortion.
    tissue_flow: bool = False
    iterations: int = 4           # solves, each re-weighting the matches (Tukey) and re-linearising
    tukey: float = 4.685          # robust cut-off, in robust standard deviations of the residuals
    pair_outlier: float = 3.0     # a pair whose RMS is this many times the median pair's is dropped...
    pair_outlier_px: float = 1.0  # ...when it is also above this
    pair_variance: bool = True    # weigh each pair by 1 / its RMS^2 about the solution (capped at 1)
    noise_ref_px: float = 0.1     # `bend` is for matches this precise; noisier ones stiffen it (0: off)
    transform_stride: int = 32    # field grid of the returned SectionTransforms


@dataclass
class StackSolution:
    transforms: dict[int, SectionTransform]   # output (stack frame) pixel -> raw pixel
    forward: dict[int, np.ndarray]             # 3x3 affine part of F_z (raw -> stack frame)
    residual_px: dict[tuple[int, int], float]  # RMS of each pair's kept matches after the solve
    kept: dict[tuple[int, int], float]         # fraction of each pair's matches kept
    fields: dict[int, np.ndarray] = dataclass_field(default_factory=dict)   # D_z's nodes (n, 2), if elastic
    held: set[int] = dataclass_field(default_factory=set)   # no match of theirs weighed anything: where they started


def _grid(shape: tuple[int, int], spacing: float) -> tuple[int, int, float]:
    """Nodes (gh, gw) and their spacing covering [0, w-1] x [0, h-1] with node 0 at 0."""
    h, w = shape
    gh = max(2, int(np.ceil((h - 1) / spacing)) + 1)
    gw = max(2, int(np.ceil((w - 1) / spacing)) + 1)
    return gh, gw, spacing


def _bilinear(pts: np.ndarray, gh: int, gw: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """(node index (n, 4), weight (n, 4)) of points (n, 2; x, y) on a gh x gw grid; points
    beyond the grid take its edge."""
    gx = np.clip(pts[:, 0] / spacing, 0, gw - 1)
    gy = np.clip(pts[:, 1] / spacing, 0, gh - 1)
    x0 = np.minimum(np.floor(gx).astype(int), gw - 2)
    y0 = np.minimum(np.floor(gy).astype(int), gh - 2)
    fx, fy = gx - x0, gy - y0
    idx = np.stack([y0 * gw + x0, y0 * gw + x0 + 1, (y0 + 1) * gw + x0, (y0 + 1) * gw + x0 + 1], 1)
    wt = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    return idx, wt


def _polar_rotation(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if np.linalg.det(r) < 0:      # a reflection is never a section's rotation
        u[:, -1] *= -1
        r = u @ vt
    return r


class _Layout:
    """Column of every unknown: per section 3 affine terms (a1, a2, b of one coordinate) and
    its distortion nodes; per z step the tissue-flow nodes."""

    def __init__(self, zs: Sequence[int], shape: tuple[int, int], p: SolveParams) -> None:
        self.zs = list(zs)
        self.pos = {z: k for k, z in enumerate(self.zs)}
        # A section's distortion is smooth at the scale of the section, so its grid does
        # not grow with the section: the solve's size is then set by the stack, not by the
        # section's area (docs/alignment.md, "Scale").
        widest = (max(shape) - 1) / max(p.max_nodes - 1, 1)
        self.dh, self.dw, self.ds = _grid(shape, max(p.field_spacing, widest))
        self.vh, self.vw, self.vs = _grid(shape, max(p.flow_spacing, widest))
        # The thin plate's energy for one smooth field grows as spacing^4 at a fixed weight per
        # node's data (second differences ~ spacing^2, squared): held to the nominal spacing's.
        self.bend_scale = (p.field_spacing / self.ds) ** 4
        self.nd = self.dh * self.dw if p.elastic else 0
        self.nv = self.vh * self.vw if p.elastic and p.tissue_flow else 0
        self.per_section = 3 + self.nd
        self.z0 = self.zs[0]
        self.steps = self.zs[-1] - self.zs[0]
        self.n = len(self.zs) * self.per_section + self.steps * self.nv

    def affine(self, z: int) -> int:
        return self.pos[z] * self.per_section

    def field(self, z: int) -> int:
        return self.pos[z] * self.per_section + 3

    def flow(self, step: int) -> int:
        return len(self.zs) * self.per_section + (step - self.z0) * self.nv

    def positions(self) -> np.ndarray:
        """(n, 2) where each unknown sits, px (x, y) on its grid; NaN for the affine terms,
        which are coupled to the whole section: for the solver's elimination order."""
        xy = np.full((self.n, 2), np.nan)
        for z in self.zs:
            ids = np.arange(self.nd)
            xy[self.field(z) + ids] = np.stack([ids % self.dw, ids // self.dw], 1) * self.ds
        for k in range(self.z0, self.z0 + self.steps):
            ids = np.arange(self.nv)
            xy[self.flow(k) + ids] = np.stack([ids % self.vw, ids // self.vw], 1) * self.vs
        return xy


def _rows(coo: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_rows: int, n: int) -> sp.csr_matrix:
    r = np.concatenate([c[0] for c in coo])
    c = np.concatenate([c[1] for c in coo])
    v = np.concatenate([c[2] for c in coo])
    return sp.csr_matrix((v, (r, c)), shape=(n_rows, n))


def solve_stack(
    shape: tuple[int, int], zs: Sequence[int], matches: Sequence[PairMatch], initial: dict[int, np.ndarray],
    params: SolveParams | None = None, fixed: Iterable[int] = (), fixed_fields: dict[int, np.ndarray] | None = None,
) -> StackSolution:
    """Transforms of the sections `zs` (ascending) from `matches` between them.

    `initial` gives each section's forward affine (3x3, raw -> stack frame), e.g. from a
    chain of the pairs' coarse transforms; the solution keeps their mean as the stack's
    frame (a frame common to all sections is not determined by the data) and takes
    nothing else from them. Sections in `fixed` keep their initial affine and their field in
    `fixed_fields` (node values as `StackSolution.fields` gives them; none: no field)
    (sections already written, live): they are the frame instead.
    """
    p = params or SolveParams()
    zs = sorted(zs)
    lay = _Layout(zs, shape, p)
    h, w = shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    half = max(h, w) / 2
    forward = {z: np.asarray(initial[z], np.float64).copy() for z in zs}
    weights = [np.asarray(m.w, np.float64).copy() for m in matches]
    dfield: dict[int, np.ndarray] = {z: np.zeros((lay.nd, 2)) for z in zs}

    # Static regularisers: thin-plate and size of every D, z-smoothness and size of v.
    reg: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bending: list[int] = []     # which of them are a field's bending
    row = 0
    # Each prior is scaled by how much data a node sees, so one set of weights serves any
    # section size and match density.
    total_w = sum(float(wt.sum()) for wt in weights) or 1.0
    per_section_w = total_w / max(len(zs), 1)
    d_density = per_section_w / max(lay.nd, 1)
    v_density = total_w / max(lay.steps * lay.nv, 1) if lay.nv else 0.0
    if p.elastic:
        d2 = second_differences(lay.dh, lay.dw).tocoo()
        for z in zs:
            off = lay.field(z)
            s = np.sqrt(p.bend * lay.bend_scale * d_density)
            reg.append((d2.row + row, d2.col + off, d2.data * s))
            bending.append(len(reg) - 1)
            row += d2.shape[0]
            ids = np.arange(lay.nd)
            reg.append((row + ids, off + ids, np.full(lay.nd, np.sqrt(p.field_size * d_density))))
            row += lay.nd
        ids = np.arange(lay.nv)
        for k in range(lay.z0, lay.z0 + lay.steps):
            reg.append((row + ids, lay.flow(k) + ids, np.full(lay.nv, np.sqrt(p.flow_size * v_density))))
            row += lay.nv
            if k + 1 < lay.z0 + lay.steps:
                s = np.sqrt(p.flow_z * v_density)
                reg.append((row + ids, lay.flow(k) + ids, np.full(lay.nv, -s)))
                reg.append((row + ids, lay.flow(k + 1) + ids, np.full(lay.nv, s)))
                row += lay.nv
    reg_rows = row
    prior_gain = 1.0
    bend_rows = set(bending)

    # Where each unknown starts (the initial affine, no distortion), and which are known: the
    # pinned sections' (their affine and field as given).
    start = np.zeros((lay.n, 2))
    for z in zs:
        a = lay.affine(z)
        start[a], start[a + 1] = initial[z][:2, 0], initial[z][:2, 1]
        start[a + 2] = (initial[z] @ [*centre, 1])[:2]
    fixed_set = set(fixed)
    pinned = [z for z in zs if z in fixed_set]
    known_at = start.copy()
    for z in pinned:
        if p.elastic and fixed_fields is not None and z in fixed_fields:
            known_at[lay.field(z):lay.field(z) + lay.nd] = np.asarray(fixed_fields[z], np.float64)
    held: set[int] = set()
    solver: NormalSolver | None = None

    residual: dict[tuple[int, int], float] = {}
    kept: dict[tuple[int, int], float] = {}
    for it in range(p.iterations):
        # A section none of whose match points weighs anything (all rejected as outliers, or
        # none where both sections were imaged) is placed by nothing: the gauge row alone
        # would tie its shift to the others' and leave the system singular along "move it,
        # move the rest the other way" (seen: 1.9e3 px off). It is held where it started (its
        # pairs' coarse chain, no distortion), as the pinned ones are held, and reported.
        weighed = {z for m, wt in zip(matches, weights, strict=True) if (wt > 0).any() for z in (m.fixed_z, m.moving_z)}
        dead = {z for z in zs if z not in fixed_set and z not in weighed}
        if solver is None or dead != held:
            held = dead
            known = np.zeros(lay.n, bool)
            for z in [*pinned, *held]:
                known[lay.affine(z):lay.affine(z) + lay.per_section] = True
            known_cols, free_cols = np.flatnonzero(known), np.flatnonzero(~known)
            known_vals = known_at[known_cols]
            solver = NormalSolver(lay.positions()[free_cols])
        # The bending prior is set for matches of `noise_ref_px`; noisier matches (measured by
        # the last solve's scatter) lean on it more, as a least-squares estimate weighs data by
        # 1 / variance: the same settings then serve a one-image test stack (0.1 px) and real
        # neighbours whose content differs (~1 px).
        coo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [
            (r, c, v * prior_gain) if k in bend_rows else (r, c, v) for k, (r, c, v) in enumerate(reg)]
        row = reg_rows
        # The data: one row per match point, the same for x and y.
        for m, wt in zip(matches, weights, strict=True):
            n = len(m.p)
            if n == 0:
                continue
            sw = np.sqrt(wt)
            rows = row + np.arange(n)
            for z, pts, sign in ((m.moving_z, m.q, 1.0), (m.fixed_z, m.p, -1.0)):
                a = lay.affine(z)
                rel = pts - centre
                coo.append((rows, np.full(n, a), sign * sw * rel[:, 0]))
                coo.append((rows, np.full(n, a + 1), sign * sw * rel[:, 1]))
                coo.append((rows, np.full(n, a + 2), sign * sw))
                if p.elastic:
                    idx, bw = _bilinear(pts, lay.dh, lay.dw, lay.ds)
                    coo.append((np.repeat(rows, 4), (lay.field(z) + idx).ravel(), (sign * sw[:, None] * bw).ravel()))
            if lay.nv:
                world = _apply(forward[m.fixed_z], m.p)
                idx, bw = _bilinear(world, lay.vh, lay.vw, lay.vs)
                for k in range(m.fixed_z, m.moving_z):
                    coo.append((np.repeat(rows, 4), (lay.flow(k) + idx).ravel(), (-sw[:, None] * bw).ravel()))
            row += n
        data_rows = row
        # Priors with a target: the affine near a rotation (the current one), and the mean
        # affine of all sections at the initial mean (the frame).
        targets: list[tuple[int, np.ndarray]] = []
        s_aff = np.sqrt(p.stretch * d_density * max(lay.nd, 1)) * half
        for z in zs:
            rot = _polar_rotation(forward[z][:2, :2])
            for k in (0, 1):    # column k of A: (a_xk in the x solve, a_yk in the y solve)
                coo.append((np.array([row]), np.array([lay.affine(z) + k]), np.array([s_aff])))
                targets.append((row, s_aff * rot[:, k]))
                row += 1
        gauge = np.sqrt(total_w)
        mean0 = np.mean([np.concatenate([initial[z][:2, :2].T.ravel(), (initial[z] @ [*centre, 1])[:2]])
                         for z in zs], axis=0)
        # unknown order per coordinate c: (a_c1, a_c2, b_c); mean0 holds A's columns then b.
        for k in range(3 if not pinned else 0):   # with sections pinned, they are the frame
            cols = np.array([lay.affine(z) + k for z in zs])
            coo.append((np.full(len(zs), row), cols, np.full(len(zs), gauge / len(zs))))
            tx = mean0[0] if k == 0 else mean0[2] if k == 1 else mean0[4]
            ty = mean0[1] if k == 0 else mean0[3] if k == 1 else mean0[5]
            targets.append((row, gauge * np.array([tx, ty])))
            row += 1
        if lay.nv:
            # The tissue's flow holds no affine part: tissue moving as a whole between two
            # sections cannot be told from the section's placement, so that part is the
            # placement's; the flow keeps what varies across the section.
            gy, gx = np.mgrid[0:lay.vh, 0:lay.vw].astype(np.float64)
            basis = [np.ones(lay.nv), (gx.ravel() - gx.mean()) / max(lay.vw, 1),
                     (gy.ravel() - gy.mean()) / max(lay.vh, 1)]
            ids = np.arange(lay.nv)
            for k in range(lay.z0, lay.z0 + lay.steps):
                for b in basis:
                    coo.append((np.full(lay.nv, row), lay.flow(k) + ids, gauge * b / lay.nv))
                    row += 1
        mat = _rows(coo, row, lay.n)
        rhs = np.zeros((row, 2))
        for r, t in targets:
            rhs[r] = t
        # The pinned sections' unknowns are known: moved to the right-hand side, so that the
        # system holds only the unknowns that move.
        cols = mat.tocsc()
        if known_cols.size:
            rhs = rhs - cols[:, known_cols] @ known_vals
        a_free = cols[:, free_cols]
        normal = (a_free.T @ a_free).tocsc()
        at_b = a_free.T @ rhs
        try:
            x_free = solver.solve(normal, at_b, prior_gain)
        except RuntimeError:
            # Singular still (the sections nothing places are held above): a ridge far below
            # any data term on every unknown, toward where it starts, holds what no row sees.
            seen = np.asarray(a_free[reg_rows:data_rows].power(2).sum(axis=0)).ravel()
            ridge = RIDGE * (float(seen[seen > 0].mean()) if (seen > 0).any() else 1.0)
            normal = (normal + ridge * sp.identity(len(free_cols), format="csc")).tocsc()
            x_free = solver.solve(normal, at_b + ridge * start[free_cols], prior_gain, refactor=True)
        x = np.zeros((lay.n, 2))
        x[free_cols] = x_free
        x[known_cols] = known_vals
        # Unpack: forward affines and fields.
        for z in zs:
            a = lay.affine(z)
            amat = np.array([[x[a, 0], x[a + 1, 0]], [x[a, 1], x[a + 1, 1]]])
            b = np.array([x[a + 2, 0], x[a + 2, 1]])
            f = np.eye(3)
            f[:2, :2] = amat
            f[:2, 2] = b - amat @ centre
            forward[z] = initial[z].copy() if z in fixed_set or z in held else f   # exactly, not through b
            if p.elastic:
                dfield[z] = x[lay.field(z):lay.field(z) + lay.nd]
        # Residual of every match point, then Tukey weights for the next solve.
        res_all = (mat[reg_rows:data_rows] @ x)
        row = 0
        per_pair = []
        for m, wt in zip(matches, weights, strict=True):
            n = len(m.p)
            sw = np.sqrt(np.maximum(wt, 1e-12))
            r = np.hypot(*(res_all[row:row + n] / sw[:, None]).T) if n else np.zeros(0)
            per_pair.append(r)
            row += n
        if it + 1 < p.iterations:
            # A pair that matched the wrong place is wrong as a whole: the least-squares solve
            # spreads its error over its neighbours, so it is found by its own RMS against the
            # other pairs', and dropped; then single points by Tukey's weights.
            rms = np.array([np.sqrt(np.mean(r[wt > 0] ** 2)) if (wt > 0).any() else 0.0
                            for r, wt in zip(per_pair, weights, strict=True)])
            live = rms[rms > 0]
            typical = float(np.median(live)) if live.size else 0.0
            bad = (rms > p.pair_outlier * typical) & (rms > p.pair_outlier_px)
            # ...unless it is all that ties part of the stack to the rest: without it the
            # system is singular, and a placement to check beats none.
            live_pairs = [k for k, wt in enumerate(weights) if (wt > 0).any() and not bad[k]]
            for k in sorted(np.flatnonzero(bad), key=lambda k: rms[k]):   # the least bad back first
                if not _connected(zs, [(matches[i].fixed_z, matches[i].moving_z) for i in live_pairs]):
                    bad[k] = False
                    live_pairs.append(k)
            bridges = _bridges(zs, [(matches[k].fixed_z, matches[k].moving_z) for k in live_pairs])
            allr = np.concatenate([r for r, b in zip(per_pair, bad, strict=True) if r.size and not b]) \
                if per_pair else np.zeros(0)
            scale = 1.4826 * float(np.median(allr)) if allr.size else 1.0
            cut = max(p.tukey * scale, 0.25)
            if p.noise_ref_px > 0 and allr.size:
                prior_gain = float(np.clip(scale / p.noise_ref_px, 1.0, MAX_PRIOR_GAIN))
            for k, (m, r) in enumerate(zip(matches, per_pair, strict=True)):
                if bad[k]:
                    weights[k] = np.zeros(len(m.p))
                    continue
                if (m.fixed_z, m.moving_z) in bridges:
                    continue        # its points are all that place one side: none is judged
                u = np.clip(r / cut, 0, 1)
                # Each pair counts by how well it agrees with the rest (1 / its variance about
                # the solution): pairs further apart in z, or across a fold, measure worse.
                trust = (typical / max(rms[k], typical)) ** 2 if p.pair_variance and typical > 0 else 1.0
                weights[k] = np.where(weights[k] > 0, np.asarray(m.w, np.float64) * trust * (1 - u ** 2) ** 2, 0.0)
    for m, wt, r in zip(matches, weights, per_pair, strict=True):
        key = (m.fixed_z, m.moving_z)
        on = wt > 0
        residual[key] = float(np.sqrt((r[on] ** 2).mean())) if on.any() else float("nan")
        kept[key] = float(on.mean()) if len(on) else 0.0
    transforms = {z: _inverse(forward[z], dfield[z] if p.elastic else None, lay, shape, p.transform_stride)
                  for z in zs}
    return StackSolution(transforms, forward, residual, kept, dfield if p.elastic else {}, held)


WINDOW = 12      # sections solved together by `solve_windowed`...
LOOK_AHEAD = 4   # ...of which this many past the sections it finalises


def solve_windowed(
    shape: tuple[int, int], zs: Sequence[int], matches: Sequence[PairMatch], initial: dict[int, np.ndarray],
    params: SolveParams | None = None, window: int = WINDOW, look_ahead: int = LOOK_AHEAD,
) -> StackSolution:
    """`solve_stack` over a sliding window: `window` sections at a time, the first
    `window - look_ahead` of them finalised, each window anchored on the finalised sections
    its matches reach (held with their affine and field). Time grows linearly with the
    stack and memory with the window, not the stack; a stack no longer than the window is
    one `solve_stack`. A section is finalised with its successors `look_ahead` deep, as a
    live run can place it once those are imaged."""
    zs = sorted(zs)
    if len(zs) <= window:
        return solve_stack(shape, zs, matches, initial, params)
    step = max(1, window - look_ahead)
    # Each window takes the matches of its free sections: indexed once by the later section,
    # so that finding them costs the window, not the stack.
    by_moving: dict[int, list[int]] = {}
    for k, m in enumerate(matches):
        by_moving.setdefault(m.moving_z, []).append(k)
    forward: dict[int, np.ndarray] = {}
    fields: dict[int, np.ndarray] = {}
    transforms: dict[int, SectionTransform] = {}
    residual: dict[tuple[int, int], float] = {}
    kept: dict[tuple[int, int], float] = {}
    held: set[int] = set()
    start = 0
    while start < len(zs):
        free = zs[start:start + window]
        last = start + window >= len(zs)
        done = free if last else free[:step]
        reach = sorted(k for z in free for k in by_moving.get(z, ()))   # in the given order
        anchors = sorted({matches[k].fixed_z for k in reach if matches[k].fixed_z in forward})
        win = sorted({*anchors, *free})
        inside = set(win)
        mine = [matches[k] for k in reach if matches[k].fixed_z in inside]
        start_at = {z: forward.get(z, initial[z]) for z in win}
        sol = solve_stack(shape, win, mine, start_at, params, fixed=anchors, fixed_fields=fields)
        held |= sol.held & set(done)
        for z in done:
            forward[z], transforms[z] = sol.forward[z], sol.transforms[z]
            if z in sol.fields:
                fields[z] = sol.fields[z]
        for key, v in sol.residual_px.items():
            if key[1] in done:
                residual[key], kept[key] = v, sol.kept[key]
        if last:
            break
        start += step
    return StackSolution(transforms, forward, residual, kept, fields, held)


def _connected(zs: Sequence[int], links: Sequence[tuple[int, int]]) -> bool:
    return len(set(groups(zs, links).values())) <= 1


def _bridges(zs: Sequence[int], links: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """Links whose removal splits the sections (few sections, few links: by trial)."""
    n = len(set(groups(zs, links).values()))
    return {k for i, k in enumerate(links) if len(set(groups(zs, links[:i] + links[i + 1:]).values())) > n}


def _apply(f: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ f[:2, :2].T + f[:2, 2]


def field_at(values: np.ndarray, pts: np.ndarray, gh: int, gw: int, spacing: float) -> np.ndarray:
    """Bilinear value (n, 2) of a node field (gh*gw, 2) at points (n, 2)."""
    idx, wt = _bilinear(pts, gh, gw, spacing)
    return (values[idx] * wt[..., None]).sum(1)


def _inverse(f: np.ndarray, d: np.ndarray | None, lay: _Layout, shape: tuple[int, int],
             stride: int) -> SectionTransform:
    """The SectionTransform (output -> raw) of F(q) = f q + D(q), by fixed-point iteration
    q <- f^-1 (P - D(q)) at the transform's field nodes (D is smooth and a few px)."""
    inv = np.linalg.inv(f)
    matrix = inv[:2]
    if d is None or not np.any(d):
        return SectionTransform(matrix)
    gh, gw = SectionTransform.grid_shape(shape, stride)
    gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float64) * stride
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    base = _apply(inv, pts)
    q = base.copy()
    for _ in range(20):
        q_new = base - field_at(d, q, lay.dh, lay.dw, lay.ds) @ inv[:2, :2].T
        done = float(np.abs(q_new - q).max()) < 1e-4
        q = q_new
        if done:
            break
    field = (q - base).reshape(gh, gw, 2).astype(np.float32)
    return SectionTransform(matrix, field, stride)


def chain_initial(zs: Sequence[int], pair_affine: dict[tuple[int, int], np.ndarray]) -> dict[int, np.ndarray]:
    """Forward affines (raw -> frame of the first section) from pairwise affines
    (pair_affine[(i, j)]: 3x3, raw i -> raw j): each section through the nearest section
    already placed (a predecessor first). Sections no pair reaches are left out."""
    zs = sorted(zs)
    out = {zs[0]: np.eye(3)}
    grew = True
    while grew:
        grew = False
        for z in zs:
            if z in out:
                continue
            links = [(abs(z - i), i, np.linalg.inv(a)) for (i, j), a in pair_affine.items() if j == z and i in out]
            links += [(abs(z - j), j, a) for (i, j), a in pair_affine.items() if i == z and j in out]
            if links:
                _, ref, a = min(links, key=lambda t: (t[0], t[1] > z))
                out[z] = out[ref] @ a
                grew = True
    return out
