"""A request/reply line transport over any pyserial URL, usable from asyncio.

pyserial is blocking; each transaction runs in a worker thread under an asyncio lock, so
the event loop never blocks and only one command is on the wire at a time. The same
class drives a real RS-232 port, a pseudo-terminal from the simulator, or ``socket://``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import serial

from .errors import DeviceDisconnected, DeviceError, DeviceTimeout, ProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")


class SerialLine:
    def __init__(
        self,
        device: str,
        url: str,
        *,
        baudrate: int = 115200,
        timeout_s: float = 2.0,
        send_eol: bytes = b"\r",
        recv_eol: bytes = b"\n",
        encoding: str = "ascii",
    ) -> None:
        self.device = device
        self.url = url
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self.send_eol = send_eol
        self.recv_eol = recv_eol
        self.encoding = encoding
        self._port: serial.SerialBase | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        def _open() -> serial.SerialBase:
            return serial.serial_for_url(
                self.url, baudrate=self.baudrate, timeout=self.timeout_s,
                write_timeout=self.timeout_s,
            )

        try:
            self._port = await asyncio.to_thread(_open)
        except (serial.SerialException, OSError) as exc:
            raise DeviceDisconnected(self.device, f"cannot open {self.url}: {exc}") from exc

    async def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await asyncio.to_thread(port.close)

    @property
    def is_open(self) -> bool:
        return self._port is not None and self._port.is_open

    def _exchange(self, data: bytes, read: Callable[[serial.SerialBase], T]) -> T:
        port = self._port
        if port is None:
            raise DeviceDisconnected(self.device, "port is not open")
        try:
            port.reset_input_buffer()  # a late reply to a timed-out command must not be read as ours
            port.write(data)
            return read(port)
        except (serial.SerialException, OSError) as exc:
            raise DeviceDisconnected(self.device, f"I/O error on {self.url}: {exc}") from exc

    async def exchange(self, data: bytes, read: Callable[[serial.SerialBase], T]) -> T:
        """Send raw bytes and read the reply with ``read(port)``, for binary protocols; the
        same lock, thread and I/O errors as ``query``."""
        async with self._lock:
            return await asyncio.to_thread(self._exchange, data, read)

    def _transact(self, line: str) -> str:
        raw = self._exchange(line.encode(self.encoding) + self.send_eol,
                             lambda port: port.read_until(self.recv_eol))
        if not raw.endswith(self.recv_eol):
            raise DeviceTimeout(
                self.device, f"no complete reply to {line!r} within {self.timeout_s:g} s"
                + (f" (partial: {raw!r})" if raw else "")
            )
        try:
            return raw.decode(self.encoding).strip()
        except UnicodeDecodeError:
            raise ProtocolError(self.device, f"undecodable reply to {line!r}: {raw!r}") from None

    async def query(self, line: str) -> str:
        """Send one command line and return its reply line, stripped."""
        async with self._lock:
            return await asyncio.to_thread(self._transact, line)

    async def query_words(self, line: str, expect: str) -> list[str]:
        """Query a device that answers ``EXPECT args...`` or ``ERR <code> <text>``; return args.

        The line protocols of the tape and the column share this reply grammar.
        """
        reply = await self.query(line)
        words = reply.split()
        if words[:1] == ["ERR"]:
            code = words[1] if len(words) > 1 else "?"
            raise DeviceError(self.device, f"{' '.join(words[2:]) or 'error'} ({line!r})",
                              int(code) if code.isdigit() else code)
        if words[:1] != [expect]:
            raise ProtocolError(self.device, f"unexpected reply {reply!r} to {line!r}")
        return words[1:]


async def send_confirmed(device: str, send: Callable[[], Awaitable[Any]],
                         confirm: Callable[[], Awaitable[bool]],
                         notice: Callable[[str], None] | None = None) -> None:
    """Send a command whose reply may be lost or garbled, and never send it twice.

    When the reply times out or cannot be parsed, the command may or may not have run.
    Instead of re-sending (a second move from a different start is a different move), ask
    the device about its state: ``confirm()`` says whether the command took effect. If it
    did, carry on; if it did not, raise the original error, marked retryable, with what
    the re-query found. If the re-query fails too, the device is not answering: raise.
    """
    try:
        await send()
        return
    except (DeviceTimeout, ProtocolError) as exc:
        first = exc
    try:
        took_effect = await confirm()
    except DeviceError as exc:
        raise type(first)(device, f"{first.text}; re-query failed too: {exc.text}", first.code) from first
    if took_effect:
        if notice is not None:      # the device's own notice logs it and tells the engine
            notice(f"{first.text}; the re-query shows the command took effect")
        else:
            log.warning("%s: %s; the re-query shows the command took effect", device, first.text)
        return
    raise type(first)(device, f"{first.text}; the re-query shows it did not take effect (safe to retry)",
                      first.code, retryable=True) from first
