"""An affine per tile (camera arrays): the solve, the renderer, the command, and real TEMCA tiles."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates
from typer.testing import CliRunner

from tapescope.cli import app
from tapescope.montage.render import render_block, render_montage
from tapescope.montage.transform import SectionTransform
from tapescope.stitching.affine import PATCH_PX, fit_affine, measure_warped, solve_affine
from tapescope.stitching.lens import RadialDistortion
from tapescope.stitching.section import strip_width
from tapescope.stitching.stream import StreamingStitcher
from tapescope.stitching.synthetic import SyntheticParams, TileSet, make_tileset
from tapescope.stitching.tileset import write_tileset


def _stitch(ts: TileSet, tile_model: str):
    st = StreamingStitcher(gain=ts.gain, strip_px=strip_width(ts.tiles[0].shape, ts.stage_px, ts.grid))
    for rc, pos, tile in zip(ts.grid, ts.stage_px, ts.tiles, strict=True):
        st.add(rc, tile, pos)
    return st.finish(lens="none", tile_model=tile_model)


@pytest.fixture(scope="module")
def camera_array() -> TileSet:
    # 3 x 3 tiles, each turned and scaled by ~4 mrad / 0.4 %: 1-2 px at a tile's edge.
    return make_tileset(SyntheticParams(tile=512, rows=3, cols=3, overlap=0.15, stage_error_px=3, camera_linear=0.004,
                                        seed=5, dose=500))


def test_an_affine_per_tile_closes_seams_that_a_translation_cannot(camera_array: TileSet) -> None:
    flat = _stitch(camera_array, "translation")
    aff = _stitch(camera_array, "affine")
    flat_seams = camera_array.seam_error(flat.solution.positions)
    seams = camera_array.seam_error(aff.solution.positions, aff.solution.linear)
    assert flat_seams.max() > 1.0                 # a translation leaves pixels of seam
    assert seams.max() < 0.15, seams              # measured 0.042
    assert aff.solution.pair_used.all()
    assert aff.affine is not None and aff.affine.rms < 0.25 * aff.affine.rms_translation


def test_tiles_of_one_camera_stay_within_noise_of_a_translation() -> None:
    ts = make_tileset(SyntheticParams(tile=512, rows=3, cols=3, overlap=0.15, stage_error_px=3, seed=5, dose=500))
    aff = _stitch(ts, "affine")
    assert aff.solution.linear is not None
    assert np.abs(aff.solution.linear - np.eye(2)).max() < 1e-3
    assert ts.seam_error(aff.solution.positions, aff.solution.linear).max() < 0.08   # 0.038; translation 0.026


def test_patches_measured_through_a_predicted_affine_are_where_the_truth_puts_them() -> None:
    """Tile b turned by 8 mrad and scaled by 0.6 % against a (2-4 px along their overlap):
    resampled half-way through the exact relative map, every patch lands on the truth; through
    a map off by 0.3 % (a first fit) they still land within hundredths of a pixel."""
    rng = np.random.default_rng(0)
    scene = gaussian_filter(rng.normal(size=(700, 1100)), 1.5)
    q = np.stack(np.mgrid[0:512, 0:512], -1).astype(float)
    turn, scale = 0.008, 1.006
    lin = scale * np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    pa, pb = np.array([50.0, 50.0]), np.array([52.3, 480.6])
    a = map_coordinates(scene, np.moveaxis(pa + q, -1, 0), order=3).astype(np.float32)
    b = map_coordinates(scene, np.moveaxis(pb + q @ lin.T, -1, 0), order=3).astype(np.float32)
    strip_a, strip_b, origin_a = a[:, 412:], b[:, :100], np.array([0.0, 412.0])
    for off in (0.0, 0.003):
        guess = np.column_stack([lin + off * np.array([[1, -1], [1, 0.5]]), pb - pa + off * np.array([130, -100])])
        patches = measure_warped(strip_a, strip_b, 0, 1, origin_a, np.zeros(2), guess)
        assert len(patches) >= 4
        err = np.array([p.m - (pb + lin @ p.qb - pa - p.qb) for p in patches])
        assert np.abs(err).max() < (0.005 if off == 0 else 0.06), err


def test_narrow_overlaps_of_a_camera_array_are_used() -> None:
    """Strips of 20 px: one slab of patches across, and every pair used."""
    ts = make_tileset(SyntheticParams(tile=256, rows=2, cols=3, overlap=0.08, stage_error_px=1, camera_linear=0.004,
                                      seed=6, dose=500))
    aff = _stitch(ts, "affine")
    assert aff.solution.pair_used.all(), aff.solution.pair_reason
    flat = _stitch(ts, "translation")
    assert ts.seam_error(aff.solution.positions, aff.solution.linear).max() < \
        0.5 * ts.seam_error(flat.solution.positions).max()


def test_strips_too_narrow_to_resample_keep_their_first_look() -> None:
    """10 px strips: the second look's resampling leaves too little of them; the first
    look's patches stand (without them 1 pair of 12 was used; 11 with them, measured)."""
    ts = make_tileset(SyntheticParams(tile=256, rows=3, cols=3, overlap=0.04, stage_error_px=1, camera_linear=0.004,
                                      seed=6, dose=500))
    assert _stitch(ts, "affine").solution.pair_used.sum() >= 10


def test_a_camera_array_with_a_lens_keeps_every_patch() -> None:
    """The second look resamples through the lens too: with a lens moving the corners by
    5 px every patch still fits (without the lens taken out, most were lost)."""
    lens = RadialDistortion(k1=0.01)
    ts = make_tileset(SyntheticParams(tile=512, rows=3, cols=3, overlap=0.15, stage_error_px=3, camera_linear=0.004,
                                      seed=5, dose=500, distortion=lens))
    st = StreamingStitcher(gain=ts.gain, strip_px=strip_width(ts.tiles[0].shape, ts.stage_px, ts.grid))
    for rc, pos, tile in zip(ts.grid, ts.stage_px, ts.tiles, strict=True):
        st.add(rc, tile, pos)
    aff = st.finish(lens=lens, tile_model="affine")
    assert aff.affine is not None and aff.affine.patch_used.all()
    assert aff.solution.pair_used.all()
    assert ts.seam_error(aff.solution.positions, aff.solution.linear, lens=lens).max() < 0.15   # measured 0.078


def test_a_pair_whose_patches_scatter_is_refused_and_a_wrong_patch_dropped(camera_array: TileSet) -> None:
    st = StreamingStitcher(gain=camera_array.gain,
                           strip_px=strip_width(camera_array.tiles[0].shape, camera_array.stage_px, camera_array.grid))
    for rc, pos, tile in zip(camera_array.grid, camera_array.stage_px, camera_array.tiles, strict=True):
        st.add(rc, tile, pos)
    st.close()
    patches = st.patch_offsets(size=PATCH_PX)
    rng = np.random.default_rng(0)
    for k in (0, 4, 11):
        # One pair's patches scattered by 3 px each (a pair whose overlap matched nothing):
        # no affine makes them agree, and the pair is refused; the others stay.
        bad = (st.pairs[k].i, st.pairs[k].j)
        moved = [replace(p, m=p.m + rng.normal(0, 3, 2)) if (p.i, p.j) == bad else p for p in patches]
        solution, _ = solve_affine(camera_array.stage_px, st.pairs, moved, camera_array.tiles[0].shape)
        assert not solution.pair_used[k] and solution.pair_reason[k].startswith("too few patches")
        assert solution.pair_used.sum() == len(st.pairs) - 1
    # One patch 4 px off, measured with little precision: dropped all the same (judged in pixels).
    one = list(patches)
    one[5] = replace(one[5], m=one[5].m + np.array([4.0, 0.0]), information=(1e-3, 0.0, 1e-3))
    fit = fit_affine(one, camera_array.stage_px, camera_array.tiles[0].shape)
    before = fit_affine(patches, camera_array.stage_px, camera_array.tiles[0].shape)
    assert before.patch_used[5] and not fit.patch_used[5]
    assert (fit.patch_used == before.patch_used).sum() == len(one) - 1


def test_an_unknown_tile_model_is_refused() -> None:
    st = StreamingStitcher()
    with pytest.raises(ValueError, match="tile_model"):
        st.finish(tile_model="projective")


def _affine_tiles(rng: np.random.Generator, scale_px: int = 1) -> tuple[np.ndarray, list[np.ndarray], np.ndarray,
                                                                          np.ndarray]:
    """A smooth textured scene and 2 x 2 tiles of it, each through its own affine; `scale_px`
    times the small set's size (tiles of 160 x 180 px, overlaps of 10-30 px)."""
    k = scale_px
    scene = gaussian_filter(rng.normal(size=(400 * k, 400 * k)), 2.0) * 40 + 100
    shape = (160 * k, 180 * k)
    positions = np.array([[20.0, 25.0], [22.5, 170.25], [155.75, 18.5], [160.0, 168.0]]) * [[k, k]]
    turn = [0.0, 0.01, -0.012, 0.006]
    scale = [1.0, 1.008, 0.994, 1.004]
    linear = np.array([s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) for a, s in zip(turn, scale,
                                                                                                   strict=True)])
    q = np.stack(np.mgrid[0:shape[0], 0:shape[1]], -1).astype(float)
    tiles = [map_coordinates(scene, np.moveaxis(p + q @ a.T, -1, 0), order=3).astype(np.float32)
             for p, a in zip(positions, linear, strict=True)]
    return scene, tiles, positions, linear


def test_large_affine_tiles_drawn_alone_and_blended_land_where_the_truth_puts_them() -> None:
    """Tiles large enough that most cells are one tile's alone (drawn by OpenCV's affine warp
    through the tile's linear part) and the rest blended: both against the scene, and
    blocks against the whole."""
    scene, tiles, positions, linear = _affine_tiles(np.random.default_rng(3), scale_px=4)
    t = SectionTransform.identity()
    size = (1360, 1440)
    whole, cover = render_block(tiles, positions, t, (0, 0, *size), linear=linear)
    inner = (slice(120, 1240), slice(140, 1320))
    assert (cover[inner] > 0.5).all()
    err = np.abs(whole[inner] - scene[:size[0], :size[1]][inner])
    assert np.median(err) < 1.0 and np.percentile(err, 99.9) < 4.0
    for y0, x0, h, w in [(0, 0, 700, 700), (600, 650, 760, 790), (300, 0, 260, 1440)]:
        part, cov = render_block(tiles, positions, t, (y0, x0, h, w), linear=linear)
        np.testing.assert_allclose(cov, cover[y0:y0 + h, x0:x0 + w], atol=1e-4)
        np.testing.assert_allclose(part, whole[y0:y0 + h, x0:x0 + w], atol=0.05)


def test_the_renderer_places_each_tile_through_its_own_linear_part() -> None:
    scene, tiles, positions, linear = _affine_tiles(np.random.default_rng(0))
    image, cover = render_montage(tiles, positions, np.zeros(2), (340, 360), linear=linear)
    inner = (slice(40, 300), slice(45, 330))
    assert (cover[inner] > 0).all()
    err = np.abs(image[inner] - scene[:340, :360][inner])
    assert np.median(err) < 1.0 and np.percentile(err, 99) < 4.0     # bilinear over cubic tiles; scene std 5
    ignored, _ = render_montage(tiles, positions, np.zeros(2), (340, 360))
    assert np.median(np.abs(ignored[inner] - scene[:340, :360][inner])) > 2 * np.median(err)


@pytest.mark.parametrize("lens", [False, True])
def test_blocks_of_an_affine_montage_equal_the_whole(lens: bool) -> None:
    """Which tiles reach a block, and which part of each is read, widen by the tiles' turn and
    scale: a block rendered alone draws what the whole render draws there."""
    _, tiles, positions, linear = _affine_tiles(np.random.default_rng(1))
    model = RadialDistortion(k1=2e-3) if lens else None
    t = SectionTransform.identity()
    whole, wcov = render_block(tiles, positions, t, (0, 0, 340, 360), lens=model, linear=linear)
    for y0, x0, h, w in [(0, 0, 150, 170), (150, 170, 190, 190), (100, 0, 90, 360), (0, 150, 340, 40)]:
        part, cov = render_block(tiles, positions, t, (y0, x0, h, w), lens=model, linear=linear)
        np.testing.assert_allclose(cov, wcov[y0:y0 + h, x0:x0 + w], atol=1e-4)
        np.testing.assert_allclose(part, whole[y0:y0 + h, x0:x0 + w], atol=0.05)


@pytest.mark.parametrize("lens", [False, True])
def test_the_ndimage_warp_draws_affine_tiles_as_opencv_does(lens: bool) -> None:
    """The GPU's warp (here on NumPy, the same code) and OpenCV's place each tile through its
    own linear part alike (OpenCV's affine path is fixed-point to 1/1024 px)."""
    from tapescope.montage.warp import NdimageWarp
    _, tiles, positions, linear = _affine_tiles(np.random.default_rng(2))
    model = RadialDistortion(k1=2e-3) if lens else None
    t = SectionTransform.identity()
    cv, cv_cov = render_block(tiles, positions, t, (0, 0, 340, 360), lens=model, linear=linear)
    nd, nd_cov = render_block(tiles, positions, t, (0, 0, 340, 360), lens=model, linear=linear, warp=NdimageWarp(np))
    np.testing.assert_allclose(nd_cov, cv_cov, atol=0.02)
    inner = cv_cov > 0.5
    assert np.abs(nd[inner] - cv[inner]).max() < 0.5          # scene std 5: 1/100 of it


def test_the_command_writes_each_tiles_affine_and_renders_with_it(camera_array: TileSet, tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    write_tileset(root, camera_array.tiles, camera_array.grid, camera_array.stage_px)
    runner = CliRunner()
    res = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "out"), "--device", "cpu",
                              "--tile-model", "affine", "--pixel-nm", "4"])
    assert res.exit_code == 0, res.output
    assert "tile model: affine" in res.output
    with open(tmp_path / "out" / "positions.csv") as fh:
        rows = list(csv.DictReader(fh))
    pos = np.array([[float(r["y"]), float(r["x"])] for r in rows])
    lin = np.array([[[float(r["a_yy"]), float(r["a_yx"])], [float(r["a_xy"]), float(r["a_xx"])]] for r in rows])
    assert np.abs(lin - np.eye(2)).max() > 2e-3          # the tiles' own turn and scale, written
    assert camera_array.seam_error(pos, lin).max() < 0.15
    assert (tmp_path / "out" / "montage.zarr").is_dir()
    bad = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "bad"), "--tile-model", "projective"])
    assert bad.exit_code == 2 and "--tile-model" in bad.output
    assert not (tmp_path / "bad").exists()


TEMCA = Path(__file__).resolve().parents[2] / "shared" / "data" / "temca_tiles" / "render_temca" / "tiles"


@pytest.mark.skipif(not TEMCA.is_dir(), reason="real TEMCA tiles not found next to the repository")
def test_a_real_camera_array_uses_every_pair_with_an_affine_per_tile(tmp_path: Path) -> None:
    """TEMCA's camera array: with a translation per tile one of the four pairs is left out as
    an outlier (no translation closes the loop); with an affine each all four are used and
    the patches along the overlaps agree to a fraction of a pixel."""
    runner = CliRunner()
    flat = runner.invoke(app, ["stitch", str(TEMCA), "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert "used 3" in flat.output
    res = runner.invoke(app, ["stitch", str(TEMCA), "--out", str(tmp_path / "a"), "--device", "cpu",
                              "--tile-model", "affine"])
    assert res.exit_code == 0, res.output
    assert "pairs 4 (used 4)" in res.output
    rms, flat_rms = (float(v) for v in res.output.split("patch residual RMS ")[1].split(" px with")[0]
                     .replace(" px (", " ").split())
    assert rms < 0.25 * flat_rms, res.output
