"""Tape transport emulator (protocol in hardware/tape.py) on a pseudo-terminal."""

from __future__ import annotations

from tapescope.hardware import tape as proto

from .pty_server import PtyLineServer
from .world import SimWorld


class TapeEmulator(PtyLineServer):
    name = "tape"

    def __init__(self, world: SimWorld) -> None:
        super().__init__()
        self.world = world

    def handle(self, line: str) -> str | None:
        if not line:
            return None
        verb, *args = line.split()
        w = self.world
        state = "MOVING" if w.tape_busy() else "IDLE"
        match verb.upper():
            case "SLOTS?":
                return f"SLOTS {w.p.n_slots}"
            case "STATE?":
                return f"STATE {state} {w.slot}"
            case "BARCODE?":
                if state != "IDLE":
                    return f"ERR {proto.ERR_NO_BARCODE} tape is moving"
                return f"BARCODE {w.slot} {w.barcodes[w.slot]}"
            case "GOTO":
                if len(args) != 1 or not args[0].isdigit() or int(args[0]) >= w.p.n_slots:
                    return f"ERR {proto.ERR_BAD_SLOT} slot must be 0..{w.p.n_slots - 1}"
                w.tape_goto(int(args[0]))
                return "OK"
        return "ERR 1 unknown command"
