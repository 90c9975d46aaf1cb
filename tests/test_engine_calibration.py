"""Calibration routines against the simulator's ground truth (dark offset, gain field, focus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from tapescope.acquisition.events import CalibrationDone, Event, EventBus
from tapescope.acquisition.store import RunStore
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
    assert trails["autofocus"][0] == "COARSE" and trails["autofocus"][-4:] == ["FINE", "FIT", "SET", "DONE"]
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


async def calibrations_of(run: dict, run_dir: Path) -> dict[str, CalibrationDone]:
    """Run `run` (ending done) and return its calibrations' verdicts by name."""
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    result = await run_acquisition(parse_config(run), run_dir, bus)
    assert result.summary.state.value == "done", result.summary.reason
    return {e.name: e for e in events if isinstance(e, CalibrationDone)}


async def test_film_calibrations_in_grid_mode_are_not_run_and_say_why(tmp_path: Path) -> None:
    run = {"scope": {"camera": {"width": 128, "height": 128}},
           "run": {"slots": [0, 1], "grid": [2, 2], "seed": 3, "exposure_ms": 3.0, "roi": "grid",
                   "calibrate": ["brightfield", "auto_exposure"]},
           "processing": {"enabled": False}}
    done = await calibrations_of(run, tmp_path / "run")
    assert set(done) == {"brightfield", "auto_exposure"} and not any(e.ok for e in done.values())
    assert all("no overview" in e.summary["skipped"] for e in done.values())
    journal = [json.loads(x) for x in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    cal = [e for e in journal if e["event"] == "calibration"]
    assert sorted(e["name"] for e in cal) == ["auto_exposure", "brightfield"]
    assert all(e["ok"] is False and e["ran"] is False and e["trail"] == ["SKIPPED"] for e in cal)
    alarms = [e["message"] for e in journal if e["event"] == "alarm" and e["source"] == "calibration"]
    assert len(alarms) == 2 and all("not run: no overview" in m for m in alarms)
    assert any("the flat-field is estimated from the tiles" in m for m in alarms)


async def test_a_darkfield_whose_blank_fails_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    """on_device_failure = "fail", and the column never answers BLANK: the calibration fails
    (journalled, an alarm), the beam is unblanked, and every tile is still taken."""
    run = {"scope": {"camera": {"width": 128, "height": 128}},
           "run": {"slots": [0], "grid": [2, 2], "seed": 3, "exposure_ms": 3.0, "calibrate": ["darkfield"],
                   "on_device_failure": "fail", "device_retries": 1, "retry_window_s": 0.0},
           "processing": {"enabled": False}}
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)

    def blank_never_answers(sim) -> None:
        sim.world.inject("column_timeout", 20, on="BLANK", executed=False)

    result = await run_acquisition(parse_config(run), tmp_path / "run", bus, on_sim=blank_never_answers)
    assert result.summary.state.value == "done", result.summary.reason
    assert result.summary.tiles == 4
    journal = [json.loads(x) for x in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    cal = [e for e in journal if e["event"] == "calibration"]
    assert len(cal) == 1 and cal[0]["name"] == "darkfield" and cal[0]["ok"] is False
    assert cal[0]["trail"] == ["BLANK", "UNBLANK", "FAILED"] and "could not be blanked" in cal[0]["error"]
    alarms = [e["message"] for e in journal if e["event"] == "alarm" and e["source"] == "calibration"]
    assert len(alarms) == 1 and "darkfield failed" in alarms[0] and "no measured dark" in alarms[0]
    tiles = RunStore(tmp_path / "run").tiles()
    assert all(t.meta["qc"]["mean"] > 500 for t in tiles)                   # the beam was unblanked


async def test_auto_exposure_sets_an_8_bit_camera_at_its_own_scale(tmp_path: Path) -> None:
    """The 16-bit band (6000-10000 counts) is out of an 8-bit camera's reach: it is set with
    film near half its 255 levels instead, from an exposure that puts film at a quarter."""
    run = {"scope": {"camera": {"width": 128, "height": 128, "bit_depth": 8}},
           "run": {"slots": [1, 2], "seed": 4, "roi": "auto", "aperture_um": [7.0, 7.0], "exposure_ms": 1.5,
                   "calibrate": ["auto_exposure"]},
           "processing": {"enabled": False}}
    ae = (await calibrations_of(run, tmp_path / "run"))["auto_exposure"]
    assert ae.ok, ae
    assert ae.summary["exposure_ms"] > 1.5 and 94 <= ae.summary["level"] <= 156 and ae.summary["band"] == [94, 156]
