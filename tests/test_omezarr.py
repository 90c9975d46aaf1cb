"""The volume's metadata against the official OME-Zarr 0.5 schema, offline."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import numpy as np
import pytest

from tapescope.montage.omezarr import Volume

from .support import check_volume, validate_ome


def test_volume_metadata_validates(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (2, 300, 200), pixel_nm=4.0, thickness_nm=40.0, levels=3, chunk=64)
    img = np.arange(300 * 200, dtype=np.float32).reshape(300, 200) % 5000
    vol.write_section(1, img, {"slot": 7})
    group = check_volume(tmp_path / "v.zarr")
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scale == [40.0, 8.0, 8.0]
    assert np.array_equal(group["0"][1], img.astype(np.uint16))
    assert group["1"][1].mean() == pytest.approx(img.mean(), rel=0.01)
    assert not group["0"][0].any()          # an unwritten section stays empty
    assert group.attrs["tapescope"]["sections"]["1"]["slot"] == 7


def test_schema_rejects_broken_metadata(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (1, 64, 64), pixel_nm=4.0, thickness_nm=40.0, levels=2, chunk=32)
    attrs = vol.group.attrs.asdict()
    attrs["ome"]["version"] = "0.4"
    with pytest.raises(jsonschema.ValidationError):
        validate_ome(attrs)


def test_write_refuses_wrong_shape(tmp_path: Path) -> None:
    vol = Volume.create(tmp_path / "v.zarr", (1, 64, 64), pixel_nm=4.0, thickness_nm=40.0, levels=2, chunk=32)
    with pytest.raises(ValueError, match="does not match volume"):
        vol.write_section(0, np.zeros((10, 10)), {})


def test_a_buffer_reused_right_after_a_write_does_not_change_what_is_stored(tmp_path) -> None:
    """Writes finish in the background; pixels handed over in the volume's own dtype are the
    caller's memory, so they are copied before the call returns."""
    import numpy as np

    from tapescope.montage.omezarr import Volume

    vol = Volume.create(tmp_path / "v.zarr", (1, 4096, 4096), pixel_nm=4, thickness_nm=40, levels=2, chunk=256)
    unit = vol.write_units()[0]                    # 2048 x 2048: the encoding takes a while
    buf = np.random.default_rng(0).integers(1, 60000, unit[2:], dtype=np.uint16)
    kept = buf.copy()
    vol.write_unit(0, unit, buf)
    buf[:] = 0                                     # the caller's next unit, say
    vol.flush()
    y0, x0, h, w = unit
    assert np.array_equal(vol.levels[0][0, y0:y0 + h, x0:x0 + w], kept)
