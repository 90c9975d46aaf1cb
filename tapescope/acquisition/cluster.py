"""Sections' stitching, alignment and rendering on a dask.distributed cluster
(`[processing] scheduler`, `tapescope process --scheduler`).

The tasks are plain functions of paths: a worker maps the tiles from the run directory,
writes a section's unaligned montage into the processor's montage folder (`montage_task`),
reads montages (or, for a retake, the references in the volume) and writes the section into
the volume itself, so the run directory, the scratch folder and the volume must be on a disk
every worker sees (one machine, or a shared file system). One task aligns a section to one
of its references (`align_task`: the expensive part, the coarse search and the patch flow),
montage to montage, so it needs neither section placed first; the placement from those
pairs, and the record, are decided by the caller. One task renders a whole section: every
shard of it has one writer. A task whose worker dies is given to another by the scheduler; one that
raises is retried `retries` times; after that the section fails with an alarm
(ProcessingWorker), recorded missing, never skipped silently.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import uuid4

import numpy as np

from tapescope.alignment.pipeline import (
    Canvas,
    FinalRender,
    Montage,
    MontageStore,
    Plane,
    ReferencePair,
    align_pairs,
    render_montage,
    stitch_tiles,
)
from tapescope.alignment.stack import FlowParams
from tapescope.allocator import keep_large_blocks
from tapescope.errors import TapescopeError
from tapescope.montage.omezarr import Volume
from tapescope.montage.shard_render import render_section
from tapescope.montage.transform import SectionTransform
from tapescope.stitching.flatfield import FlatFielded
from tapescope.stitching.lens import RadialDistortion
from tapescope.stitching.section import StitchResult

from .store import RunStore, TileRecord, section_inputs

log = logging.getLogger(__name__)

TASK_RETRIES = 2           # a task that raises is run this many more times before its section fails
TASK_TIMEOUT_S = 3600.0    # a section's task not done by then (no worker left?) fails the section


class ClusterError(TapescopeError):
    """A scheduler that cannot be reached or used; the message names it."""


def check_scheduler(address: str) -> None:
    """Refuse an address that is not tcp://HOST:PORT or where nothing listens, in seconds
    (a dask Client retries until its own timeout)."""
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if u.scheme not in ("tcp", "tls") or not u.hostname or not u.port:
        raise ClusterError(f"scheduler {address}: expected tcp://HOST:PORT")
    try:
        socket.create_connection((u.hostname, u.port), timeout=5).close()
    except OSError as exc:
        raise ClusterError(f"scheduler {address}: cannot connect ({exc})") from None


def stitch_task(records: list[TileRecord], pixel_nm: float, lens: str | RadialDistortion,
                gain: np.ndarray | None, dark: float | np.ndarray, tile_model: str) -> StitchResult:
    """On a worker: one section's registration and solve, from its tile files."""
    keep_large_blocks()     # once per worker process, as the engine's process does
    tiles, stage_px, grid = section_inputs(records, pixel_nm)
    return stitch_tiles(tiles, stage_px, grid, lens=lens, gain=gain, dark=dark, tile_model=tile_model)


def render_task(volume_path: str, z: int, records: list[TileRecord], positions: np.ndarray,
                transform: SectionTransform, lens: RadialDistortion | None, linear: np.ndarray | None,
                gain: np.ndarray | None, dark: float | np.ndarray, device: str) -> int:
    """On a worker: section z rendered from its tile files into every level of the volume
    (the caller records it). Returns the pixels covered."""
    keep_large_blocks()
    volume = Volume.open(volume_path)
    tiles = [FlatFielded(RunStore.open_tile(r), gain, dark) for r in records]
    stats = render_section(volume, z, tiles, positions, transform, lens=lens, device=device, linear=linear)
    return stats.covered


def montage_task(folder: str, name: str, records: list[TileRecord], stitched: StitchResult, canvas: Canvas,
                 gain: np.ndarray | None, dark: float | np.ndarray, device: str) -> str:
    """On a worker: a section's unaligned montage, from its tile files, into `folder` as
    `name` (`render_montage`). Returns the name."""
    keep_large_blocks()
    tiles = [FlatFielded(RunStore.open_tile(r), gain, dark) for r in records]
    return render_montage(Path(folder), name, canvas, tiles, stitched.solution.positions, lens=stitched.lens_applied,
                          linear=stitched.solution.linear, device=device)


def _held(value: np.ndarray) -> np.ndarray:
    """The task whose result is `value` (`SectionCluster._shared`)."""
    return value


def align_task(volume_path: str, folder: str, z: int, montage: str, reference: int, reference_montage: str | None,
               elastic: bool, device: str, scratch: str | None, prefix: str, flow: FlowParams) -> ReferencePair:
    """On a worker: section z's montage aligned to section `reference`'s (`align_pairs`, as
    in the engine's process), or to the reference as written in the volume where its montage
    is not kept (None); that copy goes to `scratch` where the worker sees that folder, else
    to its temporary folder, and is removed when the task ends."""
    keep_large_blocks()     # without it a pair costs twice the CPU on a worker (docs/capacity.md)
    where = Path(scratch) if scratch is not None and Path(scratch).is_dir() else None
    own = MontageStore.read(Path(folder), montage)
    source: Montage | Plane = MontageStore.read(Path(folder), reference_montage) if reference_montage is not None \
        else Plane(Volume.open(volume_path).levels[0], reference)
    (result,) = align_pairs(z, own, [(reference, source)], elastic=elastic, device=device, scratch=where,
                            prefix=prefix, volume_root=Path(volume_path), flow=flow)
    return result


def volume_path(volume: Volume) -> str:
    """The volume's folder, as the workers open it."""
    root = getattr(volume.group.store, "root", None)
    if root is None:
        raise ClusterError("processing on a cluster needs the volume on a disk the workers see")
    return str(Path(str(root)).resolve())


class SectionCluster:
    """A Client on the scheduler at `address`, and the section tasks sent through it."""

    def __init__(self, address: str, *, retries: int = TASK_RETRIES, timeout_s: float = TASK_TIMEOUT_S) -> None:
        check_scheduler(address)
        from distributed import Client

        # distributed logs every connection at INFO; the run's log wants ours.
        for name in ("distributed", "distributed.batched", "distributed.comm"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            self.client = Client(address, timeout="15s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"scheduler {address}: cannot connect ({exc})") from None
        self.address = address
        self.retries = retries
        self.timeout_s = timeout_s
        self._workers = self._current_workers()
        self._shared_arrays: list[tuple[np.ndarray, Any]] = []      # flat-field arrays sent once, and their futures

    def _shared(self, value: Any) -> Any:
        """An array every task of the run takes (the flat-field's gain and dark: 121 MB each
        at 5504 x 5504 px) sent to the workers once, as a future the tasks resolve there,
        instead of with every task; anything else as it is."""
        if not isinstance(value, np.ndarray) or value.nbytes < 1 << 16:
            return value
        for array, future in self._shared_arrays:
            # Lost is fine (the scheduler runs it again); cancelled (a lost connection to
            # the scheduler) or failed is not: sent again.
            if array is value and future.status not in ("cancelled", "error"):
                return future
        # A task that returns the array, not a scatter: the scheduler keeps the task, so when
        # the worker holding its result dies it is run again elsewhere. Scattered data lost
        # with its worker cancels every task waiting on it ("lost dependencies").
        future = self.client.submit(_held, value, pure=False, key=f"flatfield-{uuid4().hex}", retries=self.retries)
        self._shared_arrays = [*self._shared_arrays[-1:], (value, future)]    # the gain and the dark
        return future

    def _current_workers(self) -> set[str]:
        return set(self.client.scheduler_info().get("workers", {}))

    def worker_count(self) -> int:
        return len(self._workers)

    def lost_workers(self) -> list[tuple[str, int]]:
        """(address, workers left) of each worker gone since the last call; new workers are
        taken in silently."""
        now = self._current_workers()
        gone = sorted(self._workers - now)
        self._workers = now
        return [(a, len(now)) for a in gone]

    def stitch(self, records: list[TileRecord], pixel_nm: float, *, lens: str | RadialDistortion,
               gain: np.ndarray | None, dark: float | np.ndarray, tile_model: str, priority: int = 0) -> Any:
        """A future of `stitch_task`."""
        return self.client.submit(stitch_task, records, pixel_nm, lens, self._shared(gain), self._shared(dark),
                                  tile_model,
                                  retries=self.retries, pure=False, priority=priority)

    def montage(self, folder: Path, z: int, name: str, records: list[TileRecord], stitched: Any, canvas: Canvas, *,
                gain: np.ndarray | None, dark: float | np.ndarray, device: str) -> Any:
        """A future of `montage_task` (its result: `name`, the montage's in `folder`);
        `stitched` may be the future of the section's stitching."""
        return self.client.submit(montage_task, str(folder), name, records, stitched, canvas,
                                  self._shared(gain), self._shared(dark), device, retries=self.retries, pure=False,
                                  priority=-z)

    def align(self, volume: Volume, folder: Path, z: int, montage: Any, reference: int, reference_montage: Any,
              *, elastic: bool, device: str, scratch: Path | None, prefix: str, flow: FlowParams) -> Any:
        """A future of `align_task`; the montages may be futures of `montage` (the worker
        gets their names without them passing through here)."""
        return self.client.submit(align_task, volume_path(volume), str(folder), z, montage, reference,
                                  reference_montage, elastic, device, None if scratch is None else str(scratch),
                                  prefix, flow, retries=self.retries, priority=-z,
                                  key=f"align_task-{z}-{reference}-{uuid4().hex}")

    def result(self, future: Any) -> Any:
        return future.result(timeout=self.timeout_s)

    def renderer(self, volume: Volume, records: list[TileRecord], *, gain: np.ndarray | None,
                 dark: float | np.ndarray, device: str) -> FinalRender:
        """The section processor's final render, done by one task on the cluster."""
        path = volume_path(volume)

        def render(z: int, positions: np.ndarray, transform: SectionTransform, lens: RadialDistortion | None,
                   linear: np.ndarray | None) -> int:
            future = self.client.submit(render_task, path, z, records, positions, transform, lens, linear,
                                        self._shared(gain), self._shared(dark), device, retries=self.retries,
                                        priority=-z,
                                        key=f"render_task-{z}-{uuid4().hex}")
            return int(self.result(future))

        return render

    def close(self) -> None:
        self.client.close()
