"""The acquisition engine: the run's state machine (state.py, documented in
docs/acquisition.md) and its controls; the actions it runs are beside it (sections.py: a
slot's tape move, checks, plan and record; tiles.py: moves, exposures, QC, writes), as
pymmcore-plus splits its runner from its engine.

One asyncio task drives the scope through the states. Operator controls (pause, resume, abort, skip_section) only set
flags and events: they return at once, from any state, and take effect at the next tile
boundary, so a tile is never half-taken. Every device call runs under a timeout; a
failed call is retried with a reconnect (RECOVERING), and what still fails pauses or
fails the run with an alarm, as configured. Finished sections go to processing through
a bounded queue that never blocks the scope and never drops: processing that falls
behind catches up from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tapescope.hardware.errors import DeviceError, DeviceTimeout
from tapescope.hardware.scope import Scope

from .acquisition import Acquisition, Planner, SlotVerdict
from .calibration import CalibrationSuite
from .events import (
    Alarm,
    AwaitingProcessing,
    DeviceStatus,
    EventBus,
    Progress,
    RunFinished,
    RunStarted,
    SectionFinished,
    StateChanged,
)
from .interrupts import Abort, Fatal, Skip
from .journal import FINAL, RunProgress
from .notices import CureNotices
from .plan import SectionPlan, TilePlan
from .sections import SectionRunner
from .settings import EngineSettings
from .state import RunState, check_transition
from .store import RunStore
from .tiles import TileTaker

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Engine", "EngineSettings", "GridPlanner", "RunState", "RunSummary", "SlotVerdict"]


@dataclass(frozen=True)
class RunSummary:
    state: RunState
    sections: int
    tiles: int
    seconds: float
    section_status: dict[int, str] = field(default_factory=dict)
    reason: str = ""


@dataclass
class GridPlanner:
    """The same fixed grid on every slot (the demo's plan)."""

    grid: list[TilePlan]
    film_points: dict[int, list[tuple[float, float]]] = field(default_factory=dict)   # none: no overview

    async def plan(self, run: Acquisition, slot: int, barcode: str) -> SectionPlan:
        return SectionPlan(slot, barcode, tuple(self.grid))


RETRY_BACKOFF_MAX_S = 2.0
MAX_AUTO_RESUMES = 3    # a device that comes back and fails again this often in one section needs a person
# Devices a person may have their hands on while the run is paused for them: probed by
# reconnecting only, never by repeating their step (a tape move at the transport).
HANDS_ON = frozenset({"tape"})


@dataclass
class _Probe:
    """What the probe of one device pause did: whether it is inside the step now (then it is
    let finish, never cut mid-exchange), and the step's result once it succeeded."""

    stepping: bool = False
    result: list[Any] = field(default_factory=list)


class Engine:
    def __init__(
        self, scope: Scope, store: RunStore, bus: EventBus, *, slots: list[int],
        grid: list[TilePlan] | None = None, exposure_ms: float,
        section_queue: asyncio.Queue[int | None] | None = None,
        planner: Planner | None = None, settings: EngineSettings | None = None,
        progress: RunProgress | None = None, tile_shape: tuple[int, int] | None = None,
        pixel_nm: float = 0.0, calibration: CalibrationSuite | None = None,
    ) -> None:
        if planner is None:
            if grid is None:
                raise ValueError("Engine needs a grid or a planner")
            planner = GridPlanner(grid)
        self.scope = scope
        self.store = store
        self.bus = bus
        self.slots = list(slots)
        self.grid = grid
        self.exposure_ms = exposure_ms
        self.section_queue = section_queue
        self._end_marker: asyncio.Task[None] | None = None
        self.planner = planner
        self.settings = settings or EngineSettings()
        self.progress = progress or RunProgress()
        self.tile_shape = tile_shape
        self.pixel_nm = pixel_nm
        self.calibration = calibration
        self._resume_reason = "resumed"
        self._recover_from = RunState.ACQUIRING
        self._state = RunState.IDLE
        self._paused_from = RunState.ACQUIRING
        self._pause_requested: str | None = None
        self._abort_requested: str | None = None
        self._skip_requested: str | None = None
        self._wake = asyncio.Event()            # set on resume/abort: ends a PAUSED wait
        self._stop_at_end = False
        self._t0 = time.monotonic()
        self._watch_from = time.monotonic()      # the watchdog counts from here or the last tile
        # The actions the state machine runs: tiles (tiles.py) and sections (sections.py).
        self.tiles = TileTaker(self)
        self.sections = SectionRunner(self, self.tiles)
        self._waiting_for_processing = False     # the watchdog expects no tiles meanwhile
        self._auto_resumes: dict[str, int] = {}  # device -> resumes after a probe, this section
        self.notices = CureNotices(self.alarm)    # the drivers' own cures, summarised when repeated

    # -- the operator's controls: flags only; safe from any state, never block -------------
    @property
    def state(self) -> RunState:
        return self._state

    def pause(self, reason: str = "operator") -> bool:
        """Pause at the next tile boundary. False if the run is over (nothing to pause)."""
        if self._state.terminal:
            return False
        self._pause_requested = reason
        return True

    def resume(self, reason: str = "operator") -> bool:
        """Leave PAUSED (or cancel a pause not yet taken). False if nothing was paused."""
        if self._state.terminal:
            return False
        was = self._pause_requested is not None or self._state is RunState.PAUSED
        self._pause_requested = None
        self._resume_reason = reason
        self._wake.set()
        return was

    def abort(self, reason: str = "operator") -> bool:
        """End the run at the next tile boundary (at once when idle or paused)."""
        if self._state.terminal:
            return False
        self._abort_requested = reason
        self._wake.set()
        return True

    def skip_section(self, reason: str = "operator") -> bool:
        """Stop the current section at the next tile boundary, record it as skipped, go on."""
        if self._state.terminal or self._state is RunState.IDLE:
            return False
        self._skip_requested = reason
        return True

    # -- state ------------------------------------------------------------------------------
    def _set_state(self, new: RunState, reason: str = "") -> None:
        old = self._state
        if new is old:
            return
        check_transition(old, new)
        self._state = new
        self.store.log_event("state", old=old.value, new=new.value, reason=reason, time=time.time())
        self.bus.emit(StateChanged(old.value, new.value, reason))

    async def boundary(self) -> None:
        """A tile boundary: where abort, skip and pause take effect. Before any of them, the
        tile being written is made durable: a paused or aborted run has stored all it took."""
        if self._abort_requested or self._pause_requested or self._skip_requested:
            await self.tiles.drain_premove()   # nothing moves while PAUSED; no move outlives the section
            await self.tiles.flush()
        if self._abort_requested is not None:
            raise Abort(self._abort_requested)
        if self._pause_requested is not None:
            await self._paused(self._pause_requested)
        if self._skip_requested is not None:
            reason, self._skip_requested = self._skip_requested, None
            raise Skip(reason)

    async def _paused(self, reason: str) -> None:
        self._paused_from = self._state if self._state is not RunState.PAUSED else self._paused_from
        self._set_state(RunState.PAUSED, reason)
        while self._pause_requested is not None and self._abort_requested is None:
            self._wake.clear()
            if self._pause_requested is None or self._abort_requested is not None:
                break
            await self._wake.wait()
        if self._abort_requested is not None:
            raise Abort(self._abort_requested)
        back = self._paused_from if self._paused_from is not RunState.RECOVERING else RunState.ACQUIRING
        self._set_state(back, self._resume_reason)
        self._watch_from = time.monotonic()      # the watchdog counts from the resume

    def alarm(self, source: str, message: str, severity: str = "error") -> None:
        """An alarm to every subscriber, and into the journal (an error's line has no severity)."""
        self.bus.emit(Alarm(source, message, severity))
        extra = {} if severity == "error" else {"severity": severity}
        self.store.log_event("alarm", source=source, message=message, **extra, time=time.time())

    async def pause_with_alarm(self, source: str, message: str) -> None:
        self.notices.flush()                     # the cures that came before the pause, said first
        self.alarm(source, message)
        self._pause_requested = f"{source}: {message}"
        await self._paused(self._pause_requested)

    # -- device calls: timeout, retry with reconnect, then pause or fail --------------------
    async def call_device(self, what: str, fn: Callable[[], Awaitable[T]], device: str = "") -> T:
        """``fn()`` under the step timeout, retried after a reconnect until both the retry count
        and the retry window are spent; then FAILED, or PAUSED until the step itself succeeds
        again (docs/acquisition.md, "Faults and recovery"). A reconnect that works does not
        count as progress: only the step's own success ends the retries or the pause."""
        s = self.settings
        while True:
            last: DeviceError | None = None
            first_failure: float | None = None
            attempt = 0
            while True:
                try:
                    result = await asyncio.wait_for(fn(), s.step_timeout_s)
                except TimeoutError:
                    last = DeviceTimeout(device or "engine", f"{what}: no result within {s.step_timeout_s:g} s")
                except DeviceError as exc:
                    last = exc
                else:
                    if attempt:
                        self.notices.notice(last.device if last else device, f"{what} succeeded on retry {attempt}, "
                                            "the device reconnected (the run goes on)")
                    if attempt and self._state is RunState.RECOVERING:
                        self._set_state(self._recover_from, f"{what} succeeded on retry {attempt}")
                    return result
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if attempt >= s.device_retries and now - first_failure >= s.retry_window_s:
                    break
                attempt += 1
                if self._state is not RunState.RECOVERING:
                    self._recover_from = self._state
                    self._set_state(RunState.RECOVERING, f"{what}: {last}")
                left = max(0.0, s.retry_window_s - (now - first_failure))
                self.bus.emit(Alarm(last.device, f"{what} failed ({last}); retry {attempt} after a reconnect "
                                    f"(at least {s.device_retries}, for up to {left:.0f} s more)", "warning"))
                self.store.log_event("device_retry", what=what, error=str(last), attempt=attempt, time=time.time())
                await asyncio.sleep(min(s.retry_backoff_s * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S))
                await self._reconnect(last.device)
                if self._abort_requested is not None:
                    raise Abort(self._abort_requested)
            assert last is not None
            if self._state is RunState.RECOVERING:
                self._set_state(self._recover_from, "retries exhausted")
            message = (f"{what} failed {attempt + 1} times in {time.monotonic() - first_failure:.0f} s "
                       f"({attempt} retr{'y' if attempt == 1 else 'ies'}, each after a reconnect): {last}")
            if s.on_device_failure != "pause":
                raise Fatal(message) from last
            probe = await self._pause_for(last.device, what, message, fn)
            if probe.result:
                return probe.result[0]       # the probe's own try of the step succeeded
            # Resumed by the operator: try the same step again from the start.

    async def _pause_for(self, device: str, what: str, message: str, step: Callable[[], Awaitable[Any]]) -> _Probe:
        """PAUSED with one alarm; the tape and the plan kept. The run resumes by itself only
        where nobody else asked for the pause meanwhile, and only when the probe's try of the
        step succeeded (or, for a device a person may be handling, once it answers)."""
        s = self.settings
        asked = self._pause_requested is not None
        auto = self._auto_resumes.get(device, 0) < MAX_AUTO_RESUMES and not asked
        by_step = device not in HANDS_ON
        if auto:
            when = f"{what} succeeds again" if by_step else f"the {device} answers again"
            text = (f"{message}; paused: fix it and resume (the run also resumes by itself once {when}; "
                    f"tried every {s.device_probe_s:g} s)")
        elif asked:
            text = f"{message}; paused, as was asked: resume once it is fixed"
        else:
            text = (f"{message}; paused: it came back and failed again {MAX_AUTO_RESUMES} times in this section: "
                    "needs a person")
        probe = _Probe()
        task = asyncio.create_task(
            self._probe(device, f"{device}: {text}", what, step if by_step else None, probe) if auto
            else asyncio.sleep(0), name=f"engine-probe-{device}")
        try:
            await self.pause_with_alarm(device, text)
        finally:
            if probe.stepping:
                await asyncio.wait({task})   # a device exchange is never cut mid-way
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return probe

    async def _reconnect(self, device: str, *, clear_jam: bool = True) -> bool:
        """Close and reopen a device's connection and bring it back to where the run needs it
        (the camera's exposure and arm; a jammed tape cleared). Whether it answers. Part of a
        retry or a probe, whose own alarms say so: not a cure by itself."""
        dev = getattr(self.scope, device, None)
        if dev is None:
            return False
        with contextlib.suppress(DeviceError, OSError, TimeoutError):
            await asyncio.wait_for(dev.close(), 5)
        try:
            await asyncio.wait_for(dev.connect(), self.settings.step_timeout_s)
            if device == "camera":
                await self.scope.camera.set_exposure(self.exposure_ms)
                await self.scope.camera.arm()
            elif device == "tape" and clear_jam and (await self.scope.tape.state()).state == "JAMMED":
                # A jam the transport's own tension control did not clear: CLEAR it (the tape
                # stays where it is) so that the move can be tried again.
                st = await self.scope.tape.clear_jam()
                self.alarm("tape", f"tape jammed at slot {st.slot}: sent CLEAR; the tape is {st.state.lower()}",
                            "warning")
            return True
        except (DeviceError, OSError, TimeoutError) as exc:
            log.warning("reconnecting %s failed: %s", device, exc)
            return False

    async def _probe(self, device: str, reason: str, what: str, step: Callable[[], Awaitable[Any]] | None,
                     probe: _Probe) -> None:
        """While paused for `device` (pause `reason`): every device_probe_s, reconnect it and
        try `step` (None: the reconnect alone); once that succeeds, resume. Only this pause:
        an operator's pause, asked meanwhile, is theirs. A jammed tape is not cleared from
        here (a person may be at the transport). Failed tries go to the journal and the log,
        not to the alarms: the pause's alarm stands for them."""
        t0 = time.monotonic()
        tries = 0
        while True:
            await asyncio.sleep(self.settings.device_probe_s)
            if self._state is not RunState.PAUSED or self._pause_requested != reason:
                return
            tries += 1
            error = ""
            if not await self._reconnect(device, clear_jam=False):
                error = "does not answer"
            elif step is not None:
                probe.stepping = True
                try:
                    probe.result.append(await asyncio.wait_for(step(), self.settings.step_timeout_s))
                except TimeoutError:
                    error = f"no result within {self.settings.step_timeout_s:g} s"
                except DeviceError as exc:
                    error = str(exc)
                finally:
                    probe.stepping = False
            if error:
                log.info("%s still failing (probe %d): %s", what, tries, error)
                self.store.log_event("device_probe", device=device, what=what, attempt=tries, error=error,
                                     time=time.time())
                continue
            if self._pause_requested != reason or self._abort_requested is not None:
                return                       # the operator took over meanwhile; the result stays
            self._auto_resumes[device] = self._auto_resumes.get(device, 0) + 1
            done = f"{what} succeeded" if step is not None else "it reconnected"
            self.alarm(device, f"{device} answers again ({done} at probe {tries}, "
                               f"{time.monotonic() - t0:.0f} s into the pause): resuming", "warning")
            self.resume(f"{device} answers again")
            return

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        self._t0 = time.monotonic()
        n_sections = 0
        reason = ""
        self.bus.emit(RunStarted(str(self.store.dir), tuple(self.slots),
                                 len(self.grid) if self.grid is not None else 0))
        watchdog = asyncio.create_task(self._watchdog(), name="engine-watchdog")
        self._hook_devices(True)
        try:
            if self._abort_requested is not None:
                raise Abort(self._abort_requested)
            self._set_state(RunState.PREPARING, "run started")
            await self.boundary()
            await self._prepare()
            self._set_state(RunState.ACQUIRING, "prepared")
            for slot in self.slots:
                if self._stop_at_end:
                    break
                if self.progress.slot(slot).status in FINAL:
                    continue                      # done in an earlier life of this run
                await self.sections.take(slot)
                n_sections += 1
                self._auto_resumes.clear()        # a device's comebacks are counted per section
            if self.settings.reimage_at_end and not self._stop_at_end:
                await self._await_processing()
                taken: set[tuple[int, bool]] = set()
                # A verdict may still come during the pass (the wait timed out): taken up too,
                # and a slot queued whole while its QC retake ran is taken again, whole.
                while todo := [s for s in self.progress.reimage_queue()
                               if (s, self.progress.slot(s).retake_all) not in taken]:
                    taken.add((todo[0], self.progress.slot(todo[0]).retake_all))
                    await self.sections.take(todo[0], reimage=True)
            if self.calibration is not None:
                self.calibration.finish(self)
            self._set_state(RunState.FINISHING, "all slots visited")
            final = RunState.DONE
        except Abort as exc:
            final, reason = RunState.ABORTED, str(exc)
        except asyncio.CancelledError:
            final, reason = RunState.ABORTED, "cancelled"
            self._finish(final, reason, n_sections)
            raise
        except Fatal as exc:
            final, reason = RunState.FAILED, str(exc)
            self.alarm("engine", reason)
        except DeviceError as exc:     # a device fault outside the retry wrapper (a bug, but reported)
            final, reason = RunState.FAILED, str(exc)
            self.alarm(exc.device, str(exc))
        except Exception as exc:       # a bug: the run still ends (FAILED), said, and processing is released
            log.exception("the run failed unexpectedly")
            final, reason = RunState.FAILED, f"unexpected error: {type(exc).__name__}: {exc}"
            self.alarm("engine", reason)
        finally:
            await self.tiles.drain_premove()
            self._hook_devices(False)
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        return self._finish(final, reason, n_sections)

    def _hook_devices(self, on: bool) -> None:
        """Faults the drivers cure themselves become warning alarms; the stage's and tape's
        readouts during a move become DeviceStatus events (telemetry at >= 20 Hz)."""
        for dev in self.scope.devices:
            dev.on_notice = self._device_notice if on else None
        for name in ("stage", "tape"):
            dev = getattr(self.scope, name)
            if hasattr(dev, "on_readout"):
                dev.on_readout = self._readout_to_bus(name) if on else None

    def _readout_to_bus(self, device: str) -> Callable[[dict[str, Any], bool], None]:
        return lambda status, moving: self.bus.emit(DeviceStatus(device, status, moving))

    def _device_notice(self, device: str, message: str) -> None:
        self.notices.notice(device, f"{message} (cured by the driver; the run goes on)")

    def _finish(self, final: RunState, reason: str, n_sections: int) -> RunSummary:
        self.notices.flush()
        if not self._state.terminal:
            self._set_state(final, reason)
        if self.section_queue is not None:
            try:
                self.section_queue.put_nowait(None)   # no more will come
            except asyncio.QueueFull:
                # Processing is behind. The end marker must still arrive, or the worker waits on
                # the queue forever and the run never exits: hand it over as soon as there is room.
                self._end_marker = asyncio.get_running_loop().create_task(self.section_queue.put(None))
        seconds = time.monotonic() - self._t0
        tiles = self.progress.tiles_stored
        self.bus.emit(RunFinished(self._state.value, n_sections, tiles, seconds))
        self.store.log_event("run_finished", time=time.time(), state=self._state.value, reason=reason)
        status = {s: p.status for s, p in self.progress.slots.items() if p.status}
        return RunSummary(self._state, n_sections, tiles, seconds, status, reason)

    async def _prepare(self) -> None:
        cam = self.scope.camera
        await self.call_device("set exposure", lambda: cam.set_exposure(self.exposure_ms), "camera")
        await self.call_device("arm camera", cam.arm, "camera")
        if self.calibration is not None:
            await self.calibration.prepare(self)

    def request_reimage(self, slot: int, reason: str) -> bool:
        """Processing's verdict that `slot` did not register against its neighbour (a fold,
        the wrong tissue, too little agreement): re-image the whole section before the run
        ends, while the tape is loaded. Journalled, so a resumed run still owes it. A section
        already re-imaged once is not queued again: it needs a person. Call on the engine's
        loop. Returns whether the section was queued."""
        prog = self.progress.slot(slot)
        if prog.status == "flagged" and prog.retake_all and not prog.reimaged:
            return True                      # already queued whole (a verdict on a partial take)
        if prog.reimaged:
            self.alarm("alignment", f"slot {slot} still does not register after re-imaging ({reason}): needs a person")
            return False
        if prog.status not in ("complete", "flagged"):
            return False
        prog.status, prog.retake_all, prog.message = "flagged", True, reason
        self.store.log_event("reimage_queued", slot=slot, tiles="all", reason="alignment", message=reason,
                             time=time.time())
        late = self._state.terminal or not self.settings.reimage_at_end or self._state is RunState.FINISHING
        self.alarm("alignment", f"slot {slot} does not register ({reason}): "
                            + ("queued for re-imaging; resume the run to re-image it" if late
                               else "queued for re-imaging before the run ends"), "warning")
        self.bus.emit(SectionFinished(slot, "flagged", len(prog.tiles), len(prog.failed_qc),
                                      f"does not register: {reason}; queued for re-imaging"))
        return True

    async def expose_at(self, tile: TilePlan, nxt: TilePlan | None = None) -> tuple[Any, float, float]:
        """Move to `tile` and expose (planners and calibrations take their frames so)."""
        return await self.tiles.expose_at(tile, nxt)

    async def _await_processing(self) -> None:
        """Let processing judge every section taken so far, so that the re-image pass sees the
        ones that fail to register. Pause and abort act meanwhile; after processing_wait_s the
        run goes on and says so (a later verdict is journalled; resuming re-images it)."""
        queue = self.section_queue
        if queue is None:
            return
        # A wake-up: with nothing new acquired (a resumed run), the worker still catches up
        # from the journal and its verdicts come before the pass. Full: the queue wakes it anyway.
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(-1)
        joined = asyncio.ensure_future(queue.join())
        deadline = time.monotonic() + self.settings.processing_wait_s
        self._waiting_for_processing = True
        try:
            await asyncio.sleep(0)
            if not joined.done():
                log.info("waiting up to %g s for processing before the re-image pass", self.settings.processing_wait_s)
                self.bus.emit(AwaitingProcessing(self.settings.processing_wait_s))
            while not joined.done():
                if self._abort_requested is not None:
                    raise Abort(self._abort_requested)
                if self._pause_requested is not None:
                    await self._paused(self._pause_requested)
                self._skip_requested = None          # no section to skip while waiting
                left = deadline - time.monotonic()
                if left <= 0:
                    wait = self.settings.processing_wait_s
                    self.alarm("processing", f"processing is still behind after {wait:g} s: the run ends without "
                                "waiting; a section it flags later is queued in the journal (resume to re-image)",
                                "warning")
                    return
                await asyncio.wait({joined}, timeout=min(left, 0.25))
        finally:
            self._waiting_for_processing = False
            self._watch_from = time.monotonic()       # the watchdog counts from here, not from the last tile
            joined.cancel()

    def offer_processing(self, slot: int) -> None:
        if self.section_queue is None:
            return
        try:
            self.section_queue.put_nowait(slot)
        except asyncio.QueueFull:
            # Never wait on processing: the worker catches up from the journal.
            log.info("processing queue full; slot %d will be picked up from the journal", slot)

    def emit_progress(self) -> None:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = self.tiles.stored_this_run / elapsed
        done_sections = sum(1 for s in self.slots if self.progress.slot(s).status in FINAL)
        planned = [self.progress.slot(s).plan for s in self.slots]
        known = [len(p.tiles) for p in planned if p is not None]
        per = (sum(known) / len(known)) if known else 0.0
        total = int(sum(known) + per * sum(1 for p in planned if p is None))
        stored = sum(len(self.progress.slot(s).tiles) for s in self.slots)
        eta = (total - stored) / rate if rate > 0 and total >= stored else float("nan")
        self.bus.emit(Progress(done_sections, len(self.slots), stored, total, rate, eta, self.sections.current_slot))

    async def _watchdog(self) -> None:
        """Alarm and pause when no tile has arrived for watchdog_stall_s while acquiring."""
        stall = self.settings.watchdog_stall_s
        period = min(1.0, stall / 4)
        while True:
            await asyncio.sleep(period)
            self.notices.flush(older_than_s=self.notices.window_s)
            busy = self._state in (RunState.ACQUIRING, RunState.RECOVERING) and not self._waiting_for_processing
            idle_for = time.monotonic() - max(self._watch_from, self.tiles.last_stored_t)
            if busy and idle_for > stall and self._pause_requested is None:
                msg = f"no tile for {idle_for:.0f} s (limit {stall:g} s) in state {self._state.value}"
                self.alarm("watchdog", msg)
                self.pause(f"watchdog: {msg}")
