"""The simulated world's physics, against the truth it exposes."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from tapescope.hardware.camera import Camera
from tapescope.hardware.errors import DeviceError
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import SimWorld, WorldParams

from .conftest import SMALL_WORLD

QUIET = dataclasses.replace(SMALL_WORLD, n_slots=40, lens_distortion_px=0.0, stage_error_sigma_nm=0.0,
                            slot_rotation_sigma_deg=0.0)


def kind(world: SimWorld, slot: int) -> str:
    t = world.slot_truth[slot]
    return "empty" if not t.tissue else ("+".join(t.damage) or "intact")


def test_slot_truth_is_fixed_by_the_seed() -> None:
    a = SimWorld(dataclasses.replace(QUIET, seed=1))
    b = SimWorld(dataclasses.replace(QUIET, seed=1, n_slots=20))
    kinds = [kind(a, k) for k in range(40)]
    assert kinds[:3] == ["intact"] * 3                      # the demo's slots hold tissue
    assert kinds[:20] == [kind(b, k) for k in range(20)]    # slot count changes nothing
    # Seed 1 (docs/simulator.md): 5 torn, 6 folded, 9 and 10 resin, 18 empty.
    assert [kinds[k] for k in (5, 6, 9, 10, 18)] == ["tear", "fold", "resin", "resin", "empty"]
    assert {"empty", "fold", "tear", "resin"} <= {k for kk in kinds for k in kk.split("+")}


def test_damage_shows_where_the_truth_says() -> None:
    w = SimWorld(dataclasses.replace(QUIET, seed=1))
    film = w.p.film_transmission
    assert np.all(w.section_image(18) == np.float32(film))  # empty slot: film only
    cy, cx, r = w.slot_truth[9].regions["resin"]
    resin = w.section_image(9)
    patch = resin[int(cy) - int(r / 3):int(cy) + int(r / 3), int(cx) - int(r / 3):int(cx) + int(r / 3)]
    assert patch.std() < 0.02 and patch.mean() == pytest.approx(0.9, abs=0.02)  # no tissue there
    intact = w.specimen.section(9)
    assert intact[int(cy), int(cx)] != pytest.approx(resin[int(cy), int(cx)], abs=1e-3)
    torn = w.section_image(5)
    assert (torn == np.float32(film)).mean() > 0.005        # a gap of bare film runs across
    assert (w.specimen.section(5) == np.float32(film)).mean() == 0


def test_a_fold_is_the_film_twice_along_its_line_across_the_section() -> None:
    w = SimWorld(dataclasses.replace(QUIET, seed=1))
    assert w.slot_truth[6].damage == ("fold",)
    y0, x0, y1, x1, width = w.slot_truth[6].regions["fold"]
    folded, flat = w.section_image(6), w.specimen.section(6)
    n = np.array([x1 - x0, -(y1 - y0)]) / np.hypot(y1 - y0, x1 - x0)      # (y, x), to the band's side
    ratios = []
    for t in np.linspace(0.1, 0.9, 9):                                    # all along the crease
        band = np.array([y0 + t * (y1 - y0), x0 + t * (x1 - x0)]) + n * width / 2
        beside = band - n * width                                         # the other side: one layer
        for p, want in ((band, "twice"), (beside, "once")):
            y, x = np.round(p).astype(int)
            a, b = folded[y - 2:y + 3, x - 2:x + 3], flat[y - 2:y + 3, x - 2:x + 3]
            ratios.append((want, float(np.log(a).mean() / np.log(b).mean())))
    twice = [r for k, r in ratios if k == "twice"]
    once = [r for k, r in ratios if k == "once"]
    # Attenuations add: -log of the doubled film is about twice the single layer's.
    assert np.median(twice) > 1.6 and min(twice) > 1.2
    assert np.allclose(once, 1.0, atol=0.1)     # measured 1.01-1.05 beside it, against 1.6-2 in it


def test_rotation_turns_the_section() -> None:
    p = dataclasses.replace(QUIET, slot_offset_sigma_nm=0.0)
    plain, turned = SimWorld(p), SimWorld(p)
    turned.slot_rotation_deg[0] = 90.0
    a = plain.transmission_at(0, np.zeros(2))
    b = turned.transmission_at(0, np.zeros(2))

    def match(x: np.ndarray, y: np.ndarray) -> float:   # best correlation within a pixel of shift
        c = x[4:-4, 4:-4]
        return max(float(np.corrcoef(c.ravel(), np.roll(y, (dy, dx), (0, 1))[4:-4, 4:-4].ravel())[0, 1])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))

    # Positive angles turn the section counter-clockwise as displayed (x right, y down).
    assert match(b, np.rot90(a, 1)) > 0.95
    assert match(b, np.rot90(a, -1)) < 0.5


def test_lens_distortion_moves_the_corners_not_the_centre() -> None:
    straight = SimWorld(QUIET)
    bent = SimWorld(dataclasses.replace(QUIET, lens_distortion_px=4.0))
    a, b = straight.transmission_at(0, np.zeros(2)), bent.transmission_at(0, np.zeros(2))
    (dx, dy), _ = cv2.phaseCorrelate(a[48:80, 48:80].astype(np.float64), b[48:80, 48:80].astype(np.float64))
    assert abs(dx) < 0.3 and abs(dy) < 0.3
    # Barrel: a pixel at radius r sees the specimen at r (1 + k r^2), 4 px at the very corner.
    # The straight frame resampled so is the bent one in the corner, and resampled with half
    # or twice the distortion (or none) it is not. (One phase correlation over the corner is
    # no measure of it: the shift runs from 0.2 to 4 px across a 40 px patch, and the
    # estimate follows wherever the patch's membranes happen to be.)
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy - h / 2, xx - w / 2

    def misfit(corner_px: float) -> float:
        f = (1 + corner_px / np.hypot(h / 2, w / 2) ** 3 * (yy * yy + xx * xx)).astype(np.float32)
        seen = cv2.remap(a, xx * f + w / 2, yy * f + h / 2, cv2.INTER_CUBIC)
        return float(np.sqrt(np.mean((seen - b)[4:40, 4:40] ** 2)))

    assert misfit(4.0) < 0.3 * misfit(0.0)
    assert misfit(4.0) < min(misfit(2.0), misfit(8.0))


def test_backlash_depends_on_the_approach() -> None:
    w = SimWorld(dataclasses.replace(QUIET, stage_backlash_nm=40.0))
    w.stage.move(np.array([-5000.0, -5000.0]))
    w.stage.move(np.zeros(2))
    from_below = w.stage.true.copy()
    w.stage.move(np.array([5000.0, 5000.0]))
    w.stage.move(np.zeros(2))
    from_above = w.stage.true.copy()
    assert np.allclose(from_above - from_below, 40.0)
    assert np.allclose(w.stage.encoder, 0.0)               # the encoder reads the target either way


def test_hardware_limits_clip_a_move() -> None:
    w = SimWorld(dataclasses.replace(QUIET, stage_limits_nm=1e6))
    w.stage.move(np.array([0.0, 5e6]))
    assert w.stage.encoder[1] == 1e6


def test_true_focus_drifts_within_its_amplitude() -> None:
    w = SimWorld(QUIET)
    t = w.t0 + np.linspace(0, w.p.focus_drift_period_s, 50)
    focus = np.array([w.true_focus_nm(3, float(x)) for x in t])
    drift = focus - w.focus_offsets_nm[3]
    assert np.abs(drift).max() == pytest.approx(w.p.focus_drift_nm, rel=0.05)
    assert np.ptp(focus) > w.p.focus_drift_nm                # it really moves


async def test_binning_and_roi_over_tcp(sim: SimulatedScope) -> None:
    async with Camera("127.0.0.1", sim.camera.port) as cam:
        await cam.set_exposure(10)
        full = (await cam.trigger()).data.astype(np.float32)
        await cam.set_roi((32, 16, 64, 48))
        roi = (await cam.trigger()).data.astype(np.float32)
        assert roi.shape == (48, 64)
        # The same place on the sensor: the ROI is found there in the full frame. (Not a
        # correlation bound: where the ROI falls inside one neurite, as here, two exposures
        # of it correlate 0.37 through shot noise alone; 0.95-0.99 for seeds 1, 2, 4-6.)
        corr = cv2.matchTemplate(full, roi, cv2.TM_CCOEFF_NORMED)
        assert np.unravel_index(int(corr.argmax()), corr.shape) == (16, 32)
        await cam.set_binning(2)
        binned = await cam.trigger()
        assert binned.data.shape == (24, 32) and binned.meta["binning"] == 2
        dark = sim.world.p.dark_offset
        ratio = (binned.data.mean() - dark) / (roi.mean() - dark)
        assert ratio == pytest.approx(4.0, rel=0.05)         # 2x2 pixels' electrons summed
        status = await cam.status()
        assert status["binning"] == 2 and status["roi"] == [32, 16, 64, 48]
        with pytest.raises(DeviceError, match="multiple"):
            await cam.set_roi((0, 0, 63, 63))
        await cam.set_binning(1)
        await cam.set_roi(None)
        assert (await cam.trigger()).data.shape == sim.world.p.tile_px


def test_world_params_defaults_render_the_demo_fast_path() -> None:
    # At imaging magnification a tile well inside the aperture needs no aperture mask.
    w = SimWorld(WorldParams(n_slots=1, tile_px=(64, 64), section_px=(256, 256)))
    t = w.transmission_at(0, np.zeros(2))
    assert t.min() > 0.01                                   # no tape in view


def test_section_corners_are_where_the_camera_sees_the_section_edge() -> None:
    # A wide aperture: near the section corners there is film, not the aperture's rounded corner.
    w = SimWorld(dataclasses.replace(QUIET, slot_rotation_sigma_deg=3.0, tile_px=(64, 64), aperture_scale=3.0))
    film = w.p.film_transmission
    corners = w.section_corners_nm(4)
    centre = corners.mean(axis=0)
    assert np.allclose(centre, w.slot_offsets_nm[4])
    for corner in corners:
        # Just inside a corner: tissue in the frame's centre; just outside: bare film.
        inside = w.transmission_at(4, corner + (centre - corner) * 0.05)[30:34, 30:34]
        outside = w.transmission_at(4, corner + (corner - centre) * 0.05)[30:34, 30:34]
        assert np.all(outside == pytest.approx(film, abs=1e-3))
        assert not np.all(inside == pytest.approx(film, abs=1e-3))


def test_tape_move_renders_sections_ahead() -> None:
    w = SimWorld(QUIET)
    try:
        w.tape.goto(2)
        ahead = w._sections.get(3)
        assert ahead is not None and w._sections.get(2) is not None
        # The background render is the same picture as one rendered on demand.
        assert np.array_equal(ahead.result(timeout=60)[0], SimWorld(QUIET).section_image(3))
    finally:
        w.close()
