"""How `tapescope align` scales with the stack's length and the section's size, one core,
beside SOFIMA on the same stack.

    python bench/bench_align_scale.py [--counts 8 32 128] [--count-px 1024] [--sizes 1024 2048 4096]
                                      [--no-sofima]

Sections are real FIB-SEM slices (../shared/data/fibsem_medulla, every 2nd 10 nm slice),
enlarged to the size asked (cubic), each turned by <= 4 deg, shifted by <= 5 % and warped
by a 3 px elastic field. Each configuration runs in its own process pinned to one core
(`taskset`, one BLAS/FFT thread) so that its peak memory (VmHWM) and its time are its
own. Times are CPU seconds (user + system) of that one core, which a shared machine's load
does not inflate as it does the wall clock; SOFIMA's include its process's start and JIT
compilation. Printed per configuration: CPU seconds per section and per Mpx of section
area, throughput in Mpx/s per core, peak memory, and the error against the physical truth
(consecutive slices: the identity).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from align_truth import TruthStack

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "fibsem_medulla"
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def make_stack(out: Path, n: int, size: int, seed: int = 3) -> TruthStack:
    sys.path.insert(0, str(HERE))
    from align_truth import make_truth_stack

    from tapescope.alignment.stack import write_stack

    secs = []
    for i in range(n):
        img = cv2.imread(str(DATA / f"{(2 * i) % 260}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        secs.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC))
    st = make_truth_stack(secs, seed, max_rotation_deg=4.0, max_shift_frac=0.05, elastic_px=3.0)
    zs = sorted(st.images)
    write_stack(out, [np.clip(st.images[z], 0, 255) * 256 for z in zs], zs)
    return st


def truth_of(st: TruthStack, volume: Path) -> tuple[float, float]:
    """(global, local) RMS px against the physical truth (the slices' identity) of an aligned
    volume, every 8th px of a 1024 px section (every size/128th)."""
    from align_truth import error_vectors, measures, transform_maps

    from tapescope.montage.omezarr import Volume

    vol = Volume.open(volume)
    step = max(8, st.shape[0] // 128)
    ts = {}
    for z in st.images:
        try:
            ts[z] = vol.load_transform(z)
        except FileNotFoundError:   # not aligned: not measured
            continue
    m = measures(error_vectors(st, transform_maps(ts, st.shape, step), step=step))
    return m.global_px, m.local_px


def run_one(stack: Path, out: Path) -> dict[str, float]:
    """`align_stack` in this process; its time and peak memory."""
    import resource
    import time

    from tapescope.alignment.stack import align_stack

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    res = align_stack(stack, out)
    seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
    ok = sum(o.status == "ok" for o in res.sections)
    return {"seconds": cpu_s, "wall": seconds, "ok": ok, "peak_mb": own_peak_mb()}


def own_peak_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: across fork and exec
    that keeps the parent's peak, and the parent here holds the whole generated stack."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sofima_one(stack: Path, out: Path, size: int) -> dict[str, float]:
    from bench_align import PEERS, SOFIMA_PY

    k = max(1, size // 512)
    cmd = ["taskset", "-c", "0", str(SOFIMA_PY), str(HERE / "peers" / "sofima_stack.py"), str(stack), str(out),
           "--patch", str(64 * k), "--stride", str(16 * k), "--min-patch-size", str(20 * k * k)]
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(cmd, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(PEERS),
                                   "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"},
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(run.stderr.strip().splitlines()[-1:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def child(stack: str, out: str) -> None:
    print(json.dumps(run_one(Path(stack), Path(out))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--count-px", type=int, default=1024, help="section size of the --counts runs")
    ap.add_argument("--no-sofima", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if not (DATA / "0.png").is_file():
        print(f"skipped: {DATA} not found")
        return
    sys.path.insert(0, str(HERE))
    from bench_align import SOFIMA_PY

    configs = [(n, a.count_px) for n in a.counts] + [(8, s) for s in a.sizes if s != a.count_px or 8 not in a.counts]
    print(f"{'sections':>8} {'px':>6} {'s/section':>10} {'s/Mpx':>8} {'Mpx/s/core':>11} {'peak MB':>8}  method")
    ours: dict[tuple[int, int], dict[str, float]] = {}
    for n, size in configs:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            st = make_stack(d / "stack", n, size)
            run = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", str(d / "stack"),
                                  str(d / "out")], env={**os.environ, **ONE_THREAD}, capture_output=True, text=True)
            if run.returncode:
                print(f"{n:>8} {size:>6}  failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            mpx = n * size * size / 1e6
            ours[(n, size)] = {"per_section": r["seconds"] / n, "per_mpx": r["seconds"] / mpx, "peak": r["peak_mb"]}
            g, loc = truth_of(st, d / "out" / "volume.zarr")
            k = size / 520   # px of the section per px of the FIB-SEM slice it was enlarged from
            print(f"{n:>8} {size:>6} {r['seconds'] / n:>10.2f} {r['seconds'] / mpx:>8.2f} {mpx / r['seconds']:>11.3f} "
                  f"{r['peak_mb']:>8.0f}  tapescope ({r['ok']}/{n} aligned; truth global / local "
                  f"{g:.2f} / {loc:.2f} px, {g / k:.2f} / {loc / k:.2f} px of the slice)", flush=True)
            if not a.no_sofima and SOFIMA_PY.exists() and n <= 32:
                try:
                    s = sofima_one(d / "stack", d / "sofima", size)
                    print(f"{n:>8} {size:>6} {s['seconds'] / n:>10.2f} {s['seconds'] / mpx:>8.2f} "
                          f"{mpx / s['seconds']:>11.3f} {'':>8}  SOFIMA", flush=True)
                except RuntimeError as e:
                    print(f"{n:>8} {size:>6}  SOFIMA failed: {e}")
    spread(ours, [(n, a.count_px) for n in a.counts], "sections", "per_section")
    spread(ours, [(8, s) for s in a.sizes], "section sizes", "per_mpx")


def spread(rows: dict[tuple[int, int], dict[str, float]], keys: list[tuple[int, int]], what: str, measure: str) -> None:
    """How flat a range is: the largest over the smallest of time (per section along the
    stack, per Mpx across sizes) and of peak memory; the target is within 1.5x for time and
    memory that does not grow with the stack."""
    got = [rows[k] for k in keys if k in rows]
    if len(got) < 2:
        return
    t = [g[measure] for g in got]
    m = [g["peak"] for g in got]
    print(f"over the {what} {', '.join(f'{n}x{px}' for n, px in keys if (n, px) in rows)}: "
          f"{measure.replace('_', ' ')} {max(t) / min(t):.2f}x max/min (first to last {t[-1] / t[0]:.2f}x), "
          f"peak memory first to last {m[-1] / m[0]:.2f}x (last two {m[-1] / m[-2]:.2f}x)")


if __name__ == "__main__":
    main()
