"""Every simulated fault, over the real transports: the driver's error, and recovery where
the fault is one a driver or an operator can recover from."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tapescope.hardware import tape as tape_proto
from tapescope.hardware.camera import Camera
from tapescope.hardware.column import Column
from tapescope.hardware.errors import DeviceDisconnected, DeviceError, DeviceTimeout, ProtocolError
from tapescope.hardware.stage import Stage
from tapescope.hardware.tape import Tape
from tapescope.sim_hardware.faults import FaultBook, FaultError, parse_fault_spec
from tapescope.sim_hardware.scope import SimulatedScope


def moves(sim: SimulatedScope) -> list[str]:
    return [c for c in sim.stage.commands if c.startswith("M ")]


async def test_lost_move_reply_is_confirmed_not_resent(sim: SimulatedScope, caplog) -> None:
    async with Stage(sim.stage.port, timeout_s=0.5) as stage:
        sim.inject("stage_timeout", on="M")
        with caplog.at_level(logging.WARNING):
            await stage.move_to(3000, 4000)
        assert len(moves(sim)) == 1                 # sent once, never blindly again
        assert await stage.position() == pytest.approx((3000, 4000), abs=1)
        assert "took effect" in caplog.text


async def test_lost_move_command_raises_retryable_then_recovers(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=0.5) as stage:
        sim.inject("stage_timeout", on="M", executed=False)
        with pytest.raises(DeviceTimeout, match="did not take effect") as info:
            await stage.move_to(3000, 4000)
        assert info.value.retryable
        assert await stage.position() == pytest.approx((0, 0), abs=1)
        await stage.move_to(3000, 4000)             # the caller's retry
        assert await stage.position() == pytest.approx((3000, 4000), abs=1)


async def test_garbled_stage_reply(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=0.5) as stage:
        sim.inject("stage_garbled", on="W")
        with pytest.raises(ProtocolError, match="undecodable"):
            await stage.position()
        assert await stage.position() == pytest.approx((0, 0), abs=1)


async def test_stage_stall_halts_and_reports_where(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=0.5, settle_timeout_s=0.3) as stage:
        sim.inject("stage_stall")
        with pytest.raises(DeviceTimeout, match="halted at") as info:
            await stage.move_to(100_000, 0)
        assert info.value.retryable
        assert await stage.status() == "idle"
        x, _ = await stage.position()
        assert 0 < x < 100_000                      # it stopped on the way
        assert any(c == "HALT" for c in sim.stage.commands)
        await stage.move_to(100_000, 0)
        assert (await stage.position())[0] == pytest.approx(100_000, abs=1)


async def test_stage_limit_hit_is_an_error(sim: SimulatedScope) -> None:
    async with Stage(sim.stage.port, timeout_s=0.5) as stage:
        sim.inject("stage_limit")
        with pytest.raises(DeviceError, match="short of the target") as info:
            await stage.move_to(200_000, 0)
        assert not info.value.retryable


async def test_lost_tape_reply_is_confirmed(sim: SimulatedScope) -> None:
    async with Tape(sim.tape.port, timeout_s=0.5) as tape:
        sim.inject("tape_timeout", on="GOTO")
        st = await tape.goto(3)
        assert (st.state, st.slot) == ("IDLE", 3)
        assert [c for c in sim.tape.commands if c.startswith("GOTO")] == ["GOTO 3"]


async def test_garbled_tape_reply(sim: SimulatedScope) -> None:
    async with Tape(sim.tape.port, timeout_s=0.5) as tape:
        sim.inject("tape_garbled", on="BARCODE?")
        with pytest.raises(ProtocolError):
            await tape.barcode()
        assert await tape.barcode() == (0, sim.world.barcodes[0])


async def test_tape_jam_that_clears_itself(sim: SimulatedScope) -> None:
    async with Tape(sim.tape.port, timeout_s=0.5, jam_grace_s=1.0) as tape:
        sim.inject("tape_jam", clears_after=3)
        assert (await tape.goto(2)).slot == 2


async def test_tape_jam_needs_clearing(sim: SimulatedScope) -> None:
    async with Tape(sim.tape.port, timeout_s=0.5, jam_grace_s=0.05) as tape:
        sim.inject("tape_jam")
        with pytest.raises(DeviceError, match="jammed") as info:
            await tape.goto(2)
        assert info.value.code == tape_proto.ERR_JAMMED
        assert await tape.tension() == 0.0
        with pytest.raises(DeviceError) as info:
            await tape.barcode()                    # nothing to read while jammed
        assert info.value.code == tape_proto.ERR_NO_BARCODE
        assert (await tape.clear_jam()).state == "IDLE"
        assert (await tape.goto(2)).slot == 2
        assert await tape.tension() == sim.world.p.tape_tension_g


async def test_column_lost_and_garbled_replies(sim: SimulatedScope) -> None:
    async with Column(sim.column.port, timeout_s=0.5) as col:
        sim.inject("column_timeout", on="MAG")
        await col.set_magnification(600)            # confirmed by STATE?
        assert (await col.status()).magnification == 600
        sim.inject("column_garbled", on="STATE?")
        with pytest.raises(ProtocolError):
            await col.status()
        assert (await col.status()).magnification == 600


async def test_beam_trip_darkens_frames_until_recovered(sim: SimulatedScope) -> None:
    async with (Column(sim.column.port, timeout_s=0.5, ramp_timeout_s=2.0) as col,
                Camera("127.0.0.1", sim.camera.port) as cam):
        await cam.set_exposure(10)
        dark = sim.world.p.dark_offset
        sim.inject("beam_trip")
        tripped = (await cam.trigger()).data
        assert tripped.mean() == pytest.approx(dark, abs=1.0)
        st = await col.status()
        assert st.high_tension == "TRIPPED" and not st.beam_on
        with pytest.raises(DeviceError):
            await col.unblank()
        assert (await col.ensure_beam()).beam_on
        assert (await cam.trigger()).data.mean() > dark + 1000


async def test_dropped_frame_times_out_then_recovers(sim: SimulatedScope, caplog) -> None:
    async with Camera("127.0.0.1", sim.camera.port, timeout_s=1.0) as cam:
        await cam.set_exposure(5)
        first = await cam.trigger()
        sim.inject("frame_drop")
        with pytest.raises(DeviceTimeout) as info:
            await cam.trigger()
        assert info.value.retryable
        with caplog.at_level(logging.WARNING):
            again = await cam.trigger()             # reconnects and goes on
        assert again.frame_id == first.frame_id + 2
        assert cam.frames_lost == 1 and cam.reconnects == 1
        assert "1 frame(s) lost" in caplog.text
        assert cam.exposure_ms == 5 and again.exposure_ms == 5


async def test_truncated_frame_then_reconnect(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port, timeout_s=2.0) as cam:
        sim.inject("frame_truncated")
        with pytest.raises(DeviceDisconnected, match="mid-message") as info:
            await cam.trigger()
        assert info.value.retryable
        frame = await cam.trigger()
        assert frame.data.shape == sim.world.p.tile_px
        assert sim.camera.connections == 2


async def test_camera_disconnect_and_reconnect(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port, timeout_s=1.0, reconnect_timeout_s=3.0) as cam:
        await cam.set_exposure(7)
        sim.inject("camera_disconnect", down_s=0.3)
        with pytest.raises(DeviceDisconnected):
            await cam.trigger()
        frame = await cam.trigger()                # waits out the outage, restores settings
        assert frame.exposure_ms == 7 and cam.reconnects == 1
        assert sim.camera.exposure_ms == 7


async def test_closed_camera_does_not_reconnect(sim: SimulatedScope) -> None:
    cam = Camera("127.0.0.1", sim.camera.port)
    await cam.connect()
    await cam.close()
    with pytest.raises(DeviceDisconnected, match="not connected"):
        await cam.trigger()
    assert sim.camera.connections == 1


async def test_after_skips_opportunities(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port) as cam:
        await cam.set_exposure(5)
        sim.inject("beam_trip", after=2)
        means = [float(np.mean((await cam.trigger()).data)) for _ in range(3)]
        dark = sim.world.p.dark_offset
        assert means[0] > dark + 500 and means[1] > dark + 500
        assert means[2] == pytest.approx(dark, abs=1.0)
        assert [name for _, name in sim.world.faults.fired] == ["beam_trip"]


def test_bad_fault_requests_are_refused() -> None:
    book = FaultBook()
    with pytest.raises(FaultError, match="unknown fault 'stage_melt'"):
        book.inject("stage_melt")
    with pytest.raises(FaultError, match="unknown option"):
        book.inject("tape_jam", clear_after=3)
    with pytest.raises(FaultError, match="must be int"):
        book.inject("tape_jam", clears_after="soon")
    with pytest.raises(FaultError, match="count"):
        book.inject("frame_drop", count=0)
    assert book.armed() == {}


def test_fault_specs_from_the_command_line() -> None:
    assert parse_fault_spec("stage_timeout") == ("stage_timeout", 1, 0, {})
    assert parse_fault_spec("tape_jam:2,clears_after=3,after=1") == ("tape_jam", 2, 1, {"clears_after": 3})
    assert parse_fault_spec("stage_timeout,on=M,executed=false") == (
        "stage_timeout", 1, 0, {"on": "M", "executed": False})
    with pytest.raises(FaultError, match="not an integer"):
        parse_fault_spec("frame_drop:x")
    with pytest.raises(FaultError, match="key=value"):
        parse_fault_spec("frame_drop,oops")


def test_lost_frames_are_counted_from_id_gaps_with_each_cameras_rule() -> None:
    from tapescope.hardware.camera import LostFrames
    from tapescope.hardware.genicam_camera import frames_between

    notices: list[str] = []
    plain = LostFrames()
    for frame_id in (1, 2, 5, 6):
        plain.count(frame_id, notices.append)
    assert plain.lost == 2 and notices == ["2 frame(s) lost before frame 5"]
    wrapping = LostFrames(frames_between)             # GenICam block ids: ..., 65535, 1, 2, ...
    for frame_id in (65534, 65535, 1, 3):
        wrapping.count(frame_id, notices.append)
    assert wrapping.lost == 1
    wrapping.restart()                                # a new stream starts its ids again
    wrapping.count(1, notices.append)
    assert wrapping.lost == 1 and len(notices) == 2
