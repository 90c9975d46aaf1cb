"""Auto ROI as a classifier: does it image intact sections and flag damaged and empty ones?

Each case is one simulated slot with known truth (the simulator's damage list): intact,
damaged (fold, tear, resin patch, or several) or empty. The slot is surveyed as a run with
`roi = "auto"` does it (roi_planner.overview_magnifications and roi_planner.survey, with
the column driver's magnifications: the highest whose field holds the search area, lower
while the tissue reaches the field's edge; roi.find_tissue judges each overview), on
frames the simulator renders for that slot at each magnification. The run's own settings
come from the TOML path (config.parse_config, runner.sim_world_params, runner.make_planner):
default aperture (no `aperture_um`), 20 ms exposure; camera 256/512/1024 px and grids
2x2 to 4x4 over several seeds.

Verdict "tissue" -> imaged (tiles planned); "damaged" or "empty" -> flagged (skipped).
Prints the confusion table (truth by kind x verdict), the two rates (intact imaged,
target >= 95 %; damaged or empty flagged, target >= 90 %), each miss with its message,
and the seconds taken.

Run: .venv/bin/python bench/bench_roi.py   (SLOTS=10 per configuration by default)
     SEED_OFFSET=10 .venv/bin/python bench/bench_roi.py   (seeds 11-19: the same cameras and
     grids on sections the detector's limits were not chosen on)
     .venv/bin/python bench/bench_roi.py --figure docs/img/roi_overview.png   (overviews of an
     intact, a folded, a torn, a resin and an empty slot with the outline, tiles and verdict)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter

import cv2
import numpy as np

from tapescope.acquisition.roi import Overview, TissueFinding, tiles_covering
from tapescope.acquisition.roi_planner import overview_magnifications, survey
from tapescope.config import parse_config
from tapescope.runner import make_planner, sim_world_params
from tapescope.sim_hardware.world import SimWorld

# (seed, camera px, grid): every camera size with every grid size at least once.
CONFIGS = [(1, 256, 2), (2, 256, 3), (3, 256, 4), (4, 512, 2), (5, 512, 3),
           (6, 512, 4), (7, 1024, 2), (8, 1024, 3), (9, 1024, 4)]
SLOTS = int(os.environ.get("SLOTS", "10"))
SEED_OFFSET = int(os.environ.get("SEED_OFFSET", "0"))


def truth_kind(world: SimWorld, slot: int) -> str:
    t = world.slot_truth[slot]
    if not t.tissue:
        return "empty"
    return "+".join(t.damage) or "intact"


def judge(seed: int, cam: int, grid: int, slots: list[int]) -> list[tuple[str, str, str]]:
    """(truth kind, verdict, message) for each slot, as a run with roi = "auto" sees it."""
    return [(kind, found.verdict, found.message) for kind, _, found in survey_slots(seed, cam, grid, slots)]


def survey_slots(seed: int, cam: int, grid: int, slots: list[int]) -> list[tuple[str, Overview, TissueFinding]]:
    """(truth kind, last overview, its finding) for each slot."""
    cfg = parse_config({"scope": {"camera": {"width": cam, "height": cam}},
                        "run": {"roi": "auto", "seed": seed, "grid": [grid, grid], "slots": slots}})
    planner = make_planner(cfg)
    world = SimWorld(sim_world_params(cfg))
    imaging = world.column.magnification
    fov = np.array(planner.tile_px, float) * planner.pixel_nm * imaging
    mags = overview_magnifications(world.p.magnifications, fov, planner.search_box())
    out = []
    try:
        for slot in slots:
            world.tape.goto(slot)

            async def take(mag: float) -> np.ndarray:
                world.column.magnification = mag
                return world.expose(cfg.run.exposure_ms, stage_nm=np.zeros(2))

            ov, found, _ = asyncio.run(survey(take, mags, planner.pixel_nm * imaging, planner.limits))
            out.append((truth_kind(world, slot), ov, found))
    finally:
        world.column.magnification = imaging
        world.close()
    return out


def figure(path: str, seed: int = 1, cam: int = 512, grid: int = 3, slots: tuple[int, ...] = (0, 6, 5, 9, 18),
           panel: int = 360) -> None:
    """One panel per slot: the overview (its own film level = white), the outline (red),
    the tiles planned over it (green, only for imaged slots), truth and verdict."""
    cfg = parse_config({"scope": {"camera": {"width": cam, "height": cam}},
                        "run": {"roi": "auto", "seed": seed, "grid": [grid, grid], "slots": list(slots)}})
    planner = make_planner(cfg)
    panels = []
    for kind, ov, found in survey_slots(seed, cam, grid, list(slots)):
        img = ov.image / max(float(np.percentile(ov.image, 99.5)), 1e-6)
        s = panel / max(img.shape)
        rgb = cv2.cvtColor(cv2.resize(np.clip(img * 255, 0, 255).astype(np.uint8), None, fx=s, fy=s,
                                      interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
        if found.outline_nm and found.verdict == "tissue":
            for t in tiles_covering(found.outline_nm, planner.tile_px, planner.pixel_nm, planner.overlap):
                half = np.array(planner.tile_px) * planner.pixel_nm / 2
                a = ov.to_px(np.array([t.y_nm, t.x_nm]) - half) * s
                b = ov.to_px(np.array([t.y_nm, t.x_nm]) + half) * s
                cv2.rectangle(rgb, (round(a[1]), round(a[0])), (round(b[1]), round(b[0])), (60, 200, 60), 1)
        if found.outline_nm:
            pts = np.round(ov.to_px(np.array(found.outline_nm)) * s)[:, ::-1].astype(np.int32)
            cv2.polylines(rgb, [pts], True, (40, 40, 230), 2)
        canvas = np.zeros((panel + 24, panel, 3), np.uint8)
        canvas[24:24 + rgb.shape[0], :rgb.shape[1]] = rgb
        cv2.putText(canvas, f"{kind} -> {found.verdict}", (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (230, 230, 60), 1,
                    cv2.LINE_AA)
        panels.append(canvas)
    cv2.imwrite(path, np.hstack(panels), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path}: seed {seed}, {cam} px, {grid}x{grid}, slots {list(slots)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figure", help="draw the figure of docs/acquisition.md to this PNG instead")
    args = ap.parse_args()
    if args.figure:
        figure(args.figure)
        return
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []
    for seed, cam, grid in CONFIGS:
        seed += SEED_OFFSET
        for kind, verdict, msg in judge(seed, cam, grid, list(range(SLOTS))):
            rows.append((f"seed {seed}, {cam} px, {grid}x{grid}", kind, verdict, msg))
    table: Counter[tuple[str, str]] = Counter()
    for _, kind, verdict, _ in rows:
        table[(kind, verdict)] += 1
    kinds = sorted({k for _, k, _, _ in rows}, key=lambda k: (k != "intact", k == "empty", k))
    verdicts = ("tissue", "damaged", "empty")
    print(f"{len(rows)} slots, {len(CONFIGS)} configurations (seed, camera, grid), default aperture")
    print(f"{'truth':<18}" + "".join(f"{v:>9}" for v in verdicts) + "   (tissue = imaged; damaged, empty = flagged)")
    for k in kinds:
        print(f"{k:<18}" + "".join(f"{table[(k, v)]:>9}" for v in verdicts))
    intact = [r for r in rows if r[1] == "intact"]
    bad = [r for r in rows if r[1] != "intact"]
    imaged = sum(r[2] == "tissue" for r in intact)
    flagged = sum(r[2] != "tissue" for r in bad)
    print(f"intact imaged:           {imaged}/{len(intact)} = {imaged / max(len(intact), 1):.1%}  (target >= 95 %)")
    print(f"damaged/empty flagged:   {flagged}/{len(bad)} = {flagged / max(len(bad), 1):.1%}  (target >= 90 %)")
    for where, kind, verdict, msg in rows:
        if (kind == "intact") != (verdict == "tissue"):
            print(f"  miss: {where}: {kind} -> {verdict}: {msg}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
