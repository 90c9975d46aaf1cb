"""What planners and calibrations may use of a running acquisition: a public, typed
interface, so that they depend on it and not on the engine (the engine provides it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tapescope.hardware.scope import Scope

from .events import EventBus
from .journal import RunProgress
from .plan import SectionPlan, TilePlan
from .settings import EngineSettings
from .store import RunStore

T = TypeVar("T")


@dataclass(frozen=True)
class SlotVerdict:
    """A slot the planner will not image: empty, damaged, ... (recorded, not fatal)."""

    status: str
    message: str


class Acquisition(Protocol):
    """The running acquisition as a planner or a calibration sees it."""

    scope: Scope
    bus: EventBus
    store: RunStore
    progress: RunProgress
    exposure_ms: float

    async def call_device(self, what: str, fn: Callable[[], Awaitable[T]], device: str = "") -> T:
        """A device call under the run's timeout, retry and pause policy."""
        ...

    async def expose_at(self, tile: TilePlan, nxt: TilePlan | None = None) -> tuple[Any, float, float]:
        """Move to `tile` and expose: (frame, x_nm, y_nm) where the stage was."""
        ...

    async def boundary(self) -> None:
        """A tile boundary: pause, abort and skip take effect here."""
        ...

    def alarm(self, source: str, message: str, severity: str = "error") -> None:
        """An alarm to every subscriber, and into the journal."""
        ...


class Calibrations(Protocol):
    """The calibration routines a run does before it starts, before a section, on a retake."""

    async def prepare(self, engine: Acquisition) -> None: ...

    async def before_section(self, engine: Acquisition, plan: SectionPlan,
                             film_points_nm: Sequence[tuple[float, float]] | None) -> None: ...

    def finish(self, engine: Acquisition) -> None: ...

    async def refocus(self, engine: Acquisition) -> None: ...


class Planner(Protocol):
    """Turns a slot into the tiles to take (or a verdict not to image it)."""

    # Film (no tissue) positions per slot that the planner saw, for a brightfield reference.
    film_points: dict[int, list[tuple[float, float]]]

    async def plan(self, run: Acquisition, slot: int, barcode: str) -> SectionPlan | SlotVerdict: ...


class RunContext(Acquisition, Protocol):
    """What the engine's actions (sections.py, tiles.py) use of the run that drives them: the
    planner-facing interface, and the run's settings and bookkeeping."""

    settings: EngineSettings
    planner: Planner
    calibration: Calibrations | None
    tile_shape: tuple[int, int] | None
    pixel_nm: float

    async def pause_with_alarm(self, source: str, message: str) -> None:
        """Pause the run, with an alarm that says why; returns once resumed."""
        ...

    def offer_processing(self, slot: int) -> None:
        """Hand a finished section to processing (never waits)."""
        ...

    def emit_progress(self) -> None:
        """A Progress event for the run so far."""
        ...
