"""TEM column emulator (protocol in hardware/column.py) on a pseudo-terminal."""

from __future__ import annotations

from tapescope.hardware import column as proto

from .pty_server import PtyLineServer
from .world import SimWorld


class ColumnEmulator(PtyLineServer):
    name = "column"

    def __init__(self, world: SimWorld) -> None:
        super().__init__(world.faults)
        self.world = world

    @staticmethod
    def _err(code: int, text: str | None = None) -> str:
        return f"ERR {code} {text or proto.ERRORS[code]}"

    def handle(self, line: str) -> str | None:
        if not line:
            return None
        verb, *args = line.split()
        w = self.world
        match [verb.upper(), *(a.upper() for a in args)]:
            case ["STATE?"]:
                ht = w.column.ht_state()
                kv = w.p.ht_kv if ht == "ON" else 0.0
                blank = "BLANKED" if w.column.blanked else "UNBLANKED"
                return f"STATE {ht} {kv:g} {proto.format_mag(w.column.magnification)} {w.column.focus_nm:.1f} {blank}"
            case ["MAGS?"]:
                return "MAGS " + " ".join(proto.format_mag(m) for m in w.p.magnifications)
            case ["MAG?"]:
                return f"MAG {proto.format_mag(w.column.magnification)}"
            case ["MAG", value]:
                try:
                    mag = float(value)
                except ValueError:
                    return self._err(proto.ERR_BAD_ARGUMENT, f"not a number: {value}")
                if mag not in w.p.magnifications:
                    return self._err(proto.ERR_BAD_MAG, f"magnification {value} not available")
                w.column.magnification = mag
                return "OK"
            case ["FOCUS?"]:
                return f"FOCUS {w.column.focus_nm:.1f}"
            case ["FOCUS", value]:
                try:
                    focus = float(value)
                except ValueError:
                    return self._err(proto.ERR_BAD_ARGUMENT, f"not a number: {value}")
                if abs(focus) > proto.FOCUS_LIMIT_NM:
                    return self._err(proto.ERR_FOCUS_RANGE)
                w.column.focus_nm = focus
                return "OK"
            case ["BLANK"]:
                w.column.blanked = True
                return "OK"
            case ["UNBLANK"]:
                if w.column.ht_state() != "ON":
                    return self._err(proto.ERR_BEAM_OFF, f"high tension is {w.column.ht_state()}")
                w.column.blanked = False
                return "OK"
            case ["HT", "ON"]:
                if w.column.ht_state() == "TRIPPED":
                    return self._err(proto.ERR_TRIPPED)
                w.column.ht_on()
                return "OK"
            case ["HT", "OFF"]:
                w.column.ht_off()
                return "OK"
            case ["RESET"]:
                w.column.reset()
                return "OK"
        return self._err(proto.ERR_UNKNOWN, f"unknown command {line!r}")
