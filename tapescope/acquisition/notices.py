"""Cured faults, told once and then summarised.

A cure (a driver's reconnect, a lost reply that a re-query showed took effect, a step that
worked on retry after the engine reconnected the device) is worth a warning
the first time. The same device cured again and again is a different fact (a device that
fails every time and is cured every time), and one warning per cure would bury it: after
the first, cures are counted, and one summary says how many, over how long, and the last
one's text. docs/acquisition.md ("Faults and recovery") describes what a person sees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

SUMMARY_WINDOW_S = 60.0     # at most one warning per device for this long, the first cure's


@dataclass
class _Episode:
    first_t: float
    repeats: int = 0
    last: str = ""


class CureNotices:
    """Per device: the first cure is an alarm at once; later ones within SUMMARY_WINDOW_S are
    counted, and said in one summary when the window ends, the run pauses or the run ends
    (``flush``), or a cure comes after the window (which then opens a new one)."""

    def __init__(self, alarm: Callable[[str, str, str], None], window_s: float = SUMMARY_WINDOW_S) -> None:
        self._alarm = alarm
        self.window_s = window_s
        self._open: dict[str, _Episode] = {}

    def notice(self, device: str, message: str, now: float | None = None) -> None:
        """``message``: the whole text of the warning, which says that the run goes on."""
        now = time.monotonic() if now is None else now
        ep = self._open.get(device)
        if ep is not None and now - ep.first_t > self.window_s:
            self._summarise(device, now)
            ep = None
        if ep is None:
            self._open[device] = _Episode(now)
            self._alarm(device, message, "warning")
            return
        ep.repeats += 1
        ep.last = message
        log.info("%s: %s (cured again: %d since the warning)", device, message, ep.repeats)

    def flush(self, now: float | None = None, *, older_than_s: float = 0.0) -> None:
        """Say the summary of every episode opened more than ``older_than_s`` ago."""
        now = time.monotonic() if now is None else now
        for device, ep in list(self._open.items()):
            if now - ep.first_t >= older_than_s:
                self._summarise(device, now)

    def _summarise(self, device: str, now: float) -> None:
        ep = self._open.pop(device)
        if ep.repeats:
            self._alarm(device, f"cured {ep.repeats} more time{'s' * (ep.repeats > 1)} in "
                                f"{now - ep.first_t:.0f} s after the warning; the last: {ep.last}", "warning")
