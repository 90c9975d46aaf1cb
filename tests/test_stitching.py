"""Flat-field, registration and global solve against simulated tiles with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from tapescope.acquisition.plan import tile_grid
from tapescope.sim_hardware.world import SimWorld, WorldParams
from tapescope.stitching.flatfield import FlatFielded, apply_flatfield, estimate_flatfield
from tapescope.stitching.register import phase_correlate
from tapescope.stitching.section import stitch_section
from tapescope.stitching.solve import Pair, solve_positions

TILE = (256, 256)


def simulate_section(seed: int, rows: int = 3, cols: int = 3, overlap: float = 0.12, lens_px: float = 0.0):
    """Tiles of one section with their stage (encoder) and true top-left positions, px."""
    world = SimWorld(WorldParams(seed=seed, n_slots=1, tile_px=TILE, section_px=(1024, 1024),
                                 lens_distortion_px=lens_px))
    px = world.p.pixel_nm
    tiles, stage, truth, grid = [], [], [], []
    for t in tile_grid(rows, cols, TILE, px, overlap):
        world.stage.move(np.array([t.y_nm, t.x_nm]))
        tiles.append(world.expose(20.0))
        half = np.array(TILE) / 2
        stage.append(world.stage.encoder / px - half)
        truth.append(world.stage.true / px - half)
        grid.append((t.row, t.col))
    return world, tiles, np.array(stage), np.array(truth), grid


def test_phase_correlation_is_subpixel() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(300, 300)).astype(np.float32)
    from scipy.ndimage import fourier_shift, gaussian_filter
    big = gaussian_filter(big, 2)
    shift = (3.37, -5.81)
    moved = np.fft.ifft2(fourier_shift(np.fft.fft2(big), (-shift[0], -shift[1]))).real
    dy, dx, peak = phase_correlate(big[50:250, 50:250], moved[50:250, 50:250])
    assert (dy, dx) == pytest.approx(shift, abs=0.05)
    assert peak > 0.5


@pytest.mark.parametrize("seed", [1, 2])
def test_stitched_positions_match_the_truth(seed: int) -> None:
    world, raw, stage, truth, grid = simulate_section(seed)
    gain = estimate_flatfield(raw, dark=world.p.dark_offset)
    tiles = [apply_flatfield(t, gain, world.p.dark_offset) for t in raw]
    result = stitch_section(tiles, stage, grid)
    pos = result.solution.positions
    # Compare shapes, not the free translation of the whole montage.
    err = (pos - pos.mean(0)) - (truth - truth.mean(0))
    stage_err = (stage - stage.mean(0)) - (truth - truth.mean(0))
    rms = float(np.sqrt((err**2).sum(1).mean()))
    assert np.abs(stage_err).max() > 3            # the stage really was off...
    # ...and stitching recovered it. (A loose bound: tests/test_stitching_accuracy.py holds the tight one.)
    assert rms < 0.25, f"RMS {rms:.3f} px"
    assert np.abs(err).max() < 0.5
    assert all(s == "ok" for s in result.solution.status)


def test_outlier_pair_is_rejected() -> None:
    # 2x2 grid, exact pairs except one that is 30 px wrong.
    truth = np.array([[0, 0], [0, 100], [100, 0], [100, 100]], float)
    stage = truth + np.array([[2, -1], [0, 3], [-2, 0], [1, 1]])
    pairs = [Pair(i, j, *(truth[j] - truth[i]), 0.9) for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]]
    pairs.append(Pair(0, 3, 130.0, 100.0, 0.9))
    sol = solve_positions(stage, pairs)
    assert not sol.pair_used[-1]
    err = (sol.positions - sol.positions.mean(0)) - (truth - truth.mean(0))
    assert np.abs(err).max() < 1e-3


def test_tile_without_neighbour_stays_at_stage_position() -> None:
    stage = np.array([[0, 0], [0, 100], [500, 500]], float)
    sol = solve_positions(stage, [Pair(0, 1, 1.0, 101.0, 0.8)])
    assert sol.status == ["ok", "ok", "stage"]
    assert np.allclose(sol.positions[2], stage[2])


def test_flatfield_corrects_vignetting() -> None:
    world = SimWorld(WorldParams(seed=5, n_slots=1, tile_px=TILE, section_px=(1024, 1024)))
    rng = np.random.default_rng(1)
    tiles = []
    for _ in range(24):
        world.stage.move(rng.uniform(-1500, 1500, 2))
        tiles.append(world.expose(20.0))
    dark = world.p.dark_offset
    gain = estimate_flatfield(tiles, dark=dark)
    # A uniform field (bare resin) through the same optics: flat to within 1% once corrected.
    world.slot_offsets_nm[0] = (1e7, 1e7)   # move the section far away: the camera sees resin
    world.stage.move(np.zeros(2))
    blank = np.mean([world.expose(60.0).astype(np.float32) for _ in range(4)], axis=0)
    corrected = apply_flatfield(blank, gain, dark)
    raw_spread = np.percentile(blank, 99) / np.percentile(blank, 1) - 1
    # Smooth at the scale of vignetting (shot noise is not what flat-field fixes).
    import cv2
    smooth = cv2.GaussianBlur(corrected, (0, 0), 8)[16:-16, 16:-16]
    spread = smooth.max() / smooth.min() - 1
    assert raw_spread > 0.15
    assert spread < raw_spread / 3   # dust spots are finer than the polynomial fit: see docs
    core = smooth[32:-32, 32:-32]
    assert core.std() / core.mean() < 0.01


@pytest.mark.parametrize("texture", ["em", "fluorescence"])
def test_the_flatfield_statistic_suits_the_specimen(texture: str) -> None:
    """Dense EM texture: the per-pixel median. Stained nuclei on a dark field: a low
    quantile (the median of a pixel is often a nucleus: 11 % off the true gain here)."""
    import cv2

    from tapescope.stitching.flatfield import FIT_GRID, choose_quantile
    from tapescope.stitching.synthetic import SyntheticParams, make_tileset

    ts = make_tileset(SyntheticParams(tile=192, rows=4, cols=5, overlap=0.05, stage_error_px=2.5, vignetting=0.1,
                                      dust=0, seed=3, texture=texture))
    reduced = np.stack([cv2.resize(t.astype(np.float32) - ts.params.dark, (FIT_GRID, FIT_GRID),
                                   interpolation=cv2.INTER_AREA) for t in ts.tiles])
    q = choose_quantile(reduced)
    assert (q == 50.0) if texture == "em" else (q <= 10.0), q
    gain = estimate_flatfield(ts.tiles, dark=ts.params.dark)
    off = gain / ts.gain * ts.gain.mean() - 1
    assert np.sqrt(np.mean(off**2)) < 0.02, np.sqrt(np.mean(off**2))     # 1.0 % and 1.2 % measured


def test_flatfield_needs_enough_tiles() -> None:
    with pytest.raises(ValueError, match="at least 3 usable tiles"):
        estimate_flatfield([np.ones((8, 8), np.uint16)] * 2)


def test_a_tile_flat_fielded_as_it_is_read_equals_the_whole_correction() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(100, 60000, (64, 80)).astype(np.uint16)
    gain = rng.uniform(0.8, 1.2, (64, 80)).astype(np.float32)
    dark = rng.uniform(90, 110, (64, 80)).astype(np.float32)
    for d in (dark, 100.0):
        lazy, whole = FlatFielded(raw, gain, d), apply_flatfield(raw, gain, d)
        assert np.array_equal(lazy[5:40, 7:70], whole[5:40, 7:70]) and lazy.shape == whole.shape
        assert np.array_equal(np.asarray(lazy), whole)
    with pytest.raises(ValueError, match="flat-field shape"):
        FlatFielded(raw, gain[:10], 0.0)


@pytest.mark.parametrize(("shape", "strip"), [((256, 256), 24), ((1024, 256), 12)])
def test_a_narrow_overlap_of_unrelated_tiles_is_refused_as_chance(shape: tuple[int, int], strip: int) -> None:
    """Unrelated texture on a 24 px strip: the search across the strip keeps the cut that agrees
    best, so the chance floor must be that of the overlap checked, and no pair may pass; nor
    on a long 12 px strip, where a pair no single shift fits would be measured in pieces."""
    import cv2

    from tapescope.stitching.register import register_pair

    for seed in range(12):
        rng = np.random.default_rng(seed)
        a, b = (cv2.GaussianBlur(rng.normal(1000, 100, shape).astype(np.float32), (0, 0), 1.5)
                for _ in range(2))
        shift = register_pair(a, b, (0.0, float(shape[1] - strip)))
        assert shift is None or shift.confidence == 0.0, (seed, shift)


def test_the_tukey_window_is_scipys() -> None:
    """register.tukey stands in for scipy.signal.windows.tukey (whose import costs the
    command line 0.7 s of start-up): the same window for every length and taper."""
    from scipy.signal.windows import tukey as scipy_tukey

    from tapescope.stitching.register import tukey

    for n in (1, 2, 3, 8, 37, 256, 1001):
        for alpha in (0.0, 0.3, 0.5, 1.0, 1.5):
            assert np.allclose(tukey(n, alpha), scipy_tukey(n, alpha), atol=1e-12), (n, alpha)
