"""From tiles to an aligned volume in two commands: `tapescope stitch --pixel-nm` per section,
then `tapescope align` on the stitch folders. Three consecutive sections of the simulator's
specimen, each lying elsewhere on its slot (shifted 0, 24 and -18 px), cut into 2 x 2 tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tapescope.cli import app
from tapescope.stitching.synthetic import SyntheticParams, make_tileset
from tapescope.stitching.tileset import write_tileset

runner = CliRunner()
SHIFTS = [(0.0, 0.0), (24.0, -10.0), (-18.0, 15.0)]


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    both = (a > 0) & (b > 0)
    return float(np.corrcoef(a[both].astype(float), b[both].astype(float))[0, 1])


def test_stitch_then_align_gives_an_aligned_volume(tmp_path: Path) -> None:
    outs = []
    for z, shift in enumerate(SHIFTS):
        ts = make_tileset(SyntheticParams(tile=384, rows=2, cols=2, overlap=0.12, stage_error_px=3.0, dust=0,
                                          sections=3, section=z, room_px=32, shift_px=shift, seed=4))
        write_tileset(tmp_path / f"tiles{z}", ts.tiles, ts.grid, ts.stage_px)
        out = tmp_path / f"section{z}"
        res = runner.invoke(app, ["stitch", str(tmp_path / f"tiles{z}"), "--out", str(out), "--device", "cpu",
                                  "--pixel-nm", "4", "--lens", "none"])
        assert res.exit_code == 0, res.output
        assert "montage:" in res.output and (out / "montage.zarr" / "zarr.json").is_file()
        outs.append(out)
    raw = [zarr.open_group(str(o / "montage.zarr"), mode="r")["0"][0] for o in outs]
    assert all(r.dtype == np.uint16 for r in raw)
    res = runner.invoke(app, ["align", *map(str, outs), "--out", str(tmp_path / "aligned"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "4 nm pixels" in res.output
    group = zarr.open_group(str(tmp_path / "aligned" / "volume.zarr"), mode="r")
    vol = group["0"][:]
    assert vol.shape[0] == 3 and vol.dtype == np.uint16
    sections = group.attrs["tapescope"]["sections"]
    assert [sections[str(z)]["status"] for z in range(3)] == ["ok", "ok", "ok"]
    assert [sections[str(z)]["file"] for z in range(3)] == ["section0", "section1", "section2"]
    # Aligned, neighbours agree as neighbours do; as stitched, the shifts keep them apart.
    h = min(r.shape[0] for r in raw)
    w = min(r.shape[1] for r in raw)
    for z in (0, 1):
        before = ncc(raw[z][:h, :w], raw[z + 1][:h, :w])
        after = ncc(vol[z], vol[z + 1])
        assert after > 0.3 and after > before + 0.15, (z, before, after)


def test_align_refuses_what_is_not_a_section(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["align", str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "neither a stack folder" in res.output
    assert not (tmp_path / "o").exists()


def test_montages_of_different_pixel_types_are_refused(tmp_path: Path) -> None:
    from tapescope.alignment.stack import StackError, read_sections
    from tapescope.montage.omezarr import Volume

    for name, dtype in (("a", "uint8"), ("b", "uint16")):
        Volume.create(tmp_path / name / "montage.zarr", (1, 64, 64), pixel_nm=4.0, thickness_nm=40.0, dtype=dtype)
    with pytest.raises(StackError, match="uint16, uint8"):
        read_sections([tmp_path / "a", tmp_path / "b"])
