"""The bridge from stored tiles to section processing (stitching, montage, volume).

Sections arrive as slot numbers on a queue; tiles are read back from the run store (so
processing that falls behind catches up from disk), and each section is processed in a
worker thread. A section that fails is recorded as missing, with an alarm: never skipped
silently, never fatal to the run.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import tifffile

from tapescope.montage.pipeline import SectionProcessor, SectionReport
from tapescope.stitching.flatfield import estimate_flatfield

from .events import Alarm, EventBus, SectionProcessed
from .store import RunStore, TileRecord

log = logging.getLogger(__name__)

MIN_FLATFIELD_TILES = 3
MAX_FLATFIELD_TILES = 256    # the median converges long before; bounds memory and time


class ProcessingWorker:
    def __init__(
        self, store: RunStore, processor: SectionProcessor, bus: EventBus, *,
        z_of_slot: dict[int, int], pixel_nm: float, flatfield: str = "auto",
    ) -> None:
        self.store = store
        self.processor = processor
        self.bus = bus
        self.z_of_slot = z_of_slot
        self.pixel_nm = pixel_nm
        self.flatfield = flatfield
        self.reports: dict[int, SectionReport] = {}
        self.failed: dict[int, str] = {}

    async def run(self, queue: asyncio.Queue[int | None]) -> None:
        """Process slots as they come; then whatever the journal says is acquired but was not
        processed (a full queue, or a run resumed after a crash): catch up from disk."""
        while (slot := await queue.get()) is not None:
            # catch_up may already have taken this slot from the journal (its section_done
            # can be journalled before the queue hands it over): process each slot once.
            if slot not in self.reports and slot not in self.failed:
                await asyncio.to_thread(self.process_slot, slot)
            await self.catch_up()
        await self.catch_up()

    def unprocessed(self) -> list[int]:
        done: dict[int, str] = {}
        processed: set[int] = set()
        for e in self.store.events():
            if e["event"] == "section_done":
                done[int(e["slot"])] = e["status"]
            elif e["event"] == "section_processed":
                processed.add(int(e["slot"]))
        return sorted(s for s, st in done.items() if st in ("complete", "flagged") and s not in processed
                      and s not in self.reports and s not in self.failed and s in self.z_of_slot)

    async def catch_up(self) -> None:
        for slot in await asyncio.to_thread(self.unprocessed):
            await asyncio.to_thread(self.process_slot, slot)

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
            tiles = [RunStore.read_tile(r) for r in records]
            h, w = tiles[0].shape
            # Stage encoder gives the tile centre; positions are top-left, in pixels.
            stage_px = np.array([[r.y_nm, r.x_nm] for r in records]) / self.pixel_nm - (h / 2, w / 2)
            grid = [(r.row, r.col) for r in records]
            report = self.processor.process(z, tiles, stage_px, grid, info)
        except Exception as exc:
            log.exception("processing slot %d failed", slot)
            reason = f"{type(exc).__name__}: {exc}"
            self.failed[slot] = reason
            self.processor.record_missing(z, info, reason)
            self.bus.emit(Alarm("processing", f"slot {slot} (z={z}) not processed: {reason}"))
            self.bus.emit(SectionProcessed(slot, z, "failed", float("nan"), (0.0, 0.0), 0.0, reason))
            return None
        self.reports[slot] = report
        self.store.log_event("section_processed", slot=slot, z=z, status=report.status,
                             max_residual_px=report.max_residual_px, shift_px=list(report.shift_px))
        if report.status != "ok":
            self.bus.emit(Alarm("alignment", f"slot {slot} (z={z}): {report.message}", "warning"))
        self.bus.emit(SectionProcessed(slot, z, report.status, report.max_residual_px,
                                       report.shift_px, report.alignment_confidence, report.message))
        return report
