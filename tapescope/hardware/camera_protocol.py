"""The tapescope TCP frame protocol, shared by the camera driver and its emulator.

Requests are ASCII lines ending with LF. Every reply is one message:

    header  (20 bytes, little-endian): magic b"TSCF", version u16, kind u16,
            meta_len u32, payload_len u64
    meta    meta_len bytes of UTF-8 JSON
    payload payload_len bytes

kind 0 = OK (meta only), 1 = FRAME (meta has frame_id, timestamp, shape, dtype,
exposure_ms; payload is the C-order pixel array), 2 = ERROR (meta has code, text).

Requests:
    PING                 -> OK {"model", "width", "height"}
    SET EXPOSURE <ms>    -> OK {"exposure_ms"}
    ARM                  -> OK {}           (the next TRIGGER may start at once)
    TRIGGER              -> FRAME           (exposes for exposure_ms, then sends)
    EXPOSE               -> OK {"timestamp", "exposure_ms"} as soon as the exposure ends;
                            the sensor then reads out in the background
    READ                 -> FRAME           (the last EXPOSE's pixels, once read out;
                            ERROR 4 when no exposure waits to be read)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"TSCF"
VERSION = 1
HEADER = struct.Struct("<4sHHIQ")
KIND_OK, KIND_FRAME, KIND_ERROR = 0, 1, 2
ERR_NOTHING_TO_READ = 4
MAX_META = 1 << 20
MAX_PAYLOAD = 1 << 31


@dataclass(frozen=True)
class Header:
    kind: int
    meta_len: int
    payload_len: int


def pack(kind: int, meta: dict[str, Any], payload: bytes = b"") -> bytes:
    return pack_head(kind, meta, len(payload)) + payload


def pack_head(kind: int, meta: dict[str, Any], payload_len: int) -> bytes:
    """Header and meta of a message whose payload is sent separately (no copy of a frame)."""
    m = json.dumps(meta, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, kind, len(m), payload_len) + m


def unpack_header(raw: bytes) -> Header:
    """Parse a header; raise ValueError naming what is wrong."""
    magic, version, kind, meta_len, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ValueError(f"unsupported protocol version {version}")
    if kind not in (KIND_OK, KIND_FRAME, KIND_ERROR):
        raise ValueError(f"unknown message kind {kind}")
    if meta_len > MAX_META or payload_len > MAX_PAYLOAD:
        raise ValueError(f"implausible lengths meta={meta_len} payload={payload_len}")
    return Header(kind, meta_len, payload_len)
