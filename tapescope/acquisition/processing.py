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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import tifffile

from tapescope.alignment.pipeline import MontageStore, ReferencePair, SectionProcessor, SectionReport
from tapescope.stitching.flatfield import estimate_flatfield

from .events import Alarm, Event, EventBus, ProcessingBacklog, SectionFinished, SectionProcessed, StateChanged
from .store import RunStore, TileRecord, section_inputs

if TYPE_CHECKING:
    from .cluster import SectionCluster


class Ahead(NamedTuple):
    """A section's work started on the cluster before its turn."""

    records: list[TileRecord]
    lens: object                 # the lens it was stitched with
    stitching: Any               # future of its stitching
    montage: Any                 # future of its unaligned montage (None: no alignment)
    name: str                    # that montage's name in the processor's montage folder

log = logging.getLogger(__name__)

MIN_FLATFIELD_TILES = 3
MAX_FLATFIELD_TILES = 256    # the median converges long before; bounds memory and time
PROCESSED = ("ok", "unaligned")   # a section recorded so in the volume is done (`process` skips it)


def acquired_takes(events: Iterable[dict[str, Any]]) -> dict[int, tuple[int, str, float]]:
    """Per slot, its last section_done in the journal's `events`: (journal line, status, time)."""
    done: dict[int, tuple[int, str, float]] = {}
    for i, e in enumerate(events):
        if e["event"] == "section_done":
            done[int(e["slot"])] = (i, e["status"], float(e.get("time", 0.0)))
    return done


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
    """Processes a run's sections into its volume, live (`run`, fed by the engine) or
    offline (`process_offline`, `tapescope process`: `journal=False`, nothing is written
    into the run directory). With a `cluster`, stitching, the unaligned montages, alignment
    and rendering run on its workers, several sections at once: each section's alignment to
    each of its likely references is one task, montage to montage, started as soon as both
    montages are under way, so no section's alignment waits for another's. Placing a section
    from its pairs (a small solve), recording it and its render stay here, one section at a
    time in z order, since each section is placed on those placed below it
    (docs/acquisition.md)."""

    def __init__(
        self, store: RunStore, processor: SectionProcessor, bus: EventBus, *,
        z_of_slot: dict[int, int], pixel_nm: float, flatfield: str = "auto",
        on_unregistered: Callable[[int, str], object] | None = None, journal: bool = True,
        cluster: SectionCluster | None = None, max_backlog: int = 0,
    ) -> None:
        self.store = store
        self.processor = processor
        self.bus = bus
        self.z_of_slot = z_of_slot
        self.slot_of_z = {z: s for s, z in z_of_slot.items()}
        self.pixel_nm = pixel_nm
        self.flatfield = flatfield
        self.on_unregistered = on_unregistered      # called on the loop: (slot, why)
        self.journal = journal
        self.cluster = cluster
        self.max_backlog = max_backlog               # sections waiting beyond this: an alarm (0: never)
        self.reports: dict[int, SectionReport] = {}  # the latest verdict per slot
        self.failed: dict[int, str] = {}
        self._tried: dict[int, int] = {}             # slot -> journal line of the section_done last taken
        self._over_limit = False
        self._backlog_lock = threading.Lock()
        # One section or one flush of the alignment window at a time: a pause flushes it
        # from another thread than the one processing sections.
        self._processing_lock = threading.RLock()
        self._paused = False     # the engine is paused: sections are written as processed
        # The backlog grows as the engine finishes sections, not only as processing ends them.
        self._unsubscribe = bus.subscribe(self._on_event) if journal else None
        # slot -> (records, lens asked for, future of its stitching, future of its montage)
        self._stitching: dict[int, Ahead] = {}
        # z -> future of the montage of its take last processed (kept while it may be a reference)
        self._montages: dict[int, Any] = {}
        # slot -> (the stitching future its pairs used, reference z -> (its montage's token, pair's future))
        self._aligning: dict[int, tuple[Any, dict[int, tuple[Any, Any]]]] = {}
        _more_file_handles()

    def close(self) -> None:
        """Cancel stitching still in flight and let go of the cluster."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        for ahead in self._stitching.values():
            self._cancel(ahead)
        self._stitching.clear()
        self._montages.clear()
        for slot in list(self._aligning):
            self._drop_pairs(slot)
        if self.cluster is not None:
            self.cluster.close()
        with self._processing_lock:      # after a flush a pause started
            self.processor.close()

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
                if slot is None:     # the end of the run: the alignment window is written
                    await asyncio.to_thread(self.flush)
                queue.task_done()
            if slot is None:
                return

    def _waiting(self) -> dict[int, tuple[int, float]]:
        """slot -> (journal line, time) of its last section_done, for the sections acquired
        since they were last processed: a retake after processing makes a slot due again.
        A section_processed names the take it wrote (the line of its section_done): with an
        alignment window an older take can be written after a newer one was acquired."""
        events = list(self.store.events())     # one read of the journal serves both
        processed: dict[int, int] = {}
        for i, e in enumerate(events):
            if e["event"] == "section_processed":
                take = e.get("take")
                processed[int(e["slot"])] = max(processed.get(int(e["slot"]), -1), i if take is None else int(take))
        return {s: (i, t) for s, (i, st, t) in acquired_takes(events).items() if st in ("complete", "flagged")
                and processed.get(s, -1) < i and s in self.z_of_slot}

    def unprocessed(self) -> list[tuple[int, int]]:
        """(slot, journal line of its last section_done) for the sections acquired since they
        were last processed or tried."""
        return sorted((s, i) for s, (i, _) in self._waiting().items() if self._tried.get(s, -1) < i)

    def backlog(self) -> tuple[int, float]:
        """Sections acquired and not yet judged by processing (those judged and open in the
        alignment window are not waiting for processing), and the age in seconds of the
        oldest of them (0 when none waits)."""
        open_slots = {self.slot_of_z[z] for z in list(self.processor.open_sections) if z in self.slot_of_z}
        waiting = {s: v for s, v in self._waiting().items() if s not in open_slots}
        oldest = min((t for _, t in waiting.values()), default=None)
        return len(waiting), 0.0 if oldest is None else max(time.time() - oldest, 0.0)

    def _on_event(self, event: Event) -> None:
        # A paused run (a person is needed, a device is down) may stay so for hours: what
        # was imaged is written now, not when the window would have moved on; and so is
        # what processing catches up on while the pause lasts (`catch_up`).
        if isinstance(event, StateChanged):
            self._paused = event.new == "paused"
        pause = self._paused and isinstance(event, StateChanged) and bool(self.processor.open_sections)
        if not isinstance(event, SectionFinished) and not pause:
            return
        work = self.flush if pause else self._publish_backlog_logged
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            work()
            return
        # Off the engine's loop: it reads the journal, or renders.
        loop.run_in_executor(None, work)

    def _publish_backlog_logged(self) -> None:
        try:
            self.publish_backlog()
        except Exception:       # a report, not the run: the next section publishes again
            log.exception("publishing the processing backlog failed")

    def publish_backlog(self) -> None:
        """The backlog as an event (progress bar, MQTT, GUI); past `max_backlog` sections one
        alarm, and a warning again only after it has come back under the limit."""
        if not self.journal:     # offline, the journal does not say what was processed
            return
        # Called from the engine's loop and the processing thread: one at a time, so that the
        # limit's alarm is raised once per crossing.
        with self._backlog_lock:
            waiting, oldest = self.backlog()
            self.bus.emit(ProcessingBacklog(waiting, oldest, len(self._stitching), self.max_backlog))
            over = self.max_backlog > 0 and waiting > self.max_backlog
            if over and not self._over_limit:
                self.bus.emit(Alarm("processing", f"processing is {waiting} sections behind acquisition (limit "
                                    f"{self.max_backlog}, oldest waiting {oldest:.0f} s): it catches up from "
                                    "disk, and the run waits for it at the end; more workers keep pace", "warning"))
            self._over_limit = over

    async def catch_up(self) -> None:
        due = await asyncio.to_thread(self.unprocessed)
        for k, (slot, line) in enumerate(due):
            if self.cluster is not None:
                await asyncio.to_thread(self._prefetch, [s for s, _ in due[k:]])
            self._tried[slot] = line
            report = await asyncio.to_thread(self.process_slot, slot, line)
            if report is not None and report.status == "unaligned" and self.on_unregistered is not None:
                if await asyncio.to_thread(self._newer_take, slot, line):
                    continue     # judged an older take; the newer one is judged next
                self._queue_reimage(slot, report.message)
                # A repeat does not say which take is wrong: this one slipped back, or the one
                # before slipped forward onto this section. Both are re-imaged.
                if report.repeats is not None and report.repeats in self.slot_of_z:
                    self._queue_reimage(self.slot_of_z[report.repeats], f"slot {slot} repeats it: one of the two takes "
                                        "shows the wrong section (a tape slip?); both are re-imaged")
        if due and self._paused and self.processor.open_sections:
            await asyncio.to_thread(self.flush)

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
            if self.journal:
                self.store.log_event("flatfield", file="calibration/gain.tif", source="brightfield")
            return
        # One gain a run: the one estimated before a resume, or by the live run for `process`.
        if (self.store.dir / "flatfield.tif").exists():
            self.processor.gain = tifffile.imread(self.store.dir / "flatfield.tif").astype(np.float32)
            return
        records = self.store.tiles()
        if len(records) < MIN_FLATFIELD_TILES:
            self.bus.emit(Alarm("flatfield", f"only {len(records)} tiles so far: this section is "
                                f"processed without flat-field correction", "warning"))
            return
        gain = estimate_flatfield(RunStore.read_tile(r) for r in records[:MAX_FLATFIELD_TILES])
        self.processor.gain = gain
        if self.journal:
            tifffile.imwrite(self.store.dir / "flatfield.tif", gain)
            self.store.log_event("flatfield", file="flatfield.tif", tiles=len(records))

    def _prefetch(self, slots: list[int]) -> None:
        """Start the stitching of the next sections on the cluster (twice its workers at
        most: enough to keep them busy, few to redo if the lens is estimated meanwhile), and
        their alignment to the references they are sure to have (`_prefetch_pairs`)."""
        with self._processing_lock:      # not while a pause writes the window
            self._prefetch_locked(slots)

    def _prefetch_locked(self, slots: list[int]) -> None:
        assert self.cluster is not None
        self._ensure_flatfield()
        for slot, ahead in list(self._stitching.items()):
            if ahead.lens != self.processor.lens_wanted:    # the lens was estimated since: stitched again
                self._cancel(ahead)
                self._stitching[slot] = self._start(slot, ahead.records)
        room = 2 * max(self.cluster.worker_count(), 1) - len(self._stitching)
        for slot in slots:
            if room <= 0:
                break
            if slot in self._stitching:
                continue
            records = self.store.tiles(slot)
            if records:
                self._stitching[slot] = self._start(slot, records)
                room -= 1
        self._prefetch_pairs(slots)

    def _start(self, slot: int, records: list[TileRecord]) -> Ahead:
        """A section's stitching and its unaligned montage on the cluster."""
        assert self.cluster is not None
        p, z = self.processor, self.z_of_slot[slot]
        stitching = self.cluster.stitch(records, self.pixel_nm, lens=p.lens_wanted, gain=p.gain, dark=p.dark,
                                        tile_model=p.tile_model, priority=-z)
        name = MontageStore.new_name(z)
        montage = self.cluster.montage(p.montages.folder, z, name, records, stitching, p.canvas, gain=p.gain,
                                       dark=p.dark, device=p.device) if p.align else None
        return Ahead(records, p.lens_wanted, stitching, montage, name)

    def _cancel(self, ahead: Ahead) -> None:
        """Cancel a section's stitching and montage started ahead (a montage already
        written goes with the next sweep of the folder)."""
        for future in (ahead.stitching, ahead.montage):
            if future is not None:
                future.cancel()

    def _montage_of(self, z: int) -> Any:
        """What section z's pairs are aligned against: the future of its montage (a section
        under way, or processed from one), its kept montage's name, or None: its pixels in
        the volume."""
        slot = self.slot_of_z.get(z)
        if slot in self._stitching:
            return self._stitching[slot].montage
        return self._montages.get(z, self.processor.montages.current.get(z))

    def _prefetch_pairs(self, slots: list[int]) -> None:
        """For each of `slots` (processed in z order) whose stitching is under way: its
        alignment to each of the sections it will be aligned to if those under way before
        it are good (`SectionProcessor.likely_references`); a pair for a section that turns
        out not good is dropped when its section is placed. None before the first section is
        placed while the lens is still to be estimated: the sections stitched before it are
        stitched again with it, and their montages made again."""
        if not self.processor.lens_settled:
            return
        before: list[int] = []
        for slot in sorted(slots, key=self.z_of_slot.__getitem__):
            z = self.z_of_slot[slot]
            if slot in self._stitching:
                stitching, montage = self._stitching[slot].stitching, self._stitching[slot].montage
                for reference in self.processor.likely_references(z, before):
                    token = self._montage_of(reference)
                    if token is not None or reference not in before:     # a section not started yet waits
                        self._pair(slot, z, reference, stitching, montage, token)
            before.append(z)

    def _pair(self, slot: int, z: int, reference: int, stitching: Any, montage: Any, token: Any) -> Any:
        """The future of section z's alignment (its `montage`, from `stitching`) to
        `reference` (`token`: `_montage_of`) on the cluster: the one started ahead if it
        used the same montages, else one started now."""
        assert self.cluster is not None
        held = self._aligning.get(slot)
        if held is None or held[0] is not stitching:
            self._drop_pairs(slot)
            held = self._aligning[slot] = (stitching, {})
        if reference not in held[1] or held[1][reference][0] is not token:
            self._drop_pairs(slot, reference)
            p = self.processor
            held[1][reference] = (token, self.cluster.align(
                p.volume, p.montages.folder, z, montage, reference, token, elastic=p.elastic, device=p.device,
                scratch=p.scratch, prefix=p.scratch_prefix, flow=p.flow))
        return held[1][reference][1]

    def _drop_pairs(self, slot: int, reference: int | None = None, unless: Any = None) -> None:
        """Cancel the pairs of `slot` started ahead (only those to `reference`, if given,
        and not those made against the montage `unless`)."""
        held = self._aligning.get(slot)
        if held is None:
            return
        for r in [r for r in held[1] if reference is None or r == reference]:
            if unless is None or held[1][r][0] is not unless:
                held[1].pop(r)[1].cancel()
        if reference is None:
            del self._aligning[slot]

    def _process_on_cluster(self, slot: int, z: int, records: list[TileRecord], info: dict) -> SectionReport:
        """Section z with its stitching, its montage, its alignment to each reference and its
        rendering on the cluster: work started ahead is taken if it saw these tiles and the
        lens that holds now (a lens estimated meanwhile, or a retake, makes it stitch and
        align again), else it is started now. Pairs that other sections started ahead
        against another take of this z (or against its pixels in the volume) are dropped."""
        assert self.cluster is not None
        ahead = self._stitching.pop(slot, None)
        if ahead is None or ahead.records != records or ahead.lens != self.processor.lens_wanted:
            if ahead is not None:
                self._cancel(ahead)
            ahead = self._start(slot, records)
        future, montage = ahead.stitching, ahead.montage
        for other in list(self._aligning):
            self._drop_pairs(other, reference=z, unless=montage)
        cluster = self.cluster

        def pairs(z: int, references: list[int]) -> list[ReferencePair]:
            futures = [self._pair(slot, z, r, future, montage, self._montage_of(r)) for r in references]
            return [cluster.result(f) for f in futures]

        try:
            stitched = cluster.result(future)
            name = None if montage is None else cluster.result(montage)
            tiles, stage_px, grid = section_inputs(records, self.pixel_nm)
            p = self.processor
            render = cluster.renderer(p.volume, records, gain=p.gain, dark=p.dark, device=p.device)
            report = p.process(z, tiles, stage_px, grid, info, stitched=stitched, render=render, pairs=pairs,
                               montage=name)
            if montage is not None:      # this take's montage is z's now (the processor kept it)
                self._montages[z] = montage
            return report
        finally:
            self._drop_pairs(slot)
            # Montages of sections that are no longer references go, as the processor drops them,
            # and those of takes cancelled or failed after theirs was written.
            self._montages = {k: m for k, m in self._montages.items()
                              if k in self.processor.montages.current or k > z}
            self.processor.montages.sweep({a.name for a in self._stitching.values()})

    def _cluster_news(self) -> None:
        """Workers that left the cluster since the last section: an alarm each (their tasks
        were given to the others by the scheduler, and retried)."""
        if self.cluster is None:
            return
        for address, left in self.cluster.lost_workers():
            self.bus.emit(Alarm("processing", f"dask worker {address} left the cluster; its tasks go to the "
                                f"{left} worker(s) left and are retried", "warning" if left else "error"))

    def process_offline(self, slots: Sequence[int], *, on_skip: Callable[[int, int], None] | None = None) -> None:
        """The given slots' sections in z order, each once (`tapescope process`). A section
        that the volume records as processed (ok or unaligned) is skipped: a killed `process`
        goes on where it stopped; a section written but not recorded (killed while rendering
        it) is done again."""
        sections = self.processor.volume.group.attrs["tapescope"].get("sections", {})
        takes = acquired_takes(self.store.events())
        due = []
        for slot in sorted(slots, key=lambda s: self.z_of_slot[s]):
            z = self.z_of_slot[slot]
            if sections.get(str(z), {}).get("status") in PROCESSED:
                if on_skip is not None:
                    on_skip(slot, z)
                continue
            if takes.get(slot, (0, "", 0.0))[1] not in ("complete", "flagged"):
                status = takes[slot][1] if slot in takes else "not acquired"
                self.processor.record_missing(z, {"slot": slot, "z": z}, f"no section to process ({status})")
                continue
            due.append(slot)
        for k, slot in enumerate(due):
            if self.cluster is not None:
                self._prefetch(due[k:])
            self.process_slot(slot, takes[slot][0])
        self.flush()

    def flush(self) -> None:
        """Write the sections still open in the processor's alignment window, and report
        them. A fault is an alarm: those sections are not recorded, so a resume does them."""
        with self._processing_lock:
            try:
                self.processor.flush()
            except Exception as exc:
                log.exception("writing the alignment window failed")
                self.bus.emit(Alarm("processing", f"the sections open in the alignment window were not all "
                                    f"written: {type(exc).__name__}: {exc}; a resumed run processes them again"))
            self._report_written()
            self._publish_backlog_logged()

    def _restore_montages(self, z: int) -> None:
        """The montages of section z's references that are not kept (a resumed run, a retake
        aligned to older sections), rendered again from their tiles, so that z is aligned as
        it would have been without the stop. A reference whose tiles are gone, or are a newer
        take's than the one in the volume (a retake that failed: the tiles are rewritten in
        place, the good take's pixels kept), is aligned to as written in the volume: its tiles
        at the good take's positions would be another picture in the good take's place."""
        missing = self.processor.missing_montages(z)
        if not missing:
            return
        takes = acquired_takes(self.store.events())
        sections = self.processor.volume.group.attrs["tapescope"].get("sections", {})
        for k in missing:
            slot = self.slot_of_z.get(k)
            records = self.store.tiles(slot) if slot is not None else []
            kept_take = sections.get(str(k), {}).get("take")
            latest = takes.get(slot, (None,))[0] if slot is not None else None
            try:
                if kept_take is not None and latest != kept_take:
                    raise ValueError(f"its tiles are a newer take (journal line {latest}) than the one in the "
                                     f"volume (line {kept_take})")
                self.processor.restore_montage(k, section_inputs(records, self.pixel_nm)[0])
            except (ValueError, OSError) as exc:
                self.bus.emit(Alarm("alignment", f"montage of z={k} not made again ({exc}): z={z} is aligned to "
                                    "it as written in the volume", "warning"))

    def process_slot(self, slot: int, take: int) -> SectionReport | None:
        """Section `slot` as its take at journal line `take` (its section_done) left it: the
        record names the take, since a later take's tiles are written over these."""
        with self._processing_lock:
            return self._process_slot(slot, take)

    def _process_slot(self, slot: int, take: int) -> SectionReport | None:
        z = self.z_of_slot[slot]
        records: list[TileRecord] = self.store.tiles(slot)
        info = {"slot": slot, "z": z, "barcode": records[0].meta.get("barcode", "") if records else "",
                "tiles": len(records), "take": take}
        try:
            if not records:
                raise ValueError("no tiles stored for this section")
            self._ensure_flatfield()
            # A retake writes the alignment window first: before the montages its references
            # need are made again, and before pairs are set against montages the flush drops.
            if self.processor.flush_for(z) and self.cluster is not None:
                self._montages = {k: m for k, m in self._montages.items() if k in self.processor.montages.current}
            self._restore_montages(z)
            if self.cluster is not None:
                report = self._process_on_cluster(slot, z, records, info)
            else:
                report = self.processor.process(z, *section_inputs(records, self.pixel_nm), info)
        except Exception as exc:
            log.exception("processing slot %d failed", slot)
            reason = f"{type(exc).__name__}: {exc}"
            self.processor.record_missing(z, info, reason)
            self._report_written()      # sections the window wrote before the fault
            self._failed(slot, z, reason)
            self._cluster_news()
            self.publish_backlog()
            return None
        self._report_written()
        self._cluster_news()
        self.publish_backlog()
        return report

    def _failed(self, slot: int, z: int, reason: str) -> None:
        self.failed[slot] = reason
        self.reports.pop(slot, None)
        # Journalled, not as processed: a resumed run tries the section again.
        if self.journal:
            self.store.log_event("processing_failed", slot=slot, z=z, message=reason, time=time.time())
        self.bus.emit(Alarm("processing", f"slot {slot} (z={z}) not processed: {reason}"))
        self.bus.emit(SectionProcessed(slot, z, "failed", float("nan"), (0.0, 0.0), 0.0, reason))

    def _report_written(self) -> None:
        """Journal and announce the sections the processor has written since the last call:
        a section kept open in the alignment window is processed when it is written."""
        for report in self.processor.finished():
            z = report.z
            slot = self.slot_of_z[z]
            if report.status == "failed":
                self._failed(slot, z, report.message)
                continue
            self.reports[slot] = report
            self.failed.pop(slot, None)
            if self.journal:
                self.store.log_event("section_processed", slot=slot, z=z, status=report.status,
                                     max_residual_px=report.max_residual_px, shift_px=list(report.shift_px),
                                     message=report.message, take=report.take, time=time.time())
            if report.status != "ok":
                self.bus.emit(Alarm("alignment", f"slot {slot} (z={z}): {report.message}", "warning"))
            self.bus.emit(SectionProcessed(slot, z, report.status, report.max_residual_px,
                                           report.shift_px, report.alignment_confidence, report.message))
