"""ASI MS-2000 emulator (the subset in hardware/asi_protocol.py) on a pseudo-terminal."""

from __future__ import annotations

import re

import numpy as np

from tapescope.hardware import asi_protocol as asi

from .pty_server import PtyLineServer
from .world import SimWorld

_AXIS = re.compile(r"^([XY])=(-?\d+(?:\.\d*)?)$")


class StageEmulator(PtyLineServer):
    name = "stage"
    recv_eol = b"\r"
    send_eol = b"\r\n"

    def __init__(self, world: SimWorld) -> None:
        super().__init__(world.faults)
        self.world = world

    def _err(self, code: int) -> str:
        return f":N-{code}"

    def handle(self, line: str) -> str | None:
        if not line:
            return None
        verb, *args = line.split()
        verb = verb.upper()
        w = self.world
        if verb == "/":
            return "B" if w.stage.busy() else "N"
        if verb in ("W", "WHERE"):
            if not args or any(a.upper() not in ("X", "Y") for a in args):
                return self._err(2)
            y, x = w.stage.readback()
            vals = {"X": x, "Y": y}
            return ":A " + " ".join(asi.nm_to_units(vals[a.upper()]) for a in args)
        if verb in ("M", "MOVE", "R", "MOVREL"):
            if w.stage.busy():
                # As the MS-2000 does, a new move while moving starts from where it is now.
                w.stage.halt()
            target = dict(zip(("Y", "X"), w.stage.readback(), strict=True))
            relative = verb in ("R", "MOVREL")
            if not args:
                return self._err(3)
            for a in args:
                m = _AXIS.match(a.upper())
                if not m:
                    return self._err(2)
                v = asi.units_to_nm(m.group(2))
                target[m.group(1)] = target[m.group(1)] + v if relative else v
            w.stage.move(np.array([target["Y"], target["X"]]))
            return ":A"
        if verb in ("S", "SPEED"):
            if len(args) == 1 and args[0].upper() in ("X?", "Y?"):
                return f":A {args[0][0].upper()}={w.stage.speed_nm_s / asi.NM_S_PER_MM_S:.4f}"
            speeds = []
            for a in args:
                m = _AXIS.match(a.upper())
                if not m:
                    return self._err(2)
                speeds.append(float(m.group(2)))
            if not speeds:
                return self._err(3)
            if not all(0 < v <= 10.0 for v in speeds):
                return self._err(4)
            # One speed for both axes in this model: the slower one governs a diagonal move.
            w.stage.speed_nm_s = min(speeds) * asi.NM_S_PER_MM_S
            return ":A"
        if verb == "HALT":
            w.stage.halt()
            return ":A"
        return self._err(1)
