"""Stitching speed end to end from the command line, start-up included, against ashlar.

An 8 x 8 set of 1024 px tiles (synthetic, 9 % overlap, 10 px RMS stage error) is written
once; then, alternately, `tapescope stitch SET --out OUT` runs as a person would run it (a
new process: interpreter, imports, reading the TIFFs, flat-field, registration, solve,
CSV outputs) and ashlar's EdgeAligner runs the same way in its own interpreter (the peers'
venv, as bench_stitch.py sets it up: `bench/stitch_peers.py ashlar SET`, which reads the
tiles and aligns them; no mosaic written, less work than ashlar's own CLI). Medians of
REPEATS wall-clock seconds, and the ratio.

Run: .venv/bin/python bench/bench_stitch_cli.py   (REPEATS=N to change the repeats)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tapescope.stitching.synthetic import SyntheticParams, make_tileset
from tapescope.stitching.tileset import write_tileset

PEER_PYTHON = Path(os.environ.get("TAPESCOPE_PEER_PYTHON", "/tmp/peer-venv/bin/python"))
PEER_SCRIPT = Path(__file__).with_name("stitch_peers.py")
REPEATS = int(os.environ.get("REPEATS", "3"))
TARGET_RATIO = 5.0


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 3):        # 3: stitch's "needs attention" (still a result)
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return seconds


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ts = make_tileset(SyntheticParams(tile=1024, rows=8, cols=8, overlap=0.09, stage_error_px=10.0, seed=2))
        write_tileset(root / "set", ts.tiles, ts.grid, ts.stage_px)
        mpx = sum(t.size for t in ts.tiles) / 1e6
        print(f"== stitch from the command line: 8 x 8 tiles of 1024 px ({mpx:.0f} Mpx), start-up included")
        ours, affine, peer = [], [], []
        have_peer = PEER_PYTHON.exists()
        for k in range(REPEATS):
            ours.append(wall([sys.executable, "-m", "tapescope.cli", "stitch", str(root / "set"),
                              "--out", str(root / f"out{k}")]))
            # The camera-array model on the same tiles: what an affine per tile costs.
            affine.append(wall([sys.executable, "-m", "tapescope.cli", "stitch", str(root / "set"),
                                "--out", str(root / f"aff{k}"), "--tile-model", "affine"]))
            if have_peer:
                peer.append(wall([str(PEER_PYTHON), str(PEER_SCRIPT), "ashlar", str(root / "set")]))
        t_ours = statistics.median(ours)
        print(f"tapescope stitch   median {t_ours:7.2f} s   ({mpx / t_ours:6.1f} Mpx/s)   "
              f"runs {[round(t, 1) for t in ours]}")
        t_aff = statistics.median(affine)
        print(f"  --tile-model affine median {t_aff:7.2f} s   ({t_aff / t_ours:.2f} x the translation's)   "
              f"runs {[round(t, 1) for t in affine]}")
        if not have_peer:
            print(f"ashlar             unavailable: no peer interpreter at {PEER_PYTHON} (see bench_stitch.py)")
            return 0
        t_peer = statistics.median(peer)
        print(f"ashlar (aligner)   median {t_peer:7.2f} s   ({mpx / t_peer:6.1f} Mpx/s)   "
              f"runs {[round(t, 1) for t in peer]}")
        print(f"ratio              {t_peer / t_ours:.2f} x faster than ashlar (target >= {TARGET_RATIO:g} x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
