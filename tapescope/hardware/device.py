"""What every driver shares: connect/close, and `async with` that calls them."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Device:
    name = "device"

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
