"""The MQTT bridge against a real Mosquitto on 127.0.0.1, started with the shipped config and ACL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import aiomqtt
import pytest

from tapescope.acquisition.engine import RunState
from tapescope.acquisition.events import StateChanged, TileAcquired
from tapescope.hardware.scope import Scope
from tapescope.mqtt import commands
from tapescope.mqtt.bridge import MqttBridge
from tapescope.mqtt.broker import MosquittoBroker

from .support import ROOT, USERS, Watcher, bridge_for, client, headless_config, make_engine, needs_mosquitto


def test_parse_rejects_bad_commands_with_a_reason() -> None:
    assert commands.parse(b'{"cmd": "pause", "id": 7}') == commands.Command("pause", "7", "")
    for payload, words in [(b"not json", "not JSON"), (b"[1]", "JSON object"), (b'{"id": "1"}', "'cmd'"),
                           (b'{"cmd": "explode", "id": "2"}', "unknown command 'explode'"),
                           (b'{"cmd": "pause", "speed": 3}', "unknown field"), (b"\xff", "UTF-8")]:
        with pytest.raises(commands.CommandError, match=words):
            commands.parse(payload)


@needs_mosquitto
async def test_telemetry_and_commands_during_a_run(broker, watcher, scope: Scope, tmp_path: Path) -> None:
    eng, _ = make_engine(scope, tmp_path, [0, 1, 2])
    async with bridge_for(broker, eng):
        await _telemetry_and_commands(broker, watcher, eng)
    off = await watcher.wait_for(f"{ROOT}/online", lambda p: p["online"] is False)
    assert off["reason"] == "exit"


async def _telemetry_and_commands(broker: MosquittoBroker, watcher: Watcher, eng) -> None:
    assert (await watcher.wait_for(f"{ROOT}/online"))["online"] is True
    # Pause the run from MQTT as soon as its first tile is reported there.
    first_tile = asyncio.Event()
    eng.bus.subscribe(lambda ev: isinstance(ev, TileAcquired) and first_tile.set())
    run = asyncio.create_task(eng.run())
    await watcher.wait_for(f"{ROOT}/tile")
    async with client(broker, "operator") as op:
        await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "pause", "id": "p1", "reason": "look"}), qos=1)
        reply = await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("id") == "p1")
        assert reply["ok"] is True and reply["cmd"] == "pause"
        await watcher.wait_for(f"{ROOT}/state", lambda p: p["state"] == "paused")
        assert eng.state is RunState.PAUSED
        # Malformed and unknown commands: an error reply, and nothing changes.
        await op.publish(f"{ROOT}/cmd", b"{nope", qos=1)
        bad = await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("ok") is False and "JSON" in p["error"])
        assert bad["id"] is None
        await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "explode", "id": "x"}), qos=1)
        bad = await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("id") == "x")
        assert bad["ok"] is False and "unknown command" in bad["error"]
        await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "status", "id": "s"}), qos=1)
        status = await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("id") == "s")
        assert status["ok"] and status["state"] == "paused" and status["progress"]["tiles_done"] >= 1
        await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "resume", "id": "r"}), qos=1)
        assert (await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("id") == "r"))["ok"]
    summary = await asyncio.wait_for(run, 30)
    assert summary.state is RunState.DONE
    await watcher.wait_for(f"{ROOT}/run", lambda p: p["state"] == "done")
    tiles = [p for t, p in watcher.seen if t == f"{ROOT}/tile"]
    assert len(tiles) == 12 and {(p["slot"], p["row"], p["col"]) for p in tiles} == {
        (s, r, c) for s in (0, 1, 2) for r in (0, 1) for c in (0, 1)}
    assert all(p["focus"] > 0 and p["faults"] == [] and "x_nm" in p for p in tiles)
    assert any(t == f"{ROOT}/device/stage" for t, _ in watcher.seen)
    # Progress is rate-limited, but the last value always arrives.
    await watcher.wait_for(f"{ROOT}/progress", lambda p: p["tiles_done"] == 12 and p["sections_done"] == 3)


@needs_mosquitto
async def test_anonymous_cannot_connect_and_viewer_cannot_command(broker, watcher, scope: Scope,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, None):
            pass
    eng, events = make_engine(scope, tmp_path, [0])
    async with bridge_for(broker, eng):
        await _viewer_cannot_command(broker, watcher, eng, events)


async def _viewer_cannot_command(broker: MosquittoBroker, watcher: Watcher, eng, events: list) -> None:
    async with client(broker, "viewer") as viewer:
        await viewer.subscribe(f"{ROOT}/#")
        # The broker has handled the viewer's publish (denied) once the QoS 1 handshake ends ...
        await viewer.publish(f"{ROOT}/cmd", json.dumps({"cmd": "abort", "id": "v1"}), qos=1)
    async with client(broker, "operator") as op:
        # ... so the operator's later command reaches the engine after it, if it got through at all.
        await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "status", "id": "after"}), qos=1)
        await watcher.wait_for(f"{ROOT}/reply", lambda p: p.get("id") == "after")
    assert not any(t == f"{ROOT}/reply" and p.get("id") == "v1" for t, p in watcher.seen)
    assert eng.state is RunState.IDLE and not eng._abort_requested
    assert not [e for e in events if isinstance(e, StateChanged)]


@needs_mosquitto
async def test_broker_restart_neither_stops_the_run_nor_loses_retained_state(
        broker, scope: Scope, tmp_path: Path) -> None:
    eng, _ = make_engine(scope, tmp_path, [0, 1])
    async with bridge_for(broker, eng, buffer=5) as bridge:
        await _restart(broker, eng, bridge)


async def _restart(broker: MosquittoBroker, eng, bridge: MqttBridge) -> None:
    broker.stop()
    summary = await asyncio.wait_for(eng.run(), 30)        # the run does not notice the broker is gone
    assert summary.state is RunState.DONE and summary.tiles == 8
    assert bridge.dropped > 0                              # bounded: old telemetry went, counted
    broker.start()
    async with client(broker, "viewer") as v:
        await v.subscribe(f"{ROOT}/#", qos=1)
        w = Watcher(v)
        task = asyncio.create_task(w.run())
        state = await w.wait_for(f"{ROOT}/state", lambda p: p["state"] == "done", within_s=20)
        assert state["old"] == "finishing"
        assert (await w.wait_for(f"{ROOT}/online"))["online"] is True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@needs_mosquitto
async def test_killed_engine_is_marked_dead_by_its_last_will(broker, watcher, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(headless_config(broker.port, last_slot=2, exposure_ms=3.0))
    env = {**os.environ, "TAPESCOPE_MQTT_PASSWORD": USERS["engine"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tapescope.cli", "acquire", str(cfg), "--run-dir", str(tmp_path / "run"),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await watcher.wait_for(f"{ROOT}/tile", within_s=60)          # the headless run reports over MQTT
        assert (await watcher.wait_for(f"{ROOT}/online", lambda p: p["online"]))["run_dir"].endswith("run")
        proc.kill()                                                  # SIGKILL: no goodbye from the engine
        await proc.wait()
        dead = await watcher.wait_for(f"{ROOT}/online", lambda p: p["online"] is False, within_s=20)
        assert dead["reason"] == "connection lost"                   # the broker sent the will
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_mosquitto
async def test_the_engine_publishes_its_own_health(broker, watcher, scope: Scope, tmp_path: Path) -> None:
    """Memory, open files, threads and asyncio tasks of the engine's process, retained: what a
    watcher of a days-long run needs to see a leak grow."""
    eng, _ = make_engine(scope, tmp_path, [0])
    async with bridge_for(broker, eng):
        health = await watcher.wait_for(f"{ROOT}/health")
        tasks_now = len(asyncio.all_tasks())
    # This process's: the bridge's own tasks at least, the broker's socket and the drivers' lines.
    assert 3 <= health["tasks"] <= tasks_now + 2
    assert health["fds"] > 3 and health["threads"] >= 1 and health["rss_mb"] > 10
