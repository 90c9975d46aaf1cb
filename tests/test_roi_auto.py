"""Auto ROI on the simulator's own overviews, at the settings a user runs: default aperture
(no aperture_um), 256 and 512 px cameras. Intact sections get tiles; empty and damaged
slots are flagged. The survey and the tissue finder are the run's (roi_planner.survey)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from tapescope.acquisition.plan import TilePlan
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


def centroid(polygon: object) -> np.ndarray:
    """The area's centre of a polygon (y, x): its vertices crowd where the outline waves."""
    p = np.asarray(polygon, float)
    y, x = p[:, 0], p[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    return np.array([((y + np.roll(y, -1)) * cross).sum(), ((x + np.roll(x, -1)) * cross).sum()]) / (3 * cross.sum())


@pytest.mark.parametrize(("seed", "cam", "grid", "slot"), [(1, 512, 3, 0), (1, 512, 3, 1), (2, 256, 2, 1)])
def test_intact_section_gets_tiles_at_the_default_aperture(seed: int, cam: int, grid: int, slot: int) -> None:
    world, planner, ov, found, _ = judge(seed, cam, grid, slot)
    assert not world.slot_truth[slot].damage and world.slot_truth[slot].tissue
    assert found.verdict == "tissue", found.message
    assert not found.cut                       # the survey zoomed out until the section lay inside
    tiles = tiles_covering(found.outline_nm, planner.tile_px, planner.pixel_nm, planner.overlap)
    assert len(tiles) >= grid * grid
    # The outline is the simulator's trapezoid: its centre within a few overview pixels.
    assert np.abs(centroid(found.outline_nm) - centroid(world.section_corners_nm(slot))).max() < 4 * ov.pixel_nm + 200


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


@pytest.mark.parametrize(("seed", "cam", "grid", "slot", "kind", "said"),
                         [(4, 512, 2, 8, "fold", "folded"), (1, 256, 2, 6, "fold", "folded"),
                          (2, 256, 3, 7, "tear", "torn"), (1, 256, 2, 5, "tear", "torn")])
def test_a_fold_or_a_tear_across_the_section_is_flagged(seed: int, cam: int, grid: int, slot: int,
                                                        kind: str, said: str) -> None:
    # A fold a few overview pixels wide (its darkness within the tissue's own range) and a
    # tear about one pixel wide: each a straight strip across the whole section.
    world, _, _, found, _ = judge(seed, cam, grid, slot)
    assert world.slot_truth[slot].damage == (kind,)
    assert found.verdict == "damaged", found.message
    assert said in found.message


@pytest.mark.parametrize(("seed", "cam", "grid", "slot"), [(15, 512, 3, 0), (12, 256, 3, 0)])
def test_pale_tissue_is_neither_holed_nor_empty(seed: int, cam: int, grid: int, slot: int) -> None:
    # Pale cells in a vignetted field read as film against one film level; and a first
    # field inside a pale section has too little contrast to see tissue in: it steps out.
    world, _, _, found, _ = judge(seed, cam, grid, slot)
    assert world.slot_truth[slot].tissue and not world.slot_truth[slot].damage
    assert found.verdict == "tissue", found.message


class _NoColumnEngine:
    """What RoiPlanner.overview uses of the engine, on a scope without a column driver."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.scope = SimpleNamespace(column=None)
        self.bus = SimpleNamespace(emit=lambda event: None)
        self.taken: list[tuple[float, float]] = []

    async def boundary(self) -> None:
        return None

    async def expose_at(self, tile: TilePlan, nxt: TilePlan | None = None) -> tuple[object, float, float]:
        self.taken.append((tile.y_nm, tile.x_nm))
        frame = self.world.expose(20.0, stage_nm=np.array([tile.y_nm, tile.x_nm]))
        return SimpleNamespace(data=frame), tile.x_nm, tile.y_nm


def test_mosaic_overview_grows_until_it_sees_past_the_section() -> None:
    # The grid's footprint (2 x 2 frames) lies inside the section: the mosaic adds rings
    # of frames until film shows around it, each frame taken once.
    cfg = parse_config({"scope": {"camera": {"width": 512, "height": 512}},
                        "run": {"roi": "auto", "seed": 1, "grid": [2, 2], "slots": [0]}})
    planner = make_planner(cfg)
    world = SimWorld(sim_world_params(cfg))
    world.tape.goto(0)
    engine = _NoColumnEngine(world)
    try:
        ov, found = asyncio.run(planner.overview(engine, 0))      # type: ignore[arg-type]
    finally:
        world.close()
    assert found.verdict == "tissue", found.message
    assert not found.inside()
    assert len(engine.taken) == len(set(engine.taken)) > 4
    side = round(len(engine.taken) ** 0.5)
    assert ov.image.shape == (side * 512 // 8, side * 512 // 8)
    assert np.abs(centroid(found.outline_nm) - centroid(world.section_corners_nm(0))).max() < 4 * ov.pixel_nm + 200
