"""A run attacked from outside, counted: kills survived, faults recovered / paused with an
alarm / failed / hung, and bad inputs refused cleanly, out of those tried.

- kills: a real `tapescope acquire` subprocess SIGKILLed at random points (start-up or a few
  tiles in), then `--resume`d; survived = after the last resume every planned tile is stored
  exactly once, every file matches its checksum, and nothing stray is left.
- faults: every simulator fault armed in a small run (2 sections of 3 x 3 tiles, processing
  off), in-process over the real transports. recovered = the run ended DONE with every tile
  and no pause; paused = it paused with an alarm (the bench then resumes it) and ended DONE;
  failed = it ended otherwise; hung = it did not end within the time limit (must be 0).
- bad inputs: the command line given what an operator may get wrong; refused cleanly = exit
  code 2, one `error:` line, no traceback, the folder unchanged.

Run: .venv/bin/python bench/bench_reliability.py [--kills N] [--seed S]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tapescope.acquisition.events import Alarm, Event, EventBus, StateChanged
from tapescope.acquisition.store import RunStore
from tapescope.config import parse_config
from tapescope.runner import run_acquisition
from tapescope.sim_hardware.faults import FAULTS
from tapescope.stitching.tileset import write_tileset

TINY = """
[scope.camera]
width = 128
height = 128
[run]
slot_range = [0, 3]
grid = [4, 4]
exposure_ms = 3.0
seed = 5
[processing]
enabled = false
"""

# Options that make each fault bite in a small run (the rest take their defaults).
FAULT_ARGS: dict[str, dict[str, Any]] = {
    "stage_timeout": {"after": 3}, "stage_garbled": {"after": 3}, "stage_stall": {"after": 2},
    "stage_limit": {"after": 2}, "tape_timeout": {"after": 1}, "tape_garbled": {"after": 1},
    "tape_jam": {"clears_after": 0}, "column_timeout": {"after": 2}, "column_garbled": {"after": 2},
    "tape_slip": {"at_slot": 1}, "beam_trip": {"after": 4}, "frame_drop": {"after": 4},
    "frame_truncated": {"after": 4}, "camera_disconnect": {"after": 8, "down_s": 2.0},
}
LONG_OUTAGE = ("camera_disconnect", {"after": 8, "down_s": 30.0})   # beyond the retry window


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tapescope.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def tiles_in_journal(run_dir: Path) -> int:
    try:
        return (run_dir / "journal.jsonl").read_bytes().count(b'"event":"tile"')
    except FileNotFoundError:
        return 0


def kills(n: int, seed: int, root: Path) -> tuple[int, int]:
    """(kills survived, kills tried): one run killed n times, then finished."""
    rng = random.Random(seed)
    cfg = root / "kill.toml"
    cfg.write_text(TINY)
    run_dir = root / "kill-run"
    for _ in range(n):
        flag = ["--resume", run_dir] if run_dir.exists() else ["--run-dir", run_dir]
        proc = subprocess.Popen([sys.executable, "-m", "tapescope.cli", "acquire", str(cfg), *map(str, flag)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 2.0))
        else:
            want, deadline = tiles_in_journal(run_dir) + rng.randint(1, 3), time.monotonic() + 60
            while tiles_in_journal(run_dir) < want and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    r = cli("acquire", cfg, "--resume", run_dir)
    store = RunStore(run_dir)
    events = list(store.events())
    keys = [(e["slot"], e["row"], e["col"]) for e in events if e["event"] == "tile"]
    planned = {(e["plan"]["slot"], r_, c) for e in events if e["event"] == "section_planned"
               for r_, c, _, _ in e["plan"]["tiles"]}
    ok = (r.returncode == 0 and set(keys) == planned and len(planned) == 4 * 16
          and len(keys) == len(set(keys)) and not store.stray_files())
    for rec in store.tiles():
        try:
            RunStore.read_tile(rec)
        except OSError:
            ok = False
    return (n if ok else 0), n


async def one_fault(name: str, options: dict[str, Any], root: Path, limit_s: float) -> str:
    cfg = parse_config({"scope": {"camera": {"width": 128, "height": 128}},
                        "run": {"slots": [0, 1, 2], "grid": [3, 3], "exposure_ms": 2.0, "seed": 3,
                                "device_probe_s": 600.0},
                        "processing": {"enabled": False}})
    bus, events = EventBus(), list[Event]()
    bus.subscribe(events.append)
    engines: list[Any] = []

    def on(ev: Event) -> None:     # the operator: resumes a paused run at once
        if isinstance(ev, StateChanged) and ev.new == "paused" and engines:
            asyncio.get_running_loop().call_later(0.5, engines[0].resume, "bench operator")

    bus.subscribe(on)
    opts = dict(options)
    after = opts.pop("after", 0)
    task = run_acquisition(cfg, root / name, bus, on_engine=engines.append,
                           on_sim=lambda sim: sim.world.inject(name, after=after, **opts))
    try:
        result = await asyncio.wait_for(task, limit_s)
    except TimeoutError:
        return "hung"
    paused = any(isinstance(e, StateChanged) and e.new == "paused" for e in events)
    alarmed = any(isinstance(e, Alarm) and e.severity == "error" for e in events)
    if result.summary.state.value != "done":
        return "failed"
    if paused:
        return "paused" if alarmed else "paused without an alarm"
    return "recovered"


def bad_inputs(root: Path) -> list[tuple[str, bool, str]]:
    """(case, refused cleanly, first line of what it said) for each bad input tried."""
    root.mkdir(parents=True, exist_ok=True)
    tiny = root / "tiny.toml"
    tiny.write_text(TINY)
    a_file = root / "a-file"
    a_file.write_text("x")
    (root / "empty").mkdir()
    done = root / "done-run"
    cli("acquire", tiny, "--run-dir", done)
    torn = root / "torn-run"
    cli("acquire", tiny, "--run-dir", torn)
    lines = (torn / "journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = b'{"event":"tile","sl\n'
    (torn / "journal.jsonl").write_bytes(b"".join(lines))
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 4000, (64, 64)).astype(np.uint16) for _ in range(3)] + \
        [rng.random((64, 64)).astype(np.float32)]
    write_tileset(root / "mixed", tiles, [(0, 0), (0, 1), (1, 0), (1, 1)],
                  np.array([[0, 0], [0, 58], [58, 0], [58, 58]], float))

    def config(name: str, text: str) -> Path:
        p = root / f"{name}.toml"
        p.write_text(text)
        return p

    cases: list[tuple[str, list[Any]]] = [
        ("grid 1000 x 1000", ["acquire", config("grid", "[run]\ngrid = [1000, 1000]\n"), "--run-dir", root / "r1"]),
        ("pixel_size_nm = inf", ["acquire", config("inf", "[scope.camera]\npixel_size_nm = inf\n"), "--run-dir",
                                 root / "r2"]),
        ("overlap = nan (config check)", ["config", "check", config("nan", "[run]\noverlap = nan\n")]),
        ("grid beyond the stage travel", ["config", "check", config("far", "[scope.camera]\nwidth = 16384\n"
                                                                     "height = 16384\n[run]\ngrid = [200, 200]\n")]),
        ("--run-dir FILE", ["acquire", tiny, "--run-dir", a_file]),
        ("--resume FILE", ["acquire", tiny, "--resume", a_file]),
        ("stitch --out FILE", ["stitch", root / "mixed", "--out", a_file]),
        ("--resume a typo", ["acquire", tiny, "--resume", root / "typo"]),
        ("--resume an empty folder", ["acquire", tiny, "--resume", root / "empty"]),
        ("--run-dir a finished run", ["acquire", tiny, "--run-dir", done]),
        ("a corrupt journal line", ["acquire", tiny, "--resume", torn]),
        ("a changed config on resume", ["acquire", config("changed", TINY.replace("[4, 4]", "[2, 2]")), "--resume",
                                        done]),
        ("mixed tile pixel types", ["stitch", root / "mixed", "--out", root / "out"]),
        ("unknown field", ["config", "check", config("typo", "[run]\nexposre_ms = 3\n")]),
    ]
    out = []
    for name, args in cases:
        before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}
        r = cli(*args)
        said = r.stdout + r.stderr
        errors = [line for line in said.splitlines() if line.startswith("error:")]
        after = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}
        clean = r.returncode == 2 and len(errors) == 1 and "Traceback" not in said and before == after
        out.append((name, clean, errors[0] if errors else said.strip().splitlines()[-1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--fault-limit-s", type=float, default=120.0)
    ap.add_argument("--parts", default="faults,inputs,kills", help="which parts to run, comma-separated")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    said: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tapescope-reliability-") as tmp:
        root = Path(tmp)
        if "faults" in parts:
            verdicts: dict[str, str] = {}
            for name in FAULTS:
                verdicts[name] = asyncio.run(one_fault(name, FAULT_ARGS.get(name, {}), root / "faults",
                                                       args.fault_limit_s))
                print(f"  fault {name:<18} {verdicts[name]}", flush=True)
            long_name, long_opts = LONG_OUTAGE
            long = asyncio.run(one_fault(long_name, long_opts, root / "long", args.fault_limit_s))
            print(f"  fault {long_name} down 30 s: {long}", flush=True)
            counts = {v: list(verdicts.values()).count(v) for v in ("recovered", "paused", "failed", "hung")}
            said.append(f"faults {len(verdicts)}: recovered {counts['recovered']}, paused with alarm "
                        f"{counts['paused']}, failed {counts['failed']}, hung {counts['hung']}; a 30 s camera "
                        f"outage: {long}")
        if "inputs" in parts:
            refused = bad_inputs(root / "inputs")
            for name, clean, line in refused:
                print(f"  bad input {name:<30} {'refused cleanly' if clean else 'NOT clean'}: {line}", flush=True)
            said.append(f"bad inputs refused cleanly {sum(c for _, c, _ in refused)}/{len(refused)}")
        if "kills" in parts:
            survived, tried = kills(args.kills, args.seed, root)
            said.append(f"kills survived {survived}/{tried}")
    print("; ".join(said))


if __name__ == "__main__":
    main()
