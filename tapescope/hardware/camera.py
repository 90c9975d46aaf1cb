"""Camera driver: the tapescope TCP frame protocol over asyncio streams.

The interface follows ophyd-async's detector split: configure (exposure, binning, region),
arm, trigger and read are separate, so a vendor-SDK driver can implement the same calls.
After the connection drops (a cable, a camera reboot, a dropped or truncated frame), the
failing call raises; the next call reconnects, restores the settings and goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import camera_protocol as cp
from .device import Device
from .errors import DeviceDisconnected, DeviceError, DeviceTimeout, ProtocolError

log = logging.getLogger(__name__)

STREAM_LIMIT = 64 * 1024 * 1024


@dataclass
class Frame:
    """One camera frame: uint16 (an 8-bit camera's: uint8) pixels and what the camera says about them."""

    data: np.ndarray
    frame_id: int
    timestamp: float
    exposure_ms: float
    meta: dict[str, Any] = field(default_factory=dict)
    stage_nm: tuple[float, float] | None = None   # (x, y) encoder reading at exposure, when known


def ids_between(last: int, now: int) -> int:
    """Frames lost between frame ids `last` and `now` of frames read one after the other."""
    return max(now - last - 1, 0)


@dataclass
class LostFrames:
    """Frames a camera lost, counted from the gaps in the ids of the frames read; each gap is
    a notice. `gap` is the camera's rule (a GenICam block id wraps)."""

    gap: Callable[[int, int], int] = ids_between
    lost: int = 0
    last: int | None = None

    def count(self, frame_id: int, notice: Callable[[str], None]) -> None:
        if self.last is not None and (n := self.gap(self.last, frame_id)) > 0:
            self.lost += n
            notice(f"{n} frame(s) lost before frame {frame_id}")
        self.last = frame_id

    def restart(self) -> None:
        """Ids start again (a new stream): the next frame is no gap."""
        self.last = None


class Camera(Device):
    name = "camera"

    def __init__(self, host: str, port: int, *, timeout_s: float = 5.0, reconnect_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.exposure_ms = 0.0
        self.binning = 1
        self.roi: tuple[int, int, int, int] | None = None   # (x, y, width, height) in sensor pixels
        self.model = ""
        self.shape: tuple[int, int] = (0, 0)                 # full sensor (height, width)
        self.reconnects = 0
        self._lost = LostFrames()                            # gaps in frame ids seen by this driver
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._wanted = False      # connect() called and close() not: reconnect when dropped
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._lock:
            await self._open()
        self._wanted = True

    async def _open(self) -> None:
        try:
            # A large stream limit: with the default 64 KiB, reading a frame of megabytes
            # pauses and resumes the transport every 128 KiB.
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=STREAM_LIMIT), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise DeviceDisconnected(self.name, f"cannot connect to {self.host}:{self.port}: {exc}",
                                     retryable=True) from exc
        info = await self._exchange("PING", cp.KIND_OK)
        self.model = str(info.meta.get("model", "?"))
        try:
            self.shape = (int(info.meta["height"]), int(info.meta["width"]))
        except (KeyError, TypeError, ValueError):
            await self._drop()
            raise ProtocolError(self.name, f"bad PING reply {info.meta!r}") from None

    async def _reopen(self) -> None:
        """Reconnect after a drop, with backoff, and restore what was configured."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        delay = 0.05
        while True:
            try:
                await self._open()
                break
            except DeviceError as exc:
                if time.monotonic() + delay > deadline:
                    raise DeviceDisconnected(self.name, f"reconnect failed for {self.reconnect_timeout_s:g} s: "
                                             f"{exc.text}", retryable=True) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.reconnects += 1
        self.notice(f"reconnected to {self.host}:{self.port} (reconnect {self.reconnects})")
        if self.exposure_ms:
            await self._exchange(f"SET EXPOSURE {self.exposure_ms:g}", cp.KIND_OK)
        if self.binning != 1:
            await self._exchange(f"SET BINNING {self.binning}", cp.KIND_OK)
        if self.roi is not None:
            await self._exchange("SET ROI {} {} {} {}".format(*self.roi), cp.KIND_OK)

    async def close(self) -> None:
        self._wanted = False
        await self._drop()

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def set_exposure(self, ms: float) -> None:
        reply = await self._request(f"SET EXPOSURE {ms:g}", cp.KIND_OK)
        self.exposure_ms = float(reply.meta["exposure_ms"])

    async def set_binning(self, binning: int) -> None:
        reply = await self._request(f"SET BINNING {binning}", cp.KIND_OK)
        self.binning = int(reply.meta["binning"])

    async def set_roi(self, roi: tuple[int, int, int, int] | None) -> None:
        """Region of the sensor to read: (x, y, width, height) in unbinned pixels; None = all."""
        line = "SET ROI FULL" if roi is None else "SET ROI {} {} {} {}".format(*roi)
        reply = await self._request(line, cp.KIND_OK)
        x, y, w, h = (int(v) for v in reply.meta["roi"])
        self.roi = None if (x, y, w, h) == (0, 0, self.shape[1], self.shape[0]) else (x, y, w, h)

    async def status(self) -> dict[str, Any]:
        """The camera's own view of its settings (exposure, binning, roi, frames)."""
        return (await self._request("STATUS", cp.KIND_OK)).meta

    async def arm(self) -> None:
        await self._request("ARM", cp.KIND_OK)

    async def trigger(self) -> Frame:
        """Expose once and return the frame (exposure and readout in one exchange)."""
        frame: Frame = await self._request("TRIGGER", cp.KIND_FRAME,
                                           timeout_s=self.timeout_s + self.exposure_ms / 1e3)
        return self._count(frame)

    async def expose(self) -> float:
        """Expose once; return (the camera's start time) as soon as the exposure has ended.

        The sensor reads out in the background: the stage may move on at once, and read()
        delivers the pixels, those of where the stage was during the exposure. A connection
        lost between expose() and read() loses the frame: read() raises, retake it."""
        reply = await self._request("EXPOSE", cp.KIND_OK, timeout_s=self.timeout_s + self.exposure_ms / 1e3)
        try:
            return float(reply.meta["timestamp"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(self.name, f"bad EXPOSE reply {reply.meta!r}") from None

    async def read(self) -> Frame:
        """The frame of the last expose(), once read out."""
        async with self._lock:
            if self._writer is None:
                # The stream that carried the exposure broke (out of step, or closed): its frame
                # cannot be trusted to be the one asked for. The caller retakes it.
                raise DeviceDisconnected(self.name, "connection lost since the exposure; its frame is gone",
                                         retryable=True)
            frame: Frame = await self._exchange("READ", cp.KIND_FRAME)
        return self._count(frame)

    @property
    def frames_lost(self) -> int:
        return self._lost.lost

    def _count(self, frame: Frame) -> Frame:
        self._lost.count(frame.frame_id, self.notice)
        return frame

    async def _read_message(self) -> tuple[cp.Header, dict[str, Any], bytes]:
        assert self._reader is not None
        try:
            raw = await self._reader.readexactly(cp.HEADER.size)
            header = cp.unpack_header(raw)
            meta = json.loads(await self._reader.readexactly(header.meta_len))
            payload = await self._reader.readexactly(header.payload_len)
        except asyncio.IncompleteReadError as exc:
            raise DeviceDisconnected(
                self.name, f"connection closed mid-message ({len(exc.partial)} bytes of "
                f"{exc.expected} in the last read)", retryable=True,
            ) from exc
        except (ValueError, json.JSONDecodeError) as exc:
            raise ProtocolError(self.name, f"garbled message: {exc}") from exc
        return header, meta, payload

    async def _request(self, line: str, expect: int, timeout_s: float | None = None) -> Any:
        async with self._lock:
            if self._writer is None:
                if not self._wanted:
                    raise DeviceDisconnected(self.name, "not connected")
                await self._reopen()
            return await self._exchange(line, expect, timeout_s)

    async def _exchange(self, line: str, expect: int, timeout_s: float | None = None) -> Any:
        """One request and its reply on the open connection (the caller holds the lock)."""
        if self._writer is None:
            raise DeviceDisconnected(self.name, "not connected", retryable=True)
        limit = timeout_s or self.timeout_s
        try:
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
            header, meta, payload = await asyncio.wait_for(self._read_message(), limit)
        except TimeoutError:
            # The stream is now out of step: drop it; the next call reconnects.
            await self._drop()
            raise DeviceTimeout(self.name, f"no reply to {line!r} within {limit:g} s", retryable=True) from None
        except (DeviceDisconnected, ProtocolError):
            await self._drop()
            raise
        except (ConnectionError, OSError) as exc:
            await self._drop()
            raise DeviceDisconnected(self.name, f"connection lost: {exc}", retryable=True) from exc
        if header.kind == cp.KIND_ERROR:
            raise DeviceError(self.name, str(meta.get("text", "error")), meta.get("code"))
        if header.kind != expect:
            raise ProtocolError(self.name, f"expected message kind {expect}, got {header.kind} for {line!r}")
        if expect == cp.KIND_FRAME:
            return self._frame(meta, payload)
        return _Reply(meta)

    def _frame(self, meta: dict[str, Any], payload: bytes) -> Frame:
        try:
            shape = tuple(int(s) for s in meta["shape"])
            dtype = np.dtype(meta["dtype"])
            data = np.frombuffer(payload, dtype=dtype)
            if data.size != int(np.prod(shape)):
                raise ValueError(f"payload has {data.size} pixels, shape {shape} needs {int(np.prod(shape))}")
            return Frame(
                data=data.reshape(shape), frame_id=int(meta["frame_id"]),
                timestamp=float(meta["timestamp"]), exposure_ms=float(meta["exposure_ms"]), meta=meta,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(self.name, f"bad frame: {exc}") from exc


@dataclass(frozen=True)
class _Reply:
    meta: dict[str, Any]
