"""XY stage driver: ASI MS-2000 ASCII protocol over pyserial (real port, pty or socket)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from . import asi_protocol as asi
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine


@dataclass(frozen=True)
class StageLimits:
    x_nm: tuple[float, float] = (-5e6, 5e6)
    y_nm: tuple[float, float] = (-5e6, 5e6)


class Stage:
    """Async XY stage. Positions in nanometres."""

    name = "stage"

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 115200,
        timeout_s: float = 2.0,
        settle_timeout_s: float = 10.0,
        poll_s: float = 0.005,
        limits: StageLimits | None = None,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s)
        self.settle_timeout_s = settle_timeout_s
        self.poll_s = poll_s
        self.limits = limits or StageLimits()

    async def connect(self) -> None:
        await self._line.open()
        await self.status()  # fail now, not at the first move, if nothing answers

    async def close(self) -> None:
        await self._line.close()

    async def _command(self, line: str) -> str:
        reply = await self._line.query(line)
        if reply.startswith(":N"):
            try:
                code = int(reply[2:].lstrip("-").split()[0])
            except (ValueError, IndexError):
                raise ProtocolError(self.name, f"garbled error reply {reply!r} to {line!r}") from None
            raise DeviceError(self.name, f"{asi.ERRORS.get(code, 'error')} in {line!r}", code)
        if not reply.startswith(":A"):
            raise ProtocolError(self.name, f"unexpected reply {reply!r} to {line!r}")
        return reply[2:].strip()

    def _check_limits(self, x_nm: float, y_nm: float) -> None:
        (x0, x1), (y0, y1) = self.limits.x_nm, self.limits.y_nm
        if not (x0 <= x_nm <= x1 and y0 <= y_nm <= y1):
            raise DeviceError(
                self.name, f"target ({x_nm:.0f}, {y_nm:.0f}) nm is outside the soft limits "
                f"x {self.limits.x_nm}, y {self.limits.y_nm}"
            )

    async def position(self) -> tuple[float, float]:
        """Encoder readback (x, y) in nm."""
        body = await self._command("W X Y")
        parts = body.split()
        if len(parts) != 2:
            raise ProtocolError(self.name, f"expected two coordinates, got {body!r}")
        try:
            return asi.units_to_nm(parts[0]), asi.units_to_nm(parts[1])
        except ValueError:
            raise ProtocolError(self.name, f"non-numeric position {body!r}") from None

    async def status(self) -> str:
        """'idle' or 'busy'."""
        reply = await self._line.query("/")
        if reply == "N":
            return "idle"
        if reply == "B":
            return "busy"
        raise ProtocolError(self.name, f"unexpected status reply {reply!r}")

    async def move_to(self, x_nm: float, y_nm: float, *, wait: bool = True) -> None:
        self._check_limits(x_nm, y_nm)
        await self._command(f"M X={asi.nm_to_units(x_nm)} Y={asi.nm_to_units(y_nm)}")
        if wait:
            await self.wait_settled()

    async def stop(self) -> None:
        await self._command("HALT")

    async def wait_settled(self) -> None:
        """Poll status until idle. On timeout, stop the stage and report where it is."""
        deadline = time.monotonic() + self.settle_timeout_s
        while await self.status() == "busy":
            if time.monotonic() > deadline:
                await self.stop()
                x, y = await self.position()
                raise DeviceTimeout(
                    self.name, f"not settled after {self.settle_timeout_s:g} s; "
                    f"halted at ({x:.0f}, {y:.0f}) nm"
                )
            await asyncio.sleep(self.poll_s)
