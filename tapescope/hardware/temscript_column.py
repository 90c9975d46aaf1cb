"""Column driver for Thermo Fisher / FEI TEMs through temscript's HTTP server.

On the microscope PC, `temscript-server` (PyPI: temscript) exposes the TEM scripting
interface over HTTP; `temscript-server --null` serves the same API backed by its
NullMicroscope on any machine (the tests run against it). Endpoints used (JSON bodies):

    GET /v1/family, /v1/voltage (kV; 0: high tension off), /v1/column_valves_open,
        /v1/beam_blanked, /v1/magnification_index, /v1/indicated_magnification,
        /v1/defocus (m)
    PUT /v1/beam_blanked, /v1/magnification_index, /v1/defocus, /v1/column_valves_open

The same interface as the serial column driver (`column.py`), so the engine and the
calibrations use either. What temscript cannot do is said, not faked: high tension is
switched at the microscope (the scripting interface only reads it), so `high_tension(True)`
on a TEM whose high tension is off raises a DeviceError naming that.
"""

from __future__ import annotations

from typing import Any

from .column import FOCUS_LIMIT_NM, ColumnState
from .device import Device
from .errors import DeviceError, ProtocolError
from .temscript_http import TemscriptHttp

MAX_MAG_INDEX = 60      # magnification indices searched for a magnification (TEMs have ~30-40)


class TemscriptColumn(Device):
    name = "column"

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self._http = TemscriptHttp(self.name, url, timeout_s=timeout_s)
        self.url = self._http.url
        self.family = ""
        self._mag_index: dict[float, int] = {}     # magnification -> index, learnt as they are seen

    async def connect(self) -> None:
        self._http.open()
        self.family = str(await self._get("family"))
        await self.status()

    async def close(self) -> None:
        self._http.close()

    async def _get(self, endpoint: str) -> Any:
        return await self._http.get(endpoint)

    async def _put(self, endpoint: str, value: Any) -> None:
        await self._http.put(endpoint, value)

    async def status(self) -> ColumnState:
        try:
            kv = float(await self._get("voltage"))
            valves = bool(await self._get("column_valves_open"))
            blanked = bool(await self._get("beam_blanked"))
            mag = float(await self._get("indicated_magnification"))
            index = int(await self._get("magnification_index"))
            focus_m = float(await self._get("defocus"))
        except (TypeError, ValueError) as exc:
            raise ProtocolError(self.name, f"unexpected value from the microscope: {exc}") from None
        if mag > 0:
            self._mag_index[mag] = index
        # The beam reaches the specimen when high tension is on, the column valves are open
        # and the beam is not blanked: closed valves count as blanked.
        return ColumnState("ON" if kv > 0 else "OFF", kv, mag, focus_m * 1e9, blanked or not valves)

    async def set_magnification(self, mag: float) -> None:
        index = self._mag_index.get(mag)
        if index is None:
            index = await self._find_index(mag)
        await self._put("magnification_index", index)
        got = float(await self._get("indicated_magnification"))
        if got != mag:
            raise DeviceError(self.name, f"magnification index {index} shows {got:g}, not {mag:g}")

    async def _find_index(self, mag: float) -> int:
        """The magnification index that shows `mag` (temscript sets indices, not values);
        the column is left where it was."""
        start = int(await self._get("magnification_index"))
        try:
            for index in range(1, MAX_MAG_INDEX + 1):
                await self._put("magnification_index", index)
                seen = float(await self._get("indicated_magnification"))
                if seen > 0:
                    self._mag_index[seen] = index
                if seen == mag:
                    return index
        finally:
            await self._put("magnification_index", start)
        raise DeviceError(self.name, f"no magnification index shows {mag:g} "
                          f"(seen: {', '.join(f'{m:g}' for m in sorted(self._mag_index))})")

    async def set_focus(self, focus_nm: float) -> None:
        if abs(focus_nm) > FOCUS_LIMIT_NM:
            raise DeviceError(self.name, f"focus {focus_nm:g} nm is outside +-{FOCUS_LIMIT_NM:g} nm")
        await self._put("defocus", focus_nm * 1e-9)

    async def blank(self) -> None:
        await self._put("beam_blanked", True)

    async def unblank(self) -> None:
        await self._put("beam_blanked", False)

    async def reset_trip(self) -> None:
        """Nothing to reset through temscript: a tripped gun is handled at the microscope."""

    async def high_tension(self, on: bool, *, wait: bool = True) -> ColumnState:
        st = await self.status()
        if (st.high_tension == "ON") != on:
            raise DeviceError(self.name, f"high tension is {st.high_tension.lower()}: temscript only reads it; "
                              f"switch it {'on' if on else 'off'} at the microscope")
        return st

    async def ensure_beam(self) -> ColumnState:
        """Bring the beam back: open the column valves and unblank. High tension that is off
        is an error for a person (it is switched at the microscope)."""
        st = await self.status()
        if st.beam_on:
            return st
        if st.high_tension != "ON":
            await self.high_tension(True)
        if not bool(await self._get("column_valves_open")):
            await self._put("column_valves_open", True)
        await self.unblank()
        return await self.status()

