"""What the operator sees, as plain Python: the run's state folded from engine events.

No Qt here (logic split from I/O): the widgets draw this model, the tests check it
directly, and the same model is fed from the local engine's bus or from MQTT telemetry.
Events are read by type name and optional attributes, so richer events from a newer
engine (QC numbers, stage position, tile grid) are shown as soon as they carry them.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tapescope.acquisition.events import (
    Alarm,
    AwaitingProcessing,
    CalibrationDone,
    DeviceStatus,
    Event,
    OverviewAvailable,
    ProcessingBacklog,
    Progress,
    RunFinished,
    RunStarted,
    SectionAcquired,
    SectionFinished,
    SectionPlanned,
    SectionProcessed,
    SectionStarted,
    StateChanged,
    TileAcquired,
    TileRejected,
)
from tapescope.acquisition.state import RunState, offers
from tapescope.mqtt.topics import EngineOnline

from .link_events import CommandReply, LinkChanged, RoleChanged

LOG_LINES = 500      # the log panel keeps this many; the journal keeps everything
ALARMS_KEPT = 50
# Per-section detail (each tile's QC, the ROI, the overview image, processing's verdict) is
# kept for this many sections, the most recently touched; older sections keep their line on
# the tape view (SlotInfo) and show their planned grid without QC colours. A run of days has
# thousands of sections of thousands of tiles: kept whole, the GUI would grow without end.
SECTIONS_KEPT = 64


class TileState(enum.Enum):
    PLANNED = "planned"
    ACQUIRED = "acquired"
    QC_FAILED = "qc failed"
    RETAKEN = "retaken"


class SlotState(enum.Enum):
    PENDING = "pending"
    CURRENT = "imaging"
    ACQUIRED = "acquired"
    DONE = "done"            # processed into the volume
    FLAGGED = "flagged"      # processed, but unaligned or with warnings
    FAILED = "failed"
    SKIPPED = "skipped"
    EMPTY = "empty"
    DAMAGED = "damaged"


@dataclass
class TileInfo:
    row: int
    col: int
    y_nm: float                      # planned centre
    x_nm: float
    state: TileState = TileState.PLANNED
    qc: dict[str, float] = field(default_factory=dict)   # numbers the engine reported
    attempts: int = 0
    counted: bool = False            # stored at least once (counts towards progress)


@dataclass
class SlotInfo:
    slot: int
    barcode: str = ""
    state: SlotState = SlotState.PENDING
    note: str = ""


@dataclass(frozen=True)
class AlarmLine:
    time: float
    source: str
    message: str
    severity: str


class RunModel:
    """Folds events into state. ``apply`` returns the names of the parts that changed."""

    def __init__(self) -> None:
        self._handler_table = self._handlers()
        self.run_state = "idle"
        self.run_dir = ""
        self.slots: dict[int, SlotInfo] = {}
        self.current_slot: int | None = None
        self.tiles_per_section = 0
        self.plan: list[tuple[int, int, float, float]] = []   # (row, col, y_nm, x_nm) from the config
        self.tile_nm: tuple[float, float] = (0.0, 0.0)         # tile footprint (height, width)
        self.section_tiles: dict[int, dict[tuple[int, int], TileInfo]] = {}
        self.rois: dict[int, tuple[tuple[float, float], ...]] = {}     # slot -> ROI polygon (y, x) nm
        self.overviews: dict[int, tuple[Any, tuple[float, float], float]] = {}  # image, origin (y, x), nm/px
        self.tiles_done = 0
        self.engine_progress: Any = None     # the engine's own Progress event, when it sends one
        self.backlog: ProcessingBacklog | None = None    # processing's latest backlog
        self.sections_processed: dict[int, SectionProcessed] = {}
        self.last_processed: SectionProcessed | None = None
        self.alarms: deque[AlarmLine] = deque(maxlen=ALARMS_KEPT)
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.readouts: dict[str, str] = {}
        self.readouts_time: dict[str, float] = {}
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.link = ""                       # attached over MQTT: the broker connection, as words
        self.link_up = True
        self.engine_online: bool | None = None   # attached over MQTT: the engine's retained online flag
        self._tile_times: deque[float] = deque(maxlen=64)

    # -- set-up that does not come from events -------------------------------------------
    def set_plan(self, plan: list[tuple[int, int, float, float]], tile_nm: tuple[float, float]) -> None:
        """The configured tile grid (row, col, y_nm, x_nm of each centre) and the tile footprint.

        Used until the engine announces a section's own plan (``SectionPlanned``)."""
        self.plan = list(plan)
        self.tile_nm = tile_nm
        self.tiles_per_section = len(self.plan)
        # Attached over MQTT, sections may be known before the plan is: fill in their planned tiles.
        for tiles in self.section_tiles.values():
            for r, c, y, x in self.plan:
                tile = tiles.setdefault((r, c), TileInfo(r, c, y, x))
                tile.y_nm, tile.x_nm = y, x

    # -- derived -------------------------------------------------------------------------
    @property
    def tiles_total(self) -> int:
        if self.engine_progress is not None:
            return int(self.engine_progress.tiles_total)
        return self.tiles_per_section * len(self.slots)

    def tiles_of(self, slot: int | None) -> dict[tuple[int, int], TileInfo]:
        if slot is None:
            return {}
        if slot not in self.section_tiles:
            self._keep(self.section_tiles, slot, {(r, c): TileInfo(r, c, y, x) for r, c, y, x in self.plan})
        return self.section_tiles[slot]

    def _keep(self, per_section: dict[int, Any], slot: int, value: Any) -> None:
        """per_section[slot] = value, as the most recent; the oldest beyond SECTIONS_KEPT go
        (never the current slot's)."""
        per_section.pop(slot, None)
        per_section[slot] = value
        for old in list(per_section)[:max(0, len(per_section) - SECTIONS_KEPT)]:
            if old != self.current_slot and old != slot:
                del per_section[old]

    def tiles_per_second(self) -> float:
        if self.engine_progress is not None:
            return float(self.engine_progress.tiles_per_s)
        t = self._tile_times
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def eta_s(self) -> float | None:
        if self.engine_progress is not None and self.run_state not in ("done", "failed", "aborted"):
            eta = float(self.engine_progress.eta_s)
            return None if eta != eta else eta   # nan: the engine does not know yet
        rate = self.tiles_per_second()
        if rate <= 0 or self.run_state not in ("acquiring", "preparing", "paused", "recovering"):
            return None
        return max(self.tiles_total - self.tiles_done, 0) / rate

    def elapsed_s(self, now: float | None = None) -> float:
        if self.t_start is None:
            return 0.0
        return (self.t_end or now or time.monotonic()) - self.t_start

    # -- events --------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')}  {text}")

    def _handlers(self) -> dict[type, Callable[[Any], set[str]]]:
        """Which method takes which event type (what each changes: the panels to redraw)."""
        return {
            RunStarted: self._on_run_started,
            SectionStarted: self._on_section_started,
            TileAcquired: self._on_tile_acquired,
            TileRejected: self._on_tile_rejected,
            SectionPlanned: self._on_section_planned,
            OverviewAvailable: self._on_overview_available,
            AwaitingProcessing: self._on_awaiting_processing,
            SectionFinished: self._on_section_finished,
            DeviceStatus: self._on_device_status,
            Progress: self._on_progress,
            ProcessingBacklog: self._on_backlog,
            CalibrationDone: self._on_calibration_done,
            SectionAcquired: self._on_section_acquired,
            SectionProcessed: self._on_section_processed,
            Alarm: self._on_alarm,
            RunFinished: self._on_run_finished,
            StateChanged: self._on_state_changed,
            LinkChanged: self._on_link_changed,
            RoleChanged: self._on_role_changed,
            EngineOnline: self._on_engine_online,
            CommandReply: self._on_command_reply,
        }

    def apply(self, ev: Event) -> set[str]:
        for cls in type(ev).__mro__:   # a subclass of a known event is handled as that event
            if (handler := self._handler_table.get(cls)) is not None:
                return handler(ev) | {"log"}
        self._log(f"{type(ev).__name__}: {_fields(ev)}")
        return {"log"}

    def _on_run_started(self, ev: RunStarted) -> set[str]:
        self.run_state = "acquiring"
        self.run_dir = ev.run_dir
        self.slots = {s: SlotInfo(s) for s in ev.slots}
        self.section_tiles.clear()
        self.sections_processed.clear()
        self.last_processed = None
        self.backlog = None
        self.tiles_done = 0
        self.current_slot = None
        self._tile_times.clear()
        self.t_start, self.t_end = time.monotonic(), None
        if not self.plan:
            self.tiles_per_section = ev.tiles_per_section
        self._log(f"run started: {len(ev.slots)} sections x {ev.tiles_per_section} tiles -> {ev.run_dir}")
        return {"run", "tape", "map", "progress"}

    def _on_section_started(self, ev: SectionStarted) -> set[str]:
        if self.current_slot is not None and self.slots.get(self.current_slot, SlotInfo(-1)).state \
                is SlotState.CURRENT:
            self.slots[self.current_slot].state = SlotState.SKIPPED   # left before it was acquired
        info = self.slots.setdefault(ev.slot, SlotInfo(ev.slot))
        info.barcode, info.state = ev.barcode, SlotState.CURRENT
        self.current_slot = ev.slot
        self.tiles_of(ev.slot)
        self._log(f"section: slot {ev.slot}, barcode {ev.barcode}")
        return {"tape", "map", "readouts"}

    def _tile(self, slot: int, row: int, col: int, y_nm: float = float("nan"), x_nm: float = float("nan")) -> TileInfo:
        tiles = self.tiles_of(slot)
        tile = tiles.get((row, col))
        if tile is None:   # a tile no plan showed (attached over MQTT): placed where the stage read back
            tile = tiles[(row, col)] = TileInfo(row, col, y_nm, x_nm)
            if self.tile_nm == (0.0, 0.0):
                self._infer_footprint(tiles, tile)
        return tile

    def _infer_footprint(self, tiles: dict[tuple[int, int], TileInfo], new: TileInfo) -> None:
        """Without a plan (MQTT carries no tile size), the grid pitch between neighbours stands in
        for the tile footprint: the map then draws tiles edge to edge, without their overlap."""
        h, w = self.tile_nm
        for (r, c), t in tiles.items():
            if t is new or math.isnan(t.x_nm) or math.isnan(new.x_nm):
                continue
            if r == new.row and abs(c - new.col) == 1 and not w:
                w = abs(t.x_nm - new.x_nm)
            if c == new.col and abs(r - new.row) == 1 and not h:
                h = abs(t.y_nm - new.y_nm)
        if h or w:
            self.tile_nm = (h or w, w or h)

    def _on_tile_acquired(self, ev: TileAcquired) -> set[str]:
        tile = self._tile(ev.slot, ev.row, ev.col, getattr(ev, "y_nm", float("nan")), getattr(ev, "x_nm", float("nan")))
        attempt = int(getattr(ev, "attempt", tile.attempts + 1))
        tile.attempts = max(tile.attempts + 1, attempt)
        qc: dict[str, Any] = {"mean": ev.mean}
        raw_qc = getattr(ev, "qc", None) or {}
        qc.update({k: v for k, v in raw_qc.items() if isinstance(v, int | float | str | list | tuple)})
        x, y = getattr(ev, "x_nm", float("nan")), getattr(ev, "y_nm", float("nan"))
        if x == x and y == y:
            qc["stage x_nm"], qc["stage y_nm"] = x, y
        tile.qc = qc
        if raw_qc.get("faults"):
            tile.state = TileState.QC_FAILED     # kept after its last retake, and marked
        else:
            tile.state = TileState.RETAKEN if tile.attempts > 1 else TileState.ACQUIRED
        if not tile.counted:
            tile.counted = True
            self.tiles_done += 1
        self._tile_times.append(time.monotonic())
        return {"map", "progress"}

    def _on_tile_rejected(self, ev: Any) -> set[str]:
        tile = self._tile(ev.slot, ev.row, ev.col)
        tile.attempts = max(tile.attempts, int(ev.attempt))
        tile.state = TileState.QC_FAILED
        tile.qc["faults"] = list(ev.faults)
        tile.qc["decision"] = ev.decision
        self._log(f"slot {ev.slot} tile r{ev.row} c{ev.col} attempt {ev.attempt} failed QC "
                  f"({', '.join(ev.faults)}): {ev.decision}")
        return {"map"}

    def _on_section_planned(self, ev: Any) -> set[str]:
        self._keep(self.section_tiles, ev.slot, {(r, c): TileInfo(r, c, y, x) for r, c, y, x in ev.tiles})
        self._keep(self.rois, ev.slot, tuple(ev.roi_nm))
        self.tile_nm = tuple(ev.tile_nm)  # type: ignore[assignment]
        self._log(f"slot {ev.slot}: {len(ev.tiles)} tiles planned (ROI from {ev.roi_source})")
        return {"map", "progress"}

    def _on_overview_available(self, ev: Any) -> set[str]:
        self._keep(self.overviews, ev.slot, (ev.image, tuple(ev.origin_nm), float(ev.pixel_nm)))
        return {"map"}

    def _on_awaiting_processing(self, ev: Any) -> set[str]:
        self._log(f"all slots visited; waiting up to {ev.limit_s:g} s for processing to judge them, "
                  "so that a section that does not register is re-imaged before the run ends")
        return set()

    def _on_section_finished(self, ev: Any) -> set[str]:
        info = self.slots.setdefault(ev.slot, SlotInfo(ev.slot))
        state = {"complete": SlotState.ACQUIRED, "flagged": SlotState.FLAGGED, "skipped": SlotState.SKIPPED,
                 "empty": SlotState.EMPTY, "damaged": SlotState.DAMAGED, "failed": SlotState.FAILED}
        info.state = state.get(ev.status, SlotState.FLAGGED)
        info.note = ev.message or (f"{ev.n_failed_qc} tiles failed QC" if ev.n_failed_qc else "")
        self._log(f"slot {ev.slot}: {ev.status}, {ev.n_tiles} tiles" + (f" ({info.note})" if info.note else ""))
        return {"tape"}

    def _on_device_status(self, ev: Any) -> set[str]:
        self.readouts[ev.device] = ", ".join(f"{k} {_short(v)}" for k, v in ev.status.items()) + \
            ("  (moving)" if ev.moving else "")
        self.readouts_time[ev.device] = time.monotonic()
        return {"readouts"}

    def _on_backlog(self, ev: ProcessingBacklog) -> set[str]:
        self.backlog = ev
        return {"progress"}

    def _on_progress(self, ev: Any) -> set[str]:
        self.engine_progress = ev
        self.tiles_done = int(ev.tiles_done)
        return {"progress"}

    def _on_calibration_done(self, ev: Any) -> set[str]:
        self._log(f"calibration {ev.name}: {'ok' if ev.ok else 'FAILED'} {_short(ev.summary)}")
        return set()

    def _on_section_acquired(self, ev: SectionAcquired) -> set[str]:
        info = self.slots.setdefault(ev.slot, SlotInfo(ev.slot))
        if info.state is SlotState.CURRENT:
            info.state = SlotState.ACQUIRED
        self._log(f"slot {ev.slot}: {ev.n_tiles} tiles acquired")
        return {"tape"}

    def _on_section_processed(self, ev: SectionProcessed) -> set[str]:
        info = self.slots.setdefault(ev.slot, SlotInfo(ev.slot))
        info.state = {"ok": SlotState.DONE, "failed": SlotState.FAILED}.get(ev.status, SlotState.FLAGGED)
        info.note = ev.message
        self._keep(self.sections_processed, ev.slot, ev)
        self.last_processed = ev
        self._log(f"slot {ev.slot} (z={ev.z}) processed: {ev.status}, worst seam {ev.max_residual_px:.2f} px, "
                  f"shift ({ev.shift_px[0]:+.1f}, {ev.shift_px[1]:+.1f}) px")
        return {"tape", "montage"}

    def _on_alarm(self, ev: Alarm) -> set[str]:
        self.alarms.append(AlarmLine(time.time(), ev.source, ev.message, ev.severity))
        self._log(f"{ev.severity.upper()} {ev.source}: {ev.message}")
        return {"alarm"}

    def _on_run_finished(self, ev: RunFinished) -> set[str]:
        self.run_state = ev.state
        self.t_end = time.monotonic()
        if self.current_slot is not None and self.slots[self.current_slot].state is SlotState.CURRENT:
            self.slots[self.current_slot].state = SlotState.FAILED if ev.state == "failed" else SlotState.SKIPPED
            self.slots[self.current_slot].note = f"run {ev.state} during this section"
        self._log(f"run {ev.state}: {ev.sections} sections, {ev.tiles} tiles in {ev.seconds:.1f} s")
        return {"run", "tape", "progress"}

    def _on_state_changed(self, ev: Any) -> set[str]:
        self.run_state = str(ev.new).lower()
        self._log(f"state: {ev.old} -> {ev.new}" + (f" ({ev.reason})" if ev.reason else ""))
        return {"run", "progress"}


    # -- attached over MQTT (tapescope.gui.remote) ----------------------------------------
    def _on_link_changed(self, ev: Any) -> set[str]:
        self.link, self.link_up = ev.detail, bool(ev.up)
        self._log(f"MQTT: {ev.detail}")
        return {"run"}

    def _on_role_changed(self, ev: Any) -> set[str]:
        self._log(f"MQTT role {ev.role}: {ev.detail}")
        return {"run"}

    def _on_engine_online(self, ev: Any) -> set[str]:
        self.engine_online = bool(ev.online)
        if ev.run_dir:
            self.run_dir = ev.run_dir
        self._log(f"engine {'online' if ev.online else 'OFFLINE'}" + (f", run {ev.run_dir}" if ev.run_dir else "")
                  + (f" ({ev.reason})" if ev.reason else ""))
        if not ev.online and ev.reason != "exit" and self.run_state not in TERMINAL:
            self.alarms.append(AlarmLine(time.time(), "mqtt", f"the engine went offline: {ev.reason or 'no reason'}",
                                         "error"))
            return {"run", "alarm"}
        return {"run"}

    def _on_command_reply(self, ev: Any) -> set[str]:
        who = "" if ev.mine else " (another client's)"
        verdict = "ok" if ev.ok else "REFUSED"
        self._log(f"reply to{who} {ev.cmd} (id {ev.id}): {verdict}" + (f", {ev.text}" if ev.text else ""))
        if ev.mine and not ev.ok:
            self.alarms.append(AlarmLine(time.time(), "control", f"{ev.cmd.replace('_', ' ')} refused by the engine: "
                                         f"{ev.text}", "warning"))
            return {"run", "alarm"}
        return {"run"}


TERMINAL = tuple(s.value for s in RunState if s.terminal)


def allowed(verb: str, run_state: str, running: bool) -> bool:
    """Whether run control offers VERB in RUN_STATE (``running``: a run is held by this GUI).
    Which state offers which control is the state machine's rule (`state.CONTROLS`)."""
    if verb == "start":
        return not running
    if not running:
        return False
    # Before the engine reports a state ("idle"), a held run may still be aborted.
    return verb == "abort" if run_state == "idle" else offers(verb, run_state)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_short(x)}" for k, x in v.items())
    return str(v)


def _fields(ev: Event) -> str:
    d = getattr(ev, "__dict__", {})
    return ", ".join(f"{k}={v}" for k, v in d.items() if not hasattr(v, "shape"))
