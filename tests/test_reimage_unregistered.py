"""A section that does not register is re-imaged while the tape is loaded.

The simulator's tape slips at slot 2 onto a mislabelled slot (the reader still says 2; the beam sees 14's
section): every tile passes QC, the montage stitches, and only live alignment can tell that it
is the wrong tissue. The engine re-images slot 2 before the run ends and processing aligns
the retake to slot 1. Slot 14 really is eleven sections away from slot 3: it does not register
even when re-imaged, and the run says that it needs a person instead of looping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from tapescope.acquisition.engine import Engine
from tapescope.acquisition.events import (
    Alarm,
    AwaitingProcessing,
    Event,
    EventBus,
    SectionFinished,
    SectionProcessed,
)
from tapescope.acquisition.journal import RunProgress
from tapescope.acquisition.processing import ProcessingWorker
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.runner import run_acquisition

RUN = {
    "scope": {"camera": {"width": 256, "height": 256}},
    # 4 x 4 tiles of 256 px: a montage big enough that chance agreement stays well below a neighbour's.
    "run": {"slots": [0, 1, 2, 3, 14], "seed": 1, "grid": [4, 4], "exposure_ms": 20.0},
    "processing": {"elastic": False},
}


@pytest.mark.parametrize("look_ahead", [0, 2])
async def test_a_section_that_does_not_register_is_reimaged_before_the_run_ends(tmp_path: Path,
                                                                               look_ahead: int) -> None:
    """Also with an alignment window (`align_look_ahead`): the verdict still comes as each
    section is processed; good sections are written later, and the retake writes the window
    before it is aligned to slot 1."""
    bus, events, books = EventBus(), list[Event](), []
    bus.subscribe(events.append)

    def slip_at_slot_2(sim) -> None:      # the beam sees slot 14's section, the reader says 2
        sim.world.inject("tape_slip", slots=12, at_slot=2, seen=False)
        books.append(sim.world.faults)

    cfg = parse_config({**RUN, "processing": {**RUN["processing"], "align_look_ahead": look_ahead}})
    result = await run_acquisition(cfg, tmp_path / "run", bus, on_sim=slip_at_slot_2)
    assert result.summary.state.value == "done", result.summary.reason
    assert [n for _, n in books[0].fired] == ["tape_slip"]

    store = RunStore(tmp_path / "run")
    journal = list(store.events())
    queued = [e for e in journal if e["event"] == "reimage_queued"]
    assert {e["slot"] for e in queued} == {2, 14} and all(e["tiles"] == "all" for e in queued)
    # Each queued section was taken again, whole: a second section_done, marked as the re-image,
    # and a second record of every tile (the retake supersedes the first).
    redone = [e for e in journal if e["event"] == "section_done" and e.get("reimage")]
    assert sorted(e["slot"] for e in redone) == [2, 14]
    tiles_2 = [e for e in journal if e["event"] == "tile" and e["slot"] == 2]
    n = 4 * 4
    assert len(tiles_2) == 2 * n and len(store.tiles(2)) == n

    # Processing judged slot 2 twice: the slipped take did not register, the retake did, against slot 1.
    verdicts = [(e.slot, e.status) for e in events if isinstance(e, SectionProcessed)]
    assert [v for s, v in verdicts if s == 2] == ["unaligned", "ok"]
    assert [v for s, v in verdicts if s == 14] == ["unaligned", "unaligned"]
    sections = zarr.open_group(str(result.volume), mode="r").attrs["tapescope"]["sections"]
    assert sections["2"]["status"] == "ok" and sections["2"]["needs_reimaging"] is False
    assert sections["4"]["status"] == "unaligned" and sections["4"]["needs_reimaging"] is True
    assert [sections[str(z)]["status"] for z in (0, 1, 3)] == ["ok"] * 3
    # Each take journalled as processed once, when it was written.
    processed = [e["slot"] for e in journal if e["event"] == "section_processed"]
    assert sorted(processed) == [0, 1, 2, 2, 3, 14, 14]

    # The engine said it waited for processing before the re-image pass, and only once.
    assert len([e for e in events if isinstance(e, AwaitingProcessing)]) == 1
    # Every verdict reached a person: a warning when queued, an error when a retake does not help.
    texts = [a.message for a in events if isinstance(a, Alarm) and a.source == "alignment"]
    assert any("slot 2 does not register" in t and "re-imaging before the run ends" in t for t in texts)
    assert any("slot 14 still does not register after re-imaging" in t and "needs a person" in t for t in texts)
    flagged = [e for e in events if isinstance(e, SectionFinished) and e.status == "flagged"]
    assert {e.slot for e in flagged} == {2, 14}

    # The journal alone tells a resumed run that nothing is owed.
    assert RunProgress.replay(store).reimage_queue() == []


async def test_a_resumed_run_takes_up_the_verdicts_its_first_life_never_saw(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first life acquires every slot and is killed before processing catches up (here:
    its worker never runs). The second life has nothing to acquire, yet waits for processing,
    and re-images the slot that does not register before it ends."""
    real_catch_up = ProcessingWorker.catch_up

    async def killed_first(self: ProcessingWorker) -> None:
        return None

    monkeypatch.setattr(ProcessingWorker, "catch_up", killed_first)
    first = await run_acquisition(parse_config(RUN), tmp_path / "run", EventBus(),
                                  on_sim=lambda sim: sim.world.inject("tape_slip", slots=12, at_slot=2, seen=False))
    assert first.summary.state.value == "done"
    monkeypatch.setattr(ProcessingWorker, "catch_up", real_catch_up)
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    second = await run_acquisition(parse_config(RUN), tmp_path / "run", bus, resume=True)
    assert second.summary.state.value == "done", second.summary.reason
    assert any(isinstance(e, AwaitingProcessing) for e in events)
    journal = list(RunStore(tmp_path / "run").events())
    assert 2 in [e["slot"] for e in journal if e["event"] == "section_done" and e.get("reimage")]
    assert RunProgress.replay(RunStore(tmp_path / "run")).reimage_queue() == []


async def test_processing_goes_on_when_a_section_cannot_be_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queueing a re-image fails (the journal's disk is full): an alarm says so, every other
    section is still processed, and the run ends with its report."""
    def disk_full(self: Engine, slot: int, reason: str) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Engine, "request_reimage", disk_full)
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    result = await run_acquisition(parse_config(RUN), tmp_path / "run", bus,
                                   on_sim=lambda sim: sim.world.inject("tape_slip", slots=12, at_slot=2, seen=False))
    assert result.summary.state.value == "done"
    texts = [a.message for a in events if isinstance(a, Alarm) and a.source == "processing"]
    assert any("could not be queued for re-imaging" in t and "No space left" in t for t in texts)
    processed = {e.slot for e in events if isinstance(e, SectionProcessed)}
    assert processed == {0, 1, 2, 3, 14}
    assert (tmp_path / "run" / "report.json").is_file()
