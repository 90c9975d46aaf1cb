"""`tapescope demo` end to end, as a user runs it: a subprocess, a small grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tapescope.config import TapescopeConfig
from tapescope.runner import sim_world_params
from tapescope.sim_hardware.world import SimWorld

from .support import check_volume


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapescope.cli", "demo", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=240,
    )


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_demo(out, "--sections", "3", "--grid", "2", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sections 3, tiles 12" in r.stdout
    group = check_volume(out / "volume.zarr")
    sections = group.attrs["tapescope"]["sections"]
    assert sorted(sections) == ["0", "1", "2"]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    level0 = group["0"][:]
    assert all(level0[z].any() for z in range(3))   # every section has pixels
    # Every tile is in the journal, fsync'd, with its file.
    events = [json.loads(line) for line in (out / "run" / "journal.jsonl").read_text().splitlines()]
    tiles = [e for e in events if e["event"] == "tile"]
    assert len(tiles) == 12
    assert all((out / "run" / e["file"]).exists() for e in tiles)
    # Each section is processed exactly once, however the queue and the journal catch-up race.
    processed = sorted(e["slot"] for e in events if e["event"] == "section_processed")
    assert processed == [0, 1, 2]
    assert "3/3" in r.stdout and "4/3" not in r.stdout
    # Alignment recovers the tape's slot placement error (truth from the simulator's
    # world, which the run's seed reproduces) to within the specimen's own section-to-
    # section change, a few pixels (see docs/alignment.md).
    cfg = TapescopeConfig().model_copy(update={"run": TapescopeConfig().run.model_copy(
        update={"slots": [0, 1, 2], "grid": (2, 2)})})
    world = SimWorld(sim_world_params(cfg))
    truth = (world.slot_offsets_nm - world.slot_offsets_nm[0]) / world.p.pixel_nm
    for z in (1, 2):
        shift = np.array(sections[str(z)]["shift_px"])
        assert np.abs(shift - truth[z]).max() < 8, (z, shift, truth[z])


def test_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "volume.zarr").mkdir()
    r = run_demo(tmp_path, "--sections", "1", "--grid", "1", "1")
    assert r.returncode == 2
    assert "--overwrite" in r.stderr
    assert (tmp_path / "volume.zarr").exists()


def test_demo_rejects_bad_grid(tmp_path: Path) -> None:
    r = run_demo(tmp_path, "--grid", "0", "3")
    assert r.returncode == 2
    assert "--grid" in r.stderr
