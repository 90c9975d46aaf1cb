"""The bridge from stored tiles to section processing (stitching, montage, volume).

Sections arrive as slot numbers on a queue; tiles are read back from the run store (so
processing that falls behind catches up from disk), and each section is processed in a
worker thread. A section that fails is recorded as missing, with an alarm: never skipped
silently, never fatal to the run. A section that does not register against its neighbour
is handed to ``on_unregistered`` (the engine's ``request_reimage``): re-imaged while the tape
is loaded, it comes back through the queue and is processed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np
import tifffile

from tapescope.montage.pipeline import SectionProcessor, SectionReport
from tapescope.stitching.flatfield import estimate_flatfield

from .events import Alarm, EventBus, SectionProcessed
from .store import RunStore, TileRecord

log = logging.getLogger(__name__)

MIN_FLATFIELD_TILES = 3
MAX_FLATFIELD_TILES = 256    # the median converges long before; bounds memory and time


def _more_file_handles() -> None:
    """Each tile of a section being processed is a mapped file (RunStore.open_tile) holding a
    handle, and a section has thousands of tiles: raise the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError) as exc:     # not POSIX, or not allowed: tiles are read instead
        log.info("file-handle limit left as it is: %s", exc)


class ProcessingWorker:
    def __init__(
        self, store: RunStore, processor: SectionProcessor, bus: EventBus, *,
        z_of_slot: dict[int, int], pixel_nm: float, flatfield: str = "auto",
        on_unregistered: Callable[[int, str], object] | None = None,
    ) -> None:
        self.store = store
        self.processor = processor
        self.bus = bus
        self.z_of_slot = z_of_slot
        self.pixel_nm = pixel_nm
        self.flatfield = flatfield
        self.on_unregistered = on_unregistered      # called on the loop: (slot, why)
        self.reports: dict[int, SectionReport] = {}  # the latest verdict per slot
        self.failed: dict[int, str] = {}
        self._tried: dict[int, int] = {}             # slot -> journal line of the section_done last taken
        _more_file_handles()

    async def run(self, queue: asyncio.Queue[int | None]) -> None:
        """Process what the journal says is acquired and not yet processed, each time an item
        comes (a slot, or any wake-up); the queue is the wake-up, the journal the truth (a full
        queue, a run resumed after a crash and a re-imaged section all catch up from disk).
        ``task_done`` follows the processing, so ``queue.join()`` waits for the verdicts.
        A fault here is an alarm, never the end of processing: the next item tries again."""
        while True:
            slot = await queue.get()
            try:
                await self.catch_up()
            except Exception as exc:
                log.exception("processing worker: catching up failed")
                self.bus.emit(Alarm("processing", f"processing could not catch up: {type(exc).__name__}: {exc}; "
                                    "it tries again with the next section"))
            finally:
                queue.task_done()
            if slot is None:
                return

    def unprocessed(self) -> list[tuple[int, int]]:
        """(slot, journal line of its last section_done) for the sections acquired since they
        were last processed or tried: a retake after processing makes a slot due again."""
        done: dict[int, tuple[int, str]] = {}
        processed: dict[int, int] = {}
        for i, e in enumerate(self.store.events()):
            if e["event"] == "section_done":
                done[int(e["slot"])] = (i, e["status"])
            elif e["event"] == "section_processed":
                processed[int(e["slot"])] = i
        return sorted((s, i) for s, (i, st) in done.items() if st in ("complete", "flagged")
                      and processed.get(s, -1) < i and self._tried.get(s, -1) < i and s in self.z_of_slot)

    async def catch_up(self) -> None:
        for slot, line in await asyncio.to_thread(self.unprocessed):
            self._tried[slot] = line
            report = await asyncio.to_thread(self.process_slot, slot)
            if report is not None and report.status == "unaligned" and self.on_unregistered is not None:
                if await asyncio.to_thread(self._newer_take, slot, line):
                    continue     # judged an older take; the newer one is judged next
                self._queue_reimage(slot, report.message)
                # A repeat does not say which take is wrong: this one slipped back, or the one
                # before slipped forward onto this section. Both are re-imaged.
                slot_of = {z: s for s, z in self.z_of_slot.items()}
                if report.repeats is not None and report.repeats in slot_of:
                    self._queue_reimage(slot_of[report.repeats], f"slot {slot} repeats it: one of the two takes "
                                        "shows the wrong section (a tape slip?); both are re-imaged")

    def _queue_reimage(self, slot: int, why: str) -> None:
        assert self.on_unregistered is not None
        try:
            self.on_unregistered(slot, why)
        except Exception as exc:     # e.g. the journal's disk is full: said, and processing goes on
            log.exception("queueing slot %d for re-imaging failed", slot)
            self.bus.emit(Alarm("processing", f"slot {slot} does not register ({why}) but "
                                f"could not be queued for re-imaging: {type(exc).__name__}: {exc}"))

    def _newer_take(self, slot: int, line: int) -> bool:
        """Whether the journal holds a take of `slot` newer than the one at `line`."""
        return any(e["event"] == "section_done" and int(e["slot"]) == slot
                   for i, e in enumerate(self.store.events()) if i > line)

    def _ensure_flatfield(self) -> None:
        if self.flatfield != "auto" or self.processor.gain is not None:
            return
        # Calibrated references (calibration.py) beat an estimate from the tiles.
        cal = self.store.dir / "calibration"
        if (cal / "dark.tif").exists() and not np.any(self.processor.dark):
            self.processor.dark = tifffile.imread(cal / "dark.tif").astype(np.float32)
        if (cal / "gain.tif").exists():
            self.processor.gain = tifffile.imread(cal / "gain.tif").astype(np.float32)
            self.store.log_event("flatfield", file="calibration/gain.tif", source="brightfield")
            return
        records = self.store.tiles()
        if len(records) < MIN_FLATFIELD_TILES:
            self.bus.emit(Alarm("flatfield", f"only {len(records)} tiles so far: this section is "
                                f"processed without flat-field correction", "warning"))
            return
        gain = estimate_flatfield(RunStore.read_tile(r) for r in records[:MAX_FLATFIELD_TILES])
        self.processor.gain = gain
        tifffile.imwrite(self.store.dir / "flatfield.tif", gain)
        self.store.log_event("flatfield", file="flatfield.tif", tiles=len(records))

    def process_slot(self, slot: int) -> SectionReport | None:
        z = self.z_of_slot[slot]
        records: list[TileRecord] = self.store.tiles(slot)
        info = {"slot": slot, "z": z, "barcode": records[0].meta.get("barcode", "") if records else "",
                "tiles": len(records)}
        try:
            if not records:
                raise ValueError("no tiles stored for this section")
            self._ensure_flatfield()
            tiles = [RunStore.open_tile(r) for r in records]
            h, w = tiles[0].shape
            # Stage encoder gives the tile centre; positions are top-left, in pixels.
            stage_px = np.array([[r.y_nm, r.x_nm] for r in records]) / self.pixel_nm - (h / 2, w / 2)
            grid = [(r.row, r.col) for r in records]
            report = self.processor.process(z, tiles, stage_px, grid, info)
        except Exception as exc:
            log.exception("processing slot %d failed", slot)
            reason = f"{type(exc).__name__}: {exc}"
            self.failed[slot] = reason
            self.reports.pop(slot, None)
            self.processor.record_missing(z, info, reason)
            # Journalled, not as processed: a resumed run tries the section again.
            self.store.log_event("processing_failed", slot=slot, z=z, message=reason, time=time.time())
            self.bus.emit(Alarm("processing", f"slot {slot} (z={z}) not processed: {reason}"))
            self.bus.emit(SectionProcessed(slot, z, "failed", float("nan"), (0.0, 0.0), 0.0, reason))
            return None
        self.reports[slot] = report
        self.failed.pop(slot, None)
        self.store.log_event("section_processed", slot=slot, z=z, status=report.status,
                             max_residual_px=report.max_residual_px, shift_px=list(report.shift_px),
                             message=report.message, time=time.time())
        if report.status != "ok":
            self.bus.emit(Alarm("alignment", f"slot {slot} (z={z}): {report.message}", "warning"))
        self.bus.emit(SectionProcessed(slot, z, report.status, report.max_residual_px,
                                       report.shift_px, report.alignment_confidence, report.message))
        return report
