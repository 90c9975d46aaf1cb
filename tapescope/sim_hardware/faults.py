"""Faults on demand: the simulator's control backdoor for the failures drivers must survive.

A fault is *armed* with ``inject(name, count=1, after=0, **options)`` and fires at the next
``count`` opportunities that suit it (a stage reply, a tape move, an exposure, ...), after
skipping ``after`` of them. Emulators ask ``take(name)`` at each opportunity; a fault that
fires is logged and recorded in ``fired`` so that tests and people can see what happened.
The names and what they do are in docs/simulator.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tapescope.errors import TapescopeError

log = logging.getLogger(__name__)

# name -> (what it does, the options it accepts with their defaults)
FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "stage_timeout": ("the stage sends no reply to a command (which still runs unless executed=false)",
                      {"executed": True, "on": ""}),
    "stage_garbled": ("the stage's reply to a command arrives garbled (the command still runs)", {"on": ""}),
    "stage_stall": ("the next move stops partway and reports busy until HALT", {}),
    "stage_limit": ("the next move hits a limit switch partway and stops there", {}),
    "tape_timeout": ("the tape sends no reply to a command (which still runs unless executed=false)",
                     {"executed": True, "on": ""}),
    "tape_garbled": ("the tape's reply to a command arrives garbled (the command still runs)", {"on": ""}),
    "tape_jam": ("the next GOTO jams: STATE? says JAMMED until CLEAR, or until clears_after polls",
                 {"clears_after": 0}),
    "column_timeout": ("the column sends no reply to a command (which still runs unless executed=false)",
                       {"executed": True, "on": ""}),
    "column_garbled": ("the column's reply to a command arrives garbled (the command still runs)", {"on": ""}),
    "tape_slip": ("a GOTO ends with the tape slipped: the section under the beam is `slots` further on, "
                  "until the next GOTO; the barcode reader sees the slot really there, or with seen=false "
                  "still reports the slot asked for (a mislabelled slot; at_slot: only a GOTO to that "
                  "slot counts)", {"slots": 1, "at_slot": -1, "seen": True}),
    "tape_slack": ("GridTape's controller (tape driver gridtape) only: the tape goes slack, its load cell "
                   "reads low until the tape is tensioned", {}),
    "beam_trip": ("high tension trips at an exposure: beam off, dark frames, until RESET and HT ON", {}),
    "frame_drop": ("the camera exposes but never sends the frame", {}),
    "frame_truncated": ("the camera sends part of a frame and closes the connection", {}),
    "camera_disconnect": ("the camera drops the connection at a request and refuses new ones for down_s",
                          {"down_s": 0.5}),
}


class FaultError(TapescopeError, ValueError):
    """A fault request that cannot be armed; the message names what is wrong."""


@dataclass
class Fault:
    name: str
    count: int
    after: int
    options: dict[str, Any] = field(default_factory=dict)


class FaultBook:
    """The armed faults of one simulated world."""

    def __init__(self) -> None:
        self._armed: dict[str, Fault] = {}
        self.fired: list[tuple[float, str]] = []

    def inject(self, name: str, count: int = 1, *, after: int = 0, **options: Any) -> None:
        if name not in FAULTS:
            raise FaultError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        if not isinstance(count, int) or count < 1:
            raise FaultError(f"fault {name}: count must be an integer >= 1, got {count!r}")
        if not isinstance(after, int) or after < 0:
            raise FaultError(f"fault {name}: after must be an integer >= 0, got {after!r}")
        defaults = FAULTS[name][1]
        unknown = set(options) - set(defaults)
        if unknown:
            allowed = ", ".join(defaults) or "none"
            raise FaultError(f"fault {name}: unknown option(s) {', '.join(sorted(unknown))} (allowed: {allowed})")
        merged = dict(defaults)
        for key, value in options.items():
            want = type(defaults[key])
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not want:
                raise FaultError(f"fault {name}: option {key} must be {want.__name__}, got {value!r}")
            merged[key] = value
        self._armed[name] = Fault(name, count, after, merged)
        log.info("fault armed: %s count=%d after=%d %s", name, count, after, merged)

    def take(self, name: str, command: str = "", *, slot: int | None = None) -> dict[str, Any] | None:
        """At an opportunity for fault `name`: its options if it fires now, else None.

        A fault with option ``on`` (a command verb, e.g. "M" or "GOTO") only counts
        commands with that verb as opportunities; one with ``at_slot`` >= 0 only counts
        opportunities at that tape `slot`.
        """
        fault = self._armed.get(name)
        if fault is None:
            return None
        verb = fault.options.get("on", "")
        if verb and (command.split() or [""])[0].upper() != verb.upper():
            return None
        at_slot = fault.options.get("at_slot", -1)
        if at_slot >= 0 and slot != at_slot:
            return None
        if fault.after > 0:
            fault.after -= 1
            return None
        fault.count -= 1
        if fault.count <= 0:
            del self._armed[name]
        self.fired.append((time.time(), name))
        log.warning("simulated fault fired: %s", name)
        return fault.options

    def armed(self) -> dict[str, int]:
        """Armed fault names and how many times each will still fire."""
        return {name: f.count for name, f in self._armed.items()}

    def clear(self, name: str | None = None) -> None:
        if name is None:
            self._armed.clear()
        else:
            self._armed.pop(name, None)


def parse_fault_spec(spec: str) -> tuple[str, int, int, dict[str, Any]]:
    """``NAME[:COUNT][,after=N][,key=value...]`` -> (name, count, after, options).

    Values are read as int, float, true/false or else text; validation of names and options is
    ``FaultBook.inject``'s, so that one set of rules serves the API and the command line.
    """
    head, *pairs = [p.strip() for p in spec.split(",")]
    name, _, count_txt = head.partition(":")
    try:
        count = int(count_txt) if count_txt else 1
    except ValueError:
        raise FaultError(f"fault {spec!r}: count {count_txt!r} is not an integer") from None
    after = 0
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise FaultError(f"fault {spec!r}: expected key=value, got {pair!r}")
        value: Any
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        if key == "after":
            if not isinstance(value, int) or isinstance(value, bool):
                raise FaultError(f"fault {spec!r}: after must be an integer")
            after = value
        else:
            options[key] = value
    return name, count, after, options
