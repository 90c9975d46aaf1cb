"""Reel-to-reel tape transport driver (GridTape style), line protocol over serial.

Protocol (see docs/protocols.md): commands and replies end with LF.
    SLOTS?          -> "SLOTS <count>"
    GOTO <n>        -> "OK"                 (starts the move; poll STATE?)
    STATE?          -> "STATE <IDLE|MOVING|JAMMED> <slot>"
    BARCODE?        -> "BARCODE <slot> <code>"
    errors          -> "ERR <code> <text>"
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine

STATES = ("IDLE", "MOVING", "JAMMED")
ERR_BAD_SLOT = 2
ERR_NO_BARCODE = 4
ERR_JAMMED = 5


@dataclass(frozen=True)
class TapeState:
    state: str
    slot: int


class Tape:
    name = "tape"

    def __init__(
        self, url: str, *, baudrate: int = 115200, timeout_s: float = 2.0,
        move_timeout_s: float = 30.0, poll_s: float = 0.01,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s,
                                send_eol=b"\n")
        self.move_timeout_s = move_timeout_s
        self.poll_s = poll_s

    async def connect(self) -> None:
        await self._line.open()
        await self.state()

    async def close(self) -> None:
        await self._line.close()

    async def _command(self, line: str, expect: str) -> list[str]:
        reply = await self._line.query(line)
        words = reply.split()
        if words[:1] == ["ERR"]:
            code = words[1] if len(words) > 1 else "?"
            raise DeviceError(self.name, " ".join(words[2:]) or "error", int(code) if code.isdigit() else code)
        if words[:1] != [expect]:
            raise ProtocolError(self.name, f"unexpected reply {reply!r} to {line!r}")
        return words[1:]

    async def slot_count(self) -> int:
        words = await self._command("SLOTS?", "SLOTS")
        try:
            return int(words[0])
        except (IndexError, ValueError):
            raise ProtocolError(self.name, f"bad SLOTS reply {words!r}") from None

    async def state(self) -> TapeState:
        words = await self._command("STATE?", "STATE")
        if len(words) != 2 or words[0] not in STATES or not words[1].lstrip("-").isdigit():
            raise ProtocolError(self.name, f"bad STATE reply {words!r}")
        return TapeState(words[0], int(words[1]))

    async def barcode(self) -> tuple[int, str]:
        words = await self._command("BARCODE?", "BARCODE")
        if len(words) != 2 or not words[0].isdigit():
            raise ProtocolError(self.name, f"bad BARCODE reply {words!r}")
        return int(words[0]), words[1]

    async def goto(self, slot: int) -> TapeState:
        """Move the tape so that `slot` is under the beam; wait for the move to end."""
        await self._command(f"GOTO {slot}", "OK")
        deadline = time.monotonic() + self.move_timeout_s
        while True:
            st = await self.state()
            if st.state == "JAMMED":
                raise DeviceError(self.name, f"tape jammed moving to slot {slot}", ERR_JAMMED)
            if st.state == "IDLE":
                if st.slot != slot:
                    raise DeviceError(self.name, f"stopped at slot {st.slot}, wanted {slot}")
                return st
            if time.monotonic() > deadline:
                raise DeviceTimeout(self.name, f"slot {slot} not reached in {self.move_timeout_s:g} s")
            await asyncio.sleep(self.poll_s)
