"""The tape camera of a simulated GridTape stage: the frame protocol of the main camera,
showing the tape at the beam (apertures and ITF barcodes) where the reel controller's
model has put it. Layout: hardware/barcode_camera.py's ``TapeView``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import cv2
import numpy as np

from tapescope.hardware.barcode_camera import TapeView

from .camera import CameraEmulator
from .faults import FaultBook
from .gridtape import GridTapeModel
from .itf import modules

SHAPE = (200, 640)          # rows, columns: about 16 mm of tape at 40 px/mm
OVERSAMPLE = 4
TAPE, HOLE, INK = 0.80, 0.08, 0.10
MODULE_MM = 0.05            # a narrow bar: 2 px at 40 px/mm
BARCODE_ROWS = (0.1, 0.45)


def render_tape(model: GridTapeModel, view: TapeView, shape: tuple[int, int] = SHAPE,
                seed: int = 0) -> np.ndarray:
    """The tape as the camera sees it, uint16 (12-bit range), with shot-like noise."""
    h, w = shape
    ppm = view.px_per_mm * OVERSAMPLE
    axis = ((view.axis_px if view.axis_px is not None else (w - 1) / 2) + 0.5) * OVERSAMPLE
    row = np.full(w * OVERSAMPLE, TAPE, np.float32)
    holes = row.copy()
    bars = row.copy()
    first = int(np.floor((model.tape_mm - w / 2 / view.px_per_mm) / model.pitch_mm)) - 1
    last = int(np.ceil((model.tape_mm + w / 2 / view.px_per_mm) / model.pitch_mm)) + 1
    n_slots = model.world.p.n_slots
    for k in range(max(first, 0), min(last, n_slots - 1) + 1):
        centre = axis + (k * model.pitch_mm - model.tape_mm) * ppm
        half = view.aperture_mm / 2 * ppm
        a, b = round(centre - half), round(centre + half)
        holes[max(a, 0):max(b, 0)] = HOLE
        code = modules(f"{model.label(k):0{view.digits}d}")
        mod = MODULE_MM * ppm
        x0 = centre - len(code) * mod / 2
        for i in np.flatnonzero(code):
            a, b = round(x0 + i * mod), round(x0 + (i + 1) * mod)
            bars[max(a, 0):max(b, 0)] = INK

    def down(r: np.ndarray) -> np.ndarray:
        return r.reshape(w, OVERSAMPLE).mean(axis=1)
    img = np.full(shape, TAPE, np.float32)
    r0, r1 = int(BARCODE_ROWS[0] * h), int(BARCODE_ROWS[1] * h)
    img[r0:r1] = down(bars)
    a0, a1 = int(view.aperture_rows[0] * h), int(view.aperture_rows[1] * h)
    img[a0 - 4:a1 + 4] = down(holes)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    rng = np.random.default_rng(seed)
    counts = img * 3000.0
    counts += rng.normal(0.0, 1.0, shape) * np.sqrt(counts + 25.0)
    return np.clip(counts, 0, 4095).astype(np.uint16)


class TapeCameraEmulator(CameraEmulator):
    model = "tapescope-sim-tapecam"

    def __init__(self, tape: GridTapeModel, view: TapeView | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(tape.world, host)
        self.tape = tape
        self.view = view or TapeView()
        self.roi = (0, 0, SHAPE[1], SHAPE[0])
        self._frames = 0
        self.faults = FaultBook()        # the main camera's faults are not this camera's

    @property
    def frame_id(self) -> int:
        return self._frames

    def _sensor_shape(self) -> tuple[int, int]:
        return SHAPE

    def _render(self, stage_nm: np.ndarray | None = None) -> Awaitable[np.ndarray]:
        self._frames += 1
        return asyncio.to_thread(render_tape, self.tape, self.view, SHAPE, self._frames)
