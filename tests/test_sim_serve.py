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
