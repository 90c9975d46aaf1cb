"""Camera emulator: the tapescope TCP frame protocol on 127.0.0.1, asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import numpy as np

from tapescope.hardware import camera_protocol as cp

from .world import SimWorld

BINNINGS = (1, 2, 4, 8)


EIGHT_BIT_STEP = 64.0     # 16-bit counts per 8-bit count of a simulated 8-bit camera


class CameraEmulator:
    model = "tapescope-sim-cam"

    def __init__(self, world: SimWorld, host: str = "127.0.0.1", bit_depth: int = 16) -> None:
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
        self.world = world
        self.bit_depth = bit_depth
        self.faults = world.faults          # the camera faults this camera takes
        self.host = host
        self.port = 0
        self.exposure_ms = 10.0
        self.binning = 1
        h, w = world.p.tile_px
        self.roi = (0, 0, w, h)             # x, y, width, height in sensor pixels
        self.connections = 0                # accepted and served, for tests and people
        self._refuse_until = 0.0
        # The last EXPOSE's readout (rendered in a thread) and the time its exposure began.
        self._readout: asyncio.Task[np.ndarray] | None = None
        self._readout_t0 = 0.0
        self._server: asyncio.base_events.Server | None = None
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._clients):
                t.cancel()
            for t in list(self._clients):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self._server.wait_closed()
            self._server = None
        await self._discard_readout()

    async def _discard_readout(self) -> None:
        task, self._readout = self._readout, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if time.monotonic() < self._refuse_until:
            writer.close()               # the camera is "rebooting": accept, then hang up
            return
        self._clients[task] = writer
        self.connections += 1
        try:
            while line := await reader.readline():
                opts = self.faults.take("camera_disconnect")
                if opts is not None:
                    self._refuse_until = time.monotonic() + float(opts.get("down_s", 0.5))
                    break
                reply = await self.handle(line.decode("ascii", "replace").strip())
                if reply is None:
                    continue
                if isinstance(reply, _Truncated):
                    writer.write(reply.data)
                    await writer.drain()
                    break
                writer.writelines(reply if isinstance(reply, list) else [reply])
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()

    @property
    def frame_id(self) -> int:
        return self.world.frame_id

    def _sensor_shape(self) -> tuple[int, int]:
        return self.world.p.tile_px

    def _status(self) -> dict:
        return {"exposure_ms": self.exposure_ms, "binning": self.binning, "roi": list(self.roi),
                "frame_id": self.frame_id}

    async def handle(self, line: str) -> bytes | list | _Truncated | None:
        words = line.split()
        h, w = self._sensor_shape()
        match [x.upper() for x in words]:
            case ["PING"]:
                return cp.pack(cp.KIND_OK, {"model": self.model, "width": w, "height": h})
            case ["STATUS"]:
                return cp.pack(cp.KIND_OK, self._status())
            case ["SET", "EXPOSURE", ms]:
                try:
                    value = float(ms)
                except ValueError:
                    value = -1.0
                if not 0 < value <= 10_000:
                    return cp.pack(cp.KIND_ERROR, {"code": 2, "text": f"exposure out of range: {ms}"})
                self.exposure_ms = value
                return cp.pack(cp.KIND_OK, {"exposure_ms": value})
            case ["SET", "BINNING", b]:
                if not b.isdigit() or int(b) not in BINNINGS:
                    return cp.pack(cp.KIND_ERROR, {"code": 2, "text": f"binning must be one of {BINNINGS}: {b}"})
                rx, ry, rw, rh = self.roi
                if rw % int(b) or rh % int(b):
                    return cp.pack(cp.KIND_ERROR, {"code": 3, "text": f"roi {self.roi} is not a multiple of {b}"})
                self.binning = int(b)
                return cp.pack(cp.KIND_OK, {"binning": self.binning})
            case ["SET", "ROI", "FULL"]:
                self.roi = (0, 0, w, h)
                return cp.pack(cp.KIND_OK, {"roi": list(self.roi)})
            case ["SET", "ROI", *vals] if len(vals) == 4:
                try:
                    rx, ry, rw, rh = (int(v) for v in vals)
                except ValueError:
                    return cp.pack(cp.KIND_ERROR, {"code": 2, "text": f"roi must be 4 integers: {vals}"})
                b = self.binning
                if rx < 0 or ry < 0 or rw < b or rh < b or rx + rw > w or ry + rh > h or rw % b or rh % b:
                    return cp.pack(cp.KIND_ERROR, {"code": 3, "text": f"roi {vals} outside the {w}x{h} sensor "
                                                   f"or not a multiple of binning {b}"})
                self.roi = (rx, ry, rw, rh)
                return cp.pack(cp.KIND_OK, {"roi": list(self.roi)})
            case ["ARM"]:
                return cp.pack(cp.KIND_OK, {})
            case ["TRIGGER"]:
                return await self._trigger()
            case ["EXPOSE"]:
                return await self._expose()
            case ["READ"]:
                return await self._read()
        return cp.pack(cp.KIND_ERROR, {"code": 1, "text": f"unknown command {line!r}"})

    def _render(self, stage_nm: np.ndarray | None = None) -> Awaitable[np.ndarray]:
        rx, ry, rw, rh = self.roi
        # Rendering takes milliseconds to a second: keep the loop (and the pty peers) live.
        return asyncio.to_thread(self.world.expose, self.exposure_ms, binning=self.binning,
                                 roi=(ry, rx, rh, rw), stage_nm=stage_nm)

    async def _trigger(self) -> list | _Truncated | None:
        t0 = time.time()
        await asyncio.sleep(self.exposure_ms / 1e3)
        return self._frame_reply(await self._render(), t0)

    async def _expose(self) -> bytes:
        """Expose, reply as soon as the exposure ends; read out in the background. The pixels
        are those of where the stage was during the exposure, wherever it goes next."""
        t0 = time.time()
        await asyncio.sleep(self.exposure_ms / 1e3)
        # An unread frame is overwritten, as a camera's single frame buffer does; its frame id
        # is then a gap that the driver counts as lost.
        await self._discard_readout()
        self._readout = asyncio.create_task(self._render(self.world.stage.true.copy()))
        self._readout_t0 = t0
        return cp.pack(cp.KIND_OK, {"timestamp": t0, "exposure_ms": self.exposure_ms})

    async def _read(self) -> list | bytes | _Truncated | None:
        task = self._readout
        if task is None:
            return cp.pack(cp.KIND_ERROR, {"code": cp.ERR_NOTHING_TO_READ, "text": "no exposure to read"})
        img = await asyncio.shield(task)   # a dropped connection leaves the readout to stop()
        self._readout = None
        return self._frame_reply(img, self._readout_t0)

    def _frame_reply(self, img: np.ndarray, t0: float) -> list | _Truncated | None:
        faults = self.faults
        if faults.take("frame_drop") is not None:
            return None          # exposed (the frame id moved on) but never sent
        if self.bit_depth == 8:
            # The same sensor read by an 8-bit converter whose full scale is 2^14 counts: the
            # film (~8000 counts at the default exposure) sits near half scale, as a person
            # sets an 8-bit camera up, not at 1/8 of it.
            img = np.clip(np.rint(np.asarray(img, np.float32) / EIGHT_BIT_STEP), 0, 255).astype(np.uint8)
        dtype = "|u1" if self.bit_depth == 8 else "<u2"
        meta = {
            "frame_id": self.frame_id, "timestamp": t0, "shape": list(img.shape),
            "dtype": dtype, "exposure_ms": self.exposure_ms, "binning": self.binning,
            "roi": list(self.roi),
        }
        payload = memoryview(np.ascontiguousarray(img, dtype=dtype)).cast("B")
        head = cp.pack_head(cp.KIND_FRAME, meta, len(payload))
        if faults.take("frame_truncated") is not None:
            return _Truncated(head + bytes(payload[: len(payload) // 2]))
        return [head, payload]


class _Truncated:
    """Part of a message, after which the emulator hangs up."""

    def __init__(self, data: bytes) -> None:
        self.data = data
