"""XY stage driver: ASI MS-2000 ASCII protocol over pyserial (real port, pty or socket)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import asi_protocol as asi
from .device import Device
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine, send_confirmed


@dataclass(frozen=True)
class StageLimits:
    x_nm: tuple[float, float] = (-5e6, 5e6)
    y_nm: tuple[float, float] = (-5e6, 5e6)

    @classmethod
    def centred(cls, travel_nm: tuple[float, float]) -> StageLimits:
        """Limits for a travel of (y, x) nm centred on the beam axis."""
        hy, hx = travel_nm[0] / 2, travel_nm[1] / 2
        return cls(x_nm=(-hx, hx), y_nm=(-hy, hy))


class Stage(Device):
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
        tolerance_nm: float = 50.0,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s)
        self.settle_timeout_s = settle_timeout_s
        self.poll_s = poll_s
        self.limits = limits or StageLimits()
        # How far the settled encoder may be from the target before the move counts as
        # stopped short (a limit switch, an obstruction): far above the encoder's 1 nm.
        self.tolerance_nm = tolerance_nm
        # Telemetry while moving: the encoder, read every readout_period_s (25 Hz) of a settle
        # wait, goes to on_readout(status, moving). None: no extra reads on the line.
        self.on_readout: Callable[[dict[str, Any], bool], None] | None = None
        self.readout_period_s = 0.04
        self._target: tuple[float, float] | None = None

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
        """Move to (x, y) nm; with wait, until settled and checked to be there.

        A lost or garbled reply to the move is never answered by sending the move again:
        the driver asks the stage whether it is moving or already there (send_confirmed).
        """
        self._check_limits(x_nm, y_nm)
        cmd = f"M X={asi.nm_to_units(x_nm)} Y={asi.nm_to_units(y_nm)}"
        self._target = (x_nm, y_nm)

        async def moved() -> bool:
            if await self.status() == "busy":
                return True
            x, y = await self.position()
            return abs(x - x_nm) <= self.tolerance_nm and abs(y - y_nm) <= self.tolerance_nm

        await send_confirmed(self.name, lambda: self._command(cmd), moved, self.notice)
        if wait:
            await self.wait_settled()
            x, y = await self.position()
            self._readout(x, y, False)
            if abs(x - x_nm) > self.tolerance_nm or abs(y - y_nm) > self.tolerance_nm:
                raise DeviceError(
                    self.name, f"stopped at ({x:.0f}, {y:.0f}) nm, short of the target ({x_nm:.0f}, "
                    f"{y_nm:.0f}) nm: a limit switch or an obstruction", "short", retryable=False,
                )

    async def move_by(self, dx_nm: float, dy_nm: float, *, wait: bool = True) -> None:
        """Relative move, sent as an absolute one so that a lost reply can be checked."""
        x, y = await self.position()
        await self.move_to(x + dx_nm, y + dy_nm, wait=wait)

    async def set_speed(self, mm_s: float) -> None:
        """Maximum speed of both axes, mm/s (ASI's S command)."""
        if not 0 < mm_s <= 10.0:
            raise DeviceError(self.name, f"speed {mm_s:g} mm/s is outside (0, 10]", 4)
        await self._command(f"S X={mm_s:.4f} Y={mm_s:.4f}")

    async def speed(self) -> float:
        """Speed setting of the X axis, mm/s."""
        body = await self._command("S X?")
        key, _, value = body.partition("=")
        try:
            if key.strip().upper() != "X":
                raise ValueError(body)
            return float(value)
        except ValueError:
            raise ProtocolError(self.name, f"bad speed reply {body!r}") from None

    def _readout(self, x_nm: float, y_nm: float, moving: bool) -> None:
        if self.on_readout is None:
            return
        status: dict[str, Any] = {"x_nm": x_nm, "y_nm": y_nm}
        if self._target is not None:
            status.update(target_x_nm=self._target[0], target_y_nm=self._target[1])
        self.on_readout(status, moving)

    async def stop(self) -> None:
        await self._command("HALT")

    async def wait_settled(self) -> None:
        """Poll status until idle. On timeout, stop the stage and report where it is."""
        deadline = time.monotonic() + self.settle_timeout_s
        next_readout = 0.0
        while await self.status() == "busy":
            if self.on_readout is not None and time.monotonic() >= next_readout:
                next_readout = time.monotonic() + self.readout_period_s
                x, y = await self.position()     # the encoder on its way
                self._readout(x, y, True)
            if time.monotonic() > deadline:
                await self.stop()
                x, y = await self.position()
                # Halted and re-read: the stage is in a known place, so a new move is safe.
                raise DeviceTimeout(
                    self.name, f"not settled after {self.settle_timeout_s:g} s; "
                    f"halted at ({x:.0f}, {y:.0f}) nm", retryable=True,
                )
            await asyncio.sleep(self.poll_s)
