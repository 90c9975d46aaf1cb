"""Auto ROI on the simulator's own overviews, at the settings a user runs: default aperture
(no aperture_um), 256 and 512 px cameras. Intact sections get tiles; empty and damaged
slots are flagged. The survey and the tissue finder are the run's (roi_planner.survey)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tapescope.acquisition.roi import Overview, find_tissue, tiles_covering
from tapescope.acquisition.roi_planner import overview_magnifications, survey
from tapescope.config import parse_config
from tapescope.runner import make_planner, sim_world_params
from tapescope.sim_hardware.world import SimWorld


def judge(seed: int, cam: int, grid: int, slot: int):
    cfg = parse_config({"scope": {"camera": {"width": cam, "height": cam}},
                        "run": {"roi": "auto", "seed": seed, "grid": [grid, grid], "slots": [slot]}})
    planner = make_planner(cfg)
    world = SimWorld(sim_world_params(cfg))
    imaging = world.column.magnification
    fov = np.array(planner.tile_px, float) * planner.pixel_nm * imaging
    mags = overview_magnifications(world.p.magnifications, fov, planner.search_box())
    world.tape.goto(slot)

    async def take(mag: float) -> np.ndarray:
        world.column.magnification = mag
        return world.expose(cfg.run.exposure_ms, stage_nm=np.zeros(2))

    try:
        ov, found, mag = asyncio.run(survey(take, mags, planner.pixel_nm * imaging, planner.limits))
    finally:
        world.close()
    return world, planner, ov, found, mag


@pytest.mark.parametrize(("seed", "cam", "grid", "slot"), [(1, 512, 3, 0), (1, 512, 3, 1), (2, 256, 2, 1)])
def test_intact_section_gets_tiles_at_the_default_aperture(seed: int, cam: int, grid: int, slot: int) -> None:
    world, planner, ov, found, _ = judge(seed, cam, grid, slot)
    assert not world.slot_truth[slot].damage and world.slot_truth[slot].tissue
    assert found.verdict == "tissue", found.message
    assert not found.cut                       # the survey zoomed out until the section lay inside
    tiles = tiles_covering(found.outline_nm, planner.tile_px, planner.pixel_nm, planner.overlap)
    assert len(tiles) >= grid * grid
    # The outline is the simulator's trapezoid: its centre within a few overview pixels.
    poly = np.array(found.outline_nm)
    corners = world.section_corners_nm(slot)
    assert np.abs(poly.mean(axis=0) - corners.mean(axis=0)).max() < 4 * ov.pixel_nm + 200


def test_field_inside_the_section_is_not_judged() -> None:
    # The run's first guess (the grid's footprint) lies inside a 512 px section: all tissue.
    world, _, _, _, mag = judge(1, 512, 3, 0)
    first = overview_magnifications(world.p.magnifications, np.full(2, 512 * 4.0 * 4800), (5734.4, 5734.4))[0]
    world.tape.goto(0)
    world.column.magnification = first
    img = world.expose(20.0, stage_nm=np.zeros(2)).astype(np.float32)
    pix = 4.0 * 4800 / first
    inside = find_tissue(Overview(img, (-256 * pix, -256 * pix), pix))
    if inside.verdict != "empty":
        assert inside.cut
    assert mag < first


@pytest.mark.parametrize(("seed", "slot", "kind"), [(1, 18, "empty"), (1, 9, "resin"), (1, 10, "resin")])
def test_empty_and_damaged_slots_are_flagged(seed: int, slot: int, kind: str) -> None:
    world, _, _, found, _ = judge(seed, 512, 3, slot)
    truth = world.slot_truth[slot]
    assert (not truth.tissue) if kind == "empty" else kind in truth.damage
    assert found.verdict == ("empty" if kind == "empty" else "damaged"), found.message
