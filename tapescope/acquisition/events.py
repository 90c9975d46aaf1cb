"""Typed events of a run. The CLI progress bar, the log, the GUI and the MQTT bridge all
subscribe to the same bus; the engine never knows who listens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

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
    slot: int
    row: int
    col: int
    index: int          # 0-based index of the tile within its section
    mean: float


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
