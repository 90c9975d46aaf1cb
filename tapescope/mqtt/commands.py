"""Operator commands over MQTT: parse, check, apply to the engine, answer.

Parsing is separate from the engine so that a malformed command is rejected before
anything is touched: bad input gets a clear error and changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from tapescope.errors import TapescopeError

COMMANDS = ("abort", "pause", "resume", "skip_section", "status")
MAX_ID = 128
MAX_REASON = 500
MAX_PAYLOAD = 4096


class Controllable(Protocol):
    """What commands need of an engine (tapescope.acquisition.engine.Engine has it)."""

    @property
    def state(self) -> Any: ...
    def pause(self, reason: str = ...) -> bool: ...
    def resume(self, reason: str = ...) -> bool: ...
    def abort(self, reason: str = ...) -> bool: ...
    def skip_section(self, reason: str = ...) -> bool: ...


@dataclass(frozen=True)
class Command:
    cmd: str
    id: str | None
    reason: str


class CommandError(TapescopeError, ValueError):
    def __init__(self, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.id = id


def parse(payload: bytes | bytearray | str) -> Command:
    if isinstance(payload, bytes | bytearray):
        if len(payload) > MAX_PAYLOAD:
            raise CommandError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(f"payload is not UTF-8: {exc}") from None
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandError(f"payload must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("id")
    if cid is not None and not (isinstance(cid, str | int) and len(str(cid)) <= MAX_ID):
        raise CommandError(f"'id' must be a string or integer of at most {MAX_ID} characters")
    cid = None if cid is None else str(cid)
    unknown = sorted(set(obj) - {"cmd", "id", "reason"})
    if unknown:
        raise CommandError(f"unknown field(s) {', '.join(unknown)}; allowed: cmd, id, reason", cid)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise CommandError("'cmd' is missing or not a string", cid)
    if cmd not in COMMANDS:
        raise CommandError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}", cid)
    reason = obj.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise CommandError(f"'reason' must be a string of at most {MAX_REASON} characters", cid)
    return Command(cmd, cid, reason)


def apply(engine: Controllable | None, command: Command, who: str, status: dict[str, Any]) -> dict[str, Any]:
    """Run one parsed command; the reply payload (without time)."""
    base: dict[str, Any] = {"id": command.id, "cmd": command.cmd}
    if engine is None:
        return {**base, "ok": False, "error": "no run in progress"}
    reason = f"{who} over MQTT" + (f": {command.reason}" if command.reason else "")
    state = getattr(engine.state, "value", str(engine.state))
    if command.cmd == "status":
        return {**base, "ok": True, "state": state, **status}
    ok = getattr(engine, command.cmd)(reason)
    done = {"pause": "pause requested (takes effect at the next tile boundary)",
            "resume": "resumed", "abort": "abort requested (takes effect at the next tile boundary)",
            "skip_section": "skip requested (takes effect at the next tile boundary)"}[command.cmd]
    if ok:
        return {**base, "ok": True, "state": state, "message": done}
    return {**base, "ok": False, "state": state, "error": f"{command.cmd} does not apply in state {state}"}
