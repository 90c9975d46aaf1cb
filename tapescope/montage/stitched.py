"""A stitched tile set rendered into a one-section OME-Zarr 0.5 image: `tapescope stitch
--pixel-nm`. The same renderer as live processing (montage/shard_render.py): tiles flat-fielded
as they are read, the lens model taken out, seams feathered, shard by shard (memory bounded
by a shard, not by the montage). The image keeps the tiles' bit depth (8-bit tiles give an
8-bit montage). `tapescope align` takes such montages as sections."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tapescope.montage.canvas import Canvas
from tapescope.montage.omezarr import Volume, pyramid_levels
from tapescope.montage.shard_render import render_section
from tapescope.montage.transform import SectionTransform
from tapescope.stitching.flatfield import FlatFielded
from tapescope.stitching.lens import RadialDistortion

MONTAGE = "montage.zarr"


def render_montage(out: Path, tiles: Sequence[np.ndarray], positions: np.ndarray, *, pixel_nm: float,
                   gain: np.ndarray | None = None, dark: float | np.ndarray = 0.0,
                   lens: RadialDistortion | None = None, thickness_nm: float = 40.0,
                   info: dict | None = None, linear: np.ndarray | None = None) -> Path:
    """Render tiles at `positions` (top-left (y, x), px; with `linear`, each tile's own
    linear part: pixel q at positions[k] + linear[k] @ q) into OUT (a new OME-Zarr folder)."""
    pos = np.asarray(positions, float)
    canvas = Canvas.around(pos, tiles[0].shape, 0, linear)
    origin, shape = canvas.origin, canvas.shape
    dtype = np.dtype(tiles[0].dtype)
    volume = Volume.create(out, (1, *shape), pixel_nm=pixel_nm, thickness_nm=thickness_nm,
                           levels=pyramid_levels(shape), dtype=dtype.name if np.issubdtype(dtype, np.integer)
                           else "float32", name=out.stem)
    flat = [FlatFielded(t, gain, dark) for t in tiles]
    # Canvas pixel p shows the montage at p + origin, in the tiles' coordinates.
    render_section(volume, 0, flat, pos, SectionTransform.identity().shifted(origin[0], origin[1]), lens=lens,
                   linear=linear)
    volume.flush()
    volume.record(0, {**(info or {}), "status": "ok", "origin_px": origin.tolist(),
                      "window": volume.section_window(0)})
    return out


def montage_writer(pixel_nm: float) -> Callable[..., Path]:
    """What ``stitching.tileset.run_stitch`` calls to render its result into OUT/montage.zarr
    (replacing an earlier run's, as the CSVs are)."""
    def write(out_dir: Path, tiles: Sequence[np.ndarray], positions: np.ndarray, gain: np.ndarray | None,
              dark: float | np.ndarray, lens: RadialDistortion | None, info: dict,
              linear: np.ndarray | None = None) -> Path:
        out = out_dir / MONTAGE
        if out.exists():
            shutil.rmtree(out)
        return render_montage(out, tiles, positions, pixel_nm=pixel_nm, gain=gain, dark=dark, lens=lens, info=info,
                              linear=linear)
    return write
