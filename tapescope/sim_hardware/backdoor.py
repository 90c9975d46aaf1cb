"""The simulator's control backdoor, as lewis has one: a line protocol on 127.0.0.1 that arms
faults and tells what fired while `tapescope sim serve` runs, for soak tests and for a
person at a terminal (`nc 127.0.0.1 PORT`). Every request is one line, every reply one line:

    fault SPEC   ->  ok: armed NAME xCOUNT          (SPEC as for --fault)
    fired        ->  [[unix time, name], ...]       (JSON)
    armed        ->  {"name": count, ...}           (JSON)
    anything else, or a bad SPEC  ->  error: WHAT IS WRONG
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from .faults import FaultBook, FaultError, parse_fault_spec

log = logging.getLogger(__name__)
MAX_LINE = 4096


def answer(faults: FaultBook, line: str) -> str:
    verb, _, rest = line.strip().partition(" ")
    match verb:
        case "fault":
            try:
                name, count, after, options = parse_fault_spec(rest.strip())
                faults.inject(name, count, after=after, **options)
            except FaultError as exc:
                return f"error: {exc}"
            log.warning("backdoor: armed %s x%d (after %d)", name, count, after)
            return f"ok: armed {name} x{count}"
        case "fired":
            return json.dumps([[round(t, 3), n] for t, n in faults.fired])
        case "armed":
            return json.dumps(faults.armed())
    return f"error: unknown request {verb!r}; known: fault SPEC, fired, armed"


async def start_backdoor(faults: FaultBook, port: int = 0) -> asyncio.Server:
    """Listen on 127.0.0.1:port (0: any free); the caller closes the server."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if len(line) > MAX_LINE:
                    reply = f"error: a request is one line of at most {MAX_LINE} bytes"
                else:
                    reply = answer(faults, line.decode("utf-8", "replace"))
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(client, "127.0.0.1", port, limit=MAX_LINE * 2)
