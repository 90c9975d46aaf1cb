"""temscript's HTTP API (``/v1/<endpoint>``, JSON bodies), asynchronously, for the TEM's
column and goniometer stage drivers. Errors as every driver raises them: no answer is a
DeviceTimeout, an HTTP error a DeviceError carrying the status code, a body that is not
JSON a ProtocolError."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .errors import DeviceError, DeviceTimeout, ProtocolError


class TemscriptHttp:
    def __init__(self, device: str, url: str, *, timeout_s: float = 5.0) -> None:
        self.device = device
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._client: AsyncHTTPClient | None = None

    def open(self) -> None:
        self._client = AsyncHTTPClient()

    def close(self) -> None:
        self._client = None        # tornado's client is shared per loop; nothing of ours to free

    async def call(self, method: str, endpoint: str, value: Any = None, query: str = "") -> Any:
        if self._client is None:
            raise DeviceError(self.device, "not connected")
        body = None if method == "GET" else json.dumps(value)
        req = HTTPRequest(f"{self.url}/v1/{endpoint}{'?' + query if query else ''}", method=method, body=body,
                          headers={"Accept": "application/json", "Content-Type": "application/json"},
                          connect_timeout=self.timeout_s, request_timeout=self.timeout_s)
        try:
            resp = await self._client.fetch(req, raise_error=False)
        except (OSError, TimeoutError, HTTPClientError) as exc:
            # tornado raises its own timeout and closed-stream errors even with raise_error=False.
            raise DeviceTimeout(self.device, f"{method} {endpoint}: no answer from {self.url} ({exc})") from None
        if resp.code == 599:
            raise DeviceTimeout(self.device, f"{method} {endpoint}: no answer from {self.url} ({resp.error})")
        if resp.code >= 400:
            text = resp.body.decode("utf-8", "replace")[:200] if resp.body else resp.reason
            raise DeviceError(self.device, f"{method} {endpoint}: the microscope answered {resp.code}: {text}",
                              resp.code)
        if resp.code == 204 or not resp.body:
            return None
        try:
            return json.loads(resp.body)
        except ValueError:
            raise ProtocolError(self.device, f"{method} {endpoint}: not JSON: {resp.body[:80]!r}") from None

    async def get(self, endpoint: str) -> Any:
        return await self.call("GET", endpoint)

    async def put(self, endpoint: str, value: Any, query: str = "") -> None:
        await self.call("PUT", endpoint, value, query)


def is_temscript(url: str | None) -> bool:
    """A device URL that names a temscript server (http://HOST:PORT) rather than a serial port."""
    return bool(url) and str(url).startswith(("http://", "https://"))
