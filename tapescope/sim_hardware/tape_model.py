"""The simulated tape transport's state: the slot the motor went to, a slip that puts another
section under the beam (and what the barcode reader sees then), a move's duration, a jam.

Reads only read: ``state()`` reports; the polls that clear a jam armed with clears_after are
counted by the protocol that polls (``count_poll``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .faults import FaultBook

if TYPE_CHECKING:
    from .params import WorldParams


class TapeModel:
    def __init__(self, p: WorldParams, faults: FaultBook, prefetch: Callable[[int], None]) -> None:
        self.p = p
        self.faults = faults
        self.prefetch = prefetch            # the world renders a slot's section ahead of the camera
        self.slot = 0
        self.slip = 0                       # slots between the motor's slot and the one under the beam
        self.slip_seen = True               # the barcode reader sees the slot really under the beam
        self.busy_until = 0.0
        self.jammed = False
        self._jam_polls_left = 0
        self._jam_target = 0

    @property
    def beam_slot(self) -> int:
        """The slot whose section the beam sees: the reader's slot unless the tape slipped."""
        return self.slot + self.slip

    @property
    def reader_slot(self) -> int:
        """The slot whose barcode the reader sees: the one under the beam, unless the slot it
        slipped to carries a wrong label (a slip armed with seen=false)."""
        return self.beam_slot if self.slip_seen else self.slot

    def goto(self, slot: int) -> None:
        jam = self.faults.take("tape_jam")
        if jam is not None:
            self.jammed = True
            self._jam_polls_left = int(jam["clears_after"])
            self._jam_target = slot
            return
        self.busy_until = time.monotonic() + abs(slot - self.slot) * self.p.tape_s_per_slot
        self.slot = slot
        slip = self.faults.take("tape_slip", slot=slot)
        self.slip = 0 if slip is None else min(int(slip["slots"]), self.p.n_slots - 1 - slot)
        self.slip_seen = slip is None or bool(slip["seen"])
        if self.slip:
            self.prefetch(self.beam_slot)
        self.prefetch(slot)
        self.prefetch(slot + 1)       # tapes are imaged in order: the next one is likely wanted

    def busy(self) -> bool:
        return time.monotonic() < self.busy_until

    def count_poll(self) -> None:
        """A state poll: a jam armed with clears_after=N clears after N of them, and the move
        goes on where it stuck."""
        if self.jammed and self._jam_polls_left > 0:
            self._jam_polls_left -= 1
            if self._jam_polls_left == 0:
                self.jammed = False
                self.goto(self._jam_target)

    def state(self) -> str:
        """IDLE, MOVING or JAMMED."""
        if self.jammed:
            return "JAMMED"
        return "MOVING" if self.busy() else "IDLE"

    def clear(self) -> None:
        """Operator or transport clears a jam: the tape stays where it is, idle."""
        self.jammed = False
        self._jam_polls_left = 0

    def tension_g(self) -> float:
        return 0.0 if self.jammed else self.p.tape_tension_g
