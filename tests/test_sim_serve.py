"""`tapescope sim serve` as its own process, and `tapescope demo` run against it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tapescope.config import load_config

CLI = [sys.executable, "-m", "tapescope.cli"]


def test_demo_against_a_separate_simulator(tmp_path: Path, sim_server: Callable[..., Any]) -> None:
    # Two lost replies to stage moves on the way: the run must not notice beyond a warning.
    server = sim_server("--fault", "stage_timeout:2,on=M")
    printed = server.tables
    try:
        cfg_file = tmp_path / "scope.toml"
        cfg_file.write_text('[scope]\nname = "sim-over-the-wire"\n\n' + printed)
        cfg = load_config(cfg_file)
        assert not cfg.scope.simulated and cfg.scope.column.url
        r = subprocess.run([*CLI, "demo", "--config", str(cfg_file), "--out", str(tmp_path / "out"),
                            "--sections", "2", "--grid", "2", "2"], capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sections 2, tiles 8" in r.stdout
    finally:
        out = server.stop()
    # The lost move replies were confirmed by re-query, not re-sent, and the run went on.
    assert "faults fired: stage_timeout, stage_timeout" in out


def test_bad_fault_flag_is_refused() -> None:
    r = subprocess.run([*CLI, "sim", "serve", "--fault", "tape_jam,clears_after=soon"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "clears_after must be int" in r.stderr


async def test_the_control_backdoor_arms_faults_while_the_simulator_serves(
        tmp_path: Path, sim_server: Callable[..., Any]) -> None:
    import asyncio
    import json
    import re

    from tapescope.hardware.camera import Camera
    from tapescope.hardware.errors import DeviceError

    server = sim_server("--control-port", "0")
    host, port = re.search(r"# control backdoor: ([\d.]+):(\d+)", server.tables).groups()
    cfg_file = tmp_path / "scope.toml"
    cfg_file.write_text(server.tables)
    cam_cfg = load_config(cfg_file).scope.camera
    reader, writer = await asyncio.open_connection(host, int(port))

    async def ask(line: str) -> str:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()

    try:
        assert await ask("fault frame_drop:1") == "ok: armed frame_drop x1"
        assert json.loads(await ask("armed")) == {"frame_drop": 1}
        assert (await ask("fault tape_jam,clears_after=soon")).startswith("error: ")
        assert "unknown request" in await ask("explode")
        # Long enough for a frame on a loaded machine; the dropped one costs one wait.
        cam = Camera(cam_cfg.host, cam_cfg.port, timeout_s=3.0)
        await cam.connect()
        try:
            try:                                    # the armed fault fires at the first exposure
                await cam.trigger()
            except DeviceError:
                pass
            else:
                raise AssertionError("the armed frame_drop did not fire")
            assert (await cam.trigger()).data.shape == (cam_cfg.height, cam_cfg.width)   # once only
        finally:
            await cam.close()
        fired = json.loads(await ask("fired"))
        assert [name for _, name in fired] == ["frame_drop"]
    finally:
        writer.close()
        await writer.wait_closed()
        out = server.stop()
    assert "faults fired: frame_drop" in out


def test_a_garbled_reply_at_start_up_is_ridden_out_and_a_dead_device_is_one_line(
        tmp_path: Path, sim_server: Callable[..., Any]) -> None:
    """The first thing a run (or a run resumed after a crash) does is connect: a garbled reply
    to the tape's first STATE? is tried again; a tape that never answers ends in one error line
    (exit code 4), not a traceback."""
    run = "[run]\nslots = [0]\ngrid = [1, 1]\nexposure_ms = 2.0\n[processing]\nenabled = false\n"

    def acquire_against(fault: str, name: str) -> tuple[Any, subprocess.CompletedProcess[str]]:
        server = sim_server("--fault", fault)
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(server.tables + "\n" + run)
        return server, subprocess.run([*CLI, "acquire", str(cfg), "--run-dir", str(tmp_path / name)],
                                      capture_output=True, text=True, timeout=120)

    server, r = acquire_against("tape_garbled:1", "ok")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tape_garbled" in server.stop()
    _, r = acquire_against("tape_timeout:20,executed=false", "dead")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "cannot start: tape" in lines[0] and "--resume" in r.stdout
