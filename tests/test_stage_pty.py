"""The stage driver against its emulator over a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import os

import pytest

from tapescope.hardware.errors import DeviceError, DeviceTimeout
from tapescope.hardware.serial_line import SerialLine
from tapescope.hardware.stage import Stage, StageLimits
from tapescope.sim_hardware.scope import SimulatedScope


async def test_move_and_read_back(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=1.0) as stage:
        await stage.move_to(12_345.0, -6_789.0, wait=False)
        assert await stage.status() == "busy"      # the emulator models travel time
        await stage.wait_settled()
        assert await stage.status() == "idle"
        x, y = await stage.position()
        assert (x, y) == pytest.approx((12_345.0, -6_789.0), abs=1.0)
        # The camera sees the true position, which differs by the repeatability error.
        true_y, true_x = sim.world.stage.true
        assert (true_x, true_y) != (x, y)
        assert abs(true_x - x) < 10 * sim.world.p.stage_error_sigma_nm


async def test_bytes_on_the_wire_are_asi(sim: SimulatedScope) -> None:
    line = SerialLine("stage", sim.stage.port, timeout_s=1.0)
    await line.open()
    try:
        assert await line.query("M X=10.5 Y=-2") == ":A"
        for _ in range(400):                  # the encoder reads its way along while moving
            if await line.query("/") == "N":
                break
            await asyncio.sleep(0.005)
        assert await line.query("W X Y") == ":A 10.50 -2.00"
        assert await line.query("FLY") == ":N-1"
        assert await line.query("M Q=3") == ":N-2"
    finally:
        await line.close()


async def test_device_error_carries_code(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=1.0) as stage:
        with pytest.raises(DeviceError) as info:
            await stage._command("XYZZY")
        assert info.value.code == 1
        assert "unknown command" in str(info.value)


async def test_soft_limits_refuse_before_the_wire(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=1.0, limits=StageLimits(x_nm=(-1000, 1000))) as stage:
        before = sim.stage.commands_seen
        with pytest.raises(DeviceError, match="soft limits"):
            await stage.move_to(5000, 0)
        assert sim.stage.commands_seen == before


async def test_silent_port_times_out() -> None:
    master, slave = os.openpty()  # a pty that nobody answers
    try:
        stage = Stage(os.ttyname(slave), timeout_s=0.2)
        with pytest.raises(DeviceTimeout, match="no complete reply"):
            await stage.connect()
        await stage.close()
    finally:
        os.close(master)
        os.close(slave)


async def test_speed_setting_changes_travel_time(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=1.0) as stage:
        await stage.set_speed(0.5)
        assert await stage.speed() == pytest.approx(0.5)
        slow = sim.world.stage.travel_s(1e6)
        await stage.set_speed(2.0)
        assert sim.world.stage.travel_s(1e6) < slow
        with pytest.raises(DeviceError, match="outside"):
            await stage.set_speed(50)


async def test_relative_move(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=1.0) as stage:
        await stage.move_to(1000, 1000)
        await stage.move_by(-300, 500)
        assert await stage.position() == pytest.approx((700, 1500), abs=1)
