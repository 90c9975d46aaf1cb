"""The Neuroglancer state that shows a tapescope volume as a person expects: one image layer,
the x-y section filling the view, x-y-z display order, the contrast window of the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from tapescope.errors import TapescopeError
from tapescope.montage.omezarr import Volume

VIEW_PX = 800       # about the width of Neuroglancer's main panel on a laptop screen


class ViewError(TapescopeError, ValueError):
    """A volume that cannot be shown; the message names the path and the problem."""


def open_volume(path: Path) -> Volume:
    """The volume at `path`, read-only in spirit (nothing is written here)."""
    if not path.is_dir() or not (path / "zarr.json").is_file():
        raise ViewError(f"{path}: not a volume (no zarr.json; a tapescope volume is a folder such as "
                        "RUN_DIR/volume.zarr)")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        return Volume(group)
    except (KeyError, ValueError, OSError) as exc:
        raise ViewError(f"{path}: not an OME-Zarr volume tapescope can show ({type(exc).__name__}: {exc})") from None


def window_of(volume: Volume) -> tuple[float, float]:
    """The contrast window stored with the volume, else measured now on its middle imaged
    section, else the dtype's range."""
    if (w := volume.window) is not None:
        return w
    sections = volume.group.attrs.get("tapescope", {}).get("sections", {})
    zs = sorted(int(z) for z, v in sections.items() if v.get("status") == "ok") or list(range(volume.shape[0]))
    for z in zs[len(zs) // 2:] + zs[:len(zs) // 2]:
        if (w2 := volume.section_window(z)) is not None:
            return w2[0], w2[1]
    return 0.0, 65535.0


def neuroglancer_state(volume: Volume, source_url: str, name: str = "tapescope") -> dict[str, Any]:
    """Neuroglancer's JSON state for `volume`, served at `source_url` (an http URL of the
    volume's folder)."""
    ms = volume.group.attrs["ome"]["multiscales"][0]
    tz, ty, tx = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    _nz, ny, nx = volume.shape
    lo, hi = window_of(volume)
    sections = volume.group.attrs.get("tapescope", {}).get("sections", {})
    ok = sorted(int(z) for z, v in sections.items() if v.get("status") == "ok")
    z0 = ok[0] if ok else 0
    shader = (f"#uicontrol invlerp normalized(range=[{lo:g}, {hi:g}], window=[0, {max(hi * 1.5, hi + 1):g}])\n"
              "void main() { emitGrayscale(normalized()); }\n")
    return {
        # x, y, z in this order: the main panel shows the x-y section, not a z-y cut.
        "dimensions": {"x": [tx * 1e-9, "m"], "y": [ty * 1e-9, "m"], "z": [tz * 1e-9, "m"]},
        "displayDimensions": ["x", "y", "z"],
        "position": [nx / 2, ny / 2, z0 + 0.5],
        "crossSectionScale": max(nx, ny) / VIEW_PX,       # the whole section in the view
        "projectionScale": max(nx, ny) * 1.2,
        "layers": [{
            "type": "image", "name": name, "source": f"zarr3://{source_url.rstrip('/')}/",
            "shader": shader, "shaderControls": {"normalized": {"range": [lo, hi]}},
            "tab": "rendering",
        }],
        "selectedLayer": {"layer": name, "visible": False},
        "layout": "xy",
        "showSlices": False,
    }
