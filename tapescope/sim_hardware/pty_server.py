"""Serve a line protocol on a pseudo-terminal from the asyncio loop (no threads).

The driver opens ``self.port`` (e.g. /dev/pts/7) with pyserial exactly as it would a
real RS-232 device. Subclasses implement ``handle(line) -> reply | None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty

log = logging.getLogger(__name__)


class PtyLineServer:
    name = "device"
    recv_eol = b"\n"
    send_eol = b"\n"

    def __init__(self) -> None:
        self._master = -1
        self._slave = -1
        self._buf = bytearray()
        self.port = ""
        self.commands_seen = 0

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
        self._buf += chunk.replace(b"\r\n", b"\n") if self.recv_eol == b"\n" else chunk
        while True:
            idx = self._buf.find(self.recv_eol)
            if idx < 0:
                break
            line = bytes(self._buf[:idx]).decode("ascii", "replace").strip()
            del self._buf[: idx + len(self.recv_eol)]
            self.commands_seen += 1
            try:
                reply = self.handle(line)
            except Exception:  # a bug in the emulator must show, but not kill the loop
                log.exception("%s emulator failed on %r", self.name, line)
                reply = None
            if reply is not None:
                self.write_raw(reply.encode("ascii") + self.send_eol)

    def write_raw(self, data: bytes) -> None:
        if self._master >= 0:
            os.write(self._master, data)

    def handle(self, line: str) -> str | None:
        raise NotImplementedError
