"""The comando message format (Brett Graham's Arduino serial library), sans I/O.

GridTape's reel controller speaks it (hardware/gridtape.py); its emulator too
(sim_hardware/gridtape.py). Three layers, each a byte prefix on the next:

    message   [n: 1 byte][payload: n bytes][sum(payload) % 256: 1 byte]
    protocol  payload = [protocol id: 1 byte][rest]       (GridTape: 1 = commands)
    command   rest    = [command id: 1 byte][arguments]   (little-endian C types)

There is no request id: a reply is the message whose command id is the one asked, and an
asynchronous ``error`` command (id 0) may come instead. A message whose checksum fails is
skipped one byte at a time until a frame checks out (how comando resyncs a stream).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

COMMAND_PROTOCOL = 1
MAX_PAYLOAD = 255

# C type names of the firmware's arguments -> struct codes (Arduino AVR: int is 16 bits,
# long 32 bits, float 32 bits).
TYPES = {"byte": "B", "bool": "?", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
         "float": "f"}


class ComandoError(ValueError):
    """Bytes that are not a well-formed comando command."""


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ComandoError(f"payload of {len(payload)} bytes; comando carries at most {MAX_PAYLOAD}")
    return bytes([len(payload)]) + payload + bytes([sum(payload) % 256])


def pack_args(types: str, *values: float | int | bool) -> bytes:
    """``pack_args("byte uint32 float", 1, 2000, 0.5)`` -> little-endian bytes."""
    codes = [TYPES[t] for t in types.split()]
    if len(codes) != len(values):
        raise ComandoError(f"{len(values)} values for {len(codes)} types ({types})")
    return struct.pack("<" + "".join(codes), *values)


def command(cid: int, types: str = "", *values: float | int | bool,
            protocol: int = COMMAND_PROTOCOL) -> bytes:
    """One framed command message, ready for the wire."""
    return frame(bytes([protocol, cid]) + (pack_args(types, *values) if types else b""))


@dataclass
class Command:
    """A received command: its id and argument bytes, read in order with ``take``."""

    cid: int
    args: bytes
    protocol: int = COMMAND_PROTOCOL
    _at: int = 0

    def has_arg(self) -> bool:
        return self._at < len(self.args)

    def take(self, type_name: str) -> float | int | bool:
        code = "<" + TYPES[type_name]
        n = struct.calcsize(code)
        if self._at + n > len(self.args):
            raise ComandoError(f"command {self.cid}: missing {type_name} argument at byte {self._at}")
        (value,) = struct.unpack_from(code, self.args, self._at)
        self._at += n
        return value

    def values(self, types: str) -> tuple:
        return tuple(self.take(t) for t in types.split())


def parse_payload(payload: bytes) -> Command:
    if len(payload) < 2:
        raise ComandoError(f"payload {payload!r} has no protocol and command id")
    return Command(payload[1], payload[2:], payload[0])


class Deframer:
    """Feed bytes as they arrive; take whole, checked payloads out.

    Resync: a frame is taken where a length byte, a known protocol id and the checksum
    agree; bytes before it are noise (counted in ``skipped``). A noise byte that claims a
    frame longer than what has arrived does not stall the stream: a complete frame found
    after it wins."""

    def __init__(self, max_payload: int = 64, protocols: tuple[int, ...] = (0, COMMAND_PROTOCOL)) -> None:
        # A length beyond any message the peer sends is noise, not a frame to wait for
        # (comando's Arduino side caps messages the same way, MAX_MSG_LENGTH).
        self.max_payload = max_payload
        self.protocols = protocols
        self._buf = bytearray()
        self.skipped = 0          # bytes dropped to resync: line noise, seen by tests and logs

    def _frame_at(self, i: int) -> int | None:
        """Payload length of a complete, checked frame starting at i, else None."""
        buf = self._buf
        n = buf[i]
        if not 2 <= n <= self.max_payload or i + n + 2 > len(buf) or buf[i + 1] not in self.protocols:
            return None
        return n if sum(buf[i + 1:i + 1 + n]) % 256 == buf[i + 1 + n] else None

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            found = next(((i, n) for i in range(len(self._buf)) if (n := self._frame_at(i)) is not None), None)
            if found is None:
                break
            i, n = found
            self.skipped += i
            out.append(bytes(self._buf[i + 1:i + 1 + n]))
            del self._buf[:i + n + 2]
        return out

    def pending(self) -> int:
        return len(self._buf)
