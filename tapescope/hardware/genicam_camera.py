"""Camera driver for GenICam cameras (GigE Vision, USB3 Vision) through Aravis.

Aravis (LGPL, GNOME) implements the GenICam standard and both transports; Python reaches it
through GObject introspection (Debian: python3-gi, gir1.2-aravis-0.8). Its calls block, so
each runs in a worker thread under one asyncio lock, as the serial drivers do: the event
loop never blocks, one call is on the camera at a time.

The same interface as the frame-protocol camera (camera.py): set_exposure, set_binning,
set_roi, arm, trigger, expose/read (exposure and readout apart, so the stage can move during
readout), status, frames_lost, reconnects. Frames are software-triggered (TriggerMode On,
TriggerSource Software); the pixel format is Mono16 where the camera has it, else Mono8,
delivered as uint16. A camera that disappears (unplugged, power-cycled, a network drop) is
reopened on the next call, within ``reconnect_timeout_s``, with a notice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .camera import Frame, LostFrames
from .device import Device
from .errors import DeviceDisconnected, DeviceError, DeviceTimeout

T = TypeVar("T")
N_BUFFERS = 4
# GigE Vision 1.x block ids are 16 bits and skip 0 when they wrap.
FRAME_ID_WRAP = 65535
PIXEL_FORMATS = ("Mono16", "Mono12", "Mono8")


@functools.cache
def aravis() -> Any:
    """The Aravis module, or ImportError naming what to install."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        raise ImportError("the GenICam camera driver needs Aravis 0.8 through GObject introspection "
                          f"(Debian: apt install python3-gi gir1.2-aravis-0.8): {exc}") from exc
    return Aravis


def frames_between(last: int, now: int) -> int:
    """Frames lost between block ids `last` and `now` (ids count 1..65535, then wrap to 1)."""
    gap = (now - last - 1) % FRAME_ID_WRAP
    return 0 if gap == FRAME_ID_WRAP - 1 else gap


class GenicamCamera(Device):
    name = "camera"

    def __init__(self, device: str, *, timeout_s: float = 5.0, reconnect_timeout_s: float = 10.0,
                 pixel_format: str | None = None, roi: tuple[int, int, int, int] | None = None) -> None:
        """``device``: an Aravis device id ("Basler-21234567", as ``arv-tool-0.8`` lists them)
        or a GigE Vision camera's IP address."""
        self.device = device
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.pixel_format = pixel_format
        self.exposure_ms = 0.0
        self.binning = 1
        self.roi = roi             # (x, y, width, height); None: the whole sensor
        self.model = ""
        self.shape: tuple[int, int] = (0, 0)
        self.reconnects = 0
        self._lost = LostFrames(frames_between)
        self._cam: Any = None
        self._stream: Any = None
        self._exposed_at = 0.0
        self._pending = False      # an exposure triggered and not read
        self._lock = asyncio.Lock()

    # -- one blocking call at a time, in a thread ----------------------------------------------
    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        async with self._lock:
            if self._cam is None:
                await self._reopen(what)
            try:
                return await asyncio.to_thread(fn)
            except DeviceTimeout:
                # A triggered frame that never came: a camera power-cycled at the same address
                # answers its registers but has forgotten where to stream. Reopen it next call.
                await asyncio.to_thread(self._drop)
                raise
            except DeviceError:
                raise
            except Exception as exc:            # GLib.Error: the camera is gone or refused
                await asyncio.to_thread(self._drop)
                raise DeviceDisconnected(self.name, f"{what}: {exc}", retryable=True) from exc

    async def _reopen(self, what: str) -> None:
        deadline = time.monotonic() + self.reconnect_timeout_s
        while True:
            try:
                await asyncio.to_thread(self._open)
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise DeviceDisconnected(self.name, f"{what}: camera {self.device} not reachable "
                                             f"for {self.reconnect_timeout_s:g} s: {exc}") from exc
                await asyncio.sleep(0.2)
        self.reconnects += 1
        self.notice(f"camera {self.device} reopened ({what}); settings restored")

    # -- Aravis, in the worker thread -----------------------------------------------------------
    def _open(self) -> None:
        arv = aravis()
        cam = arv.Camera.new(self.device)
        formats = list(cam.dup_available_pixel_formats_as_strings())
        want = [self.pixel_format] if self.pixel_format else list(PIXEL_FORMATS)
        usable = [f for f in want if f in formats]
        if not usable:
            raise DeviceError(self.name, f"camera {self.device} offers pixel formats {formats}, none of {want}")
        cam.set_pixel_format_from_string(usable[0])
        cam.set_acquisition_mode(arv.AcquisitionMode.CONTINUOUS)
        cam.set_trigger("Software")
        self.model = f"{cam.get_vendor_name()} {cam.get_model_name()} {cam.get_device_serial_number()}"
        size = cam.get_sensor_size()
        self.shape = (int(size.height), int(size.width))
        self._cam = cam
        self._lost.restart()               # block ids start again with a new stream
        # A reopened camera gets back what this driver had set.
        if self.binning > 1:
            cam.set_binning(self.binning, self.binning)
        x, y, w, h = self.roi or (0, 0, self.shape[1] // self.binning, self.shape[0] // self.binning)
        cam.set_region(x, y, w, h)
        if self.exposure_ms:
            cam.set_exposure_time(self.exposure_ms * 1e3)
        self.exposure_ms = cam.get_exposure_time() / 1e3
        self._start_stream()

    def _reconfigure(self, change: Callable[[], T]) -> T:
        """Change what sets the payload size (region, binning): acquisition stopped and the
        stream dropped first (GenICam locks these features while acquiring), then a new one."""
        self._cam.stop_acquisition()
        self._stream = None
        try:
            return change()
        finally:
            self._start_stream()

    def _start_stream(self) -> None:
        cam = self._cam
        self._stream = cam.create_stream(None, None)
        payload = cam.get_payload()
        for _ in range(N_BUFFERS):
            self._stream.push_buffer(aravis().Buffer.new_allocate(payload))
        cam.start_acquisition()
        self._pending = False

    def _drop(self) -> None:
        cam, self._cam, self._stream = self._cam, None, None
        if cam is not None:
            try:
                cam.stop_acquisition()
            except Exception:          # the camera may be gone already: nothing to stop
                pass

    def _pop(self) -> Frame:
        arv = aravis()
        buf = self._stream.timeout_pop_buffer(int((self.timeout_s + self.exposure_ms / 1e3) * 1e6))
        if buf is None:
            raise DeviceTimeout(self.name, f"no frame within {self.timeout_s + self.exposure_ms / 1e3:g} s "
                                "of the trigger", retryable=True)
        try:
            status = buf.get_status()
            if status != arv.BufferStatus.SUCCESS:
                raise DeviceError(self.name, f"frame {buf.get_frame_id()} incomplete: {status.value_nick}",
                                  retryable=True)
            w, h = buf.get_image_width(), buf.get_image_height()
            fmt = buf.get_image_pixel_format()
            raw = buf.get_image_data()
            bits = (fmt >> 16) & 0xFF       # GenICam pixel format codes carry bits per pixel here
            if bits not in (8, 16):
                raise DeviceError(self.name, f"pixel format {hex(fmt)} ({bits} bits, packed) is not read; "
                                  f"use one of {PIXEL_FORMATS}")
            img = np.frombuffer(raw, np.uint8 if bits == 8 else "<u2").reshape(h, w)
            # Mono8 asked for (an 8-bit camera, camera.bit_depth = 8) stays uint8; otherwise a
            # camera that has only Mono8 is widened, so a run's tiles have the configured depth.
            img = img.copy() if bits == 8 and self.pixel_format == "Mono8" else img.astype(np.uint16)
            return Frame(img, int(buf.get_frame_id()), buf.get_timestamp() / 1e9, self.exposure_ms,
                         {"binning": self.binning, "roi": list(self.roi) if self.roi else None,
                          "pixel_format": hex(fmt), "model": self.model})
        finally:
            self._stream.push_buffer(buf)

    # -- the driver's interface -----------------------------------------------------------------
    async def connect(self) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._open)
            except DeviceError:
                raise
            except Exception as exc:
                raise DeviceDisconnected(self.name, f"cannot open camera {self.device}: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._drop)

    @property
    def connected(self) -> bool:
        return self._cam is not None

    async def set_exposure(self, ms: float) -> None:
        def do() -> float:
            lo, hi = self._cam.get_exposure_time_bounds()
            if not lo <= ms * 1e3 <= hi:
                raise DeviceError(self.name, f"exposure {ms:g} ms outside the camera's {lo / 1e3:g}-{hi / 1e3:g} ms", 2)
            self._cam.set_exposure_time(ms * 1e3)
            return self._cam.get_exposure_time() / 1e3
        self.exposure_ms = await self._call("set exposure", do)

    async def set_binning(self, binning: int) -> None:
        def do() -> int:
            self._cam.set_binning(binning, binning)
            return int(self._cam.get_binning()[0])
        self.binning = await self._call("set binning", lambda: self._reconfigure(do))

    async def set_roi(self, roi: tuple[int, int, int, int] | None) -> None:
        """(x, y, width, height) in the camera's (binned) pixels; None: the whole sensor."""
        def do() -> tuple[int, int, int, int]:
            x, y, w, h = roi or (0, 0, self.shape[1] // self.binning, self.shape[0] // self.binning)
            self._cam.set_region(x, y, w, h)
            r = self._cam.get_region()
            return int(r.x), int(r.y), int(r.width), int(r.height)
        got = await self._call("set roi", lambda: self._reconfigure(do))
        self.roi = None if roi is None else got

    async def status(self) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            r = self._cam.get_region()
            return {"exposure_ms": self._cam.get_exposure_time() / 1e3, "binning": int(self._cam.get_binning()[0]),
                    "roi": [int(r.x), int(r.y), int(r.width), int(r.height)],
                    "pixel_format": self._cam.get_pixel_format_as_string(), "model": self.model}
        return await self._call("status", do)

    async def arm(self) -> None:
        """Acquisition is running from connect on; arming checks the camera answers."""
        await self.status()

    async def expose(self) -> float:
        """Trigger and return once the exposure has ended; read() gives the frame."""
        t0 = time.time()
        await self._call("software trigger", lambda: self._cam.software_trigger())
        self._pending = True
        self._exposed_at = t0
        await asyncio.sleep(self.exposure_ms / 1e3)
        return t0

    async def read(self) -> Frame:
        if not self._pending:
            raise DeviceError(self.name, "no exposure to read")
        self._pending = False
        return self._count(await self._call("read frame", self._pop))

    async def trigger(self) -> Frame:
        await self.expose()
        return await self.read()

    @property
    def frames_lost(self) -> int:
        return self._lost.lost

    def _count(self, frame: Frame) -> Frame:
        self._lost.count(frame.frame_id, self.notice)
        return frame
