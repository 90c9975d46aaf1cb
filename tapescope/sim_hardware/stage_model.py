"""The simulated stage's physics: a true position (what the camera sees) and an encoder
position (what the stage reports), apart by each move's repeatability error and backlash;
travel and settle time show in busy and in the readback while moving."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .faults import FaultBook

if TYPE_CHECKING:
    from .params import WorldParams


@dataclass
class _Move:
    start: np.ndarray
    end: np.ndarray
    t0: float
    travel_s: float
    settle_s: float
    stall: bool = False


class StageModel:
    def __init__(self, p: WorldParams, faults: FaultBook, rng: np.random.Generator) -> None:
        self.p = p
        self.faults = faults
        self.rng = rng
        self.true = np.zeros(2)          # (y, x) nm
        self.encoder = np.zeros(2)
        self.speed_nm_s = p.stage_speed_nm_s    # the controller's speed setting (S command)
        self._move: _Move | None = None
        self._last_dir = np.zeros(2)

    def travel_s(self, dist_nm: float) -> float:
        v, a = self.speed_nm_s, self.p.stage_accel_nm_s2
        if dist_nm <= v * v / a:                       # triangular profile: never at full speed
            return 2 * math.sqrt(dist_nm / a)
        return dist_nm / v + v / a

    def move(self, target_nm: np.ndarray) -> None:
        p = self.p
        target = np.asarray(target_nm, dtype=float)
        start = self.readback()
        stall = self.faults.take("stage_stall") is not None
        limit = self.faults.take("stage_limit") is not None
        lim = p.stage_limits_nm
        end = np.clip(target, -lim, lim)
        if stall or limit:
            end = start + (end - start) / 2             # it stops halfway, where it stuck
        delta = end - start
        dist = float(np.max(np.abs(delta)))
        self._move = _Move(start, end, time.monotonic(), self.travel_s(dist), p.stage_settle_s, stall)
        # Backlash: an axis that reverses direction loses motion until the lead screw
        # re-engages, so where the stage really stops depends on the approach.
        # Direction from the last commanded end point: the true position already sits there.
        direction = np.sign(end - self.encoder)
        moved = direction != 0
        self._last_dir = np.where(moved, direction, self._last_dir)
        self.encoder = end.copy()
        self.true = end - self._last_dir * p.stage_backlash_nm / 2 + self.rng.normal(0, p.stage_error_sigma_nm, 2)

    def readback(self) -> np.ndarray:
        """What the encoder reads now: on the way while moving, then where it stopped."""
        mv = self._move
        if mv is None:
            return self.encoder.copy()
        if mv.travel_s <= 0:
            return mv.end.copy()
        f = min(1.0, (time.monotonic() - mv.t0) / mv.travel_s)
        return mv.start + (mv.end - mv.start) * f

    def busy(self) -> bool:
        mv = self._move
        if mv is None:
            return False
        if mv.stall:
            return True
        return time.monotonic() < mv.t0 + mv.travel_s + mv.settle_s

    def halt(self) -> None:
        mv = self._move
        if mv is not None and self.busy():
            here = self.readback()
            self.true = self.true + (here - self.encoder)
            self.encoder = here
        self._move = None
