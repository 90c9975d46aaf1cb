"""The tape camera of a GridTape stage: which slot is under the beam, and how far off centre.

A small camera looks at the tape where it passes the beam: slot apertures (dark holes in
the bright tape) and, beside each, its ITF barcode. One frame gives both answers:
- the barcodes, decoded by zxing-cpp (a barcode library nobody here wrote), each with its
  position along the tape;
- the aperture nearest the beam axis, from the column profile of the aperture band, its
  centre to a fraction of a pixel from its two edges.
The slot is the one whose barcode sits over that aperture; the offset is the aperture
centre's distance from the beam axis, in mm. The camera is any driver (the frame
protocol's, or a GenICam camera through Aravis). The layout (which rows hold barcodes and
apertures, pixels per mm, the beam axis column) is the set-up's calibration:
``TapeView``. docs/instruments.md shows a frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zxingcpp

from .camera import Camera, Frame
from .device import Device
from .errors import DeviceError

ERR_NO_BARCODE = 4


@dataclass(frozen=True)
class TapeView:
    """Where things are in the tape camera's frame (rows as fractions of the height)."""

    px_per_mm: float = 40.0
    axis_px: float | None = None             # beam axis column; None: the frame's centre
    aperture_rows: tuple[float, float] = (0.6, 0.9)
    aperture_mm: float = 2.0                  # aperture length along the tape
    digits: int = 6                           # barcode: the slot number, zero-padded


@dataclass(frozen=True)
class SlotSighting:
    slot: int
    code: str
    offset_mm: float          # aperture centre minus beam axis, along the tape (+: further on)


def apertures(img: np.ndarray, view: TapeView) -> list[float]:
    """Centres (columns, sub-pixel) of the dark runs in the aperture band that have the
    width of an aperture; runs cut by the frame's edge are left out."""
    h = img.shape[0]
    band = img[int(view.aperture_rows[0] * h): int(view.aperture_rows[1] * h)].astype(np.float64)
    profile = band.mean(axis=0)
    lo, hi = np.percentile(profile, 5), np.percentile(profile, 95)
    if hi - lo < 1e-6:
        return []
    level = (lo + hi) / 2
    dark = (profile < level).astype(np.int8)
    step = np.diff(np.concatenate(([0], dark, [0])))
    starts, ends = np.flatnonzero(step == 1), np.flatnonzero(step == -1)    # runs [start, end)

    def cross(i: int) -> float:
        """Where the profile crosses the level between columns i and i + 1."""
        a, b = profile[i], profile[i + 1]
        return i + (a - level) / (a - b) if a != b else i + 0.5

    want = view.aperture_mm * view.px_per_mm
    centres = []
    for start, end in zip(starts, ends, strict=True):
        if start == 0 or end == len(profile):
            continue                       # cut by the frame's edge: its centre is unknown
        left, right = cross(int(start) - 1), cross(int(end) - 1)
        if 0.6 * want <= right - left <= 1.4 * want:
            centres.append((left + right) / 2)
    return centres


def barcodes(img: np.ndarray, digits: int) -> list[tuple[str, float]]:
    """(text, centre column) of each ITF barcode of `digits` digits in the frame."""
    lo, hi = np.percentile(img, (0.5, 99.5))
    grey = np.clip((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    found = []
    for r in zxingcpp.read_barcodes(grey, formats=zxingcpp.BarcodeFormat.ITF):
        if len(r.text) != digits or not r.text.isdigit():
            continue
        p = r.position
        found.append((r.text, (p.top_left.x + p.top_right.x + p.bottom_left.x + p.bottom_right.x) / 4))
    return found


def sight(img: np.ndarray, view: TapeView) -> SlotSighting:
    """The slot nearest the beam axis, from one frame; DeviceError when the frame does not
    show an aperture with its barcode over it."""
    axis = view.axis_px if view.axis_px is not None else (img.shape[1] - 1) / 2
    holes = apertures(img, view)
    codes = barcodes(img, view.digits)
    if not holes:
        raise DeviceError("tape", "tape camera: no slot aperture in view", ERR_NO_BARCODE)
    hole = min(holes, key=lambda c: abs(c - axis))
    if not codes:
        raise DeviceError("tape", f"tape camera: no readable barcode in view (aperture at "
                          f"{(hole - axis) / view.px_per_mm:+.2f} mm)", ERR_NO_BARCODE)
    code, at = min(codes, key=lambda c: abs(c[1] - hole))
    if abs(at - hole) > view.aperture_mm * view.px_per_mm:
        raise DeviceError("tape", f"tape camera: barcode {code} is {(at - hole) / view.px_per_mm:+.2f} mm "
                          "from the aperture nearest the beam; no label for that slot", ERR_NO_BARCODE)
    return SlotSighting(int(code), code, float((hole - axis) / view.px_per_mm))


class FrameSource(Protocol):
    """Any camera driver: the frame protocol's (camera.py) or a GenICam one (genicam_camera.py)."""

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def trigger(self) -> Frame: ...


class BarcodeCamera(Device):
    """The tape camera: a camera driver and the calibration of what its frames show."""

    name = "tape camera"

    def __init__(self, camera: FrameSource, *, view: TapeView | None = None) -> None:
        self.camera = camera
        self.camera.name = self.name
        self.view = view or TapeView()

    @classmethod
    def on_frame_protocol(cls, host: str, port: int, *, view: TapeView | None = None,
                          timeout_s: float = 5.0) -> BarcodeCamera:
        return cls(Camera(host, port, timeout_s=timeout_s), view=view)

    async def connect(self) -> None:
        await self.camera.connect()

    async def close(self) -> None:
        await self.camera.close()

    async def frame(self) -> np.ndarray:
        return (await self.camera.trigger()).data

    async def sight(self) -> SlotSighting:
        return sight(await self.frame(), self.view)
