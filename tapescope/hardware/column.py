"""TEM column driver: magnification, focus, beam blanking, high tension; line protocol over serial.

Protocol (tapescope's own, see docs/protocols.md): commands and replies end with LF.
    STATE?          -> "STATE <ht> <kv> <mag> <focus_nm> <BLANKED|UNBLANKED>"
                       ht is OFF, RAMPING, ON or TRIPPED
    MAGS?           -> "MAGS <m1> <m2> ..."      (the magnification steps)
    MAG <m>         -> "OK"                      (m must be one of MAGS)
    FOCUS <nm>      -> "OK"                      (objective focus, |nm| <= 1e6)
    BLANK / UNBLANK -> "OK"                      (UNBLANK needs high tension ON)
    HT ON / HT OFF  -> "OK"                      (ON ramps; poll STATE? until ON)
    RESET           -> "OK"                      (clears a trip: TRIPPED -> OFF)
    errors          -> "ERR <code> <text>"
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .device import Device
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine, send_confirmed

log = logging.getLogger(__name__)

HT_STATES = ("OFF", "RAMPING", "ON", "TRIPPED")
ERR_UNKNOWN = 1
ERR_BAD_MAG = 2
ERR_FOCUS_RANGE = 3
ERR_BAD_ARGUMENT = 4
ERR_BEAM_OFF = 6     # unblank asked while high tension is not ON
ERR_TRIPPED = 7      # HT ON asked while tripped: RESET first
FOCUS_LIMIT_NM = 1.0e6
ERRORS = {
    ERR_UNKNOWN: "unknown command", ERR_BAD_MAG: "magnification not available",
    ERR_FOCUS_RANGE: "focus out of range", ERR_BAD_ARGUMENT: "bad argument",
    ERR_BEAM_OFF: "high tension is not on", ERR_TRIPPED: "high tension tripped; reset first",
}


@dataclass(frozen=True)
class ColumnState:
    high_tension: str      # OFF | RAMPING | ON | TRIPPED
    kv: float
    magnification: float
    focus_nm: float
    blanked: bool

    @property
    def beam_on(self) -> bool:
        """Electrons reach the specimen: high tension ON and the beam not blanked."""
        return self.high_tension == "ON" and not self.blanked


def format_mag(mag: float) -> str:
    return f"{mag:g}"


class Column(Device):
    name = "column"

    def __init__(
        self, url: str, *, baudrate: int = 115200, timeout_s: float = 2.0,
        ramp_timeout_s: float = 60.0, poll_s: float = 0.01,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s, send_eol=b"\n")
        self.ramp_timeout_s = ramp_timeout_s
        self.poll_s = poll_s
        self.magnifications: tuple[float, ...] = ()

    async def connect(self) -> None:
        await self._line.open()
        words = await self._command("MAGS?", "MAGS")
        try:
            self.magnifications = tuple(float(w) for w in words)
        except ValueError:
            raise ProtocolError(self.name, f"bad MAGS reply {words!r}") from None
        await self.status()

    async def close(self) -> None:
        await self._line.close()

    async def _command(self, line: str, expect: str) -> list[str]:
        return await self._line.query_words(line, expect)

    async def status(self) -> ColumnState:
        words = await self._command("STATE?", "STATE")
        if len(words) != 5 or words[0] not in HT_STATES or words[4] not in ("BLANKED", "UNBLANKED"):
            raise ProtocolError(self.name, f"bad STATE reply {words!r}")
        try:
            return ColumnState(words[0], float(words[1]), float(words[2]), float(words[3]), words[4] == "BLANKED")
        except ValueError:
            raise ProtocolError(self.name, f"non-numeric STATE reply {words!r}") from None

    async def set_magnification(self, mag: float) -> None:
        if self.magnifications and mag not in self.magnifications:
            raise DeviceError(self.name, f"magnification {mag:g} is not one of {self.magnifications}", ERR_BAD_MAG)
        await send_confirmed(self.name, lambda: self._command(f"MAG {format_mag(mag)}", "OK"),
                             lambda: self._confirm(lambda s: s.magnification == mag))

    async def set_focus(self, focus_nm: float) -> None:
        if abs(focus_nm) > FOCUS_LIMIT_NM:
            raise DeviceError(self.name, f"focus {focus_nm:g} nm is outside +-{FOCUS_LIMIT_NM:g} nm",
                              ERR_FOCUS_RANGE)
        text = f"{focus_nm:.1f}"
        await send_confirmed(self.name, lambda: self._command(f"FOCUS {text}", "OK"),
                             lambda: self._confirm(lambda s: abs(s.focus_nm - float(text)) < 0.05))

    async def blank(self) -> None:
        await send_confirmed(self.name, lambda: self._command("BLANK", "OK"),
                             lambda: self._confirm(lambda s: s.blanked))

    async def unblank(self) -> None:
        await send_confirmed(self.name, lambda: self._command("UNBLANK", "OK"),
                             lambda: self._confirm(lambda s: not s.blanked))

    async def reset_trip(self) -> None:
        await self._command("RESET", "OK")

    async def high_tension(self, on: bool, *, wait: bool = True) -> ColumnState:
        """Switch high tension; with wait, poll until it is ON (or OFF), bounded by ramp_timeout_s."""
        await self._command("HT ON" if on else "HT OFF", "OK")
        want = "ON" if on else "OFF"
        deadline = time.monotonic() + self.ramp_timeout_s
        while True:
            st = await self.status()
            if st.high_tension == "TRIPPED":
                raise DeviceError(self.name, "high tension tripped while switching", ERR_TRIPPED)
            if st.high_tension == want or not wait:
                return st
            if time.monotonic() > deadline:
                raise DeviceTimeout(self.name, f"high tension not {want} after {self.ramp_timeout_s:g} s "
                                    f"(state {st.high_tension})")
            await asyncio.sleep(self.poll_s)

    async def ensure_beam(self) -> ColumnState:
        """Bring the beam back after a trip or a blank: RESET, HT ON, UNBLANK, as needed."""
        st = await self.status()
        if st.beam_on:
            return st
        if st.high_tension == "TRIPPED":
            log.warning("column: high tension tripped; resetting and ramping up again")
            await self.reset_trip()
        if st.high_tension != "ON":
            await self.high_tension(True)
        await self.unblank()
        return await self.status()

    async def _confirm(self, check) -> bool:
        return bool(check(await self.status()))
