"""Calibration routines, each a small state machine of its own (as the Allen Institute's pyTEM).

    darkfield      BLANK -> COLLECT -> UNBLANK -> STORE        beam blanked, mean of N frames
    brightfield    SWEEP -> COMBINE -> STORE                   frames on bare film, the stage moving
    auto_exposure  MEASURE -> ADJUST -> (MEASURE ...) -> DONE  film level into a target band
    autofocus      COARSE -> (COARSE ...) -> FINE -> FIT -> SET  coarse sweep moved until the best
                                                               is inside it, fine sweep, parabola
    find_aperture  (in roi_planner.py: the aperture's centre on the overview, re-centred if clipped)

A routine records each state it enters (`Routine.trail`), ends in DONE, FAILED or SKIPPED,
journals its outcome (`{"event": "calibration", ...}`, also "not run, and why") and emits
CalibrationDone; its images go to RUN_DIR/calibration/. Dark and gain feed the flat-field of
processing (processing.py reads them before estimating one from the tiles). A routine that
fails or cannot run raises an alarm that says what the run does without it, and the run goes
on: never silently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from tapescope.errors import TapescopeError
from tapescope.hardware.errors import DeviceError

from .acquisition import Acquisition
from .events import CalibrationDone
from .interrupts import Fatal
from .plan import SectionPlan, TilePlan
from .qc import QCLimits, focus_score

CAL_DIR = "calibration"


class CalibrationFailed(TapescopeError):
    pass


# What the run does when a routine is not there, said in its alarm.
WITHOUT = {
    "darkfield": "processing subtracts no measured dark frame (the flat-field is estimated from the tiles)",
    "brightfield": "the flat-field is estimated from the tiles",
    "auto_exposure": "the configured exposure is kept",
    "autofocus": "the focus is left where it was: tiles may be out of focus (QC checks each tile's sharpness)",
}


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
        except (CalibrationFailed, DeviceError, Fatal) as exc:
            # Fatal: a device that on_device_failure = "fail" gave up on. A calibration is not
            # worth the run: the run goes on without it (what needs the device fails by itself).
            self.enter("FAILED")
            self._not_done(engine, f"failed: {exc}", "error" if self.name == "autofocus" else "warning",
                           {"error": str(exc)}, error=str(exc))
            return {"ok": False, "error": str(exc)}
        self.enter("DONE")
        engine.progress.calibrations[self.name] = {"ok": True, **result}
        engine.store.log_event("calibration", name=self.name, ok=True, trail=self.trail, time=time.time(), **result)
        engine.bus.emit(CalibrationDone(self.name, True, result))
        return {"ok": True, **result}

    def skip(self, engine: Acquisition, why: str) -> None:
        """Not run, and why: journalled and said, as a failure is."""
        self.trail[:] = ["SKIPPED"]
        self._not_done(engine, f"not run: {why}", "warning", {"skipped": why}, ran=False, why=why)

    def _not_done(self, engine: Acquisition, what: str, severity: str, summary: dict[str, Any],
                  **record: Any) -> None:
        """A failure or a skip: an alarm that says what the run does without the routine, the
        journal's line (``record``: its own fields) and the event (``summary``)."""
        engine.alarm("calibration", f"{self.name} {what}; {WITHOUT.get(self.name, 'the run goes on')}", severity)
        engine.store.log_event("calibration", name=self.name, ok=False, trail=self.trail, time=time.time(), **record)
        engine.bus.emit(CalibrationDone(self.name, False, summary))

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
        try:
            try:
                await engine.call_device("blank beam", col.blank, "column")
            except (DeviceError, Fatal) as exc:
                # The beam may be blanked or not: it is unblanked below (the run images next).
                raise CalibrationFailed(f"the beam could not be blanked: {exc}") from exc
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
    target: tuple[float, float] = (6000.0, 10000.0)     # counts of a 16-bit camera
    # An 8-bit camera is set up with film near half its scale (256 levels are few to waste):
    # the 16-bit band as an 8-bit converter of a 2^14-count sensor reads it.
    target_8bit: tuple[float, float] = (94.0, 156.0)
    max_iterations: int = 5
    max_ms: float = 1000.0

    def band(self, dtype: np.dtype) -> tuple[float, float]:
        """The target band in counts of frames of `dtype`."""
        return self.target_8bit if np.dtype(dtype) == np.uint8 else self.target

    async def _run(self, engine: Acquisition, *, film_point_nm: tuple[float, float] | None = None, **kw: Any,
                   ) -> dict[str, Any]:
        cam = engine.scope.camera
        if film_point_nm is not None:
            await engine.expose_at(TilePlan(-1, -1, *film_point_nm))
        exposure = engine.exposure_ms
        dark = _stored(engine, "dark.tif")
        offset = float(dark.mean()) if dark is not None else 0.0
        target = self.target
        for _ in range(self.max_iterations):
            self.enter("MEASURE")
            frame = await engine.call_device("camera trigger", cam.trigger, "camera")
            target = self.band(frame.data.dtype)
            level = float(np.percentile(frame.data, 95)) - offset
            if target[0] <= level <= target[1]:
                engine.exposure_ms = exposure
                return {"exposure_ms": exposure, "level": level, "band": list(target)}
            self.enter("ADJUST")
            want = (target[0] + target[1]) / 2
            exposure = float(np.clip(exposure * want / max(level, 1.0), 0.01, self.max_ms))
            await engine.call_device("set exposure", lambda e=exposure: cam.set_exposure(e), "camera")
        raise CalibrationFailed(f"level not in {target} after {self.max_iterations} tries "
                                f"(exposure {exposure:g} ms)")


class _Dark(CalibrationFailed):
    """A sweep frame with no electrons: the beam is off (tripped, blanked)."""


@dataclass
class Autofocus(Routine):
    """Focus from anywhere in the column's working range, on tissue: a coarse sweep that is
    extended while its best score is at one end (up to ``range_nm`` from where it started),
    then a fine sweep around the coarse best, a parabola fitted through it, the column set
    there. It fails, with the focus put back where it was, when a sweep is dark (the beam is
    restored and the sweep tried again, ``tries`` times in all), flat (nothing to focus on) or
    best at the end of the working range: it never sets a focus it did not find."""

    name: str = "autofocus"
    coarse_step_nm: float = 500.0
    coarse_steps: int = 3               # each side of the start
    fine_step_nm: float = 100.0
    fine_steps: int = 4                 # each side of the coarse best
    range_nm: float = 10_000.0          # each way from the start: the column's working range
    min_gain: float = 1.1               # best over worst coarse score: below, the sweep is flat
    tries: int = 3                      # sweeps, when one is dark

    async def _run(self, engine: Acquisition, *, at_nm: tuple[float, float] | None = None, **kw: Any) -> dict[str, Any]:
        col = _column(engine)
        start = float((await engine.call_device("column status", col.status, "column")).focus_nm)
        if at_nm is not None:
            await engine.expose_at(TilePlan(-1, -1, *at_nm))
        try:
            for attempt in range(1, self.tries + 1):
                try:
                    return await self._sweep(engine, col, start)
                except _Dark as exc:
                    if attempt == self.tries:
                        raise CalibrationFailed(f"{exc}, in {self.tries} sweeps") from None
                    engine.alarm("autofocus", f"{exc}: restoring the beam, sweep {attempt + 1} of {self.tries}",
                                 "warning")
                    await engine.call_device("restore beam", col.ensure_beam, "column")
            raise AssertionError("unreachable")
        except (CalibrationFailed, DeviceError, Fatal):
            # The column is not left at a sweep's edge.
            await engine.call_device(f"focus {start:.0f} nm", lambda: col.set_focus(start), "column")
            raise

    async def _score(self, engine: Acquisition, col: Any, z: float, dark_below: float) -> float:
        await engine.call_device(f"focus {z:.0f} nm", lambda: col.set_focus(z), "column")
        frame = await _frame(engine)
        score, _, mean = focus_score(frame)
        if mean < dark_below:
            raise _Dark(f"dark frame during the focus sweep at {z:.0f} nm (mean {mean:.0f} counts)")
        return score

    async def _sweep(self, engine: Acquisition, col: Any, start: float) -> dict[str, Any]:
        settings = getattr(engine, "settings", None)
        dark_below = settings.qc.mean_min if settings is not None else QCLimits().mean_min
        lo_limit, hi_limit = start - self.range_nm, start + self.range_nm
        coarse: dict[float, float] = {}
        zs = [start + self.coarse_step_nm * k for k in range(-self.coarse_steps, self.coarse_steps + 1)]
        while True:
            self.enter("COARSE")
            for z in zs:
                if z not in coarse and lo_limit <= z <= hi_limit:
                    coarse[z] = await self._score(engine, col, z, dark_below)
            order = sorted(coarse)
            best = max(order, key=coarse.__getitem__)
            if order[0] < best < order[-1]:
                break
            # The best is at an end: focus lies beyond it. Sweep on that way.
            sign = -1 if best == order[0] else 1
            zs = [best + sign * self.coarse_step_nm * k for k in range(1, 2 * self.coarse_steps + 1)]
            if not any(lo_limit <= z <= hi_limit for z in zs):
                raise CalibrationFailed(f"the best focus lies at the end of the working range ({best:.0f} nm, "
                                        f"{self.range_nm:.0f} nm from {start:.0f} nm)")
        scores = [coarse[z] for z in order]
        gain = max(scores) / max(min(scores), 1e-12)
        if gain < self.min_gain:
            raise CalibrationFailed(f"the focus sweep is flat (best/worst score {gain:.3f} < {self.min_gain:g}): "
                                    "no structure to focus on")
        self.enter("FINE")
        fz = best + self.fine_step_nm * np.arange(-self.fine_steps, self.fine_steps + 1)
        fine = np.array([await self._score(engine, col, float(z), dark_below) for z in fz])
        self.enter("FIT")
        a, b, _ = np.polyfit(fz - best, fine / fine.max(), 2)
        vertex = best - b / (2 * a) if a < 0 else math.inf
        # A fit that does not bend down inside the fine sweep says nothing: its best point then.
        focus = float(vertex) if fz[0] <= vertex <= fz[-1] else float(fz[int(np.argmax(fine))])
        self.enter("SET")
        await engine.call_device(f"focus {focus:.0f} nm", lambda: col.set_focus(focus), "column")
        return {"focus_nm": focus, "start_nm": start, "gain": float(gain),
                "coarse_nm": [float(z) for z in order], "coarse_scores": scores,
                "fine_nm": [float(z) for z in fz], "scores": [float(v) for v in fine],
                "frames": len(coarse) + len(fz)}


def _stored(engine: Acquisition, name: str) -> np.ndarray | None:
    p = engine.store.dir / CAL_DIR / name
    return tifffile.imread(p).astype(np.float32) if p.exists() else None


@dataclass
class CalibrationSuite:
    """Which routines a run uses, and when: darkfield before the first slot; brightfield and
    auto-exposure once, on the first slot with bare film on its overview (without an overview,
    roi = "grid", they are not run, and the run says so at its first section; with one, but no
    slot's overview showing film, it says so at the end); autofocus on every section (at its
    first tissue tile) and again when QC blames focus."""

    names: tuple[str, ...] = ()
    darkfield: Darkfield = field(default_factory=Darkfield)
    brightfield: Brightfield = field(default_factory=Brightfield)
    auto_exposure: AutoExposure = field(default_factory=AutoExposure)
    autofocus: Autofocus = field(default_factory=Autofocus)
    _film_done: bool = False
    _slots_without_film: int = 0

    def _film_routines(self, engine: Acquisition) -> list[Routine]:
        done = engine.progress.calibrations
        return [r for r in (self.auto_exposure, self.brightfield) if r.name in self.names and r.name not in done]

    async def prepare(self, engine: Acquisition) -> None:
        if "darkfield" in self.names and "darkfield" not in engine.progress.calibrations:
            await self.darkfield.run(engine)

    async def before_section(self, engine: Acquisition, plan: SectionPlan,
                             film_points_nm: Sequence[tuple[float, float]] | None) -> None:
        """``film_points_nm``: bare film the slot's overview showed; None: no overview was taken."""
        if not self._film_done:
            todo = self._film_routines(engine)
            if film_points_nm:
                for routine in todo:
                    if routine is self.auto_exposure:
                        await routine.run(engine, film_point_nm=film_points_nm[0])
                    else:
                        await routine.run(engine, film_points_nm=film_points_nm)
                self._film_done = True
            elif film_points_nm is None:
                for routine in todo:
                    routine.skip(engine, "no overview (roi = \"grid\" or an operator's ROI), so no bare film to "
                                         "measure on")
                self._film_done = True
            else:
                self._slots_without_film += 1
        if "autofocus" in self.names and plan.tiles:
            t = plan.tiles[len(plan.tiles) // 2]
            await self.autofocus.run(engine, at_nm=(t.y_nm, t.x_nm))

    def finish(self, engine: Acquisition) -> None:
        """At the end of the run: the routines still owed are not run, and the run says why."""
        if not self._film_done:
            for routine in self._film_routines(engine):
                routine.skip(engine, f"no overview of the {self._slots_without_film} slot(s) imaged showed bare "
                                     "film")
            self._film_done = True

    async def refocus(self, engine: Acquisition) -> None:
        if "autofocus" in self.names:
            await self.autofocus.run(engine)
