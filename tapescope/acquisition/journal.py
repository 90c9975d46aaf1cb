"""What a run's journal says has been done: the basis of resume and of the run report.

The journal (store.py) is the only truth. Replaying it gives, per slot, the plan that was
journalled before its first tile, the tiles stored (the last record of each position
wins: a retake supersedes), the final status, and the sections still owed a re-image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plan import SectionPlan
from .store import RunStore, TileRecord

FINAL = frozenset({"complete", "flagged", "skipped", "empty", "damaged", "wrong_barcode"})


@dataclass
class SlotProgress:
    plan: SectionPlan | None = None
    tiles: dict[tuple[int, int], TileRecord] = field(default_factory=dict)
    failed_qc: set[tuple[int, int]] = field(default_factory=set)   # stored, but marked failed
    status: str | None = None           # last section_done status
    message: str = ""
    reimaged: bool = False
    retake_all: bool = False            # the re-image retakes every tile (it failed to register)
    processed: bool = False
    # The last verdict of processing: status, max_residual_px, message ("failed" when it raised).
    processing: dict[str, Any] | None = None


@dataclass
class RunProgress:
    slots: dict[int, SlotProgress] = field(default_factory=dict)
    calibrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumes: int = 0
    finished_state: str | None = None

    def slot(self, s: int) -> SlotProgress:
        return self.slots.setdefault(s, SlotProgress())

    @property
    def tiles_stored(self) -> int:
        return sum(len(p.tiles) for p in self.slots.values())

    def reimage_queue(self) -> list[int]:
        return sorted(s for s, p in self.slots.items() if p.status == "flagged" and not p.reimaged)

    @classmethod
    def replay(cls, store: RunStore) -> RunProgress:
        prog = cls()
        for e in store.events():
            kind = e.get("event")
            if kind == "section_planned":
                sp = SectionPlan.from_json(e["plan"])
                prog.slot(sp.slot).plan = sp
            elif kind == "tile":
                rec = RunStore.record_of(store.dir, e)
                p = prog.slot(rec.slot)
                p.tiles[(rec.row, rec.col)] = rec
                if rec.meta.get("qc_failed"):
                    p.failed_qc.add((rec.row, rec.col))
                else:
                    p.failed_qc.discard((rec.row, rec.col))
            elif kind == "section_done":
                p = prog.slot(int(e["slot"]))
                if p.status == "flagged" and e.get("reimage"):
                    p.reimaged = True
                p.status, p.message = e["status"], e.get("message", "")
            elif kind == "reimage_queued" and e.get("tiles") == "all":
                p = prog.slot(int(e["slot"]))
                if not p.reimaged:      # queued by processing after the section was done
                    p.status, p.retake_all, p.message = "flagged", True, e.get("message", "")
            elif kind == "section_processed":
                p = prog.slot(int(e["slot"]))
                p.processed = True
                p.processing = {"status": e["status"], "max_residual_px": e.get("max_residual_px"),
                                "message": e.get("message", "")}
            elif kind == "processing_failed":
                prog.slot(int(e["slot"])).processing = {"status": "failed", "message": e.get("message", "")}
            elif kind == "calibration" and e.get("ok"):
                prog.calibrations[e["name"]] = e
            elif kind == "run_resumed":
                prog.resumes += 1
            elif kind == "run_finished":
                prog.finished_state = e.get("state")
        return prog
