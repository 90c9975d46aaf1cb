from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tapescope.hardware.scope import Scope
from tapescope.mqtt.broker import MosquittoBroker, free_port
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.serve import READY
from tapescope.sim_hardware.world import WorldParams

from .support import ROOT, USERS, DaskProcesses, Watcher, client

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


@pytest.fixture
def collect_on_this_thread() -> Iterator[None]:
    """For Qt tests: the widgets a test leaves behind are collected here, on the GUI thread,
    not by whatever thread of a later test allocates first (tapescope/gui/collector.py)."""
    yield
    gc.collect()


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


class SimServer:
    """`tapescope sim serve ARGS` as its own process; ``tables``: the [scope] tables it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tapescope.cli", "sim", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        text = b""
        deadline = time.monotonic() + 60
        # Raw reads: a buffered readline could hold the READY line while select waits on the pipe.
        while time.monotonic() < deadline and READY.encode() not in text:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text += chunk
        if READY.encode() not in text:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"simulator did not start: {text.decode()}{err.decode()}")
        self.tables = text.decode()

    def stop(self) -> str:
        """SIGINT, as Ctrl-C; what it printed from then on (which faults fired)."""
        if self.proc.returncode is not None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err.decode()
        return out.decode()


@pytest.fixture
def sim_server() -> Iterator[Callable[..., SimServer]]:
    """Starts simulators as their own processes; each is stopped at the end of the test."""
    servers: list[SimServer] = []

    def start(*args: str) -> SimServer:
        servers.append(SimServer(*args))
        return servers[-1]

    yield start
    for s in servers:
        if s.proc.returncode is None:
            s.proc.kill()
            s.proc.communicate()


@pytest.fixture
async def scope(sim: SimulatedScope) -> AsyncIterator[Scope]:
    c = sim.scope_config()
    async with Scope.from_ports(stage_url=c.stage.url, tape_url=c.tape.url, camera_host="127.0.0.1",
                                camera_port=c.camera.port) as s:
        yield s


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker", USERS) as b:
        yield b


@pytest.fixture
async def watcher(broker: MosquittoBroker) -> AsyncIterator[Watcher]:
    async with client(broker, "operator") as c:
        await c.subscribe(f"{ROOT}/#", qos=1)
        w = Watcher(c)
        task = asyncio.create_task(w.run())
        yield w
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    """A real dask scheduler and two worker processes on 127.0.0.1, stopped after the test."""
    cluster = DaskProcesses(tmp_path, workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def dask_cluster(dask_processes: DaskProcesses) -> str:
    """The address of `dask_processes`' scheduler."""
    return dask_processes.address
