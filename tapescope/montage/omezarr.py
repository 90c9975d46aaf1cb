"""The OME-Zarr 0.5 volume: zarr v3, axes z,y,x in nanometres, a 2x pyramid, sharded.

One shard holds one section's block (1 x S x S), so each section is written by exactly
one writer and sections can be written as they finish, in any order. Chunks (1 x C x C)
are the unit of reading for viewers.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .transform import SectionTransform

try:  # the fast path for shard I/O; zarr-python does all of it where tensorstore is absent
    import tensorstore
except ImportError:  # pragma: no cover - tensorstore is a dependency; kept optional on purpose
    tensorstore = None

OME_VERSION = "0.5"
SHARD_FACTOR = 4   # a shard is SHARD_FACTOR x SHARD_FACTOR chunks in y and x
# zstd level of level 0 and of the coarser levels. Level 0 is three quarters of the bytes
# and most of the encoding time: level 1 writes it ~30 % faster than level 3 for a few %
# more bytes on EM-like data (measured in bench/bench_montage.py, docs/montage.md).
ZSTD_LEVEL0 = 1
ZSTD_PYRAMID = 3
# Shard writes left to tensorstore's threads while the next unit is rendered, at most this
# many at once (each holds its uint16 pixels until copied: a 2048^2 unit is 8 MiB).
MAX_PENDING_WRITES = 4


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


WINDOW_PERCENTILES = (0.5, 99.5)   # of a section's imaged pixels: its contrast window
WINDOW_SAMPLE_PX = 1 << 20          # pixels of the coarsest level read for it, at most


def omero_window(start: float, end: float, dtype: np.dtype) -> dict[str, Any]:
    """OME "omero" metadata: one grey channel shown from `start` to `end` (viewers open the
    volume at that contrast instead of the dtype's full range)."""
    top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else max(end, 1.0)
    return {"channels": [{"label": "EM", "color": "FFFFFF", "active": True, "inverted": False,
                          "window": {"min": 0.0, "max": top, "start": float(start), "end": float(end)}}],
            "rdefs": {"model": "greyscale"}}


def pyramid_levels(shape: tuple[int, int], smallest: int = 256) -> int:
    """Levels of a 2x pyramid (at least 2) whose coarsest is about `smallest` px on its larger side."""
    return max(2, int(np.ceil(np.log2(max(max(shape) / smallest, 1.0)))) + 1)


def downsample2(img: np.ndarray) -> np.ndarray:
    """2x2 mean (odd edges: the last row/column is averaged with itself)."""
    h, w = img.shape
    return cv2.resize(img, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


class Volume:
    """An OME-Zarr 0.5 image volume written one section (z) at a time."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.levels = [group[str(k)] for k in range(len(group.attrs["ome"]["multiscales"][0]["datasets"]))]
        self._ts: dict[int, Any] = {}
        self._pending: list[Any] = []       # tensorstore write futures not yet waited for
        self._lock = threading.Lock()

    def _tensorstore(self, level: int) -> Any | None:
        """The same array opened in tensorstore, for pixel I/O, or None (no tensorstore, or
        a store not on a local disk). zarr-python's per-chunk Python overhead made writing
        a shard ~4x slower than compressing it; tensorstore encodes and writes the chunks
        of a shard in C++ threads (2-2.5x faster per write unit, measured). Metadata and
        attributes stay with zarr-python; every shard still has exactly one writer, and a
        write is on disk when `.result()` returns, so reads through either see it."""
        if tensorstore is None or not hasattr(self.group.store, "root"):
            return None
        if level not in self._ts:
            path = Path(str(self.group.store.root)).resolve() / self.group.path / str(level)
            self._ts[level] = tensorstore.open({
                "driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
                "open": True, "recheck_cached_data": False,
            }).result()
        return self._ts[level]

    @classmethod
    def create(
        cls, path: str | Path, shape: tuple[int, int, int], *, pixel_nm: float, thickness_nm: float,
        levels: int = 3, chunk: int = 256, dtype: str = "uint16", name: str = "tapescope",
        zstd_level0: int = ZSTD_LEVEL0,
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
                shards=(1, c * SHARD_FACTOR, c * SHARD_FACTOR),
                compressors=ZstdCodec(level=zstd_level0 if k == 0 else ZSTD_PYRAMID),
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

    def shard_blocks(self, level: int) -> list[tuple[int, int, int, int]]:
        """(y0, x0, h, w) of every shard of one z plane of `level`: the unit of writing."""
        arr = self.levels[level]
        _, ny, nx = arr.shape
        sy, sx = arr.shards[1:] if arr.shards else arr.chunks[1:]
        return [(y, x, min(sy, ny - y), min(sx, nx - x)) for y in range(0, ny, sy) for x in range(0, nx, sx)]

    def _store(self, level: int, z: int, block: tuple[int, int, int, int], data: np.ndarray) -> None:
        arr = self.levels[level]
        dt = arr.dtype
        given = data
        if np.issubdtype(dt, np.integer) and data.dtype != dt:
            lim = np.iinfo(dt)
            # One temporary, rounded in place: a third of the time of clip(rint(x)).
            data = np.clip(data, lim.min, lim.max)
            np.rint(data, out=data)
        y0, x0, h, w = block
        data = data.astype(dt, copy=False)
        ts_arr = self._tensorstore(level)
        if ts_arr is None:
            arr[z, y0:y0 + h, x0:x0 + w] = data
            return
        # Encoded and written by tensorstore's threads while the caller renders on; `flush`
        # (called before anything reads the level back, and before a section is done) waits.
        future = ts_arr[z, y0:y0 + h, x0:x0 + w].write(data)
        if np.shares_memory(data, given):
            # tensorstore reads `data` later: a caller's buffer may be reused the moment this
            # returns, so wait until it is copied. Converted pixels are this call's own; not
            # waiting for them keeps the render off tensorstore's queue (8 % on one thread).
            future.copy.result()
        with self._lock:
            self._pending.append(future)
            oldest = self._pending.pop(0) if len(self._pending) > MAX_PENDING_WRITES else None
        if oldest is not None:
            oldest.result()

    @contextlib.contextmanager
    def section_writes(self) -> Iterator[None]:
        """Writes made inside are on disk when the block ends; if it ends in an error, every
        write still in flight is waited for (its own errors dropped) before the error goes
        on, so none is left running to fail the next section's flush."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.flush()
            raise
        self.flush()

    def flush(self) -> None:
        """Wait for every shard write in flight; the first that failed raises."""
        with self._lock:
            pending, self._pending = self._pending, []
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as exc:     # every write is waited for before the first error is raised
                errors.append(exc)
        if errors:
            raise errors[0]

    def write_block(self, z: int, block: tuple[int, int, int, int], data: np.ndarray) -> None:
        """Write one level-0 shard block of section z (whole shards: no read-modify-write)."""
        if data.shape != tuple(block[2:]):
            raise ValueError(f"block data {data.shape} does not match block {block}")
        with self.section_writes():
            self._store(0, z, block, data)

    def build_pyramid(self, z: int, level: int | None = None, start: int = 1) -> None:
        """Levels `start`.. of section z (or just `level`), each shard computed from the 2x2
        shard area of the level below, read back from the store: memory stays at a few
        shards whatever the section's size, and each shard still has exactly one writer."""
        with self.section_writes():
            for k in [level] if level is not None else range(start, len(self.levels)):
                self._pyramid_level(z, k)

    def _pyramid_level(self, z: int, k: int) -> None:
        """Level k of section z from level k - 1, shard by shard."""
        self.flush()                    # the level below is read back
        below = self.levels[k - 1]
        for block in self.shard_blocks(k):
            y0, x0, h, w = block
            # In the stored dtype: INTER_AREA on uint16 rounds like _store, at 2.5x the speed of float.
            ts_below = self._tensorstore(k - 1)
            # Clipped to the level below (odd sizes): tensorstore does not clip slices as zarr does.
            _, by, bx = below.shape
            region = (z, slice(2 * y0, min(2 * (y0 + h), by)), slice(2 * x0, min(2 * (x0 + w), bx)))
            src = below[region] if ts_below is None else ts_below[region].read().result()
            self._store(k, z, block, downsample2(src)[:h, :w])

    def write_units(self) -> list[tuple[int, int, int, int]]:
        """Level-0 regions (y0, x0, h, w) that are written as one unit: the area of one
        level-1 shard, made of whole level-0 shards, so the unit writes its level-0 shards
        and its level-1 shard from memory and is the only writer of all of them. Without a
        level 1 (or where the shard sizes do not nest), the level-0 shards themselves."""
        if len(self.levels) < 2:
            return self.shard_blocks(0)
        s0 = self.levels[0].shards[1:] if self.levels[0].shards else self.levels[0].chunks[1:]
        s1 = self.levels[1].shards[1:] if self.levels[1].shards else self.levels[1].chunks[1:]
        if (2 * s1[0]) % s0[0] or (2 * s1[1]) % s0[1]:
            return self.shard_blocks(0)
        _, ny, nx = self.shape
        return [(2 * y, 2 * x, min(2 * h, ny - 2 * y), min(2 * w, nx - 2 * x))
                for y, x, h, w in self.shard_blocks(1)]

    def write_unit(self, z: int, unit: tuple[int, int, int, int], data: np.ndarray) -> None:
        """Write one write unit (see `write_units`): its level-0 shards, and its level-1
        shard downsampled from `data` in memory (level 0 is not read back for level 1)."""
        uy, ux, uh, uw = unit
        if data.shape != (uh, uw):
            raise ValueError(f"unit data {data.shape} does not match unit {unit}")
        # One write for the unit's level-0 shards (whole shards, so no read-modify-write):
        # zarr encodes them together, faster than shard by shard.
        self._store(0, z, unit, data)
        if len(self.levels) > 1 and self.write_units() != self.shard_blocks(0):
            block = (uy // 2, ux // 2, -(-uh // 2), -(-uw // 2))
            self._store(1, z, block, downsample2(np.asarray(data, np.float32)))

    def write_section(self, z: int, image: np.ndarray, info: dict[str, Any]) -> None:
        """Write one section's image into every pyramid level, then record it."""
        if image.shape != self.shape[1:]:
            raise ValueError(f"section image {image.shape} does not match volume {self.shape[1:]}")
        self.check_z(z)
        units = self.write_units()
        with self.section_writes():
            for y0, x0, h, w in units:
                self.write_unit(z, (y0, x0, h, w), image[y0:y0 + h, x0:x0 + w])
            self.build_pyramid(z, start=1 if units == self.shard_blocks(0) else 2)
        self.record(z, {**info, "window": self.section_window(z)})

    def check_z(self, z: int) -> None:
        if not 0 <= z < self.shape[0]:
            raise ValueError(f"z={z} outside volume depth {self.shape[0]}")

    # -- per-section transforms, stored beside the volume ---------------------------------
    @property
    def transforms_dir(self) -> Path:
        """`<volume>.transforms/` next to `<volume>.zarr`: one file per section z."""
        root = Path(str(self.group.store.root)) if hasattr(self.group.store, "root") else None
        if root is None:
            raise ValueError("transforms are stored beside a volume on a local disk only")
        return root.with_suffix(".transforms")

    def _section_file(self, z: int, kind: str = "") -> Path:
        """Section z's file of `kind` beside the volume ("": its transform)."""
        return self.transforms_dir / f"z{z:06d}{kind}.npz"

    def _new_section_file(self, z: int, kind: str = "") -> Path:
        self.check_z(z)
        self.transforms_dir.mkdir(exist_ok=True)
        return self._section_file(z, kind)

    def save_transform(self, z: int, transform: SectionTransform) -> Path:
        path = self._new_section_file(z)
        transform.save(path)
        return path

    def save_tile_placement(self, z: int, positions: np.ndarray, linear: np.ndarray | None) -> Path:
        """Where section z's stitching put its tiles, exactly (the record keeps them rounded):
        its unaligned montage can be rendered again to the bit (a resumed run's references)."""
        path = self._new_section_file(z, ".tiles")
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, positions=np.asarray(positions, np.float64),
                 **({} if linear is None else {"linear": np.asarray(linear, np.float64)}))
        tmp.replace(path)
        return path

    def load_tile_placement(self, z: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """`save_tile_placement`'s positions and linear parts of section z (None: not stored)."""
        path = self._section_file(z, ".tiles")
        if not path.exists():
            return None
        with np.load(path) as f:
            return f["positions"], (f["linear"] if "linear" in f.files else None)

    def load_transform(self, z: int) -> SectionTransform:
        path = self._section_file(z)
        if not path.exists():
            raise FileNotFoundError(f"no stored transform for z={z} ({path})")
        return SectionTransform.load(path)

    def section_window(self, z: int) -> list[float] | None:
        """Section z's contrast window: the WINDOW_PERCENTILES of its imaged (non-zero)
        pixels, from the coarsest level, or None where it holds too few."""
        self.check_z(z)
        level = self.levels[-1]
        _, h, w = level.shape
        step = max(1, int(np.ceil(np.sqrt(h * w / WINDOW_SAMPLE_PX))))
        plane = np.asarray(level[z, ::step, ::step])
        values = plane[plane > 0]
        if values.size < 64:
            return None
        lo, hi = np.percentile(values, WINDOW_PERCENTILES)
        return [float(lo), float(hi)] if hi > lo else None

    def record(self, z: int, info: dict[str, Any]) -> None:
        """Store what is known about section z (also for sections that are missing). A
        "window" in `info` (`section_window`) updates the volume's OME contrast window: the
        median of the sections' windows."""
        meta = dict(self.group.attrs["tapescope"])
        sections = dict(meta.get("sections", {}))
        sections[str(z)] = json.loads(json.dumps(info))  # JSON-safe copy
        meta["sections"] = sections
        self.group.attrs["tapescope"] = meta
        windows = np.array([v["window"] for v in sections.values() if v.get("window")], float)
        if len(windows):
            ome = dict(self.group.attrs["ome"])
            ome["omero"] = omero_window(*np.median(windows, axis=0), self.levels[0].dtype)
            self.group.attrs["ome"] = ome

    @property
    def window(self) -> tuple[float, float] | None:
        """The volume's contrast window (start, end) from its OME metadata, if written."""
        try:
            w = self.group.attrs["ome"]["omero"]["channels"][0]["window"]
            return float(w["start"]), float(w["end"])
        except (KeyError, IndexError, TypeError):
            return None
