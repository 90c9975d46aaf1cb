"""What every driver shares: connect/close, and `async with` that calls them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)


class Device:
    name = "device"
    # Told of each fault the driver cured by itself (a jam that cleared, a lost reply that a
    # re-query confirmed, a reconnect), with (device name, message): the engine raises them
    # as warning alarms, so they reach a person and not only the log.
    on_notice: Callable[[str, str], None] | None = None

    def notice(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)
        if self.on_notice is not None:
            self.on_notice(self.name, message)

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
