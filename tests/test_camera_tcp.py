"""The camera driver against its emulator over TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from tapescope.hardware import camera_protocol as cp
from tapescope.hardware.camera import Camera
from tapescope.hardware.errors import DeviceDisconnected, DeviceError, ProtocolError
from tapescope.hardware.stage import Stage
from tapescope.sim_hardware.scope import SimulatedScope


async def test_frame_over_tcp(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port, timeout_s=5.0) as cam:
        assert cam.shape == sim.world.p.tile_px
        await cam.set_exposure(10)
        await cam.arm()
        f1 = await cam.trigger()
        f2 = await cam.trigger()
        assert f1.data.dtype == np.uint16 and f1.data.shape == sim.world.p.tile_px
        assert f2.frame_id == f1.frame_id + 1
        assert f1.exposure_ms == 10
        assert f2.timestamp >= f1.timestamp
        # Shot noise: two frames of the same field differ, but not by much.
        assert not np.array_equal(f1.data, f2.data)
        await cam.set_exposure(20)
        f3 = await cam.trigger()
        dark = sim.world.p.dark_offset
        ratio = (f3.data.mean() - dark) / (f1.data.mean() - dark)
        assert ratio == pytest.approx(2.0, rel=0.05)   # signal scales with exposure


async def test_camera_error_reply(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port) as cam:
        with pytest.raises(DeviceError, match="exposure out of range") as info:
            await cam.set_exposure(-5)
        assert info.value.code == 2


@contextlib.asynccontextmanager
async def one_shot_server(reply: bytes):
    """A TCP peer that answers PING correctly, then sends `reply` and hangs up."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(cp.pack(cp.KIND_OK, {"model": "t", "width": 4, "height": 4}))
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_truncated_frame_is_detected() -> None:
    meta = {"frame_id": 1, "timestamp": 0.0, "shape": [4, 4], "dtype": "<u2", "exposure_ms": 1}
    whole = cp.pack(cp.KIND_FRAME, meta, bytes(32))
    async with one_shot_server(whole[:-7]) as port:
        cam = Camera("127.0.0.1", port, timeout_s=2.0)
        await cam.connect()
        with pytest.raises(DeviceDisconnected, match="mid-message"):
            await cam.trigger()
        await cam.close()


async def test_garbled_header_is_a_protocol_error() -> None:
    async with one_shot_server(b"XXXX" + bytes(cp.HEADER.size - 4)) as port:
        cam = Camera("127.0.0.1", port, timeout_s=2.0)
        await cam.connect()
        with pytest.raises(ProtocolError, match="bad magic"):
            await cam.trigger()
        await cam.close()


async def test_expose_then_read_while_the_stage_moves(sim: SimulatedScope) -> None:
    """The split a real camera has: EXPOSE returns when the exposure ends, READ brings the pixels,
    which are those of where the stage was during the exposure, however far it went since."""
    async with Camera("127.0.0.1", sim.camera.port) as cam, Stage(sim.stage.port) as stage:
        await cam.set_exposure(5)
        with pytest.raises(DeviceError, match="no exposure to read") as info:
            await cam.read()
        assert info.value.code == cp.ERR_NOTHING_TO_READ
        still = await cam.trigger()                  # the reference: taken at (0, 0), the stage at rest
        t = await cam.expose()
        assert t >= still.timestamp
        await stage.move_to(20_000, 20_000)          # far away: a different field of view
        frame = await cam.read()
        assert frame.frame_id == still.frame_id + 1 and frame.timestamp == t
        elsewhere = await cam.trigger()
        # Same field as the reference (only shot noise apart), unlike a frame taken where the stage went.
        near = np.abs(frame.data.astype(float) - still.data).mean()
        far = np.abs(elsewhere.data.astype(float) - still.data).mean()
        assert near < 0.6 * far, (near, far)
        with pytest.raises(DeviceError, match="no exposure to read"):
            await cam.read()                         # read once: the buffer is empty again
