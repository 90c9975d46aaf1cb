"""A headless run's telemetry and commands over MQTT, plain against TLS, on one Mosquitto
started with the shipped configuration (plain listener and TLS listener side by side).

Each repeat runs the same small acquisition (the simulator, 2 sections of 4 x 4 tiles,
processing off) with its bridge on one transport, while an operator client on the same
transport receives the telemetry and sends a `status` command every 0.1 s. Printed per
transport, medians of the repeats (interleaved): the run's tiles/s, telemetry messages/s
received by the operator, and the command round trip (publish to reply) median and p90.
The baseline is the plain listener in the same run.

Run: .venv/bin/python bench/bench_mqtt_tls.py [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt

from tapescope.acquisition.events import EventBus
from tapescope.config import parse_config
from tapescope.mqtt import certs
from tapescope.mqtt.broker import MosquittoBroker
from tapescope.mqtt.tls import TlsFiles
from tapescope.runner import run_acquisition

USERS = {"engine": "engine-pw", "operator": "op-pw", "viewer": "view-pw"}
ROOT = "tapescope/sim-scope"


async def one_run(broker: MosquittoBroker, pki: Path, tls: bool, out: Path) -> dict[str, float]:
    port = broker.tls_port if tls else broker.port
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": port, "username": "engine"}
    if tls:
        mqtt |= {"tls": True, "ca_file": str(pki / "ca.crt")}
    cfg = parse_config({"scope": {"camera": {"width": 128, "height": 128}},
                        "run": {"slots": [0, 1], "grid": [4, 4], "exposure_ms": 3.0, "seed": 5},
                        "processing": {"enabled": False}, "mqtt": mqtt})
    ctx = TlsFiles(pki / "ca.crt").context() if tls else None
    received, sent, rtts = 0, {}, []
    async with aiomqtt.Client("127.0.0.1", port, username="operator", password=USERS["operator"], timeout=5,
                              protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx) as op:
        await op.subscribe(f"{ROOT}/#", qos=1)

        async def listen() -> None:
            nonlocal received
            async for m in op.messages:
                received += 1
                if str(m.topic) == f"{ROOT}/reply":
                    cid = json.loads(m.payload).get("id")
                    if cid in sent:
                        rtts.append(time.perf_counter() - sent.pop(cid))

        async def command() -> None:
            for k in range(100_000):
                cid = f"b{k}"
                sent[cid] = time.perf_counter()
                await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "status", "id": cid}), qos=1)
                await asyncio.sleep(0.1)

        listener = asyncio.create_task(listen())
        commander = asyncio.create_task(command())
        t0 = time.perf_counter()
        result = await run_acquisition(cfg, out, EventBus(), password=USERS["engine"])
        seconds = time.perf_counter() - t0
        commander.cancel()
        await asyncio.sleep(0.3)           # the last replies
        listener.cancel()
    assert result.summary.state.value == "done", result.summary.reason
    rtts.sort()
    return {"tiles_s": result.summary.tiles / seconds, "msgs_s": received / seconds,
            "rtt_ms": 1e3 * statistics.median(rtts), "rtt_p90_ms": 1e3 * rtts[int(0.9 * (len(rtts) - 1))]}


async def main(repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tapescope-mqtt-tls-") as tmp:
        root = Path(tmp)
        certs.make_all(root / "pki", [], [])
        with MosquittoBroker(root / "broker", USERS, tls=root / "pki") as broker:
            rows: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
            for r in range(repeats):
                for name in ("plain", "tls"):
                    rows[name].append(await one_run(broker, root / "pki", name == "tls", root / f"{name}-{r}"))
    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in rows.items()}
    print(f"MQTT plain vs TLS, one Mosquitto, medians of {repeats} interleaved runs")
    print(f"{'':8} {'tiles/s':>8} {'telemetry msg/s':>16} {'command RTT ms':>15} {'p90 ms':>8}")
    for n, m in med.items():
        print(f"{n:8} {m['tiles_s']:8.2f} {m['msgs_s']:16.1f} {m['rtt_ms']:15.2f} {m['rtt_p90_ms']:8.2f}")
    p, t = med["plain"], med["tls"]
    print(f"TLS / plain: tiles/s {t['tiles_s'] / p['tiles_s']:.3f}, telemetry {t['msgs_s'] / p['msgs_s']:.3f}, "
          f"command RTT {t['rtt_ms'] / p['rtt_ms']:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(ap.parse_args().repeats))
