"""A tape that slips never puts one section in the volume twice.

The simulator's tape slips by one slot on its way to slot 2, so the beam sees slot 3's
section. Two layers catch it: the position check after each move (the barcode reader sees
slot 3: the engine moves again, with an alarm) and, where the slot the tape slipped to
carries a wrong label (the reader is fooled), the image check (slot 3 then repeats the
section before it far more closely than neighbours agree; both takes are re-imaged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tapescope.acquisition.events import Alarm, Event, EventBus
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.runner import run_acquisition

RUN = {"run": {"slots": [0, 1, 2, 3], "seed": 3, "grid": [3, 3]}}


def neighbour_ncc(volume: Path) -> list[float]:
    v = zarr.open_group(str(volume), mode="r")["0"][:].astype(np.float64)
    out = []
    for z in range(v.shape[0] - 1):
        both = (v[z] > 0) & (v[z + 1] > 0)
        out.append(float(np.corrcoef(v[z][both], v[z + 1][both])[0, 1]))
    return out


@pytest.mark.parametrize(("driver", "seen"), [("line", True), ("line", False), ("gridtape", False)],
                         ids=["reader-sees-it", "reader-fooled", "gridtape-label-fooled"])
async def test_a_slipped_tape_is_caught_and_the_volume_holds_each_section_once(
        tmp_path: Path, driver: str, seen: bool) -> None:
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    books = []

    def slip(sim) -> None:
        sim.world.inject("tape_slip", slots=1, at_slot=2, seen=seen)
        books.append(sim.world.faults)

    cfg = parse_config({**RUN, "scope": {"tape": {"driver": driver}}})
    result = await run_acquisition(cfg, tmp_path / "run", bus, on_sim=slip)
    assert [n for _, n in books[0].fired] == ["tape_slip"]
    assert result.summary.state.value == "done", result.summary.reason
    # Every plane is its own section: neighbours agree as neighbours do, none like a repeat.
    ncc = neighbour_ncc(result.volume)
    assert max(ncc) < 0.8, ncc
    alarms = [e for e in events if isinstance(e, Alarm)]
    journal = [e for e in RunStore(tmp_path / "run").events() if e["event"] == "alarm"]
    if seen:
        assert any(a.source == "tape" and "reader sees slot 3" in a.message for a in alarms)
        assert any(e["source"] == "tape" and "slipped" in e["message"] for e in journal)
    else:
        assert any(a.source == "alignment" and "repeats z=2" in a.message for a in alarms)
        redone = [e for e in RunStore(tmp_path / "run").events()
                  if e["event"] == "section_done" and e.get("reimage")]
        assert sorted(e["slot"] for e in redone) == [2, 3]
