"""The column driver against its emulator over a real pseudo-terminal, and what the camera
sees as the column changes: blanking, magnification, focus."""

from __future__ import annotations

import numpy as np
import pytest

from tapescope.hardware import column as proto
from tapescope.hardware.camera import Camera
from tapescope.hardware.column import Column
from tapescope.hardware.errors import DeviceError
from tapescope.hardware.serial_line import SerialLine
from tapescope.sim_hardware.scope import SimulatedScope


async def test_state_and_settings(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=1.0) as col:
        assert col.magnifications == sim.world.p.magnifications
        st = await col.status()
        assert (st.high_tension, st.magnification, st.blanked) == ("ON", sim.world.p.imaging_mag, False)
        assert st.beam_on and st.kv == sim.world.p.ht_kv
        await col.set_magnification(300)
        await col.set_focus(-1234.5)
        await col.blank()
        st = await col.status()
        assert (st.magnification, st.focus_nm, st.blanked, st.beam_on) == (300, -1234.5, True, False)
        assert sim.world.pixel_nm_now() == pytest.approx(sim.world.p.pixel_nm * 16)
        with pytest.raises(DeviceError) as info:
            await col.set_magnification(777)
        assert info.value.code == proto.ERR_BAD_MAG
        with pytest.raises(DeviceError, match="outside"):
            await col.set_focus(5e6)


async def test_bytes_on_the_wire(sim: SimulatedScope) -> None:
    line = SerialLine("column", sim.column.port, timeout_s=1.0, send_eol=b"\n")
    await line.open()
    try:
        assert await line.query("MAG 600") == "OK"
        assert await line.query("MAG?") == "MAG 600"
        assert await line.query("FOCUS 12") == "OK"
        assert await line.query("STATE?") == "STATE ON 120 600 12.0 UNBLANKED"
        assert await line.query("HT OFF") == "OK"
        assert (await line.query("UNBLANK")).startswith(f"ERR {proto.ERR_BEAM_OFF} ")
        assert (await line.query("MAG 601")).startswith(f"ERR {proto.ERR_BAD_MAG} ")
        assert (await line.query("WARP 9")).startswith(f"ERR {proto.ERR_UNKNOWN} ")
    finally:
        await line.close()


async def test_high_tension_ramps(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=1.0, ramp_timeout_s=2.0) as col:
        st = await col.high_tension(False)
        assert st.high_tension == "OFF" and not st.beam_on
        assert (await col.high_tension(True, wait=False)).high_tension == "RAMPING"
        assert (await col.high_tension(True)).high_tension == "ON"


async def _frame(cam: Camera) -> np.ndarray:
    return (await cam.trigger()).data.astype(np.float32)


async def test_blanked_beam_gives_dark_frames(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=1.0) as col, Camera("127.0.0.1", sim.camera.port) as cam:
        await cam.set_exposure(10)
        lit = await _frame(cam)
        await col.blank()
        dark = await _frame(cam)
        p = sim.world.p
        assert lit.mean() > p.dark_offset + 1000
        assert dark.mean() == pytest.approx(p.dark_offset, abs=1.0)
        assert dark.std() == pytest.approx(p.read_noise_counts, rel=0.15)


async def test_overview_mag_shows_the_aperture_and_section(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=1.0) as col, Camera("127.0.0.1", sim.camera.port) as cam:
        await cam.set_exposure(10)
        await col.set_magnification(sim.world.p.imaging_mag / 16)
        img = await _frame(cam)
        p = sim.world.p
        h, w = img.shape
        # Tape (opaque) at the frame's corners, film and tissue in the middle.
        assert img[:4, :4].mean() < p.dark_offset + 50
        assert img[h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4].mean() > p.dark_offset + 1000
        # The aperture's bright area is its known size, in overview pixels.
        lit = (img > p.dark_offset + 500).sum()
        half = sim.world.aperture_half_nm() / sim.world.pixel_nm_now()
        assert lit == pytest.approx(4 * half[0] * half[1], rel=0.1)


async def test_defocus_blurs(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=1.0) as col, Camera("127.0.0.1", sim.camera.port) as cam:
        await cam.set_exposure(50)
        focus = sim.world.true_focus_nm(sim.world.tape.slot)
        sharpness = []
        for offset in (0.0, 2000.0, 6000.0):
            await col.set_focus(focus + offset)
            img = await _frame(cam)
            sharpness.append(float(np.var(np.diff(img, axis=1))))
        assert sharpness[0] > sharpness[1] > sharpness[2]


async def test_scope_from_ports_drives_the_column(sim: SimulatedScope) -> None:
    from tapescope.hardware.scope import Scope

    cfg = sim.scope_config()
    assert cfg.column.url == sim.column.port
    scope = Scope.from_ports(stage_url=cfg.stage.url, tape_url=cfg.tape.url, camera_host="127.0.0.1",
                             camera_port=sim.camera.port, column_url=cfg.column.url, serial_timeout_s=1.0)
    async with scope:
        assert scope.column is not None and scope.column in scope.devices
        assert (await scope.column.status()).beam_on
    assert not scope.camera.connected
    without = Scope.from_ports(stage_url=cfg.stage.url, tape_url=cfg.tape.url, camera_host="127.0.0.1",
                               camera_port=sim.camera.port)
    assert without.column is None and len(without.devices) == 3


async def test_snap_files_the_frame_under_the_stage_position(sim: SimulatedScope) -> None:
    from tapescope.hardware.scope import Scope

    cfg = sim.scope_config()
    async with Scope.from_ports(stage_url=cfg.stage.url, tape_url=cfg.tape.url, camera_host="127.0.0.1",
                                camera_port=sim.camera.port, serial_timeout_s=1.0) as scope:
        await scope.stage.move_to(2500, -1500)
        frame = await scope.snap()
        assert frame.stage_nm == pytest.approx((2500, -1500), abs=1)
