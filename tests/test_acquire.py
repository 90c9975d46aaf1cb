"""A whole run as the issue's "done when" says: 5 simulated sections, one empty slot, one
damaged section, and injected faults (a serial timeout, a dropped frame, a tape jam that
clears). Every section with tissue is fully imaged and the report says what happened."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tapescope.acquisition.events import Event, EventBus, OverviewAvailable, SectionPlanned
from tapescope.acquisition.roi import Overview, find_tissue, tiles_covering
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.runner import run_acquisition

RUN = {
    "scope": {"camera": {"width": 128, "height": 128, "timeout_s": 1.0}, "stage": {"timeout_s": 0.3}},
    # Seed 4: slots 1, 2, 4 intact; 3 folded, torn and holed; 5 empty (the simulator's truth).
    "run": {"slot_range": [1, 5], "seed": 4, "roi": "auto", "aperture_um": [7.0, 7.0], "exposure_ms": 3.0,
            "device_retries": 3},
    "processing": {"enabled": False},
}


async def test_five_sections_with_empty_damaged_and_faults(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cfg = parse_config(RUN)
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    worlds = []

    def arm(sim) -> None:
        worlds.append(sim.world)
        sim.world.inject("tape_jam", clears_after=3)            # the first tape move jams, then clears
        sim.world.inject("stage_timeout", after=40)             # one stage reply lost mid-section
        sim.world.inject("frame_drop", after=25)                # one frame never arrives

    result = await run_acquisition(cfg, tmp_path / "run", bus, on_sim=arm)
    assert result.summary.state.value == "done", result.summary.reason
    fired = {name for _, name in worlds[0].faults.fired}
    assert {"tape_jam", "stage_timeout", "frame_drop"} <= fired
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    by_slot = {s["slot"]: s for s in report["sections"]}
    assert by_slot[5]["status"] == "empty" and by_slot[5]["tiles"] == 0
    truth = worlds[0].slot_truth
    for slot in (1, 2, 3, 4):
        assert truth[slot].tissue
        s = by_slot[slot]
        if s["status"] == "damaged":
            assert truth[slot].damage, f"slot {slot} called damaged but is intact"
            continue
        assert s["status"] in ("complete", "flagged")
        assert s["tiles"] == s["tiles_planned"] > 20, s        # every planned tile stored
    # Each fault reached a person. The drivers cure a jam that clears and a lost stage reply
    # themselves (and log a warning); the lost frame took an engine retry, journalled.
    retries = [e for e in RunStore(tmp_path / "run").events() if e["event"] == "device_retry"]
    assert any(e["what"] == "camera trigger" for e in retries), retries
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "jam" in warned and "stage: no complete reply" in warned and "camera trigger failed" in warned
    # The planned tiles cover the section that the simulator placed on each slot.
    planned = {e.slot: e for e in events if isinstance(e, SectionPlanned)}
    for slot in (1, 2, 4):
        ys = np.array([t[2] for t in planned[slot].tiles])
        xs = np.array([t[3] for t in planned[slot].tiles])
        centre = np.array([ys.mean(), xs.mean()])
        true_centre = worlds[0].slot_offsets_nm[slot]          # (y, x) of the section's centre
        assert np.abs(centre - true_centre).max() < 300, (slot, centre, true_centre)
    assert len([e for e in events if isinstance(e, OverviewAvailable)]) == 5


def test_tissue_outline_and_tiles_on_a_synthetic_overview() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((100, 100), np.float32)                       # opaque tape
    img[10:90, 10:90] = 1.0                                      # the aperture: bare film
    img[30:70, 25:75] = 0.7 + 0.05 * rng.standard_normal((40, 50))   # the section
    ov = Overview(img, (-5000.0, -5000.0), 100.0)               # 100 nm/px, centred on 0
    found = find_tissue(ov)
    assert found.verdict == "tissue", found.message
    poly = np.array(found.outline_nm)
    assert np.allclose(poly.min(axis=0), (-2000, -2500), atol=250)
    assert np.allclose(poly.max(axis=0), (2000, 2500), atol=250)
    tiles = tiles_covering(found.outline_nm, (128, 128), 4.0, 0.1)   # 512 nm tiles
    assert len(tiles) == len({(t.row, t.col) for t in tiles})
    # Serpentine: consecutive tiles are neighbours.
    steps = [abs(a.row - b.row) + abs(a.col - b.col) for a, b in itertools.pairwise(tiles)]
    assert max(steps) == 1
    # Empty aperture, and a section with a large hole.
    empty = img.copy()
    empty[30:70, 25:75] = 1.0
    assert find_tissue(Overview(empty, (0.0, 0.0), 100.0)).verdict == "empty"
    holed = img.copy()
    holed[40:60, 40:60] = 1.0
    assert find_tissue(Overview(holed, (0.0, 0.0), 100.0)).verdict == "damaged"


def test_operator_polygon_skips_tiles_outside_it() -> None:
    tri = ((0.0, 0.0), (0.0, 4000.0), (4000.0, 0.0))
    tiles = tiles_covering(tri, (128, 128), 4.0, 0.1)
    full_rows = max(t.row for t in tiles) + 1
    full_cols = max(t.col for t in tiles) + 1
    assert len(tiles) < full_rows * full_cols            # the corner beyond the hypotenuse is skipped
    for t in tiles:                                      # every kept tile touches the triangle
        assert t.y_nm + t.x_nm - 512 <= 4000 + 1e-6
