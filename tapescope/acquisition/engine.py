"""The acquisition engine: tape slot -> tile grid -> stored, journalled tiles.

One asyncio task drives the scope. Finished sections are handed to processing through
a queue and processed in a worker thread, so the scope never waits on stitching.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

import numpy as np

from tapescope.hardware.errors import DeviceError
from tapescope.hardware.scope import Scope

from .events import Alarm, EventBus, RunFinished, RunStarted, SectionAcquired, SectionStarted, TileAcquired
from .plan import TilePlan
from .store import RunStore

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    IDLE = "idle"
    ACQUIRING = "acquiring"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class RunSummary:
    state: RunState
    sections: int
    tiles: int
    seconds: float


class Engine:
    def __init__(
        self, scope: Scope, store: RunStore, bus: EventBus, *, slots: list[int],
        grid: list[TilePlan], exposure_ms: float,
        section_queue: asyncio.Queue[int | None] | None = None,
    ) -> None:
        self.scope = scope
        self.store = store
        self.bus = bus
        self.slots = slots
        self.grid = grid
        self.exposure_ms = exposure_ms
        self.section_queue = section_queue
        self.state = RunState.IDLE

    async def run(self) -> RunSummary:
        t0 = time.monotonic()
        self.state = RunState.ACQUIRING
        self.bus.emit(RunStarted(str(self.store.dir), tuple(self.slots), len(self.grid)))
        n_tiles = n_sections = 0
        try:
            await self.scope.camera.set_exposure(self.exposure_ms)
            await self.scope.camera.arm()
            for slot in self.slots:
                n_tiles += await self._section(slot)
                n_sections += 1
            self.state = RunState.DONE
        except asyncio.CancelledError:
            self.state = RunState.ABORTED
            self.store.log_event("run_aborted", time=time.time())
            raise
        except DeviceError as exc:
            self.state = RunState.FAILED
            self.bus.emit(Alarm(exc.device, str(exc)))
            self.store.log_event("run_failed", time=time.time(), error=str(exc))
        finally:
            if self.section_queue is not None:
                self.section_queue.put_nowait(None)  # tells processing that no more will come
            seconds = time.monotonic() - t0
            self.bus.emit(RunFinished(self.state.value, n_sections, n_tiles, seconds))
        self.store.log_event("run_finished", time=time.time(), state=self.state.value)
        return RunSummary(self.state, n_sections, n_tiles, seconds)

    async def _section(self, slot: int) -> int:
        await self.scope.tape.goto(slot)
        at, barcode = await self.scope.tape.barcode()
        if at != slot:
            raise DeviceError("tape", f"barcode reader sees slot {at}, expected {slot}")
        self.store.log_event("section_started", slot=slot, barcode=barcode, time=time.time())
        self.bus.emit(SectionStarted(slot, barcode))
        for index, tile in enumerate(self.grid):
            await self.scope.stage.move_to(tile.x_nm, tile.y_nm)
            x_nm, y_nm = await self.scope.stage.position()
            frame = await self.scope.camera.trigger()
            meta = {"frame_id": frame.frame_id, "timestamp": frame.timestamp,
                    "exposure_ms": frame.exposure_ms, "barcode": barcode}
            # fsync is blocking I/O: keep it off the loop so device polling stays live.
            await asyncio.to_thread(self.store.write_tile, slot, tile.row, tile.col, frame.data,
                                    y_nm=y_nm, x_nm=x_nm, meta=meta)
            self.bus.emit(TileAcquired(slot, tile.row, tile.col, index, float(np.mean(frame.data))))
        self.store.log_event("section_acquired", slot=slot, n_tiles=len(self.grid), time=time.time())
        self.bus.emit(SectionAcquired(slot, len(self.grid)))
        if self.section_queue is not None:
            self.section_queue.put_nowait(slot)
        return len(self.grid)
