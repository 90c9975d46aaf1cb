"""Stage driver for a Thermo Fisher / FEI TEM's own goniometer, through temscript's server.

For labs without a separate fast stage: the tiles of a montage are stepped with the TEM's
goniometer. Endpoints (temscript ``/v1``): ``stage_position`` (GET: x, y, z in metres, a, b in
radians; PUT with ``?method=GO``: move the axes given), ``stage_status`` (READY, DISABLED,
NOT_READY, GOING, MOVING, WOBBLING), ``stage_limits`` (per axis, metres or radians).

The same interface as the ASI stage (stage.py): nanometres, soft limits checked before a
move (the narrower of the configured travel and the goniometer's own limits), settle by
polling status, a stop short of the target is an error. temscript has no stop command: a
move that does not settle is reported, and the TEM's own software stops the goniometer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .device import Device
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .stage import StageLimits
from .temscript_http import TemscriptHttp

BUSY = ("GOING", "MOVING", "WOBBLING")


class TemscriptStage(Device):
    name = "stage"

    def __init__(self, url: str, *, timeout_s: float = 5.0, settle_timeout_s: float = 10.0, poll_s: float = 0.02,
                 limits: StageLimits | None = None, tolerance_nm: float = 50.0) -> None:
        self._http = TemscriptHttp(self.name, url, timeout_s=timeout_s)
        self.settle_timeout_s = settle_timeout_s
        self.poll_s = poll_s
        self.limits = limits or StageLimits()
        self.tolerance_nm = tolerance_nm
        self.on_readout: Callable[[dict[str, Any], bool], None] | None = None
        self.holder = ""

    async def connect(self) -> None:
        self._http.open()
        self.holder = str(await self._http.get("stage_holder"))
        try:
            tem = await self._http.get("stage_limits")
            (x0, x1), (y0, y1) = (float(v) * 1e9 for v in tem["x"]), (float(v) * 1e9 for v in tem["y"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(self.name, f"unexpected stage_limits from the microscope: {exc}") from None
        lim = self.limits
        self.limits = StageLimits(x_nm=(max(lim.x_nm[0], x0), min(lim.x_nm[1], x1)),
                                  y_nm=(max(lim.y_nm[0], y0), min(lim.y_nm[1], y1)))
        await self.status()

    async def close(self) -> None:
        self._http.close()

    async def position(self) -> tuple[float, float]:
        pos = await self._http.get("stage_position")
        try:
            return float(pos["x"]) * 1e9, float(pos["y"]) * 1e9
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(self.name, f"unexpected stage_position {pos!r}") from None

    async def status(self) -> str:
        """'idle' or 'busy'; a goniometer that is disabled or not ready is an error."""
        st = str(await self._http.get("stage_status"))
        if st == "READY":
            return "idle"
        if st in BUSY:
            return "busy"
        raise DeviceError(self.name, f"goniometer is {st.lower().replace('_', ' ')}: enable it at the microscope")

    async def move_to(self, x_nm: float, y_nm: float, *, wait: bool = True) -> None:
        lim = self.limits
        if not (lim.x_nm[0] <= x_nm <= lim.x_nm[1] and lim.y_nm[0] <= y_nm <= lim.y_nm[1]):
            raise DeviceError(self.name, f"target ({x_nm:.0f}, {y_nm:.0f}) nm is outside the limits "
                              f"x {lim.x_nm}, y {lim.y_nm} nm", "limits")
        await self._http.put("stage_position", {"x": x_nm * 1e-9, "y": y_nm * 1e-9}, "method=GO")
        if not wait:
            return
        await self.wait_settled()
        x, y = await self.position()
        if self.on_readout is not None:
            self.on_readout({"x_nm": x, "y_nm": y, "target_x_nm": x_nm, "target_y_nm": y_nm}, False)
        if abs(x - x_nm) > self.tolerance_nm or abs(y - y_nm) > self.tolerance_nm:
            raise DeviceError(self.name, f"stopped at ({x:.0f}, {y:.0f}) nm, short of the target "
                              f"({x_nm:.0f}, {y_nm:.0f}) nm", "short")

    async def move_by(self, dx_nm: float, dy_nm: float, *, wait: bool = True) -> None:
        x, y = await self.position()
        await self.move_to(x + dx_nm, y + dy_nm, wait=wait)

    async def wait_settled(self) -> None:
        deadline = time.monotonic() + self.settle_timeout_s
        while await self.status() == "busy":
            if time.monotonic() > deadline:
                x, y = await self.position()
                raise DeviceTimeout(self.name, f"goniometer not settled after {self.settle_timeout_s:g} s, "
                                    f"at ({x:.0f}, {y:.0f}) nm", retryable=True)
            await asyncio.sleep(self.poll_s)
