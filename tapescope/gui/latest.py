"""Newest-wins hand-off of frames from the acquisition side to the display.

The engine never waits on the display: a producer overwrites the one slot, the display
timer takes whatever is newest when it next draws, and frames in between are dropped for
display only (they are already stored). ``FrameLoader`` reads stored tiles back in its
own thread for events that name a tile but do not carry its pixels.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


DISPLAY_MAX_PX = 1024   # the live view never draws more than this on a side: a screen has no more


@dataclass(frozen=True)
class Frame:
    data: np.ndarray           # full resolution, for the cursor readout
    label: str                 # what the frame is, for the title of the view
    info: dict[str, Any]
    display: np.ndarray | None = None    # binned copy for drawing (made off the Qt thread)
    scale: int = 1                       # display pixel = scale x scale data pixels

    @classmethod
    def of(cls, data: np.ndarray, label: str, info: dict[str, Any] | None = None) -> Frame:
        scale = max(1, int(np.ceil(max(data.shape) / DISPLAY_MAX_PX)))
        display = data if scale == 1 else bin_mean(data, scale)
        if scale > 1 and data.dtype.kind in "ui":   # integer LUT path in pyqtgraph: cheaper to draw
            display = display.astype(data.dtype)
        return cls(data, label, dict(info or {}), np.ascontiguousarray(display), scale)


def bin_mean(data: np.ndarray, k: int) -> np.ndarray:
    """k x k block mean (edges that do not fill a block are cut), in float32."""
    h, w = (data.shape[0] // k) * k, (data.shape[1] // k) * k
    return data[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)


class LatestFrame:
    """A one-slot, thread-safe buffer: ``put`` overwrites, ``take`` empties."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: Frame | None = None
        self.put_count = 0
        self.dropped = 0           # frames overwritten before anyone drew them

    def put(self, frame: Frame) -> None:
        with self._lock:
            if self._item is not None:
                self.dropped += 1
            self._item = frame
            self.put_count += 1

    def take(self) -> Frame | None:
        with self._lock:
            item, self._item = self._item, None
            return item


@dataclass(frozen=True)
class TileImage:
    """A stored tile to show: read back in the loader thread unless the event carried pixels."""
    slot: int
    row: int
    col: int
    path: str = ""
    data: np.ndarray | None = None
    info: dict[str, Any] | None = None


THUMB_PX = 128          # longest side of a section-map thumbnail
MAX_PENDING = 256       # tiles waiting for the loader; beyond this, display copies are dropped


def thumbnail(data: np.ndarray, longest: int = THUMB_PX) -> np.ndarray:
    k = max(1, int(np.ceil(max(data.shape) / longest)))
    return bin_mean(data, k) if k > 1 else data.astype(np.float32)


class FrameLoader:
    """One worker thread that turns stored tiles into display copies.

    Every tile gives a thumbnail (the section map must have no holes); the live view gets
    each one through ``LatestFrame``, where only the newest survives until the next draw.
    A slow disk makes the display lag; it never blocks or slows acquisition (``submit``
    never waits), and a backlog beyond MAX_PENDING drops display copies with a warning.
    """

    def __init__(self, out: LatestFrame, on_error: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.on_error = on_error
        self.thumbs: deque[tuple[int, int, int, np.ndarray]] = deque()
        self.dropped = 0
        self._jobs: queue.Queue[TileImage | None] = queue.Queue(MAX_PENDING)
        self._thread = threading.Thread(target=self._run, name="tapescope-frame-loader", daemon=True)
        self._thread.start()

    def submit(self, tile: TileImage) -> None:
        try:
            self._jobs.put_nowait(tile)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 and self.on_error is not None:
                self.on_error("display is behind acquisition: some tiles are not drawn (they are stored)")

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _load(self, tile: TileImage) -> np.ndarray:
        if tile.data is not None:
            return tile.data
        import tifffile  # only the loader thread reads TIFFs

        return tifffile.imread(tile.path)

    def _run(self) -> None:
        while (tile := self._jobs.get()) is not None:
            try:
                data = self._load(tile)
            except Exception as exc:  # a tile that cannot be shown must not end the live view
                log.warning("live view could not read slot %d tile r%d c%d: %s", tile.slot, tile.row, tile.col, exc)
                if self.on_error is not None:
                    self.on_error(f"live view could not read slot {tile.slot} tile r{tile.row} c{tile.col}: {exc}")
                continue
            self.thumbs.append((tile.slot, tile.row, tile.col, thumbnail(data)))
            self.out.put(Frame.of(data, f"slot {tile.slot}  tile r{tile.row} c{tile.col}", tile.info))
