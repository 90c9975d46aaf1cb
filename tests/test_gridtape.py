"""GridTape's reel controller: the comando wire format, the tape camera's barcodes, the driver
against the firmware emulator over a pseudo-terminal, and a whole run on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tapescope.acquisition.events import Alarm, Event, EventBus
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.hardware import comando
from tapescope.hardware import gridtape as fw
from tapescope.hardware.barcode_camera import BarcodeCamera, TapeView, sight
from tapescope.hardware.errors import DeviceError, DeviceTimeout
from tapescope.hardware.gridtape import GridTape
from tapescope.hardware.tape import ERR_JAMMED
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.gridtape import GridTapeEmulator
from tapescope.sim_hardware.tape_camera import TapeCameraEmulator, render_tape
from tapescope.sim_hardware.world import SimWorld, WorldParams

# -- the wire format, from comando's documentation -----------------------------------------------


def test_a_command_frame_is_length_payload_checksum() -> None:
    # ping(42) on the command protocol: [3][1, 1, 42][44]
    assert comando.command(fw.CMD_PING, "byte", 42) == bytes([3, 1, 1, 42, 44])
    # arguments are little-endian C types: int32 1, float 1.0, uint16 256
    assert comando.pack_args("int32 float uint16", 1, 1.0, 256) == b"\x01\x00\x00\x00\x00\x00\x80?\x00\x01"
    msg = comando.command(fw.CMD_STEP_TAPE, "byte uint32 uint32 float byte", 0, 2194, 2194, 0.3, 6)
    assert msg[0] == len(msg) - 2 and msg[-1] == sum(msg[1:-1]) % 256
    cmd = comando.parse_payload(msg[1:-1])
    assert (cmd.protocol, cmd.cid) == (comando.COMMAND_PROTOCOL, fw.CMD_STEP_TAPE)
    d, f, p, t, o = cmd.values("byte uint32 uint32 float byte")
    assert (d, f, p, o) == (0, 2194, 2194, 6) and t == pytest.approx(0.3)
    with pytest.raises(comando.ComandoError, match="missing"):
        cmd.take("byte")


def test_the_deframer_resyncs_after_line_noise_and_joins_split_frames() -> None:
    good = comando.command(fw.CMD_READ_TENSION, "int32", 8_465_000)
    d = comando.Deframer()
    noise = bytes([200, 3, 9, 9, 9, 0])    # a length beyond any message, a frame failing its checksum
    assert d.feed(noise + good[:3]) == []
    got = d.feed(good[3:])
    assert got == [good[1:-1]] and d.skipped >= 1
    assert comando.parse_payload(got[0]).take("int32") == 8_465_000


# -- the tape camera -----------------------------------------------------------------------------


@pytest.mark.parametrize("tape_mm", [0.0, 6.31, 11.62, 17.95, 24.4])
def test_the_tape_camera_reads_the_slot_and_its_offset(tape_mm: float) -> None:
    world = SimWorld(WorldParams(n_slots=8))
    try:
        emu = GridTapeEmulator(world)
        emu.model.tape_mm = tape_mm
        view = TapeView()
        seen = sight(render_tape(emu.model, view, seed=int(tape_mm * 10)), view)
        slot = round(tape_mm / emu.model.pitch_mm)
        assert seen.slot == slot and seen.code == f"{slot:06d}"
        assert seen.offset_mm == pytest.approx(slot * emu.model.pitch_mm - tape_mm, abs=0.02)
    finally:
        world.close()


def test_a_frame_without_a_label_over_the_aperture_is_an_error() -> None:
    view = TapeView()
    blank = np.full((200, 640), 2400, np.uint16)
    with pytest.raises(DeviceError, match="no slot aperture"):
        sight(blank, view)
    blank[120:180, 280:360] = 200          # an aperture, no barcode
    with pytest.raises(DeviceError, match="no readable barcode"):
        sight(blank, view)


# -- the driver against the emulated firmware ----------------------------------------------------


class Bench:
    def __init__(self, world: SimWorld, emu: GridTapeEmulator, cam: TapeCameraEmulator, tape: GridTape) -> None:
        self.world, self.emu, self.cam, self.tape = world, emu, cam, tape
        self.notices: list[str] = []
        tape.on_notice = lambda _dev, msg: self.notices.append(msg)

    def centred_at(self, slot: int) -> bool:
        m = self.emu.model
        return abs(m.tape_mm - slot * m.pitch_mm) <= self.tape.centre_tolerance_mm


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    world = SimWorld(WorldParams(n_slots=8))
    emu = GridTapeEmulator(world)
    await emu.start()
    cam = TapeCameraEmulator(emu.model)
    await cam.start()
    emu.model.tape_mm = 0.4                  # loaded a little off centre
    tape = GridTape(emu.port, BarcodeCamera.on_frame_protocol("127.0.0.1", cam.port), slots=8, timeout_s=1.0)
    try:
        await tape.connect()
        yield Bench(world, emu, cam, tape)
    finally:
        await tape.close()
        await cam.stop()
        await emu.stop()
        world.close()


async def test_goto_centres_each_slot_by_its_barcode(bench: Bench) -> None:
    assert (await bench.tape.state()).slot == 0
    for slot in (1, 2, 5, 3):
        st = await bench.tape.goto(slot)
        assert (st.state, st.slot) == ("IDLE", slot)
        assert bench.centred_at(slot), bench.emu.model.tape_mm
        assert bench.world.tape.beam_slot == slot
        assert await bench.tape.barcode() == (slot, f"{slot:06d}")
    assert await bench.tape.tension() == pytest.approx(bench.world.p.tape_tension_g)
    assert "step_tape" in bench.emu.commands and "set_tension_limits" in bench.emu.commands


async def test_a_slip_is_seen_by_the_tape_camera_and_corrected(bench: Bench) -> None:
    bench.world.inject("tape_slip", slots=1, at_slot=2)
    st = await bench.tape.goto(2)
    assert st.slot == 2 and bench.centred_at(2)
    assert bench.world.faults.fired and bench.world.faults.fired[-1][1] == "tape_slip"
    assert any("sees slot 3" in n and "slipped" in n for n in bench.notices), bench.notices


async def test_a_jam_trips_the_tension_watch_and_clears_with_a_drive_reset(bench: Bench) -> None:
    await bench.tape.goto(1)
    bench.world.inject("tape_jam")
    with pytest.raises(DeviceError, match=r"jammed.*error 20.*stall") as info:
        await bench.tape.goto(2)
    assert info.value.code == ERR_JAMMED
    assert (await bench.tape.state()).state == "JAMMED"
    assert bench.emu.model.tape_mm == pytest.approx(6.0, abs=0.06)      # the tape did not move
    with pytest.raises(DeviceError, match="jammed"):
        await bench.tape.goto(2)                                         # not before it is cleared
    st = await bench.tape.clear_jam()
    assert st.state == "IDLE" and st.slot == 1
    await bench.tape.goto(2)
    assert bench.centred_at(2)


async def test_slack_tape_is_tensioned_before_a_move(bench: Bench) -> None:
    bench.world.inject("tape_slack")
    assert await bench.tape.tension() < 30
    await bench.tape.goto(3)
    assert bench.centred_at(3)
    assert any("slack" in n for n in bench.notices)
    assert await bench.tape.tension() == pytest.approx(bench.world.p.tape_tension_g)


async def test_controller_errors_and_line_noise_are_named(bench: Bench) -> None:
    with pytest.raises(DeviceError, match="error 10: invalid drive"):
        await bench.tape.drive_status(7)
    status = await bench.tape.drive_status(fw.FEED_PINCH)
    assert fw.status_faults(status) == []
    bench.world.inject("tape_garbled", on="read_tension")
    with pytest.raises(DeviceTimeout, match="no valid message"):
        await bench.tape.tension()
    assert await bench.tape.ping(9) == 9                                # the link resynced


async def test_a_fault_on_a_waited_step_falls_on_its_reply(bench: Bench) -> None:
    """A waited step_tape answers when the move ends: a garbled-reply fault armed on it must
    scramble that answer (not an empty first one), and the command is counted once."""
    await bench.tape.goto(1)
    steps = list(bench.emu.commands).count("step_tape")
    bench.world.inject("tape_garbled", on="step_tape")
    with pytest.raises(DeviceTimeout, match="no valid message"):
        await bench.tape.goto(2)
    assert bench.world.faults.fired and bench.world.faults.fired[-1][1] == "tape_garbled"
    assert list(bench.emu.commands).count("step_tape") == steps + 1
    assert not any(c.endswith(" done") for c in bench.emu.commands)      # one command, one count
    assert await bench.tape.ping(4) == 4                                # the link resynced


# -- a whole run ---------------------------------------------------------------------------------


async def test_a_run_on_the_gridtape_controller_images_every_slot(tmp_path: Path) -> None:
    cfg = parse_config({"run": {"slots": [0, 1, 2], "grid": [2, 2]}, "scope": {"tape": {"driver": "gridtape"}}})
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    sims = []

    def slip(sim) -> None:
        sims.append(sim)
        sim.world.inject("tape_slip", slots=1, at_slot=1)

    result = await run_acquisition(cfg, tmp_path / "run", bus, on_sim=slip)
    assert result.summary.state.value == "done", result.summary.reason
    assert isinstance(sims[0].tape, GridTapeEmulator)
    done = [e for e in RunStore(tmp_path / "run").events() if e["event"] == "section_done"]
    assert sorted(e["slot"] for e in done) == [0, 1, 2]
    barcodes = {e["slot"]: e["barcode"] for e in RunStore(tmp_path / "run").events() if e.get("barcode")}
    assert barcodes == {0: "000000", 1: "000001", 2: "000002"}
    # The driver's own correction reached a person as an alarm.
    assert any(isinstance(e, Alarm) and e.source == "tape" and "slipped" in e.message for e in events)


async def test_a_jam_in_a_run_is_cleared_by_the_engine_and_the_run_finishes(tmp_path: Path) -> None:
    """The firmware halts every drive on the jam (nothing holds the tape: the load cell reads
    slack); the engine's reconnect tensions it again and its CLEAR resets the drives."""
    cfg = parse_config({"run": {"slots": [0, 1], "grid": [2, 2], "retry_window_s": 1.0},
                        "scope": {"tape": {"driver": "gridtape"}}})
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    result = await run_acquisition(cfg, tmp_path / "run", bus, on_sim=lambda sim: sim.world.inject("tape_jam"))
    assert result.summary.state.value == "done", result.summary.reason
    said = [e.message for e in events if isinstance(e, Alarm) and e.source == "tape"]
    assert any("error 20" in m and "stall" in m for m in said), said
    assert any("sent CLEAR" in m for m in said), said


def test_gridtape_settings_that_cannot_work_are_refused() -> None:
    from tapescope.config import ConfigError

    with pytest.raises(ConfigError, match="slots"):
        parse_config({"scope": {"tape": {"driver": "gridtape", "url": "/dev/ttyACM0"}}})
    with pytest.raises(ConfigError, match="device"):
        parse_config({"scope": {"tape": {"driver": "gridtape", "camera": {"driver": "genicam"}}}})
    with pytest.raises(ConfigError, match="tension_low_g"):
        parse_config({"scope": {"tape": {"tension_low_g": 200.0}}})
