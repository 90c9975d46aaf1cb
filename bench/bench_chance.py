"""The alignment's chance gate on real stacks and the simulator: neighbours, sections further
apart and wrong tissue, each pair's coarse confidence against chance (docs/alignment.md,
"When a section registers").

    python bench/bench_chance.py [--seed 11] [--stacks cardona vnc fibsem sim] [--limit N]

Real stacks (../shared/data) are warped as in bench_align_stack.py (<= 4 deg, <= 50 px, 3 px
elastic); pairs one, two and three sections apart; wrong tissue: ssTEM sections half the
stack away (400-500 nm), FIB-SEM slices 1.3 um apart. The simulator: unrelated specimens
(seeds 30-41 against 130-141) at 320, 384 and 512 px. For each group: the confidence, its
ratio to one mirrored search (the old chance), to three null sigmas and to the chance the
gate uses now (the higher of the two), and how many pairs the old and the new gate register
live (floor 0.15) and in the stack (0.2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from align_truth import make_truth_stack

from tapescope.alignment import align as A
from tapescope.montage.synthetic import make_stack

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _read(folder: str, names: list[int]) -> list[np.ndarray] | None:
    if not (DATA / folder / f"{names[0]}.png").is_file():
        return None
    return [cv2.imread(str(DATA / folder / f"{i}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) for i in names]


def probe(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    """(coarse confidence, one mirrored search, null sigma) as align_section's coarse pass."""
    fv, mv = fixed > 0, moving > 0
    k = max(1, int(np.ceil(max(fixed.shape) / A.COARSE_TARGET_PX)))
    fs, fvs = A.block_mean(fixed, fv, k)
    ms, mvs = A.block_mean(moving, mv, k)
    conf = A._coarse_small(fs, fvs, ms, mvs, k, 10.0).confidence
    mirrored = A._coarse_small(fs, fvs, np.ascontiguousarray(ms[::-1]), np.ascontiguousarray(mvs[::-1]), k,
                               10.0).confidence
    return conf, mirrored, A.null_sigma(fs, fvs, ms, mvs)


def old_gate(conf: float, chance: float, floor: float) -> bool:
    """The gate before: one mirrored search, clear of chance at 4x."""
    if conf < floor and not (chance <= A.CHANCE_MAX and conf >= max(A.CLEAR_FLOOR, 4.0 * chance)):
        return False
    return not (chance <= A.CHANCE_MAX and conf < A.CHANCE_FACTOR * chance)


def groups(name: str, seed: int, limit: int | None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    if name == "sim":
        out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for size in (320, 384, 512):
            out[f"other specimens {size} px"] = [
                (make_stack(1, (size, size), seed=s, missing=()).images[0],
                 make_stack(1, (size, size), seed=s + 100, missing=()).images[0]) for s in range(30, 42)][:limit]
        return out
    names = {"cardona": ("sstem_cardona2010", list(range(16))), "vnc": ("sstem_vnc", list(range(20))),
             "fibsem": ("fibsem_medulla", list(range(0, 120, 5)))}[name]
    secs = _read(*names)
    if secs is None:
        return {}
    st = make_truth_stack(secs, seed, max_rotation_deg=4.0, elastic_px=3.0)
    zs = sorted(st.images)
    out = {f"{dz} apart": [(st.images[z], st.images[z + dz]) for z in zs[:-dz]][:limit] for dz in (1, 2, 3)}
    if name == "fibsem":
        far = _read("fibsem_medulla", list(range(130, 250, 5)))
        assert far is not None
        wst = make_truth_stack(far, seed + 1, max_rotation_deg=4.0, elastic_px=3.0)
        out["wrong tissue"] = [(st.images[z], wst.images[z]) for z in zs][:limit]
    else:
        out["wrong tissue"] = [(st.images[z], st.images[(z + len(zs) // 2) % len(zs)]) for z in zs][:limit]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--stacks", nargs="+", default=["cardona", "vnc", "fibsem", "sim"])
    ap.add_argument("--limit", type=int, help="pairs per group at most")
    a = ap.parse_args()
    print(f"{'':34s} {'n':>3s} {'conf':>13s} {'conf/sigma':>11s} {'conf/mirror':>12s} {'conf/chance':>12s}"
          f"  registered old live/stack, new live/stack")
    for name in a.stacks:
        for group, pairs in groups(name, a.seed, a.limit).items():
            rows = np.array([probe(f, m) for f, m in pairs])
            conf, mirror, sigma = rows.T
            chance = np.maximum(mirror, A.CHANCE_SIGMAS * sigma)

            def span(v: np.ndarray) -> str:
                return f"{v.min():5.2f}-{v.max():5.2f}"

            old = [sum(old_gate(c, m, f) for c, m in zip(conf, mirror, strict=True)) for f in (0.15, 0.2)]
            new = [sum(not A.unregistered_reason(c, ch, f) for c, ch in zip(conf, chance, strict=True))
                   for f in (0.15, 0.2)]
            print(f"{name + ' ' + group:34s} {len(rows):3d} {span(conf):>13s} {span(conf / sigma):>11s} "
                  f"{span(conf / np.maximum(mirror, 1e-3)):>12s} {span(conf / chance):>12s}"
                  f"  {old[0]}/{old[1]}, {new[0]}/{new[1]}", flush=True)


if __name__ == "__main__":
    main()
