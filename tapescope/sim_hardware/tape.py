"""Tape transport emulator (protocol in hardware/tape.py) on a pseudo-terminal."""

from __future__ import annotations

from tapescope.hardware import tape as proto

from .pty_server import PtyLineServer
from .world import SimWorld


class TapeEmulator(PtyLineServer):
    name = "tape"

    def __init__(self, world: SimWorld) -> None:
        super().__init__(world.faults)
        self.world = world

    def _move(self, slot: int) -> str:
        w = self.world
        if w.tape.jammed:
            return f"ERR {proto.ERR_JAMMED} tape is jammed; CLEAR first"
        if not 0 <= slot < w.p.n_slots:
            return f"ERR {proto.ERR_BAD_SLOT} slot must be 0..{w.p.n_slots - 1}"
        w.tape.goto(slot)
        return "OK"

    def handle(self, line: str) -> str | None:
        if not line:
            return None
        verb, *args = line.split()
        w = self.world
        match verb.upper():
            case "SLOTS?":
                return f"SLOTS {w.p.n_slots}"
            case "STATE?":
                w.tape.count_poll()
                return f"STATE {w.tape.state()} {w.tape.slot}"
            case "TENSION?":
                return f"TENSION {w.tape.tension_g():.1f}"
            case "BARCODE?":
                state = w.tape.state()
                if state != "IDLE":
                    return f"ERR {proto.ERR_NO_BARCODE} tape is {state.lower()}"
                return f"BARCODE {w.tape.reader_slot} {w.barcodes[w.tape.reader_slot]}"
            case "GOTO":
                if len(args) != 1 or not args[0].isdigit():
                    return f"ERR {proto.ERR_BAD_SLOT} slot must be 0..{w.p.n_slots - 1}"
                return self._move(int(args[0]))
            case "FEED" | "REWIND":
                if len(args) != 1 or not args[0].isdigit():
                    return f"ERR {proto.ERR_BAD_ARGUMENT} {verb.upper()} needs a number of slots"
                step = int(args[0]) if verb.upper() == "FEED" else -int(args[0])
                return self._move(w.tape.slot + step)
            case "CLEAR":
                w.tape.clear()
                return "OK"
        return f"ERR {proto.ERR_UNKNOWN} unknown command"
