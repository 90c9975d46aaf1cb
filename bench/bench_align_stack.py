"""Section alignment on real stacks, judged by what the data supports, beside a rigid chain
(OpenCV ECC) and SOFIMA in the same run.

    python bench/bench_align_stack.py [--seeds 11 12] [--stacks fibsem vnc cardona cardona-gap synthetic synthetic-100]
                                      [--no-sofima]

Every stack is warped section by section by a known rotation (<= 4 deg), shift (<= 50 px)
and smooth elastic field (3 px), with one section left out (not for `cardona`), and
aligned; the same sections are aligned once more *unwarped*. On a grid of output points
(every 8 px) two error vectors per section (align_truth.error_vectors):

- consistency: the warped run against the method's own unwarped run, after one common
  affine. Does the aligner undo the warps, whatever it makes of the tissue's own movement?
- truth (FIB-SEM and the simulator only, where it is physical): the warped run against
  each section's own slice.

Each is printed as global RMS / local RMS (the change of error between consecutive
sections) / across the gap / growth (the last three sections' RMS over the first three's),
in px, the median over the seeds. Real data is read from ../shared/data next to the
repository and skipped where absent; SOFIMA runs from its own virtual environment
(bench/peers/sofima_stack.py) and is skipped, saying so, where that is absent.

With --oracle, one more row: tapescope's solve given the warped stack's pairs *measured
consistently* with the unwarped run's (each warped pair's points mapped through the known
warps onto what the unwarped pair found). Those pairs cannot disagree between the runs, so
what inconsistency is left is the solve's own (its priors are not blind to the warps), and
the difference to the tapescope row is what the pairs' measurements cost: a bound that
says which part of a target the matching, and which the solve, stands in the way of.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from align_truth import (
    Measures,
    TruthStack,
    Warp,
    error_vectors,
    invert,
    make_truth_stack,
    map_transform,
    measures,
    patch_means,
    transform_maps,
)
from bench_align import PEERS, SOFIMA_PY, ecc_chain, sofima

from tapescope.alignment.pipeline import FLOWS, LIVE_NEIGHBOURS, SectionProcessor
from tapescope.alignment.stack import (
    NEIGHBOURS,
    AlignParams,
    align_stack,
    local_map,
    match_sections,
    read_stack,
    write_stack,
)
from tapescope.alignment.zsolve import PairMatch, chain_initial, solve_windowed
from tapescope.montage.canvas import Canvas
from tapescope.montage.omezarr import Volume
from tapescope.neurites import NeuriteParams, NeuriteSpecimen

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WARP = {"max_rotation_deg": 4.0, "elastic_px": 3.0}
UNWARPED = {"max_rotation_deg": 0.0, "max_shift_frac": 0.0, "elastic_px": 0.0}


def _read(folder: str, names: list[int]) -> list[np.ndarray] | None:
    d = DATA / folder
    if not (d / f"{names[0]}.png").is_file():
        return None
    return [cv2.imread(str(d / f"{i}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) for i in names]


@dataclass
class StackSpec:
    name: str
    sections: Callable[[int], list[np.ndarray] | None]
    drop: tuple[int, ...]
    physical_truth: bool
    noise: float = 0.0


def _synthetic(seed: int, n: int = 24, size: int = 512) -> list[np.ndarray]:
    """The simulator's neurites at 10 nm pixels and 50 nm sections, as the FIB-SEM stack."""
    spec = NeuriteSpecimen(NeuriteParams(height_px=size, width_px=size, pixel_nm=10.0, thickness_nm=50.0,
                                         n_sections=n, seed=seed, projected_texture=0.0))
    return [spec.section(i) * 255 for i in range(n)]


STACKS = {
    # Every 5th 10 nm slice: 50 nm sections whose true alignment is the identity.
    "fibsem": StackSpec("FIB-SEM, every 5th slice, 24 sections, z=11 left out",
                        lambda _s: _read("fibsem_medulla", list(range(0, 120, 5))), (11,), True),
    "vnc": StackSpec("ssTEM VNC, 20 sections of 1024 px, z=9 left out",
                     lambda _s: _read("sstem_vnc", list(range(20))), (9,), False),
    "cardona": StackSpec("ssTEM Cardona 2010, 16 sections, none left out",
                         lambda _s: _read("sstem_cardona2010", list(range(16))), (), False),
    "cardona-gap": StackSpec("ssTEM Cardona 2010, 16 sections, z=7 left out",
                             lambda _s: _read("sstem_cardona2010", list(range(16))), (7,), False),
    "synthetic": StackSpec("simulated neurites, 24 sections of 512 px, z=11 left out", _synthetic, (11,), True, 0.03),
    "synthetic-100": StackSpec("simulated neurites, 100 sections of 512 px, z=50 left out",
                               lambda seed: _synthetic(seed, n=100), (50,), True, 0.03),
}


def tapescope(stack: TruthStack, d: Path) -> dict[int, np.ndarray]:
    zs = sorted(stack.images)
    write_stack(d / "stack", [stack.images[z] * 256 for z in zs], zs)
    res = align_stack(d / "stack", d / "out")
    vol = Volume.open(res.volume)
    for o in res.sections:
        if o.z in stack.images and (o.status != "ok" or o.message):
            print(f"    tapescope z={o.z} {o.status}: {o.message}")
    return transform_maps({o.z: vol.load_transform(o.z) for o in res.sections if o.status == "ok"}, stack.shape)


def tapescope_live(stack: TruthStack, d: Path, look_ahead: int = 0, flow: str = "live",
                   neighbours: int = LIVE_NEIGHBOURS) -> dict[int, np.ndarray]:
    """The live processor on the same sections, each as one tile at the stage's placement,
    in z order: each aligned to `neighbours` good sections below it (`[processing]
    align_neighbours`) with the `flow` settings (`align_flow`); with `look_ahead`, placed
    again by that many successors before it is written (`align_look_ahead`)."""
    zs = sorted(stack.images)
    h, w = stack.shape
    vol = Volume.create(d / "live.zarr", (max(zs) + 1, h, w), pixel_nm=10.0, thickness_nm=50.0, levels=2)
    proc = SectionProcessor(vol, Canvas(np.zeros(2, int), (h, w)), lens="none", look_ahead=look_ahead, scratch=d,
                            flow=FLOWS[flow], neighbours=neighbours)
    try:
        for z in zs:
            proc.process(z, [(stack.images[z] * 256).astype(np.float32)], np.zeros((1, 2)), [(0, 0)], {"slot": z})
        proc.flush()
        done = proc.finished()
    finally:
        proc.close()
    for r in done:
        if r.status != "ok" or r.message:
            print(f"    live z={r.z} {r.status}: {r.message}")
    return transform_maps({r.z: vol.load_transform(r.z) for r in done if r.status == "ok"}, stack.shape)


def _matched(stack: TruthStack, d: Path) -> tuple[dict, list[int]]:
    """tapescope's registered pairs of a stack (as `align_stack` finds them) and the sections
    they align."""
    zs = sorted(stack.images)
    write_stack(d / "s", [stack.images[z] * 256 for z in zs], zs)
    entries, shape = read_stack(d / "s")
    kept, flagged, _ = match_sections(zs, {e.z: e for e in entries}, AlignParams(canvas=shape), local_map,
                                      lambda _m: None, shape)
    return kept, [z for z in zs if z not in flagged]


def _solved(kept: dict, aligned: list[int], matches: list[PairMatch], shape: tuple[int, int]) -> dict:
    initial = chain_initial(aligned, {k: r.coarse for k, r in kept.items()})
    return solve_windowed(shape, aligned, matches, initial).transforms


def oracle(warped: TruthStack, unwarped: TruthStack, d: Path) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(warped maps, unwarped maps) of the solve given pairs measured consistently: each
    warped pair's points p, through W_i onto the unwarped section, through the unwarped
    pair's transform, and back through W_j^-1."""
    kw, aw = _matched(warped, d / "w")
    ku, au = _matched(unwarped, d / "u")
    consistent = []
    for (i, j), r in kw.items():
        ru = ku.get((i, j))
        if ru is None or r.matches is None:
            continue
        m = r.matches
        pu = np.stack(warped.warps[i].apply(m.p[:, 0], m.p[:, 1]), 1)
        qu = np.stack(ru.transform.apply(pu[:, 0], pu[:, 1]), 1)
        consistent.append(PairMatch(i, j, m.p, invert(warped.warps[j], qu), m.w))
    tw = _solved(kw, aw, consistent, warped.shape)
    tu = _solved(ku, au, [r.matches for r in ku.values() if r.matches is not None], unwarped.shape)
    return transform_maps(tw, warped.shape), transform_maps(tu, unwarped.shape)


def run_oracle(warped: TruthStack, unwarped: TruthStack, physical: bool, cache: Path | None,
               key: str) -> tuple[Row, Row]:
    f = None if cache is None else cache / f"{key}.npz"
    if f is not None and f.is_file():
        with np.load(f) as z:
            maps = {int(k[2:]): z[k] for k in z.files if k.startswith("w_")}
            ref = {int(k[2:]): z[k] for k in z.files if k.startswith("u_")}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            maps, ref = oracle(warped, unwarped, Path(tmp))
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.savez(f, **{f"w_{z}": m for z, m in maps.items()}, **{f"u_{z}": m for z, m in ref.items()})
    return rows_of(warped, maps, ref, physical, float("nan"))


METHODS: dict[str, Callable[[TruthStack, Path], dict[int, np.ndarray] | None]] = {
    "rigid chain": lambda st, _d: transform_maps(ecc_chain(st), st.shape),
    # SOFIMA's notebook recipe, its reconcile area scaled to the section (20 grid cells at 512 px).
    "SOFIMA": lambda st, d: sofima(st, d, min_patch_cells=20),
    "tapescope": tapescope,
    # The live processor (not run by default): its defaults, section by section; in a window
    # of 4; and in a window of 4 with the offline stack's flow and neighbours.
    "live": tapescope_live,
    "live window 4": lambda st, d: tapescope_live(st, d, look_ahead=4),
    "live as stack": lambda st, d: tapescope_live(st, d, look_ahead=4, flow="stack", neighbours=NEIGHBOURS),
}
DEFAULT_METHODS = ["rigid chain", "SOFIMA", "tapescope"]


@dataclass
class Row:
    consistency: Measures
    truth: Measures | None
    seconds_per_section: float
    content: Measures | None = None     # the method's *unwarped* run against the truth: the content's own pull


def _cached(fn: Callable[[TruthStack, Path], dict[int, np.ndarray] | None], stack: TruthStack,
            cache: Path | None, key: str) -> tuple[dict[int, np.ndarray] | None, float]:
    """The method's maps and seconds, from `cache` when it holds them (--cache)."""
    f = None if cache is None else cache / f"{key}.npz"
    if f is not None and f.is_file():
        with np.load(f) as d:
            return {int(k[2:]): d[k] for k in d.files if k.startswith("z_")}, float(d["seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        maps = fn(stack, Path(tmp))
        seconds = time.perf_counter() - t0
    if maps is not None and f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, seconds=seconds, **{f"z_{z}": m for z, m in maps.items()})
    return maps, seconds


def run_method(fn: Callable[[TruthStack, Path], dict[int, np.ndarray] | None], warped: TruthStack,
               unwarped: TruthStack, physical: bool, cache: Path | None = None, key: str = "",
               ) -> tuple[Row, Row] | None:
    """(by points, by quarter-section patches) for one method on one stack."""
    maps, seconds = _cached(fn, warped, cache, key + "-w")
    ref, _ = _cached(fn, unwarped, cache, key + "-u")
    if maps is None or ref is None:
        return None
    return rows_of(warped, maps, ref, physical, seconds / max(len(maps), 1), unwarped)


def rows_of(warped: TruthStack, maps: dict[int, np.ndarray], ref: dict[int, np.ndarray], physical: bool,
            seconds: float, unwarped: TruthStack | None = None) -> tuple[Row, Row]:
    """Rows by points and by patches; with `unwarped` (and a physical truth) also the
    unwarped run against the truth: where the content alone takes the method, which bounds
    what its warped run can reach against the truth."""
    reference = {z: map_transform(m) for z, m in ref.items()}
    grid = next(iter(maps.values())).shape[:2]
    cons = error_vectors(warped, maps, reference)
    truth = error_vectors(warped, maps) if physical else None
    content = error_vectors(unwarped, ref) if physical and unwarped is not None else None
    by_points = Row(measures(cons), measures(truth) if truth else None, seconds,
                    measures(content) if content else None)
    by_patches = Row(measures(patch_means(cons, grid)), measures(patch_means(truth, grid)) if truth else None,
                     seconds, measures(patch_means(content, grid)) if content else None)
    return by_points, by_patches


def rigid_undone(stack: TruthStack) -> dict[int, np.ndarray]:
    """Maps that undo each section's known rotation and shift exactly and leave its elastic
    field: what a perfect rigid aligner reaches."""
    out = {}
    for z, wz in stack.warps.items():
        if z not in stack.images:
            continue
        rigid = Warp(wz.angle_deg, wz.shift_xy, wz.centre_xy, [])
        h, w = stack.shape
        gy, gx = np.mgrid[0:h:8, 0:w:8].astype(np.float64)
        a = np.radians(wz.angle_deg)
        back = np.linalg.inv(np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])).T
        q = np.stack([gx, gy], -1)
        for _ in range(30):     # q with rigid(q) = p, by fixed point (exact for a rotation)
            bx, by = rigid.apply(q[..., 0], q[..., 1])
            q = q - np.stack([bx - gx, by - gy], -1) @ back
        out[z] = q
    return out


def common_distortion(stack: TruthStack, step: int = 8) -> float:
    """RMS over the section of the mean over z of the warps' non-affine parts: a distortion
    that every section shares is the stack's frame to any aligner (no pair sees it), so
    consistency cannot be better than this."""
    h, w = stack.shape
    gy, gx = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    design = np.column_stack([pts, np.ones(len(pts))])
    parts = []
    for z, wz in stack.warps.items():
        if z in stack.images:
            q = np.stack(wz.apply(pts[:, 0], pts[:, 1]), 1)
            g, *_ = np.linalg.lstsq(design, q, rcond=None)
            parts.append(q - design @ g)
    mean = np.mean(parts, axis=0)
    return float(np.sqrt((mean ** 2).sum(1).mean()))


def median_measures(ms: list[Measures]) -> Measures:
    return Measures(*(float(np.nanmedian([getattr(m, f) for m in ms]))
                      for f in ("global_px", "local_px", "gap_px", "growth")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--oracle", action="store_true",
                    help="also the solve given pairs measured consistently (the bound; one more matching)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each method's maps here and reuse them (delete it after changing a method)")
    a = ap.parse_args()
    methods = dict(METHODS)
    if "SOFIMA" in a.methods and (not SOFIMA_PY.exists() or not (PEERS / "sofima").is_dir()):
        print(f"SOFIMA skipped: no {SOFIMA_PY} or no {PEERS / 'sofima'} (bench/peers/sofima_stack.py says how)")
        a.methods.remove("SOFIMA")
    for key in a.stacks:
        spec = STACKS[key]
        rows: dict[str, list[Row]] = {m: [] for m in a.methods + (["oracle pairs"] if a.oracle else [])}
        patch_rows: dict[str, list[Row]] = {}
        # Beside the methods: the known rotation and shift undone exactly, the elastic part
        # left (its consistency is against the identity, which is what it does unwarped).
        for seed in a.seeds:
            secs = spec.sections(seed)
            if secs is None:
                print(f"== {spec.name}: skipped, data not found under {DATA}")
                break
            h = secs[0].shape[0]
            warped = make_truth_stack(secs, seed, drop=spec.drop, noise=spec.noise, max_shift_frac=50 / h, **WARP)
            unwarped = make_truth_stack(secs, seed, drop=spec.drop, noise=spec.noise, **UNWARPED)
            identity = {z: np.stack(np.mgrid[0:h:8, 0:secs[0].shape[1]:8][::-1].astype(np.float64), -1)
                        for z in unwarped.images}
            pair = rows_of(warped, rigid_undone(warped), identity, spec.physical_truth, 0.0)
            rows.setdefault("rigid undone", []).append(pair[0])
            patch_rows.setdefault("rigid undone", []).append(pair[1])
            print(f"   seed {seed}: the warps' non-affine part shared by all sections (no aligner can see it): "
                  f"{common_distortion(warped):.2f} px RMS")
            for m in a.methods + (["oracle pairs"] if a.oracle else []):
                tag = f"{key}-{seed}-{m.replace(' ', '_')}"
                got = (run_oracle(warped, unwarped, spec.physical_truth, a.cache, tag) if m == "oracle pairs"
                       else run_method(methods[m], warped, unwarped, spec.physical_truth, a.cache, tag))
                if got is None:
                    continue
                rows[m].append(got[0])
                patch_rows.setdefault(m, []).append(got[1])
                for label, row in zip(("points", "patches"), got, strict=True):
                    print(f"   seed {seed} {m:<12} {label:<7} consistency {row.consistency.cells()}"
                          + (f"  truth {row.truth.cells()}" if row.truth else "")
                          + (f"  unwarped truth {row.content.cells()}" if row.content else "")
                          + f"  {row.seconds_per_section:5.1f} s/section", flush=True)
        else:
            for label, table in (("every 8 px", rows), ("quarter-section patches", patch_rows)):
                print(f"== {spec.name}: median of seeds {a.seeds}, by {label}; px, global / local / gap / growth")
                for m, rs in table.items():
                    if not rs:
                        continue
                    cons = median_measures([r.consistency for r in rs])
                    truth = median_measures([r.truth for r in rs if r.truth]) if rs[0].truth else None
                    content = median_measures([r.content for r in rs if r.content]) if rs[0].content else None
                    sec = float(np.median([r.seconds_per_section for r in rs]))
                    print(f"  {m:<12} consistency {cons.cells()}" + (f"  truth {truth.cells()}" if truth else "")
                          + (f"  unwarped truth {content.cells()}" if content else "")
                          + f"  {sec:5.1f} s/section", flush=True)


if __name__ == "__main__":
    main()
