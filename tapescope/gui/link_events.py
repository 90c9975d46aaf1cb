"""Events of a remote window's own link to the broker, beside the engine's events: the
window's model and its MQTT link both use them."""

from __future__ import annotations

from dataclasses import dataclass

from tapescope.acquisition.events import Event


@dataclass(frozen=True)
class LinkChanged(Event):
    """The GUI's own connection to the broker."""

    up: bool
    detail: str


@dataclass(frozen=True)
class RoleChanged(Event):
    role: str            # "operator" or "viewer"
    detail: str


@dataclass(frozen=True)
class CommandReply(Event):
    id: str | None
    cmd: str
    ok: bool
    text: str            # the engine's message, or its error
    mine: bool = True    # False: the answer to another client's command
