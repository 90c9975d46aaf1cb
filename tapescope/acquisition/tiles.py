"""Taking tiles: the stage to each tile (the move to the next one started while the sensor
reads out), the exposure, QC with retakes (the beam restored, refocus), and the durable write
of each tile behind the next one's move. The engine (engine.py) decides when; this does."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np

from tapescope.hardware.errors import DeviceError

from .acquisition import RunContext
from .events import DeviceStatus, TileAcquired, TileRejected
from .plan import TilePlan
from .qc import Decision, FocusReference, TileQC, evaluate


class TileTaker:
    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.pending: asyncio.Task[None] | None = None      # the tile being written
        self.premove: tuple[TilePlan, asyncio.Task[None]] | None = None   # the move to the next tile
        self.last_frame_id = -1
        self.stored_this_run = 0
        self.last_stored_t = time.monotonic()

    async def flush(self) -> None:
        """The tile being written is durable when this returns."""
        pending, self.pending = self.pending, None
        if pending is not None:
            await pending

    def start_premove(self, tile: TilePlan) -> None:
        self.run.bus.emit(DeviceStatus("stage", {"target_y_nm": tile.y_nm, "target_x_nm": tile.x_nm}, moving=True))
        self.premove = (tile, asyncio.create_task(self.run.scope.stage.move_to(tile.x_nm, tile.y_nm),
                                                   name="engine-premove"))

    async def drain_premove(self) -> None:
        """Let a move started ahead end (a serial exchange is never cut mid-way). Its failure
        is reported here; the tile it was for will be moved to again."""
        pre, self.premove = self.premove, None
        if pre is None:
            return
        try:
            await asyncio.wait_for(pre[1], self.run.settings.step_timeout_s)
        except (DeviceError, TimeoutError) as exc:
            self.run.alarm("stage", f"move ahead to ({pre[0].x_nm:.0f}, {pre[0].y_nm:.0f}) nm failed: {exc}",
                                "warning")

    async def _move(self, tile: TilePlan) -> None:
        """Stage to the tile: the move started ahead when it was for this tile, else a new one."""
        ahead: asyncio.Task[None] | None = None
        if self.premove is not None and self.premove[0] is tile:
            ahead, self.premove = self.premove[1], None
        else:
            await self.drain_premove()       # a retake: the stage went on to the next tile
            self.run.bus.emit(DeviceStatus("stage", {"target_y_nm": tile.y_nm, "target_x_nm": tile.x_nm}, moving=True))
        stage = self.run.scope.stage

        async def go() -> None:
            nonlocal ahead
            if ahead is not None:            # the first attempt is the move under way
                task, ahead = ahead, None
                return await task
            return await stage.move_to(tile.x_nm, tile.y_nm)

        await self.run.call_device(f"stage to ({tile.x_nm:.0f}, {tile.y_nm:.0f}) nm", go, "stage")

    async def expose_at(self, tile: TilePlan, nxt: TilePlan | None = None) -> tuple[Any, float, float]:
        stage, cam = self.run.scope.stage, self.run.scope.camera
        await self._move(tile)
        x_nm, y_nm = await self.run.call_device("stage position", stage.position, "stage")
        self.run.bus.emit(DeviceStatus("stage", {"x_nm": x_nm, "y_nm": y_nm}, moving=False))
        if not self.run.settings.overlap_readout or not hasattr(cam, "expose"):
            frame = await self.run.call_device("camera trigger", cam.trigger, "camera")
            return frame, x_nm, y_nm
        await self.run.call_device("camera expose", cam.expose, "camera")
        # The exposure is over: the stage may leave while the sensor reads out.
        if nxt is not None:
            self.start_premove(nxt)
        where = (x_nm, y_nm)
        first = True

        async def read() -> Any:
            nonlocal first, where
            if first:
                first = False
                return await cam.read()
            # The frame went with the connection (the camera is reconnected by now): expose
            # again at this tile, the stage brought back from where it went ahead.
            await self.drain_premove()
            await stage.move_to(tile.x_nm, tile.y_nm)
            where = await stage.position()
            return await cam.trigger()

        # Named as the one-exchange trigger is: the journal and the alarms say "camera trigger"
        # for a lost frame either way (the run report and its readers need not know the split).
        frame = await self.run.call_device("camera trigger", read, "camera")
        return frame, where[0], where[1]

    async def take(
        self, slot: int, barcode: str, tile: TilePlan, index: int, n_tiles: int, focus_ref: FocusReference,
        nxt: TilePlan | None = None,
    ) -> Decision:
        limits = self.run.settings.qc
        prog = self.run.progress.slot(slot)
        attempt = 0
        while True:
            attempt += 1
            frame, x_nm, y_nm = await self.expose_at(tile, nxt)
            # QC in a worker thread (OpenCV and NumPy release the GIL): the loop stays free for
            # the devices' I/O and the previous tile's write.
            qc = await asyncio.to_thread(evaluate, frame.data, limits, reference_focus=focus_ref.value,
                                         expected_shape=self.run.tile_shape)
            if frame.frame_id <= self.last_frame_id and "integrity" not in qc.faults:
                qc = dataclasses.replace(qc, faults=(*qc.faults, "integrity"), messages=(
                    *qc.messages, f"frame id {frame.frame_id} repeats (last {self.last_frame_id})"))
            self.last_frame_id = max(self.last_frame_id, frame.frame_id)
            if qc.ok or attempt > limits.max_retakes:
                break
            self.run.store.log_event("tile_rejected", slot=slot, row=tile.row, col=tile.col, attempt=attempt,
                                 qc=qc.as_dict(), time=time.time())
            self.run.bus.emit(TileRejected(slot, tile.row, tile.col, attempt, qc.faults, "retake"))
            column = getattr(self.run.scope, "column", None)
            if "dark" in qc.faults and column is not None:
                # No electrons: a tripped high tension or a blanked beam. Bring it back, retake.
                self.run.alarm("column", f"dark frame at slot {slot} r{tile.row} c{tile.col}: "
                                    "restoring the beam (reset, high tension, unblank)", "warning")
                await self.run.call_device("restore beam", column.ensure_beam, "column")
            if "focus" in qc.faults:
                if self.run.calibration is not None:
                    await self.run.calibration.refocus(self.run)
                elif self.run.settings.refocus is not None:
                    await self.run.settings.refocus()
        focus_ref.add(qc)
        decision = qc.decision()
        if not qc.ok:
            self.run.bus.emit(TileRejected(slot, tile.row, tile.col, attempt, qc.faults, decision.value))
            self.run.alarm("qc", f"slot {slot} r{tile.row} c{tile.col}: {'; '.join(qc.messages)} "
                              f"after {attempt} exposure(s): {decision.value}", "warning")
        meta = {"frame_id": frame.frame_id, "timestamp": frame.timestamp, "exposure_ms": frame.exposure_ms,
                "barcode": barcode, "attempt": attempt, "qc": qc.as_dict(), "qc_failed": not qc.ok}
        # The previous tile's write overlapped this tile's move and exposure; it must be
        # durable before this one is written (journal order = acquisition order).
        await self.flush()
        self.pending = asyncio.create_task(self._store(slot, tile, index, n_tiles, frame.data,
                                                             x_nm, y_nm, meta, qc, attempt))
        if not qc.ok:
            prog.failed_qc.add((tile.row, tile.col))
        else:
            prog.failed_qc.discard((tile.row, tile.col))
        return decision

    async def _store(self, slot: int, tile: TilePlan, index: int, n_tiles: int, data: np.ndarray,
                          x_nm: float, y_nm: float, meta: dict[str, Any], qc: TileQC, attempt: int) -> None:
        # fsync is blocking I/O: keep it off the loop so device polling stays live.
        rec = await asyncio.to_thread(self.run.store.write_tile, slot, tile.row, tile.col, data,
                                      y_nm=y_nm, x_nm=x_nm, meta=meta)
        self.run.progress.slot(slot).tiles[(tile.row, tile.col)] = rec
        self.stored_this_run += 1
        self.last_stored_t = time.monotonic()
        self.run.bus.emit(TileAcquired(slot, tile.row, tile.col, index, qc.mean, x_nm, y_nm, qc.as_dict(),
                                   attempt, n_tiles))
        self.run.emit_progress()
