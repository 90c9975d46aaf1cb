"""The simulated TEM column's state: magnification, focus, blanking, column valves and high
tension (OFF, RAMPING, ON, TRIPPED). The beam reaches the specimen only with high tension
ON, the valves open and the beam not blanked."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .params import WorldParams

HT_STATES = ("OFF", "RAMPING", "ON", "TRIPPED")


class ColumnModel:
    def __init__(self, p: WorldParams) -> None:
        self.p = p
        self.magnification = p.imaging_mag
        self.focus_nm = 0.0
        self.blanked = False
        self.valves_open = True            # a TEM's column valves (temscript can close them)
        self._ht = "ON"
        self._ht_ready_at = 0.0

    def ht_state(self) -> str:
        if self._ht == "RAMPING" and time.monotonic() >= self._ht_ready_at:
            return "ON"
        return self._ht

    def ht_on(self) -> None:
        if self.ht_state() == "OFF":
            self._ht = "RAMPING"
            self._ht_ready_at = time.monotonic() + self.p.ht_ramp_s

    def ht_off(self) -> None:
        if self._ht != "TRIPPED":
            self._ht = "OFF"

    def trip(self) -> None:
        self._ht = "TRIPPED"

    def reset(self) -> None:
        if self._ht == "TRIPPED":
            self._ht = "OFF"

    def beam_on(self) -> bool:
        return self.ht_state() == "ON" and not self.blanked and self.valves_open

    def pixel_nm(self) -> float:
        """Pixel size at the specimen at the present magnification."""
        return self.p.pixel_nm * self.p.imaging_mag / self.magnification
