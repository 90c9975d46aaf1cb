"""Stitching accuracy against synthetic tile sets with known truth (stitching/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tapescope.stitching.backend import CPU, Backend, BackendUnavailable, get_backend
from tapescope.stitching.flatfield import apply_flatfield, estimate_flatfield
from tapescope.stitching.register import refine_shift
from tapescope.stitching.section import stitch_section
from tapescope.stitching.synthetic import SyntheticParams, make_tileset


def _stitch(params: SyntheticParams):
    ts = make_tileset(params)
    gain = estimate_flatfield(ts.tiles, dark=params.dark)
    tiles = [apply_flatfield(t, gain, params.dark) for t in ts.tiles]
    return ts, stitch_section(tiles, ts.stage_px, ts.grid)


# 512 px tiles keep the test fast; their overlap strips hold a quarter of the pixels of the
# 1024 px sets in bench/bench_stitch.py, so "low dose" here is 60 e/px there 20 e/px.
# At 60 e/px one draw's RMS varies by +-15 % around the target, so three draws are pooled.
@pytest.mark.parametrize("dose", [60.0, 300.0])
def test_positions_within_target_of_truth(dose: float) -> None:
    errors = []
    for seed in (4, 5, 6):
        ts, result = _stitch(SyntheticParams(tile=512, rows=3, cols=3, overlap=0.09, dose=dose, seed=seed))
        err = np.linalg.norm(ts.error(result.solution.positions), axis=1)
        stage_err = np.linalg.norm(ts.error(ts.stage_px), axis=1)
        assert stage_err.max() > 5                   # the stage really was off by pixels
        assert err.max() <= 0.15, (seed, err)
        errors.append(err)
    err = np.concatenate(errors)
    assert np.sqrt((err**2).mean()) <= 0.05, err     # the stated targets (docs/stitching.md)
    assert result.solution.status == ["ok"] * 9


def test_blank_tile_is_placed_by_the_stage_and_flagged() -> None:
    ts, result = _stitch(SyntheticParams(tile=384, rows=3, cols=3, overlap=0.1, blank=((1, 1),), seed=6))
    sol = result.solution
    centre = ts.grid.index((1, 1))
    assert sol.status[centre] == "stage"
    assert [s for k, s in enumerate(sol.status) if k != centre] == ["ok"] * 8
    # Placed where the stage said: off by the stage error, and no more.
    assert np.allclose(sol.positions[centre], ts.stage_px[centre])
    err = np.linalg.norm(ts.error(sol.positions, among=~ts.blank), axis=1)
    assert np.delete(err, centre).max() < 0.15
    assert err[centre] <= np.linalg.norm(ts.truth_px[centre] - ts.stage_px[centre]) + 0.15


def test_refinement_measures_a_known_subpixel_shift() -> None:
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.normal(size=(140, 400)), 1.5).astype(np.float32)
    shift = (0.37, -0.61)
    moved = ndimage.shift(img, (-shift[0], -shift[1]), order=5, mode="nearest")   # moved(p) = img(p + shift)
    got = refine_shift(img[20:120, 20:380], moved[20:120, 20:380], (0.0, 0.0))
    assert got is not None and got.shift == pytest.approx(shift, abs=0.01)


def test_scipy_formulation_of_the_gpu_primitives_matches_opencv() -> None:
    # The GPU backend runs cupyx.scipy.ndimage; the same calls on scipy.ndimage must give
    # what the OpenCV path gives, or the two devices would disagree.
    emulated = Backend("scipy", np, CPU.fft, ndimage)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(64, 80)).astype(np.float32)
    for s in [(0.3, -0.7), (-1.25, 2.5)]:
        a, b = CPU.sample_shifted(img, s), emulated.sample_shifted(img, s)
        assert np.abs(a - b)[8:-8, 8:-8].max() < 1e-4
    assert np.abs(CPU.blur(img, 1.0) - emulated.blur(img, 1.0))[8:-8, 8:-8].max() < 1e-3
    odd = rng.normal(size=(93, 257)).astype(np.float32)
    assert np.abs(CPU.bin(odd, 2) - emulated.bin(odd, 2)).max() < 1e-5 and CPU.bin(odd, 2).shape == (46, 128)
    for along in (0, 1):     # narrow strips are filtered along their length only
        assert np.abs(CPU.blur(img, 1.0, along) - emulated.blur(img, 1.0, along))[8:-8, 8:-8].max() < 1e-3
        assert np.abs(CPU.lowpass(img, 21, along) - emulated.lowpass(img, 21, along))[24:-24, 24:-24].max() < 1e-3


def test_gpu_and_cpu_agree_within_a_hundredth_of_a_pixel() -> None:
    try:
        gpu = get_backend("gpu")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    ts = make_tileset(SyntheticParams(tile=512, rows=2, cols=3, overlap=0.09, seed=2))
    tiles = [t.astype(np.float32) for t in ts.tiles]
    cpu = stitch_section(tiles, ts.stage_px, ts.grid).solution.positions
    dev = stitch_section(tiles, ts.stage_px, ts.grid, backend=gpu).solution.positions
    assert np.abs(cpu - dev).max() < 0.01


def test_unknown_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="auto, cpu or gpu"):
        get_backend("tpu")  # type: ignore[arg-type]
    assert get_backend("auto").name in ("cpu", "gpu")


def test_lens_distortion_is_estimated_from_the_overlaps_and_corrected() -> None:
    from tapescope.stitching.lens import RadialDistortion

    tile = 768
    k1 = 1.0 / (2**1.5 * tile / 2)          # 1 px at the sensor corner, as the simulator's camera
    ts = make_tileset(SyntheticParams(tile=tile, rows=3, cols=3, overlap=0.09, dose=150, seed=5,
                                      distortion=RadialDistortion(k1)))
    tiles = [apply_flatfield(t, ts.gain, ts.params.dark) for t in ts.tiles]
    plain = stitch_section(tiles, ts.stage_px, ts.grid)
    fitted = stitch_section(tiles, ts.stage_px, ts.grid, lens="estimate")
    fit = fitted.lens
    assert fit is not None and fit.accepted
    assert fit.model.k1 == pytest.approx(k1, rel=0.1)
    assert fit.rms_after < 0.7 * fit.rms_before   # what is left is the noise of 90 px patches
    rms = [float(np.sqrt((np.linalg.norm(ts.error(r.solution.positions), axis=1) ** 2).mean()))
           for r in (plain, fitted)]
    assert rms[0] > 0.4                      # the lens really does bend a translation-only solve
    assert rms[1] < 0.12 and rms[1] < rms[0] / 5   # 1024/2048 px sets reach ~0.035 (bench)


def test_no_lens_is_not_invented() -> None:
    ts = make_tileset(SyntheticParams(tile=768, rows=3, cols=3, overlap=0.09, dose=150, seed=7))
    tiles = [apply_flatfield(t, ts.gain, ts.params.dark) for t in ts.tiles]
    fit = stitch_section(tiles, ts.stage_px, ts.grid, lens="estimate").lens
    assert fit is not None and not fit.accepted
    assert abs(fit.model.k1) * 2**1.5 * 384 < 0.1    # under 0.1 px at the corner


def test_flatfield_leaves_blank_and_saturated_tiles_out() -> None:
    ts = make_tileset(SyntheticParams(tile=256, rows=3, cols=4, overlap=0.1, dose=300, seed=12, dust=0))
    dark = ts.params.dark
    clean = estimate_flatfield(ts.tiles, dark=dark)
    blank = make_tileset(SyntheticParams(tile=256, rows=1, cols=3, overlap=0.1, dose=300, seed=13, dust=0,
                                         blank=((0, 0), (0, 1), (0, 2))))
    saturated = ts.tiles[0].copy()
    saturated[:128] = 65535
    mixed = estimate_flatfield([*ts.tiles, *blank.tiles, saturated], dark=dark)
    # Blank resin under a different vignetting would pull a plain median toward its own field.
    assert np.abs(mixed / clean - 1).max() < 0.01
    core = (slice(16, -16), slice(16, -16))
    assert np.abs(mixed / ts.gain - 1)[core].max() < 0.05   # 12 small tiles: specimen left in the median


def test_bright_and_dark_references_give_the_gain() -> None:
    from tapescope.stitching.flatfield import flatfield_from_references

    ts = make_tileset(SyntheticParams(tile=128, rows=1, cols=1, seed=1))
    dark = np.full(ts.gain.shape, 100.0, np.float32)
    gain = flatfield_from_references(ts.gain * 4000 + dark, dark)
    assert np.allclose(gain, ts.gain, rtol=1e-5)
    with pytest.raises(ValueError, match="not a bright exposure"):
        flatfield_from_references(dark, dark)
