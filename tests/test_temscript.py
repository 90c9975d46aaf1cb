"""The column driver against temscript's own server (`temscript-server --null`: the HTTP
API of Thermo Fisher / FEI TEM scripting, backed by temscript's NullMicroscope), started
on 127.0.0.1 by the tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tapescope.acquisition.events import Alarm, Event, EventBus
from tapescope.config import parse_config
from tapescope.hardware.errors import DeviceError
from tapescope.hardware.stage import StageLimits
from tapescope.hardware.temscript_column import TemscriptColumn
from tapescope.hardware.temscript_stage import TemscriptStage
from tapescope.mqtt.broker import free_port
from tapescope.runner import run_acquisition

pytest.importorskip("temscript")


async def test_the_driver_reads_and_sets_the_column(temscript_url: str) -> None:
    col = TemscriptColumn(temscript_url)
    async with col:
        st = await col.status()
        assert st.high_tension == "ON" and st.kv == 200.0 and col.family
        await col.set_focus(-750.0)
        await col.set_magnification(50_000.0)
        st = await col.status()
        assert st.focus_nm == pytest.approx(-750.0) and st.magnification == 50_000.0
        await col.blank()
        assert (await col.status()).blanked
        st = await col.ensure_beam()          # opens the column valves, unblanks
        assert st.beam_on
        with pytest.raises(DeviceError, match="switch it off at the microscope"):
            await col.high_tension(False)
        with pytest.raises(DeviceError, match="no magnification index shows 123"):
            await col.set_magnification(123.0)
        assert (await col.status()).magnification == 50_000.0      # left where it was


async def test_a_run_uses_the_tem_through_temscript(temscript_url: str, tmp_path: Path) -> None:
    """Stage, tape and camera simulated; the column is the TEM behind temscript. Before each
    section the engine asks it for its beam: the null microscope starts with its column
    valves closed, so the first check restores the beam, with an alarm."""
    cfg = parse_config({"scope": {"camera": {"width": 128, "height": 128}, "column": {"url": temscript_url}},
                        "run": {"slots": [0, 1], "grid": [1, 2], "exposure_ms": 2.0},
                        "processing": {"enabled": False}})
    async with TemscriptColumn(temscript_url) as col:       # as a fresh null microscope: valves closed
        await col._put("column_valves_open", False)
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    result = await run_acquisition(cfg, tmp_path / "run", bus)
    assert result.summary.state.value == "done", result.summary.reason
    assert any(isinstance(e, Alarm) and e.source == "column" and "no beam before the section" in e.message
               for e in events)
    async with TemscriptColumn(temscript_url) as col:
        assert (await col.status()).beam_on


async def test_a_tem_that_does_not_answer_is_a_clear_error() -> None:
    col = TemscriptColumn(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    with pytest.raises(DeviceError, match=r"no answer from http://127\.0\.0\.1"):
        await asyncio.wait_for(col.connect(), 10)


async def test_a_tem_that_accepts_but_never_answers_is_a_timeout_not_a_crash() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)            # takes the request, says nothing, keeps the line open
        await done.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DeviceError, match="no answer"):
            await asyncio.wait_for(TemscriptColumn(f"http://127.0.0.1:{port}", timeout_s=0.5).connect(), 10)
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_the_goniometer_moves_through_temscript(temscript_url: str) -> None:
    """The stage driver for the TEM's own goniometer, against the null microscope: metres on
    the wire, nanometres in tapescope, limits the narrower of the travel and the TEM's."""
    async with TemscriptStage(temscript_url, limits=StageLimits.centred((5e6, 5e6))) as stage:
        assert stage.limits.x_nm == pytest.approx((-1e6, 1e6))      # the null TEM's +-1 mm
        assert stage.holder == "SINGLE_TILT"
        await stage.move_to(12_000.0, -3_500.0)
        assert await stage.position() == pytest.approx((12_000.0, -3_500.0), abs=1.0)
        await stage.move_by(-2_000.0, 500.0)
        assert await stage.position() == pytest.approx((10_000.0, -3_000.0), abs=1.0)
        with pytest.raises(DeviceError, match="outside the limits"):
            await stage.move_to(2e6, 0.0)
        assert await stage.position() == pytest.approx((10_000.0, -3_000.0), abs=1.0)
        assert await stage.status() == "idle"


async def test_a_tem_answering_500_is_an_error_naming_the_code() -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 20\r\n\r\nCOM error 0x80004005")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DeviceError, match="answered 500: COM error") as info:
            await asyncio.wait_for(TemscriptStage(f"http://127.0.0.1:{port}", timeout_s=2.0).connect(), 10)
        assert info.value.code == 500
    finally:
        server.close()
        await server.wait_closed()
