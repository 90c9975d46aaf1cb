"""Serve a serial protocol on a pseudo-terminal from the asyncio loop (no threads).

The driver opens ``self.port`` (e.g. /dev/pts/7) with pyserial exactly as it would a
real RS-232 device. Line protocols implement ``handle(line) -> reply | None``; binary
ones split the stream themselves (``received``) and answer through ``serve``.

Serial faults are applied here, once for every serial device: ``<name>_timeout`` swallows
a reply (the command runs, or with ``executed=false`` is lost too), ``<name>_garbled``
replaces it with bytes that are not ASCII, as line noise would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from collections import deque
from collections.abc import Callable

from .faults import FaultBook

log = logging.getLogger(__name__)


class Later:
    """The reply of a command that answers when it ends (`PtyServer.serve` sets `send`)."""

    def __init__(self) -> None:
        self.send: Callable[[bytes | None], None] = lambda _data: None


class PtyServer:
    """The pseudo-terminal and the serial faults; subclasses split the byte stream into
    commands (``received``) and answer each through ``serve``."""

    name = "device"

    def __init__(self, faults: FaultBook | None = None) -> None:
        self.faults = faults or FaultBook()
        self._master = -1
        self._slave = -1
        self.port = ""
        self.commands_seen = 0
        self.commands: deque[str] = deque(maxlen=1000)  # recent commands, for tests and people

    async def start(self) -> str:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        asyncio.get_running_loop().add_reader(self._master, self._on_readable)
        return self.port

    async def stop(self) -> None:
        if self._master >= 0:
            asyncio.get_running_loop().remove_reader(self._master)
            for fd in (self._master, self._slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._master = self._slave = -1

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # the peer closed; our own slave fd keeps the pty alive
        self.received(chunk)

    def received(self, chunk: bytes) -> None:
        raise NotImplementedError

    def serve(self, command: str, run: Callable[[], bytes | Later | None], tail: bytes = b"") -> None:
        """Run one command (``command``: its text, which faults' ``on`` option matches) and
        send its reply, through the serial faults: ``<name>_timeout`` swallows the reply (the
        command runs, or with executed=false is lost too), ``<name>_garbled`` scrambles it.
        ``tail`` (a line end) follows the reply unscrambled, as a framing layer would keep it.
        ``run`` may return a `Later` (a command whose reply comes when it ends): the faults
        drawn for the command then apply to that reply."""
        self.commands_seen += 1
        self.commands.append(command)
        lost = self.faults.take(f"{self.name}_timeout", command)
        if lost is not None and not lost["executed"]:
            return
        try:
            reply = run()
        except Exception:  # a bug in the emulator must show, but not kill the loop
            log.exception("%s emulator failed on %r", self.name, command)
            reply = None
        if isinstance(reply, Later):
            reply.send = lambda data: self._send(command, data, lost is not None, tail)
            return
        self._send(command, reply, lost is not None, tail)

    def _send(self, command: str, reply: bytes | None, lost: bool, tail: bytes) -> None:
        if reply is None or lost:
            return
        if self.faults.take(f"{self.name}_garbled", command) is not None:
            reply = bytes(0x80 | (b * 37 + 11) & 0xFF for b in reply or b"?")
        self.write_raw(reply + tail)

    def write_raw(self, data: bytes) -> None:
        if self._master >= 0:
            os.write(self._master, data)


class PtyLineServer(PtyServer):
    """A line protocol: ``handle(line) -> reply | None``."""

    recv_eol = b"\n"
    send_eol = b"\n"

    def __init__(self, faults: FaultBook | None = None) -> None:
        super().__init__(faults)
        self._buf = bytearray()

    def received(self, chunk: bytes) -> None:
        self._buf += chunk.replace(b"\r\n", b"\n") if self.recv_eol == b"\n" else chunk
        while True:
            idx = self._buf.find(self.recv_eol)
            if idx < 0:
                break
            line = bytes(self._buf[:idx]).decode("ascii", "replace").strip()
            del self._buf[: idx + len(self.recv_eol)]
            self.serve(line, lambda line=line: self._reply(line), self.send_eol)

    def _reply(self, line: str) -> bytes | None:
        reply = self.handle(line)
        return None if reply is None else reply.encode("ascii")

    def handle(self, line: str) -> str | None:
        raise NotImplementedError
