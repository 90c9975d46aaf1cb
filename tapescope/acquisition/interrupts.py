"""How the engine's control reaches the actions it runs: exceptions raised at a tile boundary
(abort, skip) or when retries give up (fatal), caught where they end what they interrupt."""

from __future__ import annotations


class Abort(Exception):
    """The run ends at this boundary (the operator, or a failure that must stop it)."""


class Skip(Exception):
    """The current section ends at this boundary, recorded as skipped; the run goes on."""


class Fatal(Exception):
    """A device fault that retries did not cure, with on_device_failure = "fail"."""
