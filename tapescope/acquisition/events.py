"""Typed events of a run. The CLI progress bar, the log, the GUI and the MQTT bridge all
subscribe to the same bus; the engine never knows who listens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tapescope.events")


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class RunStarted(Event):
    run_dir: str
    slots: tuple[int, ...]
    tiles_per_section: int


@dataclass(frozen=True)
class SectionStarted(Event):
    slot: int
    barcode: str


@dataclass(frozen=True)
class TileAcquired(Event):
    """A tile is stored and journalled (it counts). QC numbers and the encoder position ride along."""

    slot: int
    row: int
    col: int
    index: int          # 0-based index of the tile within its section
    mean: float
    x_nm: float = float("nan")      # stage encoder readback at exposure
    y_nm: float = float("nan")
    qc: dict[str, Any] = field(default_factory=dict)   # TileQC.as_dict(): focus, saturation, verdict...
    attempt: int = 1                # 1 = first exposure; >1 after retakes
    n_tiles: int = 0                # tiles planned in this section


@dataclass(frozen=True)
class SectionAcquired(Event):
    slot: int
    n_tiles: int


@dataclass(frozen=True)
class SectionProcessed(Event):
    slot: int
    z: int
    status: str                     # "ok", "unaligned" or "failed"
    max_residual_px: float
    shift_px: tuple[float, float]
    alignment_confidence: float
    message: str = ""


@dataclass(frozen=True)
class Alarm(Event):
    source: str
    message: str
    severity: str = "error"         # "warning" | "error"


@dataclass(frozen=True)
class RunFinished(Event):
    state: str
    sections: int
    tiles: int
    seconds: float


@dataclass(frozen=True)
class StateChanged(Event):
    """The engine's RunState changed (values are RunState.value strings)."""

    old: str
    new: str
    reason: str = ""


@dataclass(frozen=True)
class SectionPlanned(Event):
    """The tile grid of one section: ROI polygon and tile centres in stage nm, (y, x)."""

    slot: int
    barcode: str
    roi_nm: tuple[tuple[float, float], ...]
    tiles: tuple[tuple[int, int, float, float], ...]    # (row, col, y_nm, x_nm) in acquisition order
    tile_nm: tuple[float, float]                        # tile footprint (height, width) in nm
    roi_source: str = "grid"                            # "grid" | "auto" | "operator"


@dataclass(frozen=True)
class OverviewAvailable(Event):
    """A low-resolution overview of a slot (in-process only: pixels never go over MQTT)."""

    slot: int
    image: Any                      # float32 2D numpy array
    origin_nm: tuple[float, float]  # stage (y, x) of the image's top-left pixel corner
    pixel_nm: float


@dataclass(frozen=True)
class TileRejected(Event):
    """An exposure failed QC and will be retaken (or, at the last attempt, kept and marked)."""

    slot: int
    row: int
    col: int
    attempt: int
    faults: tuple[str, ...]
    decision: str                   # "retake" | "GOOD" | "STOP_AT_END" | "STOP_NOW"


@dataclass(frozen=True)
class SectionFinished(Event):
    """What happened to one slot: complete, flagged (re-image), skipped, empty, damaged, failed."""

    slot: int
    status: str
    n_tiles: int
    n_failed_qc: int = 0
    message: str = ""


@dataclass(frozen=True)
class DeviceStatus(Event):
    """A device readout: stage position, tape slot and state, camera exposure..."""

    device: str
    status: dict[str, Any]
    moving: bool = False


@dataclass(frozen=True)
class Progress(Event):
    sections_done: int
    sections_total: int
    tiles_done: int
    tiles_total: int                # planned so far (sections not yet planned count as estimated)
    tiles_per_s: float
    eta_s: float                    # nan when unknown
    slot: int = -1                  # current slot, -1 between sections


@dataclass(frozen=True)
class ProcessingBacklog(Event):
    """Sections acquired and not yet judged by processing, after each section it judges."""

    waiting: int
    oldest_s: float                 # age of the oldest waiting section (0 when none waits)
    in_flight: int = 0              # sections being stitched on the cluster
    limit: int = 0                  # waiting beyond this raised an alarm (0: no limit)


@dataclass(frozen=True)
class AwaitingProcessing(Event):
    """Acquisition is done but for re-imaging: the engine waits for processing's verdicts
    (at most limit_s) so that a section that does not register is re-imaged now."""

    limit_s: float


@dataclass(frozen=True)
class CalibrationDone(Event):
    name: str                       # "darkfield" | "brightfield" | "auto_exposure" | "autofocus" | "find_aperture"
    ok: bool
    summary: dict[str, Any]


Handler = Callable[[Event], None]


@dataclass
class EventBus:
    _handlers: list[Handler] = field(default_factory=list)

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    def emit(self, event: Event) -> None:
        if isinstance(event, Alarm):
            log.log(logging.ERROR if event.severity == "error" else logging.WARNING,
                    "%s: %s", event.source, event.message)
        for h in list(self._handlers):
            try:
                h(event)
            except Exception:  # a broken display must not stop the scope
                log.exception("event handler %r failed on %r", h, event)
