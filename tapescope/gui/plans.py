"""The tile plan the section map draws before tiles arrive: from a config, or from the
config snapshot of a run directory this machine can read."""

from __future__ import annotations

import json
from pathlib import Path

from tapescope.config import ConfigError, TapescopeConfig, parse_config

Plan = tuple[list[tuple[int, int, float, float]], tuple[float, float]]   # (row, col, y_nm, x_nm), tile (h, w) nm


def plan_of(cfg: TapescopeConfig) -> Plan:
    from tapescope.runner import plan_grid  # the run's own grid; the runner is heavy to import

    cam = cfg.scope.camera
    grid = [(t.row, t.col, t.y_nm, t.x_nm) for t in plan_grid(cfg)]
    return grid, (cam.height * cam.pixel_size_nm, cam.width * cam.pixel_size_nm)


def plan_from_run_dir(run_dir: str) -> Plan | None:
    """The configured tile grid of a run whose directory this machine can read (else None)."""
    path = Path(run_dir) / "config.json"
    try:
        return plan_of(parse_config(json.loads(path.read_text()), str(path)))
    except (OSError, ValueError, ConfigError):
        return None
