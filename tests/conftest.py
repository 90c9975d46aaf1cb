from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tapescope.mqtt.broker import free_port
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

SMALL_WORLD = WorldParams(seed=3, n_slots=4, tile_px=(128, 128), section_px=(512, 512))


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """As in ophyd-async: a test that leaves a task running fails."""
    yield
    current = asyncio.current_task()
    # Let tasks that are finishing their cancellation run to completion first.
    for _ in range(3):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked tasks: {leaked}"


@pytest.fixture(scope="module")
def temscript_url() -> Iterator[str]:
    """temscript's own server with its NullMicroscope (`temscript-server --null`) on 127.0.0.1."""
    pytest.importorskip("temscript")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from temscript.server import run_server; run_server()",
                             "--null", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                break
        except OSError:
            assert proc.poll() is None, "temscript-server exited"
            time.sleep(0.05)      # polling a subprocess's port until it listens
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedScope]:
    async with SimulatedScope(SMALL_WORLD) as s:
        yield s
