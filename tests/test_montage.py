"""Block rendering: equal to the in-RAM render, bounded reads, sharded writes with the pyramid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tapescope.montage.omezarr import Volume
from tapescope.montage.render import render_block, render_montage
from tapescope.montage.shard_render import render_section
from tapescope.montage.transform import SectionTransform


class CountingTile:
    """A tile that records the area of every read: rendering must never read it whole."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = data.shape
        self.reads: list[int] = []

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        out = self.data[key]
        self.reads.append(out.size)
        return out


def _tiles(n: int = 4, size: int = 300) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    tiles = [rng.uniform(100, 1000, (size, size)).astype(np.float32) for _ in range(n)]
    pos = np.array([[10.3, 5.2], [12.1, 275.7], [280.4, 7.9], [282.0, 277.3]])[:n]
    return tiles, pos


def _warp() -> SectionTransform:
    gy, gx = np.mgrid[0:11, 0:11].astype(np.float32)
    field = np.stack([1.5 * np.sin(gx / 2), np.cos(gy / 3)], -1).astype(np.float32)
    c, s = np.cos(0.05), np.sin(0.05)
    return SectionTransform(np.array([[c, -s, 3.0], [s, c, -2.0]]), field, 64)


def test_blocks_equal_whole_render_at_every_level(tmp_path: Path) -> None:
    tiles, pos = _tiles()
    t = _warp()
    vol = Volume.create(tmp_path / "v.zarr", (2, 600, 600), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    stats = render_section(vol, 1, tiles, pos, t, threads=2)
    img, cover = render_montage(tiles, pos, np.zeros(2), (600, 600), transform=t)
    assert stats.pixels == 600 * 600 and stats.covered == int((cover > 1e-6).sum())
    assert np.array_equal(vol.levels[0][1], np.clip(np.rint(img), 0, 65535).astype(np.uint16))
    ref = Volume.create(tmp_path / "w.zarr", (2, 600, 600), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    ref.write_section(1, img, {})
    for k in range(3):
        assert np.array_equal(vol.levels[k][1], ref.levels[k][1])
    assert not vol.levels[0][0].any()     # the other section is untouched


class ThreadNotingTile(CountingTile):
    """A tile that notes how many threads OpenCV runs whenever the renderer reads it, and
    fails on read number `fail_at` (None: never)."""

    def __init__(self, data: np.ndarray, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.threads: list[int] = []
        self.fail_at = fail_at

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        import cv2

        self.threads.append(cv2.getNumThreads())
        if self.fail_at is not None and len(self.threads) >= self.fail_at:
            raise OSError("tile file went away")
        return super().__getitem__(key)


@pytest.mark.parametrize("fail", [False, True])
def test_render_runs_opencv_on_one_thread_and_gives_its_threads_back(tmp_path: Path, fail: bool) -> None:
    """Rendering is parallel over write units; OpenCV's own pool is held at one thread while
    it runs, and the process's setting comes back after, also when the render fails."""
    import cv2

    tiles, pos = _tiles()
    spied = [ThreadNotingTile(t, fail_at=3 if fail and k == 2 else None) for k, t in enumerate(tiles)]
    vol = Volume.create(tmp_path / "v.zarr", (1, 600, 600), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        if fail:
            with pytest.raises(OSError, match="went away"):
                render_section(vol, 0, spied, pos, _warp(), threads=2)
        else:
            render_section(vol, 0, spied, pos, _warp(), threads=2)
        seen = [n for t in spied for n in t.threads]
        assert seen and set(seen) == {1}
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


def test_render_reads_only_what_each_block_needs() -> None:
    data = np.random.default_rng(1).uniform(0, 1, (2000, 2000)).astype(np.float32)
    tile = CountingTile(data)
    t = SectionTransform.translation(500.0, 700.0)
    img, cover = render_block([tile], np.zeros((1, 2)), t, (0, 0, 256, 256))
    assert max(tile.reads) <= 260 * 260          # a crop around the block, not the tile
    assert np.allclose(img[5:-5, 5:-5], data[505:751, 705:951], atol=1e-4)
    assert cover.min() > 0


def test_feathered_seams_blend_without_steps() -> None:
    # Two tiles of different brightness overlapping by 40 px: the blend ramps across the
    # overlap instead of stepping at a tile edge.
    a = np.full((100, 140), 100.0, np.float32)
    b = np.full((100, 140), 200.0, np.float32)
    img, _ = render_montage([a, b], np.array([[0.0, 0.0], [0.0, 100.0]]), np.zeros(2), (100, 240), ramp=20)
    row = img[50]
    assert np.allclose(row[:95], 100.0, atol=1e-3) and np.allclose(row[145:], 200.0, atol=1e-3)
    assert np.all(np.diff(row[95:145]) >= -1e-3) and np.abs(np.diff(row)).max() < 10


def test_transforms_are_stored_beside_the_volume(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (3, 64, 64), pixel_nm=4, thickness_nm=40, levels=2, chunk=32)
    t = _warp()
    path = vol.save_transform(2, t)
    assert path.parent == tmp_path / "v.transforms"
    back = Volume.open(tmp_path / "v.zarr").load_transform(2)
    assert np.array_equal(back.field, t.field)
    import pytest
    with pytest.raises(FileNotFoundError, match="z=1"):
        vol.load_transform(1)


def test_tensorstore_and_zarr_python_write_the_same_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tapescope.montage.omezarr as omezarr

    tiles, pos = _tiles()
    t = _warp()
    fast = Volume.create(tmp_path / "ts.zarr", (1, 601, 587), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    render_section(fast, 0, tiles, pos, t)
    assert fast._tensorstore(0) is not None               # the fast path did the I/O
    monkeypatch.setattr(omezarr, "tensorstore", None)
    plain = Volume.create(tmp_path / "zp.zarr", (1, 601, 587), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    render_section(plain, 0, tiles, pos, t)
    assert plain._tensorstore(0) is None
    for k in range(3):
        a, b = Volume.open(tmp_path / "ts.zarr").levels[k][0], plain.levels[k][0]
        assert a.any() and np.array_equal(a, b)


def test_camera_pixels_invert_the_lens() -> None:
    from tapescope.stitching.lens import RadialDistortion, camera_pixels

    shape = (512, 640)
    lens = RadialDistortion(k1=3.0 / (2**1.5 * 320), k2=-0.5 / (4 * 2**1.5 * 320))   # ~3 px at the corners
    q = np.random.default_rng(0).uniform(-5, 645, (1000, 2))
    t = q + lens.at(q, shape)                       # where camera pixel q looks
    qy, qx = camera_pixels(lens, t[:, 0].astype(np.float32), t[:, 1].astype(np.float32), shape)
    assert np.abs(np.stack([qy, qx], -1) - q).max() < 2e-3
    assert np.abs(t - q).max() > 2.5                # the lens really moves the corners
    # A strong lens on a small sensor (30 px at the corners of 256 px) takes more steps, not more error.
    strong, small = RadialDistortion(k1=30.0 / (2**1.5 * 128)), (256, 256)
    q = np.random.default_rng(1).uniform(0, 255, (1000, 2))
    t = q + strong.at(q, small)
    qy, qx = camera_pixels(strong, t[:, 0].astype(np.float32), t[:, 1].astype(np.float32), small)
    assert np.abs(np.stack([qy, qx], -1) - q).max() < 2e-3


def test_rendering_through_the_lens_makes_overlapping_tiles_agree() -> None:
    """Tiles taken through a lens with 2 px at the corners, stitched with the lens estimated:
    rendered without the lens, two neighbours disagree along their overlap (each bends the
    specimen its own way); rendered through it, they agree to the noise."""
    from tapescope.stitching.flatfield import apply_flatfield
    from tapescope.stitching.lens import RadialDistortion
    from tapescope.stitching.section import stitch_section
    from tapescope.stitching.synthetic import SyntheticParams, make_tileset

    tile = 512
    k1 = 2.0 / (2**1.5 * tile / 2)
    ts = make_tileset(SyntheticParams(tile=tile, rows=2, cols=2, overlap=0.15, dose=2000, seed=5,
                                      distortion=RadialDistortion(k1)))
    tiles = [apply_flatfield(t, ts.gain, ts.params.dark) for t in ts.tiles]
    result = stitch_section(tiles, ts.stage_px, ts.grid, lens="estimate")
    assert result.lens is not None and result.lens.accepted
    pos = result.solution.positions
    origin = np.floor(pos.min(0))
    shape = (int(np.ceil(pos[:, 0].max() - origin[0])) + tile, int(np.ceil(pos[:, 1].max() - origin[1])) + tile)

    def disagreement(lens: RadialDistortion | None) -> float:
        a, ca = render_montage([tiles[0]], pos[:1], origin, shape, ramp=1, lens=lens)
        b, cb = render_montage([tiles[1]], pos[1:2], origin, shape, ramp=1, lens=lens)   # right neighbour
        both = (ca > 0.99) & (cb > 0.99)
        assert both.sum() > 0.1 * tile * tile * 0.15
        return float(np.sqrt(np.mean((a[both] - b[both]) ** 2)) / np.std(a[both]))

    plain, through = disagreement(None), disagreement(result.lens_applied)
    assert through < 0.5 * plain, (plain, through)


def test_pixels_one_tile_draws_alone_equal_the_blend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where one tile alone lands at full weight its pixels are drawn without weights; they
    must be what blending would give, and no pixel another tile reaches may be drawn that
    way (the sorting errs towards blending). Rotation, field and lens all widen the reach."""
    import tapescope.montage.render as render
    from tapescope.stitching.lens import RadialDistortion

    rng = np.random.default_rng(3)
    # Tiles of 520 px overlapping by ~40 px; each its own texture and brightness, so a pixel
    # drawn from the wrong tile, or alone where two blend, is far off.
    tiles = [rng.uniform(100, 200, (520, 520)).astype(np.float32) + 300 * k for k in range(4)]
    pos = np.array([[10.3, 5.2], [12.1, 485.7], [480.4, 7.9], [482.0, 487.3]])
    lens = RadialDistortion(k1=3.0 / (2**1.5 * 260))
    t = _warp()
    block = (0, 0, 1000, 1000)
    sorted_ = render._sorted_cells(render._Setup.of(tiles, pos, t, None, lens), block)[2]
    assert (sorted_ >= 0).sum() >= 8 and (sorted_ < 0).sum() >= 9       # both ways are exercised
    fast, fast_cover = render_block(tiles, pos, t, block, lens=lens)

    def all_blended(*args: object) -> tuple[np.ndarray, ...]:
        rows, cols, owner = original(*args)
        return rows, cols, np.full_like(owner, -1)

    original = render._sorted_cells
    monkeypatch.setattr(render, "_sorted_cells", all_blended)
    slow, slow_cover = render_block(tiles, pos, t, block, lens=lens)
    assert np.abs(fast - slow).max() <= 1e-6 * np.abs(slow).max()      # the same to float32 rounding
    assert np.allclose(fast_cover, slow_cover, atol=1e-5)


def _random_geometry(seed: int) -> tuple[list[np.ndarray], np.ndarray, SectionTransform,
                                         object, int | None, tuple[int, int, int, int]]:
    """Tiles and a transform drawn at random: any rotation, scale 0.7-1.4, reflections,
    shear, fields with bicubic overshoot, lenses of +-3 px, narrow ramps, gaps, odd offsets."""
    from tapescope.stitching.lens import RadialDistortion

    rng = np.random.default_rng(seed)
    n = int(rng.choice([384, 512, 700]))
    gy, gx = (int(v) for v in rng.integers(1, 3, 2) + 1)
    ov = rng.uniform(-0.02, 0.15)                        # a negative overlap leaves a gap
    pos = np.array([[i * n * (1 - ov), j * n * (1 - ov)] for i in range(gy) for j in range(gx)], float)
    pos += rng.uniform(-3, 3, pos.shape) + rng.uniform(-50, 50, 2)
    tiles = [rng.uniform(100, 200, (n, n)).astype(np.float32) + 1000 * k for k in range(len(pos))]
    a = rng.uniform(-np.pi, np.pi)
    sc = rng.uniform(0.7, 1.4, 2) * np.where(rng.random(2) < 0.2, -1, 1)
    lin = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag(sc)
    if rng.random() < 0.3:
        lin = lin + rng.uniform(-0.2, 0.2, (2, 2))
    # Output block around the tiles: their bounding box through the inverse affine.
    lo, hi = pos.min(0) - 8, pos.max(0) + n + 8
    inv = np.linalg.inv(lin)
    corners = np.array([[x, y] for y in (lo[0], hi[0]) for x in (lo[1], hi[1])]) @ inv.T
    shift = corners.min(0)                              # output (x, y) of the box's first corner
    m = np.hstack([lin, (lin @ shift)[:, None]])        # output 0 -> that corner
    extent = corners.max(0) - shift
    h, w = (int(min(np.ceil(v), 1400)) for v in (extent[1], extent[0]))
    field = None
    if rng.random() < 0.6:
        stride = int(rng.choice([16, 32, 64]))
        field = rng.normal(0, rng.uniform(0.05, 1.5), (h // stride + 3, w // stride + 3, 2)).astype(np.float32)
        field[::2, ::2] *= -1                           # alternating nodes: the cubic overshoots most
    t = SectionTransform(m, field, stride if field is not None else 64)
    lens = RadialDistortion(k1=float(rng.uniform(-3, 3) / (2**1.5 * n / 2))) if rng.random() < 0.6 else None
    ramp = int(rng.choice([1, 2, 4, 8, 20])) if rng.random() < 0.5 else None
    return tiles, pos, t, lens, ramp, (0, 0, h, w)


@pytest.mark.parametrize("seed", range(40))
def test_cells_drawn_alone_equal_the_blend_whatever_the_geometry(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sorting is conservative under any geometry: drawing every cell by blending gives
    the same image (a cell sorted to one tile that another tile reaches is off by hundreds)."""
    import tapescope.montage.render as render

    tiles, pos, t, lens, ramp, block = _random_geometry(seed)
    fast, fast_cover = render_block(tiles, pos, t, block, ramp, lens)
    original = render._sorted_cells

    def all_blended(*args: object) -> tuple[np.ndarray, ...]:
        rows, cols, owner = original(*args)
        return rows, cols, np.full_like(owner, -1)

    monkeypatch.setattr(render, "_sorted_cells", all_blended)
    slow, slow_cover = render_block(tiles, pos, t, block, ramp, lens)
    # Without a field or a lens OpenCV warps by the affine itself, placing a pixel to 1/1024
    # px from the region's origin: on these noise tiles (neighbours up to 100 apart) up to 0.01.
    tol = 1e-3 if t.field is not None or lens is not None else 0.05
    assert np.abs(fast - slow).max() <= tol, float(np.abs(fast - slow).max())
    assert np.abs(fast_cover - slow_cover).max() <= 1e-5


def test_lens_map_stays_within_its_tolerance_of_the_exact_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inverse lens interpolated from a grid is within LENS_MAP_TOL_PX of the exact one
    on points it was not checked on; a lens too strong for any grid is solved exactly; and a
    render through the map matches a render through the exact inverse."""
    import tapescope.montage.render as render
    from tapescope.montage.lens_map import LENS_MAP_TOL_PX, lens_map
    from tapescope.stitching.lens import RadialDistortion

    mild = RadialDistortion(k1=2.0 / (2**1.5 * 256))             # 2 px at the corners of 512 px
    lm = lens_map(mild, (512, 512), 7)
    assert lm is not None and lm.spacing >= 8                     # coarse enough to be worth it
    assert lm.error_px(seed=7) <= 1.2 * LENS_MAP_TOL_PX
    assert lens_map(RadialDistortion(k1=30.0 / (2**1.5 * 64)), (128, 128), 35) is None     # 30 px on 128 px

    rng = np.random.default_rng(4)
    import cv2
    tiles = [cv2.GaussianBlur(rng.uniform(0, 1000, (512, 512)).astype(np.float32), (0, 0), 3) for _ in range(2)]
    pos = np.array([[0.0, 0.0], [3.2, 440.6]])
    through_map, _ = render_block(tiles, pos, SectionTransform.identity(), (0, 0, 512, 950), lens=mild)
    monkeypatch.setattr(render, "lens_map", lambda *a: None)
    exact, _ = render_block(tiles, pos, SectionTransform.identity(), (0, 0, 512, 950), lens=mild)
    inner = (slice(20, 490), slice(20, 930))                     # away from where coverage ends
    grad = max(float(np.abs(np.diff(exact[inner], axis=a)).max()) for a in (0, 1))
    off = float(np.abs(through_map[inner] - exact[inner]).max())
    # Positions within the tolerance: values within it times the steepest slope nearby.
    assert 0 < off <= 1.5 * LENS_MAP_TOL_PX * grad, (off, grad)


def test_a_shard_write_that_fails_in_the_background_is_raised(tmp_path: Path) -> None:
    """Shard writes run on while the next unit renders; one that fails must still end the
    render with its error, not vanish."""
    tiles, pos = _tiles()
    vol = Volume.create(tmp_path / "v.zarr", (1, 600, 600), pixel_nm=4, thickness_nm=40, levels=3, chunk=64)
    (tmp_path / "v.zarr" / "0" / "c").write_text("a file where level 0's chunks should go")
    with pytest.raises(Exception) as err:
        render_section(vol, 0, tiles, pos, _warp())
    assert "0/c" in str(err.value) or "Not a directory" in str(err.value), err.value
    assert vol._pending == []                    # nothing left running behind the caller


def test_a_failed_pyramid_write_does_not_fail_the_next_section(tmp_path: Path) -> None:
    """A write failing in the pyramid (more shards than writes in flight) ends that section;
    the next section, once the fault is gone, is written without inheriting its error."""
    tiles, pos = _tiles()
    vol = Volume.create(tmp_path / "v.zarr", (2, 600, 600), pixel_nm=4, thickness_nm=40, levels=3, chunk=16)
    assert len(vol.shard_blocks(2)) > 4
    (tmp_path / "v.zarr" / "2" / "c").write_text("a file where level 2's chunks should go")
    with pytest.raises(Exception, match=r"Not a directory|2/c"):
        render_section(vol, 0, tiles, pos, SectionTransform.identity())
    assert vol._pending == []
    (tmp_path / "v.zarr" / "2" / "c").unlink()           # the fault is gone
    render_section(vol, 1, tiles, pos, SectionTransform.identity())
    assert vol.levels[2][1].any()


def _smooth_scene() -> tuple[list[np.ndarray], np.ndarray]:
    import cv2
    rng = np.random.default_rng(6)
    tiles = [cv2.GaussianBlur(rng.uniform(0, 1000, (300, 300)).astype(np.float32), (0, 0), 2) + 500 * k
             for k in range(4)]
    return tiles, np.array([[10.3, 5.2], [12.1, 275.7], [280.4, 7.9], [282.0, 277.3]])


def _agree_within_placement(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    """Two renders agree to 1/100 px of placement (the local gradient over 100) plus float32
    rounding, where tiles land (at the rim of coverage the normalisation divides by almost
    nothing). Measured on NumPy: within 0.003 of the gradient."""
    (img_a, cov_a), (img_b, cov_b) = a, b
    seen = (cov_a > 0.05) & (cov_b > 0.05)
    assert seen.mean() > 0.8
    gy, gx = np.gradient(img_b)
    slope = np.maximum(np.abs(gy), np.abs(gx))
    import cv2
    slope = cv2.dilate(slope, np.ones((3, 3), np.uint8))   # the sample may sit a pixel over
    off = np.abs(img_a - img_b)[seen]
    assert np.all(off <= slope[seen] / 100 + 0.01), float((off - slope[seen] / 100).max())
    assert np.abs(cov_a - cov_b)[seen].max() < 0.01


def test_ndimage_warp_draws_what_opencv_draws() -> None:
    """The warp that runs on a GPU (map_coordinates), here on NumPy: the same image as
    OpenCV's remap, with rotation, field, lens, blending and tiles drawn alone."""
    from tapescope.montage.warp import NdimageWarp
    from tapescope.stitching.lens import RadialDistortion

    tiles, pos = _smooth_scene()
    lens = RadialDistortion(k1=2.0 / (2**1.5 * 150))
    cv = render_block(tiles, pos, _warp(), (0, 0, 600, 600), lens=lens)
    nd = render_block(tiles, pos, _warp(), (0, 0, 600, 600), lens=lens, warp=NdimageWarp(np))
    _agree_within_placement(nd, cv)
    assert np.abs(nd[0] - cv[0]).max() > 0         # really two different warps


def test_render_on_gpu_equals_cpu() -> None:
    from tapescope.montage.array_backend import gpu_available
    from tapescope.montage.warp import warp_for

    if not gpu_available():
        pytest.skip("no CuPy GPU here: the GPU warp runs where one is present (same code tested on NumPy above)")
    tiles, pos = _smooth_scene()
    gpu = warp_for("gpu")
    assert gpu.name.startswith("ndimage (cupy")
    _agree_within_placement(render_block(tiles, pos, _warp(), (0, 0, 600, 600), warp=gpu),
                            render_block(tiles, pos, _warp(), (0, 0, 600, 600)))


def test_a_lens_too_strong_to_invert_everywhere_blanks_nothing_it_covers() -> None:
    """30 px at the corners of 128 px tiles: far outside the sensor the inverse diverges
    (inf, nan). Those points must sample nothing of that tile, not poison the sum of the
    tiles that do cover them, on either warp."""
    from tapescope.montage.warp import NdimageWarp
    from tapescope.stitching.lens import RadialDistortion

    rng = np.random.default_rng(8)
    n = 128
    tiles = [rng.uniform(100, 200, (n, n)).astype(np.float32) for _ in range(4)]
    pos = np.array([[0.0, 0.0], [0.0, 0.8 * n], [0.8 * n, 0.0], [0.8 * n, 0.8 * n]]) + 40
    lens = RadialDistortion(k1=-30.0 / (2**1.5 * n / 2))
    block = (0, 0, 2 * n + 80, 2 * n + 80)
    for warp in (None, NdimageWarp(np)):
        img, cover = render_block(tiles, pos, SectionTransform.identity(), block, lens=lens, warp=warp)
        assert np.isfinite(img).all() and np.isfinite(cover).all()
        seen = cover > 0.05
        assert seen.mean() > 0.3 and (img[seen] > 90).all()      # every covered pixel has a tile's value


def test_a_block_works_over_the_tiles_near_it_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section has thousands of tiles and a block meets a few: per-tile work (sorting,
    crops, blending) runs over those few, and the image is the one all tiles would give."""
    import tapescope.montage.render as render

    rng = np.random.default_rng(9)
    n, grid = 96, 20
    step = 86.0
    tiles = [rng.uniform(100, 200, (n, n)).astype(np.float32) for _ in range(grid * grid)]
    pos = np.array([(r * step, c * step) for r in range(grid) for c in range(grid)])
    pos += rng.uniform(-2, 2, pos.shape)
    t = SectionTransform(np.array([[np.cos(0.03), -np.sin(0.03), 5.0], [np.sin(0.03), np.cos(0.03), 3.0]]))
    block = (700, 900, 200, 160)
    s = render._Setup.of(tiles, pos, t, None, None)
    near = s.near(s.source_boxes(np.array([700]), np.array([899]), np.array([900]), np.array([1059]))[0])
    assert 4 <= len(near) <= 16                                     # of 400
    img, cover = render_block(tiles, pos, t, block)
    monkeypatch.setattr(render._Setup, "near", lambda self, box: np.arange(len(self.positions)))
    img_all, cover_all = render_block(tiles, pos, t, block)
    assert np.array_equal(img, img_all) and np.array_equal(cover, cover_all) and cover.min() > 0


def test_tiles_of_another_frame_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    tiles, pos = _tiles()
    tiles[2] = np.zeros((600, 600), np.float32)          # another camera's frame
    vol = Volume.create(tmp_path / "v.zarr", (1, 600, 600), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    with pytest.raises(ValueError, match=r"tile 2 is \(600, 600\) px"):
        render_section(vol, 0, tiles, pos, SectionTransform.identity())
    assert not vol.levels[0][0].any()
    with pytest.raises(ValueError, match="tile 2"):        # a block it reaches only by its extra part
        render_block(tiles, pos, SectionTransform.identity(), (0, 0, 600, 600))


def test_a_cell_is_sorted_the_same_in_any_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that sticks out of a block is sorted with every tile that reaches any of it,
    so it is drawn the same way whichever block renders it (the right tile reaches only
    the part of cell column 3 beyond x = 480)."""
    import tapescope.montage.render as render

    rng = np.random.default_rng(0)
    tiles = [rng.uniform(100, 200, (620, 620)).astype(np.float32) + 300 * k for k in range(2)]
    pos = np.array([[-50.0, -50.0], [-50.0, 505.3]])
    t = SectionTransform.identity()
    whole = render._sorted_cells(render._Setup.of(tiles, pos, t, None, None), (0, 0, 560, 1100))[2]
    seen: dict[tuple[int, int, int, int], np.ndarray] = {}
    original = render._sorted_cells

    def spy(s: render._Setup, block: tuple[int, int, int, int], near: np.ndarray | None = None) -> tuple:
        out = original(s, block, near)
        seen[block] = out[2]
        return out

    monkeypatch.setattr(render, "_sorted_cells", spy)
    for x1 in (480, 497):
        render_block(tiles, pos, t, (0, 0, 560, x1))
        owner = seen[(0, 0, 560, x1)]
        assert np.array_equal(owner, whole[:, :owner.shape[1]]), (x1, owner[1], whole[1])
    assert whole[1, 3] == -1                     # the cell in question is blended


def test_the_affine_warp_places_pixels_where_the_maps_do() -> None:
    """Without a field or a lens the renderer lets OpenCV warp by the affine (no maps): the
    same places as the maps, to OpenCV's fixed-point 1/1024 px."""
    from tapescope.montage.transform import affine_maps
    from tapescope.montage.warp import CvWarp, NdimageWarp

    yy, xx = np.mgrid[0:300, 0:320].astype(np.float32)
    crop = 3.0 * xx + 2.0 * yy                       # a ramp: a value error is a place error
    a, sc = 0.3, 1.1
    m = np.array([[sc * np.cos(a), -sc * np.sin(a), 60.3], [sc * np.sin(a), sc * np.cos(a), -20.7]])
    for warp in (CvWarp(), NdimageWarp(np)):
        fast = np.zeros((200, 180), np.float32)
        warp.draw_affine(crop, m, fast)
        slow = np.zeros((200, 180), np.float32)
        warp.draw(crop, *affine_maps(m, (0, 0, *slow.shape)), slow)
        inside = (slow > 10) & (fast > 10)
        inside[[0, -1], :] = inside[:, [0, -1]] = False
        assert inside.mean() > 0.5
        assert np.abs(fast - slow)[inside].max() <= 5.0 / 1024 * 2, warp.name   # gradient 5 per px
