"""The run's state machine: states, the transitions allowed between them, and who may ask.

Documented in docs/acquisition.md. An illegal transition is a bug in the engine, so it
raises rather than being ignored: a state machine that silently accepts anything is how
acquisition programs end up locked in an error state.
"""

from __future__ import annotations

import enum

from tapescope.errors import TapescopeError


class RunState(enum.Enum):
    IDLE = "idle"               # built, not started
    PREPARING = "preparing"     # calibrations, camera set-up
    ACQUIRING = "acquiring"     # sections and tiles
    PAUSED = "paused"           # waiting for resume (operator, watchdog, disk, STOP_NOW, device fault)
    RECOVERING = "recovering"   # retrying a device call that failed (reconnect, back-off)
    FINISHING = "finishing"     # acquisition over: draining processing, writing the report
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (RunState.DONE, RunState.FAILED, RunState.ABORTED)


_S = RunState
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.IDLE: frozenset({_S.PREPARING, _S.ABORTED, _S.FAILED}),
    _S.PREPARING: frozenset({_S.ACQUIRING, _S.PAUSED, _S.RECOVERING, _S.FINISHING, _S.FAILED, _S.ABORTED}),
    _S.ACQUIRING: frozenset({_S.PAUSED, _S.RECOVERING, _S.FINISHING, _S.FAILED, _S.ABORTED}),
    _S.PAUSED: frozenset({_S.PREPARING, _S.ACQUIRING, _S.RECOVERING, _S.FINISHING, _S.FAILED, _S.ABORTED}),
    _S.RECOVERING: frozenset({_S.PREPARING, _S.ACQUIRING, _S.PAUSED, _S.FINISHING, _S.FAILED, _S.ABORTED}),
    _S.FINISHING: frozenset({_S.DONE, _S.FAILED, _S.ABORTED}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
    _S.ABORTED: frozenset(),
}


# What the engine does in each state, for the table in docs/acquisition.md.
DOING: dict[RunState, str] = {
    _S.IDLE: "built, `run()` not called",
    _S.PREPARING: "camera exposure, arm, calibrations",
    _S.ACQUIRING: "tape to slot, barcode, plan (overview, ROI), tiles with QC",
    _S.PAUSED: "waiting for `resume()` (or a device to answer again); nothing moves",
    _S.RECOVERING: "a device call failed: reconnect, back off, retry",
    _S.FINISHING: "acquisition over; processing drains",
    _S.DONE: "terminal: controls return False",
    _S.FAILED: "terminal: controls return False",
    _S.ABORTED: "terminal: controls return False",
}


def markdown_table() -> str:
    """The state table of docs/acquisition.md, made from TRANSITIONS and DOING (a test keeps
    the document equal to it)."""
    rows = ["| state | what the engine is doing | leaves for |", "|---|---|---|"]
    for st in RunState:
        to = ", ".join(t.name for t in RunState if t in TRANSITIONS[st]) or "none"
        rows.append(f"| {st.name} | {DOING[st]} | {to} |")
    return "\n".join(rows)


# The operator's controls (GUI buttons, MQTT commands) and the states in which a run offers
# each: the one place this rule is written. The engine's own methods accept a request in any
# state that is not terminal (it takes effect at the next tile boundary) and answer False in
# a terminal one; a front end offers only what is useful in the state it shows.
_ACTIVE = frozenset({_S.PREPARING, _S.ACQUIRING, _S.RECOVERING})
CONTROLS: dict[str, frozenset[RunState]] = {
    "pause": _ACTIVE,
    "resume": frozenset({_S.PAUSED}),
    "skip_section": _ACTIVE | {_S.PAUSED},
    "abort": frozenset(s for s in RunState if not s.terminal),
}


def offers(verb: str, state: RunState | str) -> bool:
    """Whether a run in `state` offers control `verb` (pause, resume, skip_section, abort)."""
    try:
        st = state if isinstance(state, RunState) else RunState(state)
    except ValueError:
        return False
    return st in CONTROLS.get(verb, frozenset())


class IllegalTransition(TapescopeError, RuntimeError):
    pass


def check_transition(old: RunState, new: RunState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"run state {old.value} -> {new.value} is not allowed")
