"""Reel-to-reel tape transport driver (GridTape style), line protocol over serial.

Protocol (see docs/protocols.md): commands and replies end with LF.
    SLOTS?          -> "SLOTS <count>"
    GOTO <n>        -> "OK"                 (starts the move; poll STATE?)
    FEED <n>        -> "OK"                 (n slots forward; REWIND <n> goes back)
    STATE?          -> "STATE <IDLE|MOVING|JAMMED> <slot>"
    TENSION?        -> "TENSION <grams>"
    BARCODE?        -> "BARCODE <slot> <code>"
    CLEAR           -> "OK"                 (clears a jam; the tape stays where it is)
    errors          -> "ERR <code> <text>"
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .device import Device
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine, send_confirmed

log = logging.getLogger(__name__)

STATES = ("IDLE", "MOVING", "JAMMED")
ERR_UNKNOWN = 1
ERR_BAD_SLOT = 2
ERR_BAD_ARGUMENT = 3
ERR_NO_BARCODE = 4
ERR_JAMMED = 5


@dataclass(frozen=True)
class TapeState:
    state: str
    slot: int


class Tape(Device):
    name = "tape"

    def __init__(
        self, url: str, *, baudrate: int = 115200, timeout_s: float = 2.0,
        move_timeout_s: float = 30.0, poll_s: float = 0.01, jam_grace_s: float = 0.5,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s,
                                send_eol=b"\n")
        self.move_timeout_s = move_timeout_s
        self.poll_s = poll_s
        # A transport's tension control clears many jams by itself within a moment: wait
        # this long before calling a jam a fault.
        self.jam_grace_s = jam_grace_s
        # Telemetry while moving: each STATE? of a move wait (at most every readout_period_s)
        # goes to on_readout(status, moving); the poll is there anyway, so it costs no traffic.
        self.on_readout: Callable[[dict[str, Any], bool], None] | None = None
        self.readout_period_s = 0.04

    async def connect(self) -> None:
        await self._line.open()
        await self.state()

    async def close(self) -> None:
        await self._line.close()

    async def _command(self, line: str, expect: str) -> list[str]:
        return await self._line.query_words(line, expect)

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

    async def status(self) -> TapeState:
        """Same as state(): every driver has a status query."""
        return await self.state()

    async def tension(self) -> float:
        """Tape tension in grams (0 when slack, e.g. jammed or broken)."""
        words = await self._command("TENSION?", "TENSION")
        try:
            return float(words[0])
        except (IndexError, ValueError):
            raise ProtocolError(self.name, f"bad TENSION reply {words!r}") from None

    async def barcode(self) -> tuple[int, str]:
        words = await self._command("BARCODE?", "BARCODE")
        if len(words) != 2 or not words[0].isdigit():
            raise ProtocolError(self.name, f"bad BARCODE reply {words!r}")
        return int(words[0]), words[1]

    async def clear_jam(self) -> TapeState:
        await self._command("CLEAR", "OK")
        return await self.state()

    async def goto(self, slot: int) -> TapeState:
        """Move the tape so that `slot` is under the beam; wait for the move to end."""
        before = await self.state()

        async def started() -> bool:
            st = await self.state()
            return st.state != "IDLE" or st.slot == slot or st.slot != before.slot

        await send_confirmed(self.name, lambda: self._command(f"GOTO {slot}", "OK"), started, self.notice)
        return await self._wait(slot)

    async def feed(self, n: int = 1) -> TapeState:
        """Advance n slots (negative: rewind) and wait for the move to end."""
        st = await self.state()
        target = st.slot + n
        verb = "FEED" if n >= 0 else "REWIND"
        await self._command(f"{verb} {abs(n)}", "OK")
        return await self._wait(target)

    async def rewind(self, n: int = 1) -> TapeState:
        return await self.feed(-n)

    async def _wait(self, slot: int) -> TapeState:
        deadline = time.monotonic() + self.move_timeout_s
        jammed_since: float | None = None
        next_readout = 0.0
        while True:
            st = await self.state()
            now = time.monotonic()
            if self.on_readout is not None and (now >= next_readout or st.state == "IDLE"):
                next_readout = now + self.readout_period_s
                self.on_readout({"slot": st.slot, "state": st.state, "target_slot": slot}, st.state != "IDLE")
            if st.state == "JAMMED":
                jammed_since = jammed_since or now
                if now - jammed_since >= self.jam_grace_s:
                    raise DeviceError(self.name, f"tape jammed at slot {st.slot} moving to slot {slot} "
                                      f"(for {now - jammed_since:.1f} s); clear the jam, then retry",
                                      ERR_JAMMED)
            elif jammed_since is not None:
                self.notice(f"a jam at slot {st.slot} cleared by itself after {now - jammed_since:.2f} s")
                jammed_since = None
            if st.state == "IDLE":
                if st.slot != slot:
                    raise DeviceError(self.name, f"stopped at slot {st.slot}, wanted {slot}")
                return st
            if now > deadline:
                raise DeviceTimeout(self.name, f"slot {slot} not reached in {self.move_timeout_s:g} s "
                                    f"(state {st.state} at slot {st.slot})")
            await asyncio.sleep(self.poll_s)
