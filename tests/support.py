"""Helpers shared by several test modules (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
import zarr
from referencing import Registry, Resource

from tapescope.acquisition.engine import Engine, EngineSettings
from tapescope.acquisition.events import Event, EventBus
from tapescope.acquisition.plan import tile_grid
from tapescope.acquisition.store import RunStore
from tapescope.hardware.scope import Scope
from tapescope.mqtt.bridge import BrokerSettings, MqttBridge
from tapescope.mqtt.broker import MosquittoBroker, mosquitto_binary

# -- engine ------------------------------------------------------------------------------------


def make_engine(scope: Scope, tmp_path: Path, slots: list[int], **kw) -> tuple[Engine, list[Event]]:
    store = RunStore.create(tmp_path / "run", "{}")
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    grid = tile_grid(2, 2, (128, 128), 4.0, 0.1)
    eng = Engine(scope, store, bus, slots=slots, grid=grid, exposure_ms=2.0, tile_shape=(128, 128),
                 pixel_nm=4.0, settings=EngineSettings(**kw))
    return eng, events


# -- volumes -----------------------------------------------------------------------------------

SCHEMAS = Path(__file__).parent / "data" / "ngff-0.5"


def validate_ome(attrs: dict) -> None:
    resources = []
    for name in ("image.schema", "_version.schema"):
        schema = json.loads((SCHEMAS / name).read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    image = json.loads((SCHEMAS / "image.schema").read_text())
    validator = jsonschema.Draft202012Validator(image, registry=Registry().with_resources(resources))
    validator.validate(attrs)


def check_volume(path: Path) -> zarr.Group:
    """Assertions every tapescope volume must pass (used by the demo test too)."""
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    validate_ome(attrs)
    ms = attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "nanometer" for a in ms["axes"])
    assert len(ms["datasets"]) >= 2
    prev = None
    for ds in ms["datasets"]:
        arr = group[ds["path"]]
        assert arr.metadata.zarr_format == 3
        assert list(arr.metadata.dimension_names) == ["z", "y", "x"]
        if prev is not None:
            assert arr.shape[0] == prev.shape[0]
            assert arr.shape[1] == -(-prev.shape[1] // 2)
        prev = arr
    # The community's own model of OME-Zarr 0.5 accepts it too.
    from ome_zarr_models.v05.image import Image
    Image.from_zarr(group)
    return group


# -- GUI ---------------------------------------------------------------------------------------

def click(win: Any, verb: str) -> None:
    """Press a run-control button of a MainWindow, as the operator would (it must be enabled)."""
    button = win.control.buttons[verb]
    assert button.isEnabled(), f"{verb} is disabled in state {win.model.run_state}"
    button.click()


# -- MQTT --------------------------------------------------------------------------------------

USERS = {"engine": "engine-pw", "operator": "op-pw", "viewer": "view-pw"}


def headless_config(port: int, *, last_slot: int, exposure_ms: float) -> str:
    """A `tapescope acquire` config on the simulator, bridged to the broker as the engine
    user (password from $TAPESCOPE_MQTT_PASSWORD); small tiles, processing off."""
    return f"""
[scope.camera]
width = 128
height = 128
[run]
slot_range = [0, {last_slot}]
grid = [4, 4]
exposure_ms = {exposure_ms}
[processing]
enabled = false
[mqtt]
enabled = true
port = {port}
username = "engine"
"""
ROOT = "tapescope/sim-scope"

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None, reason="no mosquitto binary here (Debian: apt-get install mosquitto)")


def client(b: MosquittoBroker, user: str | None, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", b.port, username=user, password=USERS.get(user or ""), timeout=5,
                          protocol=aiomqtt.ProtocolVersion.V5, **kw)


class Watcher:
    """Collects every message under ROOT; wait_for() returns the first that matches."""

    def __init__(self, c: aiomqtt.Client) -> None:
        self.c = c
        self.seen: list[tuple[str, dict]] = []
        self._new = asyncio.Event()

    async def run(self) -> None:
        async for m in self.c.messages:
            try:
                payload = json.loads(m.payload)
            except ValueError:          # the malformed commands the tests send themselves
                payload = {"raw": repr(m.payload)}
            self.seen.append((str(m.topic), payload))
            self._new.set()

    async def wait_for(self, topic: str, pred=lambda p: True, within_s: float = 10) -> dict:
        async def find() -> dict:
            i = 0
            while True:
                while i < len(self.seen):
                    t, p = self.seen[i]
                    i += 1
                    if t == topic and pred(p):
                        return p
                self._new.clear()
                await self._new.wait()
        return await asyncio.wait_for(find(), within_s)


@contextlib.asynccontextmanager
async def bridge_for(broker: MosquittoBroker, eng, **kw: Any) -> AsyncIterator[MqttBridge]:
    bridge = MqttBridge(BrokerSettings("127.0.0.1", broker.port, "engine", USERS["engine"], **kw), eng.bus,
                        "sim-scope", engine=eng, run_dir="run")
    bridge.start()
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        yield bridge
    finally:
        await bridge.stop()


class DaskProcesses:
    """A real `dask scheduler` and `workers` `dask worker` processes on 127.0.0.1, as on a
    cluster. Workers run without a nanny: each is one process, and a killed one stays dead."""

    def __init__(self, tmp_path: Path, workers: int = 2) -> None:
        self.sched_file = tmp_path / "scheduler.json"
        self.env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(self.sched_file)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 60
            while not self.sched_file.exists():
                if self.scheduler.poll() is not None:
                    raise RuntimeError(f"dask scheduler exited with {self.scheduler.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("dask scheduler did not start in 60 s")
                time.sleep(0.1)
            for i in range(workers):
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.sched_file),
                     "--nthreads", "1", "--no-dashboard", "--no-nanny", "--name", f"w{i}", "--host", "127.0.0.1"],
                    env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.address: str = json.loads(self.sched_file.read_text())["address"]
        except BaseException:
            self.stop()
            raise

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(n, timeout=60)

    def stop(self) -> None:
        # The workers are killed (nothing is left behind), the scheduler terminated cleanly.
        for p in self.workers:
            p.kill()
        self.scheduler.terminate()
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
