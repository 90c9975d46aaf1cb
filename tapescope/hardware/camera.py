"""Camera driver: the tapescope TCP frame protocol over asyncio streams.

The interface follows ophyd-async's detector split: configure (exposure), arm, trigger
and read are separate, so a vendor-SDK driver can implement the same four calls.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import camera_protocol as cp
from .errors import DeviceDisconnected, DeviceError, DeviceTimeout, ProtocolError


@dataclass
class Frame:
    """One camera frame: uint16 pixels and what the camera says about them."""

    data: np.ndarray
    frame_id: int
    timestamp: float
    exposure_ms: float
    meta: dict[str, Any] = field(default_factory=dict)


class Camera:
    name = "camera"

    def __init__(self, host: str, port: int, *, timeout_s: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.exposure_ms = 0.0
        self.model = ""
        self.shape: tuple[int, int] = (0, 0)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise DeviceDisconnected(self.name, f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        info = await self._request("PING", cp.KIND_OK)
        self.model = str(info.meta.get("model", "?"))
        self.shape = (int(info.meta["height"]), int(info.meta["width"]))

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def set_exposure(self, ms: float) -> None:
        reply = await self._request(f"SET EXPOSURE {ms:g}", cp.KIND_OK)
        self.exposure_ms = float(reply.meta["exposure_ms"])

    async def arm(self) -> None:
        await self._request("ARM", cp.KIND_OK)

    async def trigger(self) -> Frame:
        """Expose once and return the frame (the read is part of the same exchange)."""
        return await self._request("TRIGGER", cp.KIND_FRAME, timeout_s=self.timeout_s + self.exposure_ms / 1e3)

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
                f"{exc.expected} in the last read)"
            ) from exc
        except (ValueError, json.JSONDecodeError) as exc:
            raise ProtocolError(self.name, f"garbled message: {exc}") from exc
        return header, meta, payload

    async def _request(self, line: str, expect: int, timeout_s: float | None = None) -> Any:
        if self._writer is None:
            raise DeviceDisconnected(self.name, "not connected")
        async with self._lock:
            try:
                self._writer.write(line.encode() + b"\n")
                await self._writer.drain()
                header, meta, payload = await asyncio.wait_for(
                    self._read_message(), timeout_s or self.timeout_s
                )
            except TimeoutError:
                # The stream is now out of step: drop it, the caller may reconnect.
                await self.close()
                limit = timeout_s or self.timeout_s
                raise DeviceTimeout(self.name, f"no reply to {line!r} within {limit:g} s") from None
            except (ConnectionError, OSError) as exc:
                await self.close()
                raise DeviceDisconnected(self.name, f"connection lost: {exc}") from exc
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
