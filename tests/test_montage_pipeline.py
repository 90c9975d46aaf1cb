"""The live section processor: align to the last good section, step over a bad one."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from tapescope.alignment.pipeline import Canvas, SectionProcessor, scratch_prefix
from tapescope.montage.omezarr import Volume
from tapescope.montage.synthetic import make_stack

TILE, STEP = 224, 200   # 2 x 2 tiles, 24 px overlap


def tiles_of(img: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, list[tuple[int, int]]]:
    grid = [(r, c) for r in range(2) for c in range(2)]
    pos = np.array([(r * STEP, c * STEP) for r, c in grid], float)
    tiles = [(img[r * STEP:r * STEP + TILE, c * STEP:c * STEP + TILE] * 20000).astype(np.float32) for r, c in grid]
    return tiles, pos, grid


def test_live_alignment_steps_over_the_wrong_tissue(tmp_path: Path) -> None:
    shape = (STEP + TILE, STEP + TILE)
    st = make_stack(4, shape, seed=8, max_rotation_deg=3, max_shift_px=30, elastic_px=1.0, missing=())
    wrong = make_stack(1, shape, seed=77, missing=()).images[0]
    images = [st.images[0], st.images[1], wrong, st.images[3]]
    _, pos, _ = tiles_of(images[0])
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    vol = Volume.create(tmp_path / "v.zarr", (4, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    proc = SectionProcessor(vol, canvas)
    reports = []
    for z, img in enumerate(images):
        tiles, pos, grid = tiles_of(img)
        reports.append(proc.process(z, tiles, pos, grid, {"slot": z}))
    assert [r.status for r in reports] == ["ok", "ok", "unaligned", "ok"]
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["2"]["needs_reimaging"] is True and sections["3"]["needs_reimaging"] is False
    # z=3 was aligned to z=1 (the last good one), so it matches z=0 after alignment.
    a, b = vol.levels[0][0].astype(float), vol.levels[0][3].astype(float)
    core = (slice(40, -40), slice(40, -40))
    both = (a[core] > 0) & (b[core] > 0)
    assert np.corrcoef(a[core][both], b[core][both])[0, 1] > 0.9
    assert np.corrcoef(a[core][both], cv2.resize(images[3], a.shape[::-1])[core][both])[0, 1] < 0.9
    assert vol.load_transform(3).field is not None          # stored beside the volume


def test_resume_primes_the_reference_from_the_volume(tmp_path: Path) -> None:
    shape = (STEP + TILE, STEP + TILE)
    st = make_stack(3, shape, seed=5, max_rotation_deg=2, max_shift_px=20, elastic_px=0.5, missing=())
    _, pos, _ = tiles_of(st.images[0])
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    path = tmp_path / "v.zarr"
    vol = Volume.create(path, (3, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    first = SectionProcessor(vol, canvas, elastic=False)
    for z in range(2):
        assert first.process(z, *tiles_of(st.images[z]), {"slot": z}).status == "ok"
    # The same section 2 after a resume: a fresh processor without (on a copy) and with the primed reference.
    shutil.copytree(path, tmp_path / "copy.zarr")
    fresh = SectionProcessor(Volume.open(tmp_path / "copy.zarr"), canvas, elastic=False)
    unprimed = fresh.process(2, *tiles_of(st.images[2]), {"slot": 2})
    assert unprimed.shift_px == (0.0, 0.0)                   # nothing to align to: a new chain
    resumed = SectionProcessor(Volume.open(path), canvas, elastic=False)
    assert resumed.prime_from_volume() == 1                  # the last good section
    report = resumed.process(2, *tiles_of(st.images[2]), {"slot": 2})
    assert report.status == "ok" and report.alignment_confidence > 0.5
    assert max(abs(s) for s in report.shift_px) > 1.0
    a, b = (Volume.open(path).levels[0][z].astype(float) for z in (1, 2))
    core = (slice(40, -40), slice(40, -40))
    both = (a[core] > 0) & (b[core] > 0)
    assert np.corrcoef(a[core][both], b[core][both])[0, 1] > 0.9   # z=2 now lies on z=1


def test_prime_from_volume_refuses_a_section_that_is_not_good(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (2, 128, 128), pixel_nm=4, thickness_nm=40, levels=1, chunk=64)
    proc = SectionProcessor(vol, Canvas(np.zeros(2, int), (128, 128)))
    assert proc.prime_from_volume() is None                  # empty volume: nothing to prime
    proc.record_missing(0, {"slot": 0}, "no tissue")
    with pytest.raises(ValueError, match="z=0 is failed"):
        proc.prime_from_volume(0)
    with pytest.raises(ValueError, match="z=1 is not written"):
        proc.prime_from_volume(1)
    with pytest.raises(ValueError, match="outside volume depth"):
        proc.prime_from_volume(5)


def neighbours_and_wrong_tissue(tmp_path: Path, n: int):  # type: ignore[no-untyped-def]
    """n neighbouring sections, one of another specimen, a volume for n and its processor."""
    shape = (STEP + TILE, STEP + TILE)
    st = make_stack(n, shape, seed=8, max_rotation_deg=3, max_shift_px=30, elastic_px=1.0, missing=())
    wrong = make_stack(1, shape, seed=77, missing=()).images[0]
    _, pos, _ = tiles_of(st.images[0])
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    vol = Volume.create(tmp_path / "v.zarr", (n, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    return st, wrong, vol, SectionProcessor(vol, canvas, elastic=False)


def test_a_retake_is_aligned_to_the_good_section_below_it(tmp_path: Path) -> None:
    """Section 2 first came back as the wrong tissue; after 3 was processed it is re-imaged.
    The retake is aligned to z=1 (read back from the volume), not to z=3, and z=3 stays the
    reference for what comes next."""
    st, wrong, vol, proc = neighbours_and_wrong_tissue(tmp_path, 4)
    statuses = [proc.process(z, *tiles_of(img), {"slot": z}).status
                for z, img in enumerate([st.images[0], st.images[1], wrong, st.images[3]])]
    assert statuses == ["ok", "ok", "unaligned", "ok"]
    retake = proc.process(2, *tiles_of(st.images[2]), {"slot": 2})
    assert retake.status == "ok" and retake.alignment_confidence > 0.5
    assert proc._reference_z == 3
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["2"]["status"] == "ok" and sections["2"]["needs_reimaging"] is False
    # In register with its neighbours: the retake matches z=1 where both were imaged.
    a, b = vol.levels[0][1].astype(float), vol.levels[0][2].astype(float)
    core = (slice(40, -40), slice(40, -40))
    both = (a[core] > 0) & (b[core] > 0)
    assert np.corrcoef(a[core][both], b[core][both])[0, 1] > 0.8


def test_scratch_files_go_with_the_section_and_a_killed_run_leaves_none(tmp_path: Path) -> None:
    """Unaligned montages live in memory-mapped scratch beside the volume while coming
    sections may be aligned to them (the `neighbours` last good ones); they go when the
    processor is closed, and a processor started after a kill removes what the killed one left."""
    shape = (STEP + TILE, STEP + TILE)
    st = make_stack(4, shape, seed=5, max_rotation_deg=2, max_shift_px=20, elastic_px=0.5, missing=())
    _, pos, _ = tiles_of(st.images[0])
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    left = tmp_path / f"{scratch_prefix(tmp_path / 'v.zarr')}killed"
    # Another run's processor, whose volume has the same name in another folder: not ours.
    other = tmp_path / f"{scratch_prefix(tmp_path / 'elsewhere' / 'v.zarr')}running"
    for d in (left, other):
        d.mkdir()
        (d / "image.npy").write_bytes(b"partial")
    vol = Volume.create(tmp_path / "v.zarr", (4, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    proc = SectionProcessor(vol, canvas, elastic=False)
    assert not left.exists() and other.exists()
    for z in range(4):
        assert proc.process(z, *tiles_of(st.images[z]), {"slot": z}).status == "ok"
    kept = proc.montages.folder
    assert kept.parent == tmp_path and sorted(proc.montages.current) == [2, 3]
    assert len(list(kept.iterdir())) == 4           # image and coverage of z=2 and z=3, nothing else
    proc.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "v.transforms", "v.zarr"]


def test_a_reference_overwritten_by_a_bad_retake_is_not_aligned_to(tmp_path: Path) -> None:
    """z=1 is the reference; its retake comes back as the wrong tissue and overwrites it in the
    volume. The next section must be aligned to z=0, the last good one left, not to those pixels."""
    st, wrong, _, proc = neighbours_and_wrong_tissue(tmp_path, 3)
    for z in range(2):
        assert proc.process(z, *tiles_of(st.images[z]), {"slot": z}).status == "ok"
    assert proc._reference_z == 1
    assert proc.process(1, *tiles_of(wrong), {"slot": 1}).status == "unaligned"
    assert proc._reference_z == 0
    assert proc.process(2, *tiles_of(st.images[2]), {"slot": 2}).status == "ok"


def test_a_scratch_folder_that_is_not_there_is_refused_at_once(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (1, 64, 64), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    with pytest.raises(ValueError, match=r"processing\.scratch: .*nowhere is not a folder"):
        SectionProcessor(vol, Canvas(np.zeros(2, int), (64, 64)), scratch=tmp_path / "nowhere")


def test_a_retake_that_fails_before_rendering_leaves_the_good_take(tmp_path: Path) -> None:
    st, _, _, proc = neighbours_and_wrong_tissue(tmp_path, 3)
    for z in range(2):
        assert proc.process(z, *tiles_of(st.images[z]), {"slot": z}).status == "ok"
    tiles, pos, grid = tiles_of(st.images[1])
    with pytest.raises(ValueError, match="same length"):
        proc.process(1, tiles[:-1], pos, grid, {"slot": 1})       # fails before a pixel is written
    proc.record_missing(1, {"slot": 1}, "ValueError: ...")
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["1"]["status"] == "ok" and proc._reference_z == 1
    # A retake whose alignment fails after its montage was made (a worker lost past its
    # retries) leaves the good take's montage as what coming sections are aligned to.
    kept = dict(proc.montages.current)

    def lost(z: int, references: list[int]) -> list:
        raise RuntimeError("the pair's worker is gone")

    with pytest.raises(RuntimeError, match="worker is gone"):
        proc.process(1, *tiles_of(st.images[1]), {"slot": 1}, pairs=lost)
    assert proc.montages.current == kept
    names = {p.name.split(".")[0] for p in proc.montages.folder.iterdir()}
    assert names == set(kept.values())           # the failed take's montage is gone
    assert proc.process(2, *tiles_of(st.images[2]), {"slot": 2}).status == "ok"


def test_a_live_section_is_placed_by_the_good_sections_below_it_too(tmp_path: Path) -> None:
    """A section is aligned to the last good section and the good ones below it; when the
    last one no longer matches (here its kept unaligned montage, what coming sections are
    aligned to, was turned upside down), the ones below still place it, and the record says
    which did."""
    st, wrong, vol, proc = neighbours_and_wrong_tissue(tmp_path, 5)
    proc.neighbours = 3
    statuses = [proc.process(z, *tiles_of(img), {"slot": z}).status
                for z, img in enumerate([st.images[0], st.images[1], wrong, st.images[3]])]
    assert statuses == ["ok", "ok", "unaligned", "ok"]
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["3"]["alignment_references"] == [1, 0]          # across the wrong tissue
    image_path, _ = proc.montages.files(proc.montages.folder, proc.montages.current[3])
    image = np.load(image_path, mmap_mode="r+")
    image[:] = image[::-1].copy()
    image.flush()
    del image
    report = proc.process(4, *tiles_of(st.images[4]), {"slot": 4})
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert report.status == "ok" and sections["4"]["alignment_references"] == [1, 0]
    assert "aligned to the sections below the previous one" in report.message and "z=3" in report.message
    a, b = vol.levels[0][1].astype(float), vol.levels[0][4].astype(float)
    core = (slice(40, -40), slice(40, -40))
    both = (a[core] > 0) & (b[core] > 0)
    assert np.corrcoef(a[core][both], b[core][both])[0, 1] > 0.8


def test_a_live_section_that_repeats_its_neighbour_is_flagged(tmp_path: Path) -> None:
    """Neighbouring sections of the simulated specimen differ as real ones do; the same
    section imaged again (the tape slipped back) agrees far better, and is flagged for
    re-imaging with the reason instead of being written as the next section."""
    from tapescope.neurites import NeuriteParams, NeuriteSpecimen

    shape = (STEP + TILE, STEP + TILE)
    spec = NeuriteSpecimen(NeuriteParams(height_px=shape[0], width_px=shape[1], n_sections=5, seed=3))
    rng = np.random.default_rng(0)
    secs = [spec.section(i) for i in range(4)]
    images = [secs[0], secs[1], secs[2], secs[2], secs[3]]          # z=3 is z=2 again
    _, pos, _ = tiles_of(images[0])
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    vol = Volume.create(tmp_path / "v.zarr", (5, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64)
    proc = SectionProcessor(vol, canvas, elastic=False)
    reports = [proc.process(z, *tiles_of(np.clip(img * (1 + 0.03 * rng.normal(0, 1, img.shape)), 0.01, None)),
                            {"slot": z}) for z, img in enumerate(images)]
    assert [r.status for r in reports] == ["ok", "ok", "ok", "unaligned", "ok"]
    assert "repeats z=2" in reports[3].message
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["3"]["needs_reimaging"] is True and sections["4"]["alignment_references"][0] == 2


def test_a_camera_array_section_is_stitched_and_rendered_with_an_affine_per_tile(tmp_path: Path) -> None:
    """Live processing with `tile_model="affine"`: the tiles' own linear parts are fitted,
    recorded with the section, and the section is rendered through them."""
    from tapescope.montage.render import render_montage
    from tapescope.stitching.synthetic import SyntheticParams, make_tileset

    ts = make_tileset(SyntheticParams(tile=256, rows=2, cols=2, overlap=0.2, stage_error_px=2, camera_linear=0.004,
                                      seed=5, dose=500, vignetting=0.0, dust=0))
    tiles = [t.astype(np.float32) - ts.params.dark for t in ts.tiles]
    canvas = Canvas.around(ts.stage_px, (256, 256), 8)
    vol = Volume.create(tmp_path / "v.zarr", (1, *canvas.shape), pixel_nm=4, thickness_nm=40, levels=2, chunk=64,
                        dtype="float32")
    proc = SectionProcessor(vol, canvas, lens="none", tile_model="affine")
    assert proc.process(0, tiles, ts.stage_px, ts.grid, {"slot": 0}).status == "ok"
    record = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]["0"]
    linear = np.array(record["tile_linear"])
    assert np.abs(linear - np.eye(2)).max() > 2e-3
    pos = np.array(record["tile_positions_px"])
    # 0.24 px at most on this small set (two patches along each 256 px overlap); 1.33 with a
    # translation per tile.
    assert ts.seam_error(pos, linear).max() < 0.4
    expect, cover = render_montage(tiles, pos, canvas.origin, canvas.shape, linear=linear)
    got = vol.levels[0][0]
    inner = cover > 0.5
    assert np.abs(got[inner] - expect[inner]).max() < 0.05 * float(np.abs(expect).max())
    with pytest.raises(ValueError, match="tile_model"):
        SectionProcessor(vol, canvas, tile_model="projective")


def _registered(vol: Volume, za: int, zb: int) -> float:
    a, b = vol.levels[0][za].astype(float), vol.levels[0][zb].astype(float)
    core = (slice(40, -40), slice(40, -40))
    both = (a[core] > 0) & (b[core] > 0)
    return float(np.corrcoef(a[core][both], b[core][both])[0, 1])


def test_a_live_window_writes_each_good_section_when_it_leaves_the_window(tmp_path: Path) -> None:
    """With a look-ahead of 2, a good section's verdict comes at once but it is written two
    good sections later, placed again by each of them; a section that does not register is
    written (and flagged) at once; the end flushes the window. The volume is in register."""
    st, wrong, vol, _ = neighbours_and_wrong_tissue(tmp_path, 5)
    proc = SectionProcessor(vol, proc_canvas(vol), elastic=False, look_ahead=2)
    images = [st.images[0], st.images[1], wrong, st.images[3], st.images[4]]
    verdicts, written = [], []
    for z, img in enumerate(images):
        verdicts.append(proc.process(z, *tiles_of(img), {"slot": z}))
        written.append([r.z for r in proc.finished()])
    assert [v.status for v in verdicts] == ["ok", "ok", "unaligned", "ok", "ok"]
    assert [v.written for v in verdicts] == [False, False, True, False, False]
    assert written == [[], [], [2], [0], [1]]
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sorted(sections) == ["0", "1", "2"] and proc.open_sections == [3, 4]
    proc.flush()
    assert [(r.z, r.status) for r in proc.finished()] == [(3, "ok"), (4, "ok")]
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert [sections[str(z)]["status"] for z in range(5)] == ["ok", "ok", "unaligned", "ok", "ok"]
    assert sections["3"]["alignment_references"] == [1, 0]      # across the wrong tissue
    assert _registered(vol, 0, 1) > 0.8 and _registered(vol, 1, 3) > 0.8 and _registered(vol, 3, 4) > 0.8
    # Only the montages coming sections are aligned to are kept.
    assert sorted(proc.montages.current) == [3, 4]


def test_a_live_window_places_sections_at_least_as_near_the_truth_as_without_one(tmp_path: Path) -> None:
    """Sections turned, shifted and bent by known amounts: placed in a window of 3, each
    section is as near its truth as when placed from the sections below alone (and the
    first stays where the stage put it)."""
    shape = (STEP + TILE, STEP + TILE)
    st = make_stack(6, shape, seed=8, max_rotation_deg=3, max_shift_px=30, elastic_px=1.5, missing=())
    errors = []
    for look_ahead in (0, 3):
        _, pos, _ = tiles_of(st.images[0])
        canvas = Canvas.around(pos, (TILE, TILE), 0)
        assert canvas.shape == shape and tuple(canvas.origin) == (0, 0)     # volume pixel = raw pixel
        vol = Volume.create(tmp_path / f"v{look_ahead}.zarr", (6, *canvas.shape), pixel_nm=4, thickness_nm=40,
                            levels=2, chunk=64)
        proc = SectionProcessor(vol, canvas, look_ahead=look_ahead)
        for z, img in enumerate(st.images):
            proc.process(z, *tiles_of(img), {"slot": z})
        proc.flush()
        assert sorted(r.z for r in proc.finished() if r.status == "ok") == list(range(6))
        transforms = {z: vol.load_transform(z) for z in range(6)}
        assert np.abs(st.residual(0, transforms[0])).max() < 1e-9 or look_ahead == 0
        errors.append([float(np.sqrt(np.mean(st.residual(z, transforms[z]) ** 2))) for z in range(6)])
        proc.close()
    plain, window = np.array(errors)
    assert plain[1:].max() > 0.2            # there was error to make: the test can tell
    assert np.sqrt(np.mean(window ** 2)) <= np.sqrt(np.mean(plain ** 2)) + 0.05, (plain, window)
    assert window.max() < 2.0, window


def test_a_retake_flushes_the_window_and_a_closed_processor_leaves_open_sections_unrecorded(
        tmp_path: Path) -> None:
    """A retake of a section below the window writes the window first, then is aligned to
    the good section below it as without a window; sections still open when the processor
    is closed are not recorded (a resume processes them again)."""
    st, wrong, vol, _ = neighbours_and_wrong_tissue(tmp_path, 5)
    proc = SectionProcessor(vol, proc_canvas(vol), elastic=False, look_ahead=2)
    for z, img in enumerate([st.images[0], st.images[1], wrong, st.images[3]]):
        proc.process(z, *tiles_of(img), {"slot": z})
    proc.finished()
    assert proc.open_sections == [1, 3]
    retake = proc.process(2, *tiles_of(st.images[2]), {"slot": 2})
    assert retake.status == "ok" and retake.written and proc.open_sections == []
    assert [r.z for r in proc.finished()] == [1, 3, 2]
    assert _registered(vol, 1, 2) > 0.8
    proc.process(4, *tiles_of(st.images[4]), {"slot": 4})
    assert proc.open_sections == [4]
    proc.close()
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert "4" not in sections and [sections[str(z)]["status"] for z in range(4)] == ["ok"] * 4


def proc_canvas(vol: Volume) -> Canvas:
    """The canvas `neighbours_and_wrong_tissue` made its volume for."""
    _, pos, _ = tiles_of(np.zeros((STEP + TILE, STEP + TILE)))
    canvas = Canvas.around(pos, (TILE, TILE), 0)
    assert canvas.shape == vol.shape[1:]
    return canvas


def test_a_section_that_fails_as_it_leaves_the_window_fails_alone(tmp_path: Path) -> None:
    """Its render fails as it leaves the window (a lost worker, a full disk): it is recorded
    as failed with the reason, its pairs leave the window, and every later section is
    placed and written."""
    from tapescope.montage.shard_render import render_section

    st, _, vol, _ = neighbours_and_wrong_tissue(tmp_path, 6)
    proc = SectionProcessor(vol, proc_canvas(vol), elastic=False, look_ahead=2)

    def render(z: int, positions, transform, lens, linear) -> None:  # type: ignore[no-untyped-def]
        if z == 1:
            raise OSError(28, "No space left on device")
        render_section(vol, z, tiles_of(st.images[z])[0], positions, transform, lens=lens, linear=linear)

    for z in range(6):
        assert proc.process(z, *tiles_of(st.images[z]), {"slot": z}, render=render).status == "ok"
    proc.flush()
    reports = {r.z: r for r in proc.finished()}
    assert reports[1].status == "failed" and "No space left" in reports[1].message
    assert [reports[z].status for z in (0, 2, 3, 4, 5)] == ["ok"] * 5
    sections = zarr.open_group(str(tmp_path / "v.zarr"), mode="r").attrs["tapescope"]["sections"]
    assert sections["1"]["status"] == "failed" and "left the alignment window" in sections["1"]["message"]
    assert all(sections[str(z)]["status"] == "ok" for z in (0, 2, 3, 4, 5))
    assert _registered(vol, 0, 2) > 0.8 and _registered(vol, 4, 5) > 0.8
