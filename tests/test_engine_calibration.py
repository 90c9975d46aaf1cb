"""Calibration routines against the simulator's ground truth (dark offset, gain field, focus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from tapescope.acquisition.events import CalibrationDone, Event, EventBus
from tapescope.config import parse_config
from tapescope.runner import run_acquisition

RUN = {
    "scope": {"camera": {"width": 128, "height": 128}},
    "run": {"slots": [1, 2], "seed": 4, "roi": "auto", "aperture_um": [7.0, 7.0], "exposure_ms": 3.0,
            "calibrate": ["darkfield", "brightfield", "auto_exposure", "autofocus"]},
    "processing": {"enabled": True, "align": False},
}


async def test_calibrations_measure_what_the_simulator_holds(tmp_path: Path) -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    worlds = []
    result = await run_acquisition(parse_config(RUN), tmp_path / "run", bus, on_sim=lambda s: worlds.append(s.world))
    assert result.summary.state.value == "done", result.summary.reason
    world = worlds[0]
    done = {e.name: e for e in events if isinstance(e, CalibrationDone)}
    assert all(done[n].ok for n in ("darkfield", "brightfield", "auto_exposure", "autofocus")), done
    journal = [json.loads(x) for x in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    trails = {e["name"]: e["trail"] for e in journal if e["event"] == "calibration"}
    assert trails["darkfield"] == ["BLANK", "COLLECT", "UNBLANK", "STORE", "DONE"]
    assert trails["autofocus"] == ["SWEEP", "FIT", "SET", "DONE"]
    # Darkfield: the camera's offset.
    dark = tifffile.imread(tmp_path / "run" / "calibration" / "dark.tif")
    assert abs(float(dark.mean()) - world.p.dark_offset) < 5
    # Brightfield: the gain field (vignetting and dust) the simulator multiplies in.
    gain = tifffile.imread(tmp_path / "run" / "calibration" / "gain.tif")
    truth = world.gain if world.gain.shape == gain.shape else None
    assert truth is not None
    assert np.corrcoef(gain.ravel(), truth.ravel())[0, 1] > 0.9
    # Auto-exposure moved the exposure so that film lands in the band.
    ae = done["auto_exposure"].summary
    assert ae["exposure_ms"] != 3.0 and 6000 <= ae["level"] <= 10000
    # Autofocus lands near the section's true focus.
    af = [e.summary for e in events if isinstance(e, CalibrationDone) and e.name == "autofocus"]
    assert len(af) >= 2
    # Processing used the calibrated flat-field, not an estimate.
    assert any(e["event"] == "flatfield" and e.get("source") == "brightfield" for e in journal)
    assert all(s["status"] == "complete" for s in json.loads((tmp_path / "run" / "report.json").read_text())
               ["sections"])
    for summary in af:
        assert summary["gain"] > 1.2       # the sweep saw focus matter
