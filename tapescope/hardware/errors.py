"""Typed device errors: every driver raises these, never a bare OSError or a hang."""

from __future__ import annotations

from tapescope.errors import TapescopeError


class DeviceError(TapescopeError):
    """A device refused or failed a command; carries the device's own code and text.

    ``retryable`` is True when the driver knows that sending the same request again is
    safe and may succeed (the device is in a known state and did not act on it).
    """

    def __init__(self, device: str, message: str, code: int | str | None = None, *,
                 retryable: bool = False) -> None:
        self.device = device
        self.code = code
        self.text = message
        self.retryable = retryable
        where = f" (code {code})" if code is not None else ""
        super().__init__(f"{device}: {message}{where}")


class DeviceTimeout(DeviceError):
    """No (complete) reply within the timeout. The command may or may not have run."""


class ProtocolError(DeviceError):
    """A reply arrived but cannot be parsed: garbled, truncated, or out of sequence."""


class DeviceDisconnected(DeviceError):
    """The transport closed under us (cable pulled, server gone)."""
