"""`tapescope sim serve` as its own process, and `tapescope demo` run against it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tapescope.config import load_config
from tapescope.sim_hardware.serve import READY

CLI = [sys.executable, "-m", "tapescope.cli"]


def start_server(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([*CLI, "sim", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    text = b""
    deadline = time.monotonic() + 60
    # Raw reads: a buffered readline could hold the READY line while select waits on the pipe.
    while time.monotonic() < deadline and READY.encode() not in text:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            text += chunk
    if READY.encode() in text:
        return proc, text.decode()
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"simulator did not start: {text.decode()}{err.decode()}")


def stop_server(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def test_demo_against_a_separate_simulator(tmp_path: Path) -> None:
    # Two lost replies to stage moves on the way: the run must not notice beyond a warning.
    proc, printed = start_server("--fault", "stage_timeout:2,on=M")
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
        out = stop_server(proc)
    # The lost move replies were confirmed by re-query, not re-sent, and the run went on.
    assert "faults fired: stage_timeout, stage_timeout" in out


def test_bad_fault_flag_is_refused() -> None:
    r = subprocess.run([*CLI, "sim", "serve", "--fault", "tape_jam,clears_after=soon"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "clears_after must be int" in r.stderr
