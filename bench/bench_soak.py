"""Days, not minutes: a long headless run under random faults, watched the whole time, with
nothing growing but the volume.

What runs, each its own process as at a facility, all on 127.0.0.1:
- Mosquitto (started here), restarted once in the middle of the run;
- the simulator (`tapescope sim serve --control-port 0`): faults are armed at random through
  its control backdoor while the run goes (serial timeouts and garbled replies, stage
  stalls, tape jams and slips, dropped frames, camera disconnects of a few seconds, a beam
  trip; see FAULTS);
- the engine (`tapescope acquire`, processing on: flat-field, stitch, align, volume), killed
  with SIGKILL halfway and continued with `--resume`;
- the operator GUI attached over MQTT (`tapescope gui --mqtt`, offscreen Qt);
- a second MQTT viewer: this script, which records every alarm, section and health message.

Sampled at every section: the engine's and the GUI's resident memory, open file descriptors
and threads (from /proc), the engine's asyncio tasks (its `health` message), the processing
backlog (sections finished but not yet processed) and the time per section. Printed as
medians of sections 50-100 against the last 50, and drawn (OUT/soak.png, one panel per
quantity against the section number). At the end it checks that every planned tile is
stored once, that every fault that fired has an alarm from its device, and that the volume
has every section.

Run: .venv/bin/python bench/bench_soak.py [--sections 300] [--seed 1] [--out soak-out]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import cv2
import numpy as np

from tapescope.acquisition.store import RunStore
from tapescope.health import process_stats
from tapescope.mqtt.broker import MosquittoBroker

CLI = [sys.executable, "-m", "tapescope.cli"]
USERS = {"engine": "soak-engine", "operator": "soak-operator", "viewer": "soak-viewer"}
SCOPE = "soak"
ROOT = f"tapescope/{SCOPE}"
# (backdoor spec, devices whose alarm answers it)
FAULTS: list[tuple[str, tuple[str, ...]]] = [
    ("stage_timeout,on=M", ("stage",)),
    ("stage_timeout,on=M,executed=false", ("stage",)),
    ("stage_garbled,on=M", ("stage",)),
    ("stage_stall", ("stage",)),
    ("tape_timeout", ("tape",)),
    ("tape_garbled", ("tape",)),
    ("tape_jam,clears_after=3", ("tape",)),
    ("tape_jam", ("tape",)),
    ("tape_slip", ("tape",)),
    ("column_timeout", ("column",)),
    ("column_garbled", ("column",)),
    ("frame_drop", ("camera",)),
    ("camera_disconnect,down_s=3", ("camera",)),
    ("beam_trip", ("column", "qc")),
]
ANSWER_WITHIN_S = 150.0          # a cure said once, then summarised after SUMMARY_WINDOW_S (60 s)


@dataclass
class Sample:
    section: int
    t: float
    engine: dict[str, float]
    gui: dict[str, float]
    tasks: float
    backlog: int


@dataclass
class Watch:
    """What the second viewer saw."""

    alarms: list[tuple[float, str, str, str]] = field(default_factory=list)   # (t, source, severity, msg)
    finished: list[tuple[float, int]] = field(default_factory=list)
    processed: set[int] = field(default_factory=set)
    health: dict[str, Any] = field(default_factory=dict)
    run_state: str = ""
    new_section: asyncio.Event = field(default_factory=asyncio.Event)


def proc_stats(pid: int | None) -> dict[str, float]:
    """Resident memory (MB), open fds and threads of a live process; NaN when there is none."""
    if pid is None:
        return dict.fromkeys(("rss_mb", "fds", "threads"), float("nan"))
    return process_stats(pid)


def start_simulator(cfg: Path, slots: int, log: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    proc = subprocess.Popen([*CLI, "sim", "serve", "--config", str(cfg), "--slots", str(slots),
                             "--control-port", "0"], stdout=subprocess.PIPE, stderr=log.open("wb"))
    assert proc.stdout is not None
    text, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline and b"# simulator ready" not in text:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text += chunk
    tables = text.decode()
    m = re.search(r"# control backdoor: [\d.]+:(\d+)", tables)
    if m is None:
        proc.kill()
        raise SystemExit(f"the simulator did not start:\n{tables}\n{log.read_text()}")
    return proc, tables, int(m.group(1))


async def backdoor(port: int, line: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def viewer(port: int, watch: Watch) -> None:
    """The second MQTT viewer; reconnects through the broker's restart."""
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, username="viewer", password=USERS["viewer"],
                                      protocol=aiomqtt.ProtocolVersion.V5) as c:
                await c.subscribe(f"{ROOT}/#", qos=1)
                async for m in c.messages:
                    topic = str(m.topic)[len(ROOT) + 1:]
                    try:
                        p = json.loads(m.payload)
                    except ValueError:
                        continue
                    if topic == "alarm":
                        watch.alarms.append((p["time"], p["source"], p["severity"], p["message"]))
                    elif topic == "section/finished" and not m.retain:
                        watch.finished.append((time.time(), int(p["slot"])))
                        watch.new_section.set()
                    elif topic == "section/processed":
                        watch.processed.add(int(p["slot"]))
                    elif topic == "health":
                        watch.health = p
                    elif topic == "run":
                        watch.run_state = p["state"]
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


def plot(samples: list[Sample], path: Path) -> None:
    """One panel per quantity against the section number (OpenCV: no plotting library needed)."""
    panels = [("engine RSS (MB)", [s.engine["rss_mb"] for s in samples]),
              ("GUI RSS (MB)", [s.gui["rss_mb"] for s in samples]),
              ("engine open fds", [s.engine["fds"] for s in samples]),
              ("GUI open fds", [s.gui["fds"] for s in samples]),
              ("engine threads", [s.engine["threads"] for s in samples]),
              ("GUI threads", [s.gui["threads"] for s in samples]),
              ("engine asyncio tasks", [s.tasks for s in samples]),
              ("processing backlog (sections)", [float(s.backlog) for s in samples]),
              ("time per section (s)", [b.t - a.t for a, b in itertools.pairwise(samples)])]
    w, h, pad = 560, 220, 46
    canvas = np.full((h * 5, w * 2, 3), 255, np.uint8)
    n = max(s.section for s in samples) + 1
    for i, (title, ys) in enumerate(panels):
        x0, y0 = (i % 2) * w, (i // 2) * h
        vals = np.array(ys, float)
        ok = np.isfinite(vals)
        lo, hi = (float(vals[ok].min()), float(vals[ok].max())) if ok.any() else (0.0, 1.0)
        lo, hi = (0.0, hi * 1.1 + 1e-9) if lo >= 0 else (lo, hi)
        cv2.rectangle(canvas, (x0 + pad, y0 + 24), (x0 + w - 12, y0 + h - 28), (0, 0, 0), 1)
        cv2.putText(canvas, title, (x0 + pad, y0 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for frac, label in ((0.0, lo), (1.0, hi)):
            yy = int(y0 + h - 28 - frac * (h - 52))
            cv2.putText(canvas, f"{label:.4g}", (x0 + 2, yy + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        cv2.putText(canvas, f"section 0 .. {n - 1}", (x0 + pad, y0 + h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 0, 0), 1)
        xs = [s.section for s in samples][-len(ys):]
        pts = [(int(x0 + pad + (x / max(n - 1, 1)) * (w - pad - 12)),
                int(y0 + h - 28 - (v - lo) / (hi - lo) * (h - 52)))
               for x, v in zip(xs, vals, strict=False) if np.isfinite(v)]
        for a, b in itertools.pairwise(pts):
            cv2.line(canvas, a, b, (180, 60, 20), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)


def med(xs: list[float]) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


async def spawn(args: list[str], env: dict[str, str], log: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)


async def soak(args: argparse.Namespace, out: Path) -> int:
    rng = random.Random(args.seed)
    n = args.sections
    run_dir = out / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: give another --out")
    base = (f'[scope]\nname = "{SCOPE}"\n[scope.camera]\nwidth = 256\nheight = 256\n'
            f"[run]\nslot_range = [0, {n - 1}]\ngrid = [2, 2]\nexposure_ms = 2.0\nseed = {args.seed}\n")
    (out / "sim.toml").write_text(base)
    broker = MosquittoBroker(out / "broker", USERS)
    broker.start()
    sim, tables, control = start_simulator(out / "sim.toml", n, out / "sim.log")
    scope_tables = "\n".join(line for line in tables.splitlines() if not line.startswith("#"))
    cfg = (f'[scope]\nname = "{SCOPE}"\n' + scope_tables +
           f"\n[run]\nslot_range = [0, {n - 1}]\ngrid = [2, 2]\nexposure_ms = 2.0\nseed = {args.seed}\n"
           "retry_window_s = 10.0\ndevice_probe_s = 5.0\n"
           f"[processing]\nenabled = true\n[mqtt]\nenabled = true\nport = {broker.port}\nusername = \"engine\"\n")
    (out / "soak.toml").write_text(cfg)
    env = {**os.environ, "TAPESCOPE_MQTT_PASSWORD": USERS["engine"]}
    gui_env = {**os.environ, "TAPESCOPE_MQTT_PASSWORD": USERS["viewer"], "QT_QPA_PLATFORM": "offscreen"}
    watch = Watch()
    viewer_task = asyncio.create_task(viewer(broker.port, watch))
    gui = await spawn([*CLI, "gui", "--mqtt", f"mqtt://viewer@127.0.0.1:{broker.port}/{SCOPE}"], gui_env,
                      args.gui_log)
    engine = await spawn([*CLI, "acquire", str(out / "soak.toml"), "--run-dir", str(run_dir)], env, args.engine_log)
    samples: list[Sample] = []
    armed: list[tuple[float, str]] = []
    events: list[str] = []
    killed = restarted = False
    t0 = time.time()
    try:
        while True:
            try:
                await asyncio.wait_for(watch.new_section.wait(), 5.0)
            except TimeoutError:
                if engine.returncode is not None:
                    break
                continue
            watch.new_section.clear()
            k = len(watch.finished)
            backlog = len({s for _, s in watch.finished} - watch.processed)
            samples.append(Sample(k - 1, time.time(), proc_stats(engine.pid if engine.returncode is None else None),
                                  proc_stats(gui.pid if gui.returncode is None else None),
                                  float(watch.health.get("tasks", float("nan"))), backlog))
            if k % 25 == 0:
                s = samples[-1]
                print(f"  section {k:4d}  {time.time() - t0:6.0f} s  engine {s.engine['rss_mb']:.0f} MB "
                      f"GUI {s.gui['rss_mb']:.0f} MB  tasks {s.tasks:.0f}  backlog {backlog}", flush=True)
            if rng.random() < args.fault_rate:
                spec, _ = rng.choice(FAULTS)
                spec = f"{spec.split(',')[0]}:1,after={rng.randint(0, 3)}" + (
                    "," + spec.split(",", 1)[1] if "," in spec else "")
                reply = await backdoor(control, f"fault {spec}")
                armed.append((time.time(), spec))
                if not reply.startswith("ok"):
                    events.append(f"backdoor refused {spec}: {reply}")
            if not restarted and k >= n // 3:
                restarted = True
                broker.stop()
                await asyncio.sleep(3.0)
                broker.start()
                events.append(f"broker restarted after section {k}")
            if not killed and k >= n // 2:
                killed = True
                engine.kill()
                await engine.wait()
                events.append(f"engine killed (SIGKILL) after section {k}")
                engine = await spawn([*CLI, "acquire", str(out / "soak.toml"), "--resume", str(run_dir)], env,
                                     args.engine_log)
        code = engine.returncode
        await asyncio.sleep(2.0)                 # the last alarms and summaries over MQTT
        fired = json.loads(await backdoor(control, "fired"))
    finally:
        for p in (gui, engine):
            if p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except TimeoutError:
                    p.kill()
                    await p.wait()
        sim.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(30)
        viewer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await viewer_task
        broker.stop()
    return report(args, out, run_dir, samples, watch, fired, armed, events, code, time.time() - t0)


def report(args: argparse.Namespace, out: Path, run_dir: Path, samples: list[Sample], watch: Watch,
           fired: list[list[Any]], armed: list[tuple[float, str]], events: list[str], code: int | None,
           seconds: float) -> int:
    n = args.sections
    plot(samples, out / "soak.png")
    (out / "samples.json").write_text(json.dumps([s.__dict__ for s in samples]))
    print(f"\n{len(samples)} sections in {seconds:.0f} s; engine exit code {code}; "
          + "; ".join(events))
    early = [s for s in samples if 50 <= s.section < 100]
    late = samples[-50:]
    times = {s.section: b.t - s.t for s, b in itertools.pairwise(samples)}
    rows = [("engine RSS MB", lambda s: s.engine["rss_mb"]), ("GUI RSS MB", lambda s: s.gui["rss_mb"]),
            ("engine fds", lambda s: s.engine["fds"]), ("GUI fds", lambda s: s.gui["fds"]),
            ("engine threads", lambda s: s.engine["threads"]), ("GUI threads", lambda s: s.gui["threads"]),
            ("engine tasks", lambda s: s.tasks), ("backlog", lambda s: float(s.backlog)),
            ("s per section", lambda s: times.get(s.section, float("nan")))]
    print(f"{'median':16} {'sections 50-100':>16} {'last 50':>10} {'ratio':>7}")
    for name, f in rows:
        a, b = med([f(s) for s in early]), med([f(s) for s in late])
        print(f"{name:16} {a:16.1f} {b:10.1f} {b / a if a else float('nan'):7.3f}")
    # Every planned tile stored once.
    # Once per take: a section re-imaged whole (processing's verdict that it did not register)
    # is a new take of every tile, by design; within a take, and across a kill, never twice.
    store = RunStore(run_dir)
    takes: Counter[int] = Counter()
    records: Counter[tuple[int, int, int, int]] = Counter()
    reimaged = set()
    for e in store.events():
        if e["event"] == "section_started":
            takes[e["slot"]] += 1
            if e.get("reimage"):
                reimaged.add(e["slot"])
        elif e["event"] == "tile":
            records[(e["slot"], e["row"], e["col"], takes[e["slot"]])] += 1
    stored = {(t.slot, t.row, t.col) for t in store.tiles()}
    planned = {(s, r, c) for s in range(n) for r in range(2) for c in range(2)}
    missing, twice = planned - stored, [k for k, v in records.items() if v > 1]
    print(f"tiles: planned {len(planned)}, stored {len(stored & planned)}, missing {len(missing)}, "
          f"stored twice in one take {len(twice)} {sorted(twice)[:5]}; sections re-imaged {len(reimaged)} "
          f"{sorted(reimaged)[:10]}")
    # Every fault that fired has an alarm from its device.
    sources = {spec.split(",")[0]: devs for spec, devs in FAULTS}
    unmatched = []
    for t, name in fired:
        devs = sources.get(name, ())
        if not any(src in devs and t - 1 <= at <= t + ANSWER_WITHIN_S for at, src, _, _ in watch.alarms):
            unmatched.append((round(t - samples[0].t if samples else t), name))
    print(f"faults: armed {len(armed)}, fired {len(fired)} ({dict(Counter(n for _, n in fired))}), "
          f"without an alarm from their device within {ANSWER_WITHIN_S:g} s: {len(unmatched)} {unmatched[:8]}")
    print(f"alarms seen by the viewer: {len(watch.alarms)} "
          f"({dict(Counter(sev for _, _, sev, _ in watch.alarms))})")
    # The volume has every section.
    import zarr
    vol = zarr.open_group(str(run_dir / "volume.zarr"), mode="r")
    arr = vol["0"]
    filled = [z for z in range(arr.shape[0]) if np.asarray(arr[z, ::8, ::8]).any()]
    print(f"volume: {arr.shape[0]} sections, {len(filled)} with data (expected {n})")
    print(f"plot: {out / 'soak.png'}")
    ok = (not missing and not twice and not unmatched and len(filled) == n and code == 0)
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fault-rate", type=float, default=0.2, help="chance of arming a fault after a section")
    ap.add_argument("--out", default="soak-out")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "engine.log").open("ab") as args.engine_log, (out / "gui.log").open("wb") as args.gui_log:
        sys.exit(asyncio.run(soak(args, out)))


if __name__ == "__main__":
    main()
