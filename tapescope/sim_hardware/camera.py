"""Camera emulator: the tapescope TCP frame protocol on 127.0.0.1, asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tapescope.hardware import camera_protocol as cp

from .world import SimWorld


class CameraEmulator:
    model = "tapescope-sim-cam"

    def __init__(self, world: SimWorld, host: str = "127.0.0.1") -> None:
        self.world = world
        self.host = host
        self.port = 0
        self.exposure_ms = 10.0
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while line := await reader.readline():
                writer.write(await self.handle(line.decode("ascii", "replace").strip()))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def handle(self, line: str) -> bytes:
        words = line.split()
        h, w = self.world.p.tile_px
        match [x.upper() for x in words]:
            case ["PING"]:
                return cp.pack(cp.KIND_OK, {"model": self.model, "width": w, "height": h})
            case ["SET", "EXPOSURE", ms]:
                try:
                    value = float(ms)
                except ValueError:
                    value = -1.0
                if not 0 < value <= 10_000:
                    return cp.pack(cp.KIND_ERROR, {"code": 2, "text": f"exposure out of range: {ms}"})
                self.exposure_ms = value
                return cp.pack(cp.KIND_OK, {"exposure_ms": value})
            case ["ARM"]:
                return cp.pack(cp.KIND_OK, {})
            case ["TRIGGER"]:
                t0 = time.time()
                await asyncio.sleep(self.exposure_ms / 1e3)
                # Rendering takes milliseconds to a second: keep the loop (and the pty peers) live.
                img = await asyncio.to_thread(self.world.expose, self.exposure_ms)
                meta = {
                    "frame_id": self.world.frame_id, "timestamp": t0, "shape": list(img.shape),
                    "dtype": "<u2", "exposure_ms": self.exposure_ms,
                }
                return cp.pack(cp.KIND_FRAME, meta, img.astype("<u2").tobytes())
        return cp.pack(cp.KIND_ERROR, {"code": 1, "text": f"unknown command {line!r}"})
