"""`tapescope stitch`: the CSV formats, the summary, and bad input (exit 2, no output)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from tapescope.cli import app
from tapescope.stitching.synthetic import SyntheticParams, make_tileset
from tapescope.stitching.tileset import write_tileset

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    ts = make_tileset(SyntheticParams(tile=256, rows=2, cols=3, overlap=0.15, dose=300, seed=3, stage_error_px=4,
                                      blank=((1, 2),)))
    root = tmp_path_factory.mktemp("tileset")
    write_tileset(root, ts.tiles, ts.grid, ts.stage_px)
    return ts, root


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_stitch_writes_positions_close_to_the_truth(synthetic, tmp_path: Path) -> None:
    ts, root = synthetic
    out = tmp_path / "out"
    res = runner.invoke(app, ["stitch", str(root), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "tiles 6 (ok 5, stage 1, failed 0)" in res.output
    with open(out / "positions.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file", "y", "x", "residual_px", "status", "a_yy", "a_yx", "a_xy", "a_xx"]
    assert all(r[5:] == ["1.0000000", "0.0000000", "0.0000000", "1.0000000"] for r in rows[1:])
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in root.glob("*.tif"))
    status = [r[4] for r in rows[1:]]
    assert status == ["ok", "ok", "ok", "ok", "ok", "stage"]
    pos = np.array([[float(r[1]), float(r[2])] for r in rows[1:]])
    err = np.linalg.norm(ts.error(pos, among=~ts.blank), axis=1)
    assert err[~ts.blank].max() < 0.15
    with open(out / "pairs.csv") as fh:
        pairs = list(csv.reader(fh))
    assert pairs[0] == ["file_a", "file_b", "dy", "dx", "confidence", "used", "residual_px", "seam", "reason"]
    assert len(pairs) == 1 + 7
    # Every pair not used says why; the blank tile is a normal outcome (exit 0), said so.
    assert all((r[5] == "1") == (r[8] == "") for r in pairs[1:])
    assert any(r[5] == "0" and "texture" in r[8] for r in pairs[1:])
    assert "1 blank tile(s) placed by the stage" in res.output and "refused:" in res.output


def test_narrow_overlaps_use_every_pair_and_a_textured_tile_left_to_the_stage_exits_3(tmp_path: Path) -> None:
    # 4 % of 256 px: 10 px strips, a stage error of 2 px across them.
    ts = make_tileset(SyntheticParams(tile=256, rows=3, cols=3, overlap=0.04, stage_error_px=2.0, dust=0, seed=5))
    root = tmp_path / "set"
    write_tileset(root, ts.tiles, ts.grid, ts.stage_px)
    res = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "out"), "--device", "cpu",
                              "--lens", "none"])
    assert res.exit_code == 0, res.output
    assert "pairs 12 (used 12)" in res.output and "closed loop" in res.output
    with open(tmp_path / "out" / "positions.csv") as fh:
        pos = np.array([[float(r[1]), float(r[2])] for r in list(csv.reader(fh))[1:]])
    # Sub-pixel, far from the stage's 2 px (0.14 px measured here with the flat-field estimated
    # from 9 vignetted tiles; 0.04-0.07 px without vignetting: docs/stitching.md).
    assert np.sqrt((ts.error(pos) ** 2).sum(1).mean()) < 0.2
    # The middle tile replaced by tissue from elsewhere (a frame from another section): it has
    # texture but no neighbour agrees with it; the positions are written and the exit code says so.
    other = make_tileset(SyntheticParams(tile=256, rows=3, cols=3, overlap=0.04, dust=0, seed=99))
    tiles = list(ts.tiles)
    tiles[4] = other.tiles[4]
    write_tileset(tmp_path / "moved", tiles, ts.grid, ts.stage_px)
    res = runner.invoke(app, ["stitch", str(tmp_path / "moved"), "--out", str(tmp_path / "out2"), "--device", "cpu",
                              "--lens", "none"])
    assert res.exit_code == 3, res.output
    assert "with texture placed by the stage alone" in res.output and (tmp_path / "out2" / "positions.csv").exists()


def test_without_a_closed_loop_the_summary_says_the_residual_cannot_be_measured(tmp_path: Path) -> None:
    # Stage error 3 px: with the default 10 px, tiles 1 and 2 of this seed do not overlap at
    # all (0.6 px), and the run rightly exits 3.
    ts = make_tileset(SyntheticParams(tile=256, rows=1, cols=3, overlap=0.1, stage_error_px=3.0, seed=2))
    write_tileset(tmp_path / "row", ts.tiles, ts.grid, ts.stage_px)
    res = runner.invoke(app, ["stitch", str(tmp_path / "row"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "no loop closes" in res.output and "median 0.000" not in res.output


def _corrupt_missing(d: Path) -> str:
    next(d.glob("*.tif")).unlink()
    return "file is missing"


def _corrupt_unreadable(d: Path) -> str:
    next(d.glob("*.tif")).write_bytes(b"not a tiff at all")
    return "not a readable TIFF"


def _corrupt_shape(d: Path) -> str:
    f = sorted(d.glob("*.tif"))[-1]
    tifffile.imwrite(f, np.zeros((256, 200), np.uint16))
    return "differs from"


def _corrupt_empty(d: Path) -> str:
    (d / "tiles.csv").write_text("")
    return "empty"


def _corrupt_twice(d: Path) -> str:
    lines = (d / "tiles.csv").read_text().splitlines()
    first = lines[1].split(",")
    lines.append(",".join([first[0], "9", "9", "0", "0"]))
    (d / "tiles.csv").write_text("\n".join(lines) + "\n")
    return "already listed on line 2"


def _corrupt_header(d: Path) -> str:
    text = (d / "tiles.csv").read_text()
    (d / "tiles.csv").write_text(text.replace("file,row,col,y,x", "file,y,x"))
    return "header"


def _corrupt_number(d: Path) -> str:
    lines = (d / "tiles.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",abc"
    (d / "tiles.csv").write_text("\n".join(lines) + "\n")
    return "line 3"


@pytest.mark.parametrize("corrupt", [_corrupt_missing, _corrupt_unreadable, _corrupt_shape, _corrupt_empty,
                                     _corrupt_twice, _corrupt_header, _corrupt_number])
def test_bad_input_exits_2_with_a_clear_error_and_no_output(synthetic, tmp_path: Path, corrupt) -> None:
    _, root = synthetic
    d = _copy(root, tmp_path / "set")
    expected = corrupt(d)
    out = tmp_path / "out"
    res = runner.invoke(app, ["stitch", str(d), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert not out.exists()


def test_bad_flatfield_reference_and_device(synthetic, tmp_path: Path) -> None:
    _, root = synthetic
    out = tmp_path / "out"
    ref = tmp_path / "bright.tif"
    tifffile.imwrite(ref, np.ones((100, 100), np.uint16))
    res = runner.invoke(app, ["stitch", str(root), "--out", str(out), "--flatfield", str(ref)])
    assert res.exit_code == 2 and "flat-field shape" in res.output
    res = runner.invoke(app, ["stitch", str(root), "--out", str(out), "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output
    assert not out.exists()


def test_bright_and_dark_references_are_used(synthetic, tmp_path: Path) -> None:
    ts, root = synthetic
    bright = (ts.gain * 3000 + ts.params.dark).astype(np.uint16)
    tifffile.imwrite(tmp_path / "bright.tif", bright)
    tifffile.imwrite(tmp_path / "dark.tif", np.full(bright.shape, ts.params.dark, np.uint16))
    out = tmp_path / "out"
    res = runner.invoke(app, ["stitch", str(root), "--out", str(out), "--device", "cpu",
                              "--flatfield", str(tmp_path / "bright.tif"), "--dark", str(tmp_path / "dark.tif")])
    assert res.exit_code == 0, res.output
    assert "flat-field: reference" in res.output


def test_png_tiles_of_8_bits_stitch_into_an_8_bit_montage_and_a_mix_is_refused(tmp_path: Path) -> None:
    import cv2
    import zarr

    ts = make_tileset(SyntheticParams(tile=256, rows=2, cols=2, overlap=0.12, stage_error_px=3.0, seed=6))
    root = tmp_path / "png"
    root.mkdir()
    rows = ["file,row,col,y,x"]
    for k, (tile, (r, c), (y, x)) in enumerate(zip(ts.tiles, ts.grid, ts.stage_px, strict=True)):
        name = f"t{k}.png"
        cv2.imwrite(str(root / name), np.clip(tile / 4, 0, 255).astype(np.uint8))     # an 8-bit camera
        rows.append(f"{name},{r},{c},{y:.3f},{x:.3f}")
    (root / "tiles.csv").write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "out"), "--pixel-nm", "4"])
    assert res.exit_code == 0, res.output
    montage = zarr.open_group(str(tmp_path / "out" / "montage.zarr"), mode="r")
    assert montage["0"].dtype == np.uint8 and "uint8" in res.output
    assert montage.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1] == 4.0
    # One tile as TIFF among PNGs: two sources, refused before anything is written.
    tifffile.imwrite(root / "t3.tif", cv2.imread(str(root / "t3.png"), cv2.IMREAD_UNCHANGED))
    (root / "tiles.csv").write_text("\n".join(rows).replace("t3.png", "t3.tif") + "\n")
    res = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "out2"), "--pixel-nm", "4"])
    assert res.exit_code == 2 and "mix PNG and TIFF" in res.output and not (tmp_path / "out2").exists()
    res = runner.invoke(app, ["stitch", str(root), "--out", str(tmp_path / "out3"), "--pixel-nm", "inf"])
    assert res.exit_code == 2 and "--pixel-nm" in res.output
