"""One section, as the engine asks for it: the tape to the slot and the position check, the
beam check, the plan (or a verdict not to image the slot), the calibrations before it, the
disk check, its tiles (tiles.py), and its record. The engine (engine.py) decides when."""

from __future__ import annotations

import contextlib
import shutil
import time

from .acquisition import RunContext, SlotVerdict
from .disk import section_need
from .events import DeviceStatus, SectionAcquired, SectionFinished, SectionPlanned, SectionStarted
from .interrupts import Skip
from .qc import Decision, FocusReference
from .tiles import TileTaker

TAPE_RESEEKS = 2    # moves again after the reader saw the wrong slot, before the slot is given up


class SectionRunner:
    def __init__(self, run: RunContext, tiles: TileTaker) -> None:
        self.run = run
        self.tiles = tiles
        self.current_slot = -1

    def check_disk(self, n_tiles: int) -> str | None:
        h, w = self.run.tile_shape or getattr(self.run.scope.camera, "shape", (0, 0)) or (0, 0)
        need = self.run.settings.min_free_bytes + section_need(n_tiles, (h, w))
        free = shutil.disk_usage(self.run.store.dir).free
        if free < need:
            return (f"{free / 1e9:.2f} GB free in {self.run.store.dir}, the next section needs "
                    f"{need / 1e9:.2f} GB (incl. {self.run.settings.min_free_bytes / 1e9:.2f} GB reserve)")
        return None

    async def seek(self, slot: int) -> tuple[int, str]:
        """Tape to `slot`, then the position check: the barcode reader must see that slot.
        A tape that slipped (the reader sees another) is moved again, with an alarm, up to
        TAPE_RESEEKS times; returns what the reader sees last."""
        tape = self.run.scope.tape
        for attempt in range(TAPE_RESEEKS + 1):
            await self.run.call_device(f"tape to slot {slot}", lambda: tape.goto(slot), "tape")
            at, barcode = await self.run.call_device("read barcode", tape.barcode, "tape")
            if at == slot:
                return at, barcode
            if attempt < TAPE_RESEEKS:
                self.run.alarm("tape", f"tape position: moved to slot {slot}, the barcode reader sees slot {at} "
                            f"({barcode}): the tape slipped; moving again ({attempt + 1} of {TAPE_RESEEKS})",
                            "warning")
        return at, barcode

    async def check_beam(self, slot: int) -> None:
        """Before each section, as an operator would: is the beam on? A tripped or blanked beam
        found here is restored, with an alarm, before a dark tile is taken."""
        column = getattr(self.run.scope, "column", None)
        if column is None:
            return
        st = await self.run.call_device("column status", column.status, "column")
        if not st.beam_on:
            self.run.alarm("column", f"slot {slot}: no beam before the section (high tension {st.high_tension}, "
                        f"{'blanked' if st.blanked else 'not blanked'}): restoring it", "warning")
            await self.run.call_device("restore beam", column.ensure_beam, "column")

    async def take(self, slot: int, *, reimage: bool = False) -> None:
        self.current_slot = slot
        try:
            await self.run.boundary()
            await self._body(slot, reimage)
        except Skip as exc:
            prog = self.run.progress.slot(slot)
            n, planned = len(prog.tiles), len(prog.plan.tiles) if prog.plan else 0
            self.done(slot, "skipped", n, f"skipped by {exc} after {n} of {planned} tiles")
        finally:
            self.current_slot = -1

    async def _body(self, slot: int, reimage: bool) -> None:
        prog = self.run.progress.slot(slot)
        self.run.bus.emit(DeviceStatus("tape", {"target_slot": slot}, moving=True))
        at, barcode = await self.seek(slot)
        self.run.bus.emit(DeviceStatus("tape", {"slot": at, "barcode": barcode}, moving=False))
        expected = self.run.settings.barcodes.get(slot)
        if at != slot or (expected is not None and barcode != expected):
            want = f"slot {slot}" + (f" barcode {expected}" if expected else "")
            self.done(slot, "wrong_barcode", 0, f"reader sees slot {at} barcode {barcode}, plan says {want}")
            self.run.alarm("tape", f"slot {slot}: barcode mismatch (sees slot {at}, {barcode}); section skipped",
                        "warning")
            return
        await self.check_beam(slot)
        self.run.store.log_event("section_started", slot=slot, barcode=barcode, reimage=reimage, time=time.time())
        self.run.bus.emit(SectionStarted(slot, barcode))
        plan = prog.plan
        if plan is None:
            got = await self.run.planner.plan(self.run, slot, barcode)
            if isinstance(got, SlotVerdict):
                self.done(slot, got.status, 0, got.message)
                self.run.alarm("plan", f"slot {slot}: {got.status}: {got.message}", "warning")
                return
            plan = got
            self.run.store.log_event("section_planned", plan=plan.to_json(), time=time.time())
            prog.plan = plan
        whole = reimage and prog.retake_all      # what this take covers; a verdict during it does not
        todo = [t for t in plan.tiles if (t.row, t.col) not in prog.tiles
                or (reimage and (whole or (t.row, t.col) in prog.failed_qc))]
        h, w = self.run.tile_shape or (0, 0)
        px = self.run.pixel_nm
        self.run.bus.emit(SectionPlanned(slot, barcode, plan.roi_nm,
                                     tuple((t.row, t.col, t.y_nm, t.x_nm) for t in plan.tiles),
                                     (h * px, w * px), plan.roi_source))
        if self.run.calibration is not None and todo:
            film = self.run.planner.film_points.get(slot)     # None: no overview of this slot
            await self.run.calibration.before_section(self.run, plan, film)
        while (why := self.check_disk(len(todo))) is not None:
            await self.run.pause_with_alarm("disk", why)
        index_of = {(t.row, t.col): i for i, t in enumerate(plan.tiles)}
        focus_ref = FocusReference()
        flagged = False
        try:
            for i, tile in enumerate(todo):
                await self.run.boundary()
                nxt = todo[i + 1] if i + 1 < len(todo) else None
                decision = await self.tiles.take(slot, barcode, tile, index_of[(tile.row, tile.col)],
                                            len(plan.tiles), focus_ref, nxt)
                if decision is Decision.STOP_AT_END:
                    flagged = True
                elif decision is Decision.STOP_NOW:
                    await self.tiles.flush()
                    await self.run.pause_with_alarm("qc", f"slot {slot} tile r{tile.row} c{tile.col}: "
                                                 "QC says STOP_NOW")
            await self.tiles.flush()
        finally:
            if self.tiles.pending is not None:
                # Abort or failure: the tile that was being written still counts: a stored tile is never lost.
                with contextlib.suppress(Exception):
                    await self.tiles.flush()
        flagged = flagged or bool(prog.failed_qc)
        status = "flagged" if flagged else "complete"
        n_failed = len(prog.failed_qc)
        msg = f"{n_failed} tile(s) failed QC; montage queued for re-imaging" if flagged else ""
        if whole and not flagged:
            msg = f"re-imaged whole after it failed to register ({prog.message})"
        elif reimage and prog.retake_all and not whole:
            # Queued whole while this QC retake was under way: still owed, not done.
            self.done(slot, "flagged", len(prog.tiles), f"does not register: {prog.message}; "
                               "queued for re-imaging")
            return
        self.run.bus.emit(SectionAcquired(slot, len(prog.tiles)))
        self.done(slot, status, len(prog.tiles), msg, reimage=reimage)
        if flagged and not reimage:
            self.run.store.log_event("reimage_queued", slot=slot, tiles=sorted(map(list, prog.failed_qc)))
        self.run.offer_processing(slot)

    def done(self, slot: int, status: str, n_tiles: int, message: str, reimage: bool = False) -> None:
        prog = self.run.progress.slot(slot)
        if prog.status == "flagged" and reimage:
            prog.reimaged = True
        prog.status, prog.message = status, message
        self.run.store.log_event("section_done", slot=slot, status=status, n_tiles=n_tiles,
                             n_failed_qc=len(prog.failed_qc), message=message, reimage=reimage, time=time.time())
        self.run.bus.emit(SectionFinished(slot, status, n_tiles, len(prog.failed_qc), message))
        self.run.emit_progress()
