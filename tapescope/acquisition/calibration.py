"""Calibration routines, each a small state machine of its own (as the Allen Institute's pyTEM).

    darkfield      BLANK -> COLLECT -> UNBLANK -> STORE        beam blanked, mean of N frames
    brightfield    SWEEP -> COMBINE -> STORE                   frames on bare film, the stage moving
    auto_exposure  MEASURE -> ADJUST -> (MEASURE ...) -> DONE  film level into a target band
    autofocus      SWEEP -> FIT -> SET                         maximise the focus score over defocus
    find_aperture  (in roi_planner.py: the aperture's centre on the overview, re-centred if clipped)

A routine records each state it enters (`Routine.trail`), ends in DONE or FAILED, journals
its result (`{"event": "calibration", ...}`) and emits CalibrationDone; its images go to
RUN_DIR/calibration/. Dark and gain feed the flat-field of processing (processing.py reads
them before estimating one from the tiles). A routine that cannot run (no column driver
to blank the beam) fails with an alarm: the run goes on without it, never silently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from tapescope.errors import TapescopeError
from tapescope.hardware.errors import DeviceError

from .acquisition import Acquisition
from .events import Alarm, CalibrationDone
from .plan import SectionPlan, TilePlan
from .qc import focus_score

CAL_DIR = "calibration"


class CalibrationFailed(TapescopeError):
    pass


@dataclass
class Routine:
    name: str = ""
    trail: list[str] = field(default_factory=list)

    def enter(self, state: str) -> None:
        self.trail.append(state)

    async def run(self, engine: Acquisition, **kw: Any) -> dict[str, Any]:
        self.trail.clear()
        try:
            result = await self._run(engine, **kw)
        except (CalibrationFailed, DeviceError) as exc:
            self.enter("FAILED")
            engine.bus.emit(Alarm("calibration", f"{self.name} failed: {exc}", "warning"))
            engine.store.log_event("calibration", name=self.name, ok=False, error=str(exc), trail=self.trail,
                                   time=time.time())
            engine.bus.emit(CalibrationDone(self.name, False, {"error": str(exc)}))
            return {"ok": False, "error": str(exc)}
        self.enter("DONE")
        engine.progress.calibrations[self.name] = {"ok": True, **result}
        engine.store.log_event("calibration", name=self.name, ok=True, trail=self.trail, time=time.time(), **result)
        engine.bus.emit(CalibrationDone(self.name, True, result))
        return {"ok": True, **result}

    async def _run(self, engine: Acquisition, **kw: Any) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _save(engine: Acquisition, name: str, image: np.ndarray) -> str:
        d = engine.store.dir / CAL_DIR
        d.mkdir(exist_ok=True)
        tifffile.imwrite(d / name, image.astype(np.float32))
        return f"{CAL_DIR}/{name}"


def _column(engine: Acquisition) -> Any:
    col = getattr(engine.scope, "column", None)
    if col is None:
        raise CalibrationFailed("this scope has no column driver (cannot blank, focus or change magnification)")
    return col


async def _frame(engine: Acquisition) -> np.ndarray:
    frame = await engine.call_device("camera trigger", engine.scope.camera.trigger, "camera")
    return frame.data.astype(np.float32)


@dataclass
class Darkfield(Routine):
    name: str = "darkfield"
    frames: int = 8

    async def _run(self, engine: Acquisition, **kw: Any) -> dict[str, Any]:
        col = _column(engine)
        self.enter("BLANK")
        await engine.call_device("blank beam", col.blank, "column")
        try:
            self.enter("COLLECT")
            acc = None
            for _ in range(self.frames):
                f = await _frame(engine)
                acc = f if acc is None else acc + f
            assert acc is not None
            dark = acc / self.frames
        finally:
            self.enter("UNBLANK")
            await engine.call_device("unblank beam", col.unblank, "column")
        self.enter("STORE")
        return {"file": self._save(engine, "dark.tif", dark), "mean": float(dark.mean()),
                "std": float(dark.std()), "frames": self.frames}


@dataclass
class Brightfield(Routine):
    """Frames on bare film at several stage positions: specimen-free, so their median is the
    camera's gain field (vignetting, dust), independent of any tissue."""

    name: str = "brightfield"
    frames: int = 7

    async def _run(self, engine: Acquisition, *, film_points_nm: Sequence[tuple[float, float]] = (), **kw: Any,
                   ) -> dict[str, Any]:
        if len(film_points_nm) < 3:
            raise CalibrationFailed(f"need 3 film positions free of tissue, the overview gave {len(film_points_nm)}")
        self.enter("SWEEP")
        frames = []
        for i, (y, x) in enumerate(list(film_points_nm)[: self.frames]):
            frame, _, _ = await engine.expose_at(TilePlan(-1, i, y, x))
            frames.append(frame.data.astype(np.float32))
        self.enter("COMBINE")
        dark = _stored(engine, "dark.tif")
        stack = np.stack(frames) - (dark if dark is not None else 0.0)
        gain = np.median(stack, axis=0)
        if float(gain.mean()) <= 0:
            raise CalibrationFailed("film frames are dark: is the beam on?")
        gain = (gain / gain.mean()).astype(np.float32)
        self.enter("STORE")
        return {"file": self._save(engine, "gain.tif", gain), "frames": len(frames),
                "min": float(gain.min()), "max": float(gain.max())}


@dataclass
class AutoExposure(Routine):
    """Exposure so that bare film (the brightest the specimen gets) sits inside a target band
    of counts: bright enough for signal, clear of saturation."""

    name: str = "auto_exposure"
    target: tuple[float, float] = (6000.0, 10000.0)
    max_iterations: int = 5
    max_ms: float = 1000.0

    async def _run(self, engine: Acquisition, *, film_point_nm: tuple[float, float] | None = None, **kw: Any,
                   ) -> dict[str, Any]:
        cam = engine.scope.camera
        if film_point_nm is not None:
            await engine.expose_at(TilePlan(-1, -1, *film_point_nm))
        exposure = engine.exposure_ms
        dark = _stored(engine, "dark.tif")
        offset = float(dark.mean()) if dark is not None else 0.0
        for _ in range(self.max_iterations):
            self.enter("MEASURE")
            level = float(np.percentile(await _frame(engine), 95)) - offset
            if self.target[0] <= level <= self.target[1]:
                engine.exposure_ms = exposure
                return {"exposure_ms": exposure, "level": level}
            self.enter("ADJUST")
            want = (self.target[0] + self.target[1]) / 2
            exposure = float(np.clip(exposure * want / max(level, 1.0), 0.01, self.max_ms))
            await engine.call_device("set exposure", lambda e=exposure: cam.set_exposure(e), "camera")
        raise CalibrationFailed(f"level not in {self.target} after {self.max_iterations} tries "
                                f"(exposure {exposure:g} ms)")


@dataclass
class Autofocus(Routine):
    """Focus sweep on tissue, a parabola through the best three, the column set there."""

    name: str = "autofocus"
    step_nm: float = 200.0
    steps: int = 4                      # each side of the present focus

    async def _run(self, engine: Acquisition, *, at_nm: tuple[float, float] | None = None, **kw: Any) -> dict[str, Any]:
        col = _column(engine)
        start = (await engine.call_device("column status", col.status, "column")).focus_nm
        if at_nm is not None:
            await engine.expose_at(TilePlan(-1, -1, *at_nm))
        self.enter("SWEEP")
        zs = start + self.step_nm * np.arange(-self.steps, self.steps + 1)
        scores = []
        for z in zs:
            await engine.call_device(f"focus {z:.0f} nm", lambda z=z: col.set_focus(float(z)), "column")
            scores.append(focus_score(await _frame(engine))[0])
        self.enter("FIT")
        k = int(np.argmax(scores))
        best = float(zs[k])
        if 0 < k < len(zs) - 1:
            a, b, c = scores[k - 1], scores[k], scores[k + 1]
            denom = a - 2 * b + c
            if denom < 0:
                best += 0.5 * (a - c) / denom * self.step_nm
        self.enter("SET")
        await engine.call_device(f"focus {best:.0f} nm", lambda: col.set_focus(best), "column")
        if k in (0, len(zs) - 1):
            engine.bus.emit(Alarm("autofocus", f"best focus at the end of the sweep ({best:.0f} nm): "
                                  "focus may lie beyond it", "warning"))
        return {"focus_nm": best, "start_nm": float(start), "scores": [float(s) for s in scores],
                "gain": float(max(scores) / max(min(scores), 1e-12))}


def _stored(engine: Acquisition, name: str) -> np.ndarray | None:
    p = engine.store.dir / CAL_DIR / name
    return tifffile.imread(p).astype(np.float32) if p.exists() else None


@dataclass
class CalibrationSuite:
    """Which routines a run uses, and when: darkfield before the first slot; brightfield and
    auto-exposure once, on the first slot with bare film on its overview; autofocus on every
    section (at its first tissue tile) and again when QC blames focus."""

    names: tuple[str, ...] = ()
    darkfield: Darkfield = field(default_factory=Darkfield)
    brightfield: Brightfield = field(default_factory=Brightfield)
    auto_exposure: AutoExposure = field(default_factory=AutoExposure)
    autofocus: Autofocus = field(default_factory=Autofocus)
    _film_done: bool = False

    async def prepare(self, engine: Acquisition) -> None:
        if "darkfield" in self.names and "darkfield" not in engine.progress.calibrations:
            await self.darkfield.run(engine)

    async def before_section(self, engine: Acquisition, plan: SectionPlan,
                             film_points_nm: Sequence[tuple[float, float]]) -> None:
        done = engine.progress.calibrations
        if not self._film_done and film_points_nm:
            if "auto_exposure" in self.names and "auto_exposure" not in done:
                await self.auto_exposure.run(engine, film_point_nm=film_points_nm[0])
            if "brightfield" in self.names and "brightfield" not in done:
                await self.brightfield.run(engine, film_points_nm=film_points_nm)
            self._film_done = True
        if "autofocus" in self.names and plan.tiles:
            t = plan.tiles[len(plan.tiles) // 2]
            await self.autofocus.run(engine, at_nm=(t.y_nm, t.x_nm))

    async def refocus(self, engine: Acquisition) -> None:
        if "autofocus" in self.names:
            await self.autofocus.run(engine)
