"""The one simulated world that every emulator shares: tape, stage, beam, camera physics.

Coordinates: the stage's (x, y) in nanometres, (0, 0) at the centre of the aperture.
Slot k of the tape carries section k of the specimen, placed with a random offset (the
tape's slot position error). The stage has a *true* position, which the camera sees,
and an *encoder* position, which the stage reports: they differ by the repeatability
error of each move, so stitching has real stage error to correct.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from .specimen import Specimen, SpecimenParams


@dataclass(frozen=True)
class WorldParams:
    seed: int = 1
    n_slots: int = 16
    tile_px: tuple[int, int] = (512, 512)      # camera (height, width)
    pixel_nm: float = 4.0
    section_px: tuple[int, int] = (2048, 2048)  # specimen extent of each section
    thickness_nm: float = 40.0
    slot_offset_sigma_nm: float = 200.0        # where the section sits in its aperture
    stage_error_sigma_nm: float = 24.0         # repeatability: ~6 px at 4 nm/px
    stage_speed_nm_s: float = 2.0e6
    stage_settle_s: float = 0.01
    tape_s_per_slot: float = 0.02
    electrons_per_ms: float = 100.0            # at full transmission and gain 1
    counts_per_electron: float = 4.0
    dark_offset: float = 100.0
    read_noise_counts: float = 6.0
    vignetting: float = 0.25                   # relative fall-off at the sensor corner


class SimWorld:
    def __init__(self, params: WorldParams | None = None) -> None:
        self.p = p = params or WorldParams()
        rng = np.random.default_rng(p.seed)
        self.specimen = Specimen(SpecimenParams(
            height_px=p.section_px[0], width_px=p.section_px[1], pixel_nm=p.pixel_nm,
            thickness_nm=p.thickness_nm, n_sections=p.n_slots, seed=p.seed,
        ))
        self.slot_offsets_nm = rng.normal(0, p.slot_offset_sigma_nm, (p.n_slots, 2))
        self.barcodes = [f"TS{p.seed:03d}-{k:05d}" for k in range(p.n_slots)]
        self.gain = self._make_gain(rng)
        self.rng = np.random.default_rng(p.seed + 1000)
        # Stage state.
        self.stage_true = np.zeros(2)      # (y, x) nm
        self.stage_encoder = np.zeros(2)
        self.stage_busy_until = 0.0
        # Tape state.
        self.slot = 0
        self.tape_busy_until = 0.0
        self.frame_id = 0
        self._sections: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- camera physics ---------------------------------------------------------------
    def _make_gain(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.p.tile_px
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
        gain = 1.0 - self.p.vignetting * r2 / 2
        for _ in range(3):  # dust on the scintillator: soft dark blots
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(4, 12) * h / 512
            gain *= 1 - 0.15 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        return (gain / gain.mean()).astype(np.float32)

    def section_image(self, slot: int) -> np.ndarray:
        if slot in self._sections:
            self._sections.move_to_end(slot)
            return self._sections[slot]
        img = self.specimen.section(slot)
        self._sections[slot] = img
        while len(self._sections) > 2:
            self._sections.popitem(last=False)
        return img

    def transmission_at(self, slot: int, centre_nm: np.ndarray) -> np.ndarray:
        """What the beam sees for a tile centred at stage position centre_nm (y, x)."""
        h, w = self.p.tile_px
        sec = self.section_image(slot)
        sh, sw = sec.shape
        # Specimen pixel under the tile's top-left corner (sub-pixel).
        c = (centre_nm - self.slot_offsets_nm[slot]) / self.p.pixel_nm + np.array([sh, sw]) / 2
        y0, x0 = c[0] - h / 2, c[1] - w / 2
        m = np.float32([[1, 0, -x0], [0, 1, -y0]])
        # Outside the section is bare resin: nearly full transmission.
        return cv2.warpAffine(sec, m, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.97)

    def expose(self, exposure_ms: float) -> np.ndarray:
        """One uint16 frame at the stage's true position."""
        p = self.p
        t = self.transmission_at(self.slot, self.stage_true)
        electrons = p.electrons_per_ms * exposure_ms * t * self.gain
        counts = self.rng.poisson(electrons).astype(np.float32) * p.counts_per_electron
        counts += p.dark_offset + self.rng.normal(0, p.read_noise_counts, counts.shape)
        self.frame_id += 1
        return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

    # -- stage -------------------------------------------------------------------------
    def stage_move(self, target_nm: np.ndarray) -> None:
        dist = float(np.max(np.abs(target_nm - self.stage_encoder)))
        self.stage_encoder = target_nm.astype(float)
        self.stage_true = target_nm + self.rng.normal(0, self.p.stage_error_sigma_nm, 2)
        self.stage_busy_until = time.monotonic() + dist / self.p.stage_speed_nm_s + self.p.stage_settle_s

    def stage_busy(self) -> bool:
        return time.monotonic() < self.stage_busy_until

    def stage_halt(self) -> None:
        self.stage_busy_until = 0.0

    # -- tape --------------------------------------------------------------------------
    def tape_goto(self, slot: int) -> None:
        self.tape_busy_until = time.monotonic() + abs(slot - self.slot) * self.p.tape_s_per_slot
        self.slot = slot

    def tape_busy(self) -> bool:
        return time.monotonic() < self.tape_busy_until
