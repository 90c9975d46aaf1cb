"""Per-tile QC, computed as each frame arrives, and the decision it leads to.

Numbers (TileQC): mean level, standard deviation, saturation fraction, a focus score and
frame integrity. Faults map to a decision as in the Allen Institute's QC service:
GOOD (keep going), STOP_AT_END (finish the montage, flag it for re-imaging) or STOP_NOW
(pause the run with an alarm). A failing tile is first retaken, a bounded number of
times, with a refocus when focus is the cause; what still fails is stored and marked,
never hidden. The table is FAULT_DECISIONS; docs/acquisition.md explains the choices.

The focus score is the variance of the Laplacian of the frame, blurred by one pixel to
keep shot noise out, divided by the squared mean so that exposure does not change it.
It is compared with the section's own reference (the median of its good tiles so far),
not with an absolute number: specimens differ far more than focus does.

That cannot see a section imaged out of focus from its first tile, so each tile's
sharpness is also judged on its own: the energy of its finest detail (a difference of
Gaussians, 1-2 px) over that of the next octave (2-4 px). Blur removes the first long
before the second, and the ratio hardly depends on what the tissue is; its floor
(`QCLimits.sharpness_min`) and what it was measured on are in docs/acquisition.md.
"""

from __future__ import annotations

import enum
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np


class Decision(enum.Enum):
    GOOD = "GOOD"
    STOP_AT_END = "STOP_AT_END"
    STOP_NOW = "STOP_NOW"


# What a fault means once its retakes are used up. Faults of the instrument (no beam, a
# broken frame) stop now: more tiles would be just as bad. Faults of one place on the
# specimen (focus, a bright spot) let the montage finish and flag it for re-imaging.
FAULT_DECISIONS: dict[str, Decision] = {
    "integrity": Decision.STOP_NOW,
    "dark": Decision.STOP_NOW,
    "saturated": Decision.STOP_AT_END,
    "bright": Decision.STOP_AT_END,
    "focus": Decision.STOP_AT_END,
}


@dataclass(frozen=True)
class QCLimits:
    """Levels in counts of a 16-bit frame; a frame of another depth is judged at the same
    fraction of its full scale (`for_frame`)."""

    mean_min: float = 500.0          # counts; below: beam off or blanked
    mean_max: float = 60000.0
    saturation_max: float = 0.005    # fraction of pixels at full scale
    saturation_level: int = 65535
    focus_min_ratio: float = 0.3     # of the section reference: content alone varies ~3x (docs)
    sharpness_min: float = 0.22      # fine over medium detail of one tile: below, out of focus (docs)
    resin_cv_max: float = 0.04       # std/mean of the blurred frame: below this it is bare resin
    max_retakes: int = 2

    def for_frame(self, dtype: np.dtype) -> QCLimits:
        """These limits for frames of `dtype`: the count levels scaled to its full scale (an
        8-bit camera's 'dark' is 500/65535 of 255, its saturation 255)."""
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max == 65535:
            return self
        scale = np.iinfo(dtype).max / 65535
        return replace(self, mean_min=self.mean_min * scale, mean_max=self.mean_max * scale,
                       saturation_level=min(round(self.saturation_level * scale), int(np.iinfo(dtype).max)))


@dataclass(frozen=True)
class TileQC:
    mean: float
    std: float
    saturation: float
    focus: float
    resin: bool
    faults: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    sharpness: float = math.nan

    @property
    def ok(self) -> bool:
        return not self.faults

    def decision(self) -> Decision:
        worst = Decision.GOOD
        for f in self.faults:
            d = FAULT_DECISIONS.get(f, Decision.STOP_AT_END)
            if d is Decision.STOP_NOW:
                return d
            worst = d
        return worst

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["faults"], d["messages"] = list(self.faults), list(self.messages)
        d["sharpness"] = None if math.isnan(self.sharpness) else self.sharpness     # JSON has no NaN
        return d


def focus_score(frame: np.ndarray) -> tuple[float, float, float]:
    """(focus, blurred coefficient of variation, mean) of a frame."""
    f = frame
    # The score is compared only with scores of the same size: reductions keep the ranking
    # (defocus blur is wider than 2 px long before it matters) at a fraction of the cost.
    while max(f.shape) >= 512:
        f = cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA)
    f = f.astype(np.float32)
    mean = float(cv2.mean(f)[0])
    if mean <= 0:
        return 0.0, 0.0, mean
    b = cv2.GaussianBlur(f, (0, 0), 1.0)
    lap = cv2.Laplacian(b, cv2.CV_32F)
    lap_std = float(cv2.meanStdDev(lap)[1][0, 0])
    cv = float(cv2.meanStdDev(cv2.GaussianBlur(b, (0, 0), 4.0))[1][0, 0]) / mean
    return lap_std * lap_std / (mean * mean), cv, mean


SHARPNESS_PX = 512      # the central square the sharpness is measured on
# Structure in the 2-4 px band at least this many times the noise there, or the tile is not
# judged: on the simulator tissue 3 um out of focus has 9-20x (5 um: 2.6-6.6x), blank resin
# and film tiles 0.1-0.5x.
MIN_STRUCTURE = 2.0
_SCALES = (1.0, 2.0, 4.0)


def _band_gains() -> tuple[float, float]:
    """How much of white noise's variance each band passes (1-2 px, 2-4 px): the sums of
    squares of the bands' kernels, taken from the same OpenCV blurs that measure them."""
    d = np.zeros((81, 81), np.float32)
    d[40, 40] = 1.0
    g1, g2, g4 = (cv2.GaussianBlur(d, (0, 0), s).astype(np.float64) for s in _SCALES)
    return float(((g1 - g2) ** 2).sum()), float(((g2 - g4) ** 2).sum())


_NOISE_IN_FINE, _NOISE_IN_MEDIUM = _band_gains()
# Immerkaer's mask: blind to a frame's smooth structure, so what it passes is mostly noise.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_variance(frame: np.ndarray) -> float:
    """The frame's white (shot + read) noise variance, from the median response of
    Immerkaer's mask (36 x the variance; the median keeps edges out)."""
    r = cv2.filter2D(frame.astype(np.float32), -1, _NOISE_MASK)[1:-1, 1:-1]
    return (float(np.median(np.abs(r))) / (0.6745 * 6.0)) ** 2


def sharpness(frame: np.ndarray) -> float:
    """Energy of the 1-2 px detail over the 2-4 px detail, each less what the frame's own
    noise puts there (a dim frame's noise would pass for detail), on the frame's central
    SHARPNESS_PX square: a ratio of scales, so it is taken at full resolution, where
    focus_score reduces large frames. NaN for a frame without structure above its noise."""
    h, w = frame.shape[:2]
    y0, x0 = max(0, (h - SHARPNESS_PX) // 2), max(0, (w - SHARPNESS_PX) // 2)
    f = frame[y0:y0 + SHARPNESS_PX, x0:x0 + SHARPNESS_PX].astype(np.float32)
    g1, g2, g4 = (cv2.GaussianBlur(f, (0, 0), s) for s in _SCALES)
    noise = noise_variance(f)
    fine = float(cv2.meanStdDev(cv2.subtract(g1, g2))[1][0, 0]) ** 2 - _NOISE_IN_FINE * noise
    medium = float(cv2.meanStdDev(cv2.subtract(g2, g4))[1][0, 0]) ** 2 - _NOISE_IN_MEDIUM * noise
    if medium < MIN_STRUCTURE * _NOISE_IN_MEDIUM * noise:
        return math.nan             # no structure above the noise (resin, film, a gap): nothing to judge
    return max(fine, 0.0) / medium


def integrity_faults(frame: np.ndarray, expected_shape: tuple[int, int] | None) -> list[str]:
    """Reasons a frame is broken: wrong shape, or rows lost at the end of a readout."""
    out = []
    if frame.ndim != 2:
        return [f"frame has {frame.ndim} dimensions, expected 2"]
    if expected_shape is not None and tuple(frame.shape) != tuple(expected_shape):
        out.append(f"frame shape {frame.shape} differs from the camera's {expected_shape}")
    # A truncated readout arrives zero-filled (or repeats one row) at the bottom: an
    # exposed frame has shot noise in every row, so identical trailing rows are impossible.
    tail = frame[-8:]
    if frame.shape[0] >= 16 and np.all(tail == tail[:1]):
        out.append("last rows of the frame are identical (truncated readout)")
    return out


def evaluate(frame: np.ndarray, limits: QCLimits, *, reference_focus: float | None,
             expected_shape: tuple[int, int] | None = None) -> TileQC:
    faults: list[str] = []
    msgs: list[str] = []
    limits = limits.for_frame(frame.dtype)
    integ = integrity_faults(frame, expected_shape)
    if integ:
        faults.append("integrity")
        msgs.extend(integ)
    focus, cv, _ = focus_score(frame)
    m, sd = cv2.meanStdDev(frame)
    mean, std = float(m[0, 0]), float(sd[0, 0])
    sat = float(np.count_nonzero(frame >= limits.saturation_level)) / max(frame.size, 1)
    resin = cv < limits.resin_cv_max and mean >= limits.mean_min
    if mean < limits.mean_min:
        faults.append("dark")
        msgs.append(f"mean {mean:.0f} counts < {limits.mean_min:g} (beam off or blanked?)")
    elif mean > limits.mean_max:
        faults.append("bright")
        msgs.append(f"mean {mean:.0f} counts > {limits.mean_max:g}")
    if sat > limits.saturation_max:
        faults.append("saturated")
        msgs.append(f"{sat:.2%} of pixels saturated > {limits.saturation_max:.2%}")
    # Bare resin has no structure to focus on: a low score there is not a focus fault.
    sharp = sharpness(frame) if not resin and not faults else math.nan
    if sharp < limits.sharpness_min:
        faults.append("focus")
        msgs.append(f"sharpness {sharp:.2f} < {limits.sharpness_min:g}: the finest detail is gone (out of focus)")
    elif (not resin and not faults and reference_focus is not None
            and focus < limits.focus_min_ratio * reference_focus):
        faults.append("focus")
        msgs.append(f"focus {focus:.3g} < {limits.focus_min_ratio:g} x section reference {reference_focus:.3g}")
    return TileQC(mean, std, sat, focus, resin, tuple(faults), tuple(msgs), sharp)


@dataclass
class FocusReference:
    """The running median focus of a section's good, non-resin tiles."""

    min_tiles: int = 3
    _scores: list[float] = field(default_factory=list)

    def add(self, qc: TileQC) -> None:
        if qc.ok and not qc.resin:
            self._scores.append(qc.focus)

    @property
    def value(self) -> float | None:
        if len(self._scores) < self.min_tiles:
            return None
        return statistics.median(self._scores[-64:])
