"""The OME-Zarr 0.5 volume: zarr v3, axes z,y,x in nanometres, a 2x pyramid, sharded.

One shard holds one section's block (1 x S x S), so each section is written by exactly
one writer and sections can be written as they finish, in any order. Chunks (1 x C x C)
are the unit of reading for viewers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

OME_VERSION = "0.5"
SHARD_FACTOR = 4   # a shard is SHARD_FACTOR x SHARD_FACTOR chunks in y and x


def ome_multiscales(levels: int, pixel_nm: float, thickness_nm: float, name: str) -> dict[str, Any]:
    return {
        "version": OME_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [
                {"name": "z", "type": "space", "unit": "nanometer"},
                {"name": "y", "type": "space", "unit": "nanometer"},
                {"name": "x", "type": "space", "unit": "nanometer"},
            ],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [{
                        "type": "scale",
                        "scale": [thickness_nm, pixel_nm * 2**k, pixel_nm * 2**k],
                    }],
                }
                for k in range(levels)
            ],
            "type": "mean",
        }],
    }


def downsample2(img: np.ndarray) -> np.ndarray:
    """2x2 mean (odd edges: the last row/column is averaged with itself)."""
    h, w = img.shape
    return cv2.resize(img, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


class Volume:
    """An OME-Zarr 0.5 image volume written one section (z) at a time."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.levels = [group[str(k)] for k in range(len(group.attrs["ome"]["multiscales"][0]["datasets"]))]

    @classmethod
    def create(
        cls, path: str | Path, shape: tuple[int, int, int], *, pixel_nm: float, thickness_nm: float,
        levels: int = 3, chunk: int = 256, dtype: str = "uint16", name: str = "tapescope",
    ) -> Volume:
        if levels < 1:
            raise ValueError("levels must be at least 1")
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        nz, ny, nx = shape
        for k in range(levels):
            sy, sx = -(-ny // 2**k), -(-nx // 2**k)
            c = min(chunk, max(sy, sx))
            group.create_array(
                str(k), shape=(nz, sy, sx), dtype=dtype, chunks=(1, c, c),
                shards=(1, c * SHARD_FACTOR, c * SHARD_FACTOR), compressors=ZstdCodec(level=3),
                fill_value=0, dimension_names=["z", "y", "x"],
            )
        group.attrs["ome"] = ome_multiscales(levels, pixel_nm, thickness_nm, name)
        group.attrs["tapescope"] = {"sections": {}}
        return cls(group)

    @classmethod
    def open(cls, path: str | Path) -> Volume:
        return cls(zarr.open_group(str(path), mode="r+", zarr_format=3))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.levels[0].shape)  # type: ignore[return-value]

    def write_section(self, z: int, image: np.ndarray, info: dict[str, Any]) -> None:
        """Write one section's image into every pyramid level, then record it."""
        if image.shape != self.shape[1:]:
            raise ValueError(f"section image {image.shape} does not match volume {self.shape[1:]}")
        if not 0 <= z < self.shape[0]:
            raise ValueError(f"z={z} outside volume depth {self.shape[0]}")
        dt = self.levels[0].dtype
        lim = np.iinfo(dt) if np.issubdtype(dt, np.integer) else None
        level = image.astype(np.float32)
        for k, arr in enumerate(self.levels):
            if k:
                level = downsample2(level)
            out = np.clip(np.rint(level), lim.min, lim.max) if lim else level
            arr[z, :, :] = out.astype(dt)
        self.record(z, info)

    def record(self, z: int, info: dict[str, Any]) -> None:
        """Store what is known about section z (also for sections that are missing)."""
        meta = dict(self.group.attrs["tapescope"])
        sections = dict(meta.get("sections", {}))
        sections[str(z)] = json.loads(json.dumps(info))  # JSON-safe copy
        meta["sections"] = sections
        self.group.attrs["tapescope"] = meta
