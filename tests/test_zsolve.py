"""The stack-wide solve: sections placed from noisy pairwise matches without drift along z,
and the gates that take a repeated section out of a stack whose neighbours differ."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

from tapescope.alignment.stack import align_stack, write_stack
from tapescope.alignment.zsolve import PairMatch, SolveParams, chain_initial, solve_stack
from tapescope.neurites import NeuriteParams, NeuriteSpecimen

SHAPE = (256, 256)


def _affine(rng: np.random.Generator) -> np.ndarray:
    a = np.radians(rng.uniform(-5, 5))
    f = np.eye(3)
    f[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    f[:2, 2] = rng.uniform(-20, 20, 2)
    return f


def _apply(f: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ f[:2, :2].T + f[:2, 2]


def _error_by_z(truth: dict[int, np.ndarray], forward: dict[int, np.ndarray]) -> list[float]:
    """RMS error of each section's solved placement, after the one affine common to all."""
    pts = np.stack(np.meshgrid(np.linspace(0, 255, 8), np.linspace(0, 255, 8)), -1).reshape(-1, 2)
    solved = np.concatenate([_apply(forward[z], pts) for z in truth])
    true = np.concatenate([_apply(truth[z], pts) for z in truth])
    g, *_ = np.linalg.lstsq(np.column_stack([solved, np.ones(len(solved))]), true, rcond=None)
    err = np.hypot(*(np.column_stack([solved, np.ones(len(solved))]) @ g - true).T).reshape(len(truth), -1)
    return [float(np.sqrt((e ** 2).mean())) for e in err]


def test_solve_has_no_drift_where_a_chain_walks_away() -> None:
    rng = np.random.default_rng(5)
    n = 24
    truth = {z: _affine(rng) for z in range(n)}          # raw -> specimen frame
    matches, pair_affine = [], {}
    for j in range(1, n):
        for i in range(max(0, j - 3), j):
            p = rng.uniform(0, 255, (60, 2))
            q = _apply(np.linalg.inv(truth[j]) @ truth[i], p) + rng.normal(0, 0.5, (60, 2))
            matches.append(PairMatch(i, j, p, q, np.ones(60)))
            fit, *_ = np.linalg.lstsq(np.column_stack([p, np.ones(60)]), q, rcond=None)
            pair_affine[(i, j)] = np.vstack([fit.T, [0, 0, 1]])
    initial = chain_initial(range(n), pair_affine)
    chain_err = _error_by_z(truth, initial)               # each section through its predecessor
    sol = solve_stack(SHAPE, list(range(n)), matches, initial, SolveParams(elastic=False))
    err = _error_by_z(truth, sol.forward)
    assert max(err) < 0.35
    assert np.mean(err[-3:]) <= 1.5 * np.mean(err[:3]) + 0.05      # no growth along z
    assert np.mean(chain_err[-3:]) > 2 * np.mean(err[-3:])         # where the chain has drifted


def test_solve_ignores_a_wrong_pair() -> None:
    rng = np.random.default_rng(8)
    truth = {z: _affine(rng) for z in range(6)}
    matches, pair_affine = [], {}
    for j in range(1, 6):
        for i in range(max(0, j - 3), j):
            p = rng.uniform(0, 255, (60, 2))
            q = _apply(np.linalg.inv(truth[j]) @ truth[i], p) + rng.normal(0, 0.3, (60, 2))
            if (i, j) == (1, 4):
                q = q + 12.0                                      # a pair that matched the wrong place
            matches.append(PairMatch(i, j, p, q, np.ones(60)))
            pair_affine[(i, j)] = np.linalg.inv(truth[j]) @ truth[i]
    sol = solve_stack(SHAPE, list(range(6)), matches, chain_initial(range(6), pair_affine), SolveParams(elastic=False))
    assert max(_error_by_z(truth, sol.forward)) < 0.3
    assert sol.kept[(1, 4)] < 0.1 and sol.kept[(0, 1)] > 0.9


def test_a_repeated_section_is_flagged_and_bridged(tmp_path: Path) -> None:
    """Consecutive sections of the simulated specimen differ as real ones do; a section
    imaged twice (a tape slip) does not, and is taken out while its neighbours align across it."""
    spec = NeuriteSpecimen(NeuriteParams(height_px=320, width_px=320, n_sections=6, seed=4))
    rng = np.random.default_rng(1)
    secs = [spec.section(i) for i in range(4)]
    images = [secs[0], secs[1], secs[1], secs[2], secs[3]]     # z=2 repeats z=1
    noisy = [np.clip(im * (1 + 0.03 * rng.normal(0, 1, im.shape)), 0.01, None) * 30000 for im in images]
    d = write_stack(tmp_path / "stack", noisy)
    res = align_stack(d, tmp_path / "out")
    by_z = {o.z: o for o in res.sections}
    assert by_z[2].status == "unaligned" and "repeats z=1" in by_z[2].message and by_z[2].needs_reimaging
    assert all(by_z[z].status == "ok" for z in (0, 1, 3, 4))
    assert by_z[3].reference_z == 1                               # across the repeat
    group = zarr.open_group(str(res.volume), mode="r")
    assert not group["0"][2].any()                                # the repeat is not in the volume
    assert group.attrs["tapescope"]["sections"]["2"]["needs_reimaging"] is True


def test_a_pair_that_alone_joins_two_parts_is_never_dropped() -> None:
    """Matched only to its predecessor, every pair is all that ties the stack together: a
    pair that fits worse than the others (real neighbours that differ more) stays in,
    instead of leaving the system singular and the sections after it nowhere."""
    rng = np.random.default_rng(3)
    truth = {z: _affine(rng) for z in range(6)}
    matches, pair_affine = [], {}
    for j in range(1, 6):
        i = j - 1
        p = rng.uniform(0, 255, (60, 2))
        noise = 6.0 if j == 3 else 0.3
        q = _apply(np.linalg.inv(truth[j]) @ truth[i], p) + rng.normal(0, noise, (60, 2))
        matches.append(PairMatch(i, j, p, q, np.ones(60)))
        pair_affine[(i, j)] = np.linalg.inv(truth[j]) @ truth[i]
    sol = solve_stack(SHAPE, list(range(6)), matches, chain_initial(range(6), pair_affine), SolveParams(elastic=False))
    assert all(sol.kept[(j - 1, j)] == 1.0 for j in range(1, 6))
    assert max(_error_by_z(truth, sol.forward)) < 3.0


def test_pairs_joining_a_cut_off_group_are_taken_where_they_agree() -> None:
    """Below the gates, right pairs agree on where a cut-off group lies and wrong ones
    scatter, whatever their NCC: the agreeing ones join it, not the one with the best NCC."""
    from tapescope.alignment.stack import PairResult, agreeing_bridges
    from tapescope.montage.transform import SectionTransform

    rng = np.random.default_rng(2)
    truth = {z: _affine(rng) for z in range(6)}     # raw -> specimen

    def pair(i: int, j: int, conf: float, error: tuple[float, float] = (0.0, 0.0)) -> PairResult:
        t = np.linalg.inv(truth[j]) @ truth[i]          # raw i -> raw j
        t[:2, 2] += error
        return PairResult(i, j, SectionTransform(t[:2]), conf, 0.0, 0, 0.0, 0.02, None)

    kept = {(0, 1): pair(0, 1, 0.3), (1, 2): pair(1, 2, 0.3), (3, 4): pair(3, 4, 0.3), (4, 5): pair(4, 5, 0.3)}
    below = {(1, 3): pair(1, 3, 0.06, (0.8, -0.5)), (0, 3): pair(0, 3, 0.05, (-1.0, 0.6)),
             (2, 4): pair(2, 4, 0.07, (0.5, 1.0)), (2, 3): pair(2, 3, 0.12, (40.0, -25.0)),
             (1, 4): pair(1, 4, 0.09, (-60.0, 10.0))}
    chosen = agreeing_bridges({**kept, **below}, kept, [0, 1, 2], [3, 4, 5], SHAPE)
    assert chosen == [(0, 3), (1, 3), (2, 4)]
    # With no two agreeing, the one with the highest NCC.
    alone = {k: below[k] for k in ((1, 3), (2, 3), (1, 4))}
    assert agreeing_bridges({**kept, **alone}, kept, [0, 1, 2], [3, 4, 5], SHAPE) == [(2, 3)]


def test_the_tissue_flow_keeps_steady_movement_out_of_the_sections_distortion() -> None:
    """Tissue that moves the same way from section to section (a bundle cut obliquely) makes
    every pair see a non-affine shift in proportion to its z distance. Taken as distortion,
    it piles up along z; with the tissue flow on, it is the tissue's and the sections stay
    in place."""
    rng = np.random.default_rng(4)
    n = 12
    truth = {z: _affine(rng) for z in range(n)}

    def drift(world: np.ndarray) -> np.ndarray:   # per section step, in the stack frame; no affine part
        return 1.5 * np.stack([np.sin(world[:, 1] * np.pi / 64), np.cos(world[:, 0] * np.pi / 64)], 1)

    grid = np.stack(np.meshgrid(np.arange(8, 250, 16.0), np.arange(8, 250, 16.0)), -1).reshape(-1, 2)
    matches, pair_affine = [], {}
    for j in range(1, n):
        for i in range(max(0, j - 3), j):
            world = _apply(truth[i], grid) + (j - i) * drift(_apply(truth[i], grid))
            q = _apply(np.linalg.inv(truth[j]), world) + rng.normal(0, 0.1, grid.shape)
            matches.append(PairMatch(i, j, grid, q, np.ones(len(grid))))
            pair_affine[(i, j)] = np.linalg.inv(truth[j]) @ truth[i]
    initial = chain_initial(range(n), pair_affine)

    def error_by_z(sol) -> list[float]:  # type: ignore[no-untyped-def]
        pts = grid[(grid[:, 0] > 40) & (grid[:, 0] < 216) & (grid[:, 1] > 40) & (grid[:, 1] < 216)]
        world = np.concatenate([_apply(truth[z], np.stack(sol.transforms[z].apply(*pts.T), 1)) for z in range(n)])
        out = np.tile(pts, (n, 1))
        g, *_ = np.linalg.lstsq(np.column_stack([out, np.ones(len(out))]), world, rcond=None)
        err = np.hypot(*(np.column_stack([out, np.ones(len(out))]) @ g - world).T).reshape(n, -1)
        return [float(np.sqrt((e ** 2).mean())) for e in err]

    # A field as soft as the matches were precise (0.1 px), every pair counted alike.
    soft = SolveParams(pair_variance=False, noise_ref_px=0.0)
    plain = error_by_z(solve_stack(SHAPE, list(range(n)), matches, initial, soft))
    flow = error_by_z(solve_stack(SHAPE, list(range(n)), matches, initial, replace(soft, tissue_flow=True)))
    # Measured: the ends 3.0-4.4 px without the flow, 1.2-1.6 px with it.
    assert max(flow) < 0.5 * max(plain)
    assert np.mean(plain[-2:] + plain[:2]) > 2 * np.mean(flow[-2:] + flow[:2])
    # The defaults stiffen the field by the scatter the movement leaves and trust the
    # distant pairs (which see more of it) less: without a flow model they keep the sections
    # in place about as well (measured: 1.0-1.4 px at the ends).
    default = error_by_z(solve_stack(SHAPE, list(range(n)), matches, initial, SolveParams()))
    assert max(default) < 0.5 * max(plain)


def test_a_section_whose_matches_all_weigh_nothing_stays_where_it_started() -> None:
    """Every point of its match rejected (weight 0), live with the reference fixed and the
    elastic field on: the system was singular and the section lost ("Factor is exactly
    singular"); it is placed where it started, with no distortion, and the others as before."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 40, (30, 2))
    start = np.eye(3)
    start[:2, 2] = (3.0, -2.0)
    initial = {0: np.eye(3), 1: start}
    sol = solve_stack(SHAPE, [0, 1], [PairMatch(0, 1, pts, pts + 1.0, np.zeros(30))], initial, SolveParams(),
                      fixed=[0])
    np.testing.assert_allclose(sol.transforms[1].matrix, np.linalg.inv(start)[:2], atol=1e-9)   # output -> source
    field = sol.transforms[1].field
    assert field is None or np.abs(field).max() < 1e-6
    weighed = solve_stack(SHAPE, [0, 1], [PairMatch(0, 1, pts, pts + 1.0, np.ones(30))], initial, SolveParams(),
                          fixed=[0])
    assert abs(weighed.transforms[1].matrix[0, 2] - 1.0) < 1e-6       # with data: the data's answer


def test_a_section_no_match_places_is_held_where_it_started_and_reported() -> None:
    """Nothing pinned (offline), and every point of one section's only pair weighs nothing:
    its shift was tied to the others' by the frame's mean alone, and the stack went
    thousands of px astray. It is held where its pairs' coarse chain puts it, the others are
    placed by their matches, and the solution names it."""
    rng = np.random.default_rng(3)
    truth = {z: _affine(rng) for z in range(4)}
    matches, pair_affine = [], {}
    for i, j in ((0, 1), (1, 2), (0, 2), (2, 3)):
        p = rng.uniform(0, 255, (40, 2))
        q = _apply(np.linalg.inv(truth[j]) @ truth[i], p)
        matches.append(PairMatch(i, j, p, q, np.zeros(40) if j == 3 else np.ones(40)))
        pair_affine[(i, j)] = np.linalg.inv(truth[j]) @ truth[i]
    initial = chain_initial(range(4), pair_affine)
    for params in (SolveParams(elastic=False), SolveParams()):
        sol = solve_stack(SHAPE, list(range(4)), matches, initial, params)
        assert sol.held == {3}
        np.testing.assert_array_equal(sol.forward[3], initial[3])
        assert max(_error_by_z({z: truth[z] for z in range(3)}, {z: sol.forward[z] for z in range(3)})) < 0.05


def _waved_stack(seed: int, n: int, periods: tuple[float, float], grid: np.ndarray, noise: float):
    """n sections, each under its own affine and a smooth sine field (2 px, wavelengths
    2 pi `periods` px), matched at `grid` to 3 predecessors with `noise` px: (forward map
    raw -> stack frame, the matches, the chained initial affines)."""
    rng = np.random.default_rng(seed)
    truth = {z: _affine(rng) for z in range(n)}
    waves = {z: (rng.uniform(-2, 2, 2), rng.uniform(0, 2 * np.pi, 2)) for z in range(n)}

    def forward(z: int, raw: np.ndarray) -> np.ndarray:     # raw -> stack frame, with the field
        amp, ph = waves[z]
        bend = np.stack([amp[0] * np.sin(raw[:, 1] / periods[0] + ph[0]),
                         amp[1] * np.sin(raw[:, 0] / periods[1] + ph[1])], 1)
        return _apply(truth[z], raw) + bend

    matches, pair_affine = [], {}
    for j in range(1, n):
        for i in range(max(0, j - 3), j):
            world = forward(i, grid)
            q = grid.copy()
            for _ in range(30):     # q with forward(j, q) = world, by fixed point
                q = q - (forward(j, q) - world) @ np.linalg.inv(truth[j][:2, :2]).T
            matches.append(PairMatch(i, j, grid, q + rng.normal(0, noise, q.shape), np.ones(len(grid))))
            pair_affine[(i, j)] = np.linalg.inv(truth[j]) @ truth[i]
    return forward, matches, chain_initial(range(n), pair_affine)


def test_a_long_stack_solved_window_by_window_matches_the_whole_solve() -> None:
    """40 sections, each distorted by its own smooth field, matched to 3 predecessors with
    0.1 px noise: solved 12 at a time (8 finalised, 4 looked ahead), every section lands
    where the solve of the whole stack puts it, and both find the truth."""
    from tapescope.alignment.zsolve import solve_windowed

    n = 40
    grid = np.stack(np.meshgrid(np.arange(8, 250, 12.0), np.arange(8, 250, 12.0)), -1).reshape(-1, 2)
    forward, matches, initial = _waved_stack(7, n, (60, 70), grid, 0.1)
    whole = solve_stack(SHAPE, list(range(n)), matches, initial)
    windows = solve_windowed(SHAPE, list(range(n)), matches, initial, window=12, look_ahead=4)
    assert sorted(windows.transforms) == list(range(n))
    pts = grid[(grid > 40).all(1) & (grid < 216).all(1)]
    gaps, errs = [], []
    for z in range(n):
        a = np.stack(whole.transforms[z].apply(*pts.T), 1)
        b = np.stack(windows.transforms[z].apply(*pts.T), 1)
        gaps.append(float(np.sqrt(((a - b) ** 2).sum(1).mean())))
    # Against the truth, through each section's raw points: the frame common to all removed.
    out = np.tile(pts, (n, 1))
    world = np.concatenate([forward(z, np.stack(windows.transforms[z].apply(*pts.T), 1)) for z in range(n)])
    g, *_ = np.linalg.lstsq(np.column_stack([out, np.ones(len(out))]), world, rcond=None)
    errs = np.hypot(*(np.column_stack([out, np.ones(len(out))]) @ g - world).T).reshape(n, -1)
    # Measured: windows within 0.20 px of the whole solve, 0.12 px RMS from the truth.
    assert max(gaps) < 0.35, gaps
    assert float(np.sqrt((errs ** 2).mean())) < 0.25


def test_pinned_sections_keep_their_affine_and_field_exactly() -> None:
    """Sections already written (live, or an earlier window) are held exactly where they
    are, field and all, and the free sections are placed against them as the whole solve
    places them."""
    n = 10
    grid = np.stack(np.meshgrid(np.arange(8, 250, 12.0), np.arange(8, 250, 12.0)), -1).reshape(-1, 2)
    _forward, matches, initial = _waved_stack(3, n, (60, 70), grid, 0.1)
    whole = solve_stack(SHAPE, list(range(n)), matches, initial)
    pinned = [0, 1, 2]
    start = {z: (whole.forward[z] if z in pinned else initial[z]) for z in range(n)}
    part = solve_stack(SHAPE, list(range(n)), matches, start, fixed=pinned,
                       fixed_fields={z: whole.fields[z] for z in pinned})
    for z in pinned:
        np.testing.assert_array_equal(part.forward[z], whole.forward[z])
        np.testing.assert_array_equal(part.fields[z], whole.fields[z])
    pts = grid[(grid > 40).all(1) & (grid < 216).all(1)]
    for z in range(3, n):
        a = np.stack(whole.transforms[z].apply(*pts.T), 1)
        b = np.stack(part.transforms[z].apply(*pts.T), 1)
        assert float(np.sqrt(((a - b) ** 2).sum(1).mean())) < 0.1


def test_a_large_section_is_solved_on_a_grid_that_does_not_grow_with_it() -> None:
    """Sections of 2048 px distorted by smooth fields, matched every 32 px with 0.5 px of
    noise (as real neighbours scatter): on the default grid (at most 33 nodes a side, here
    every 64 px) the solve lands where the 32 px grid puts it, and both find the truth."""
    from tapescope.alignment.zsolve import _Layout

    shape = (2048, 2048)
    n = 4
    grid = np.stack(np.meshgrid(np.arange(16, 2032, 32.0), np.arange(16, 2032, 32.0)), -1).reshape(-1, 2)
    forward, matches, initial = _waved_stack(5, n, (480, 560), grid, 0.5)
    coarse_p, fine_p = SolveParams(), SolveParams(max_nodes=65)
    coarse_lay, fine_lay = _Layout(range(n), shape, coarse_p), _Layout(range(n), shape, fine_p)
    assert (coarse_lay.dh, coarse_lay.dw, coarse_lay.ds) == (33, 33, 2047 / 32)
    assert (fine_lay.dh, fine_lay.dw, fine_lay.ds) == (65, 65, 32.0)
    coarse = solve_stack(shape, list(range(n)), matches, initial, coarse_p)
    fine = solve_stack(shape, list(range(n)), matches, initial, fine_p)
    pts = grid[(grid > 200).all(1) & (grid < 1848).all(1)]
    for z in range(n):
        a = np.stack(coarse.transforms[z].apply(*pts.T), 1)
        b = np.stack(fine.transforms[z].apply(*pts.T), 1)
        assert np.sqrt(((a - b) ** 2).sum(1).mean()) < 0.15, z
    for sol in (coarse, fine):
        # Against the truth: each section's raw point for a frame point, mapped back.
        errs = []
        for z in range(n):
            raw = np.stack(sol.transforms[z].apply(*pts.T), 1)
            errs.append(forward(z, raw))
        world = np.concatenate(errs)
        ref = np.concatenate([pts] * n)
        g, *_ = np.linalg.lstsq(np.column_stack([world, np.ones(len(world))]), ref, rcond=None)
        rms = np.sqrt(((np.column_stack([world, np.ones(len(world))]) @ g - ref) ** 2).sum(1).mean())
        assert rms < 0.2, rms
