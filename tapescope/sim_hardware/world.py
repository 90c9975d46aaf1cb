"""The one simulated world that every emulator shares: the specimen on the tape, the camera's
sensor, the faults, and one model per device (stage_model.py, tape_model.py, column_model.py).

Coordinates: the stage's (y, x) in nanometres, (0, 0) at the beam axis when the stage is
home. Slot k of the tape carries section k of the specimen. Its *aperture* (the hole in
the tape) lands at ``aperture_offsets_nm[k]`` (the tape's position error); the section
lies in it at ``slot_offsets_nm[k]`` (stage coordinates of the section's centre), turned
by ``slot_rotation_deg[k]``. ``slot_truth[k]`` says what is in the slot (tissue, empty,
folded, torn, blank resin): the truth that tests and the acquisition engine's QC measure
against.

The stage has a *true* position, which the camera sees, and an *encoder* position, which
the stage reports: they differ by the repeatability error and backlash of each move, so
stitching has real stage error to correct. A move changes the true position at once (the
camera sees the end point); the travel and settle time only show in the stage's busy
status and its readback while moving (see docs/simulator.md).

The column sets what the camera sees: the beam must be on (high tension ON, not blanked)
or frames are dark; the magnification sets the pixel size (``imaging_mag`` gives
``pixel_nm``); defocus against the section's true focus, which drifts, blurs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from tapescope.specimen import Specimen, SpecimenParams

from . import defocus
from .column_model import ColumnModel
from .faults import FaultBook
from .outline import Outline, draw_outline, outline_alpha
from .params import WorldParams
from .stage_model import StageModel
from .tape_model import TapeModel

SECTION_CACHE = 3   # rendered sections kept: the one under the beam, the one before, the next


@dataclass(frozen=True)
class SlotTruth:
    """What one tape slot holds. Regions are in section pixels (y0, x0, y1, x1) or lines."""

    slot: int
    tissue: bool
    damage: tuple[str, ...] = ()               # "fold", "tear", "resin"
    regions: dict[str, tuple[float, ...]] = field(default_factory=dict)


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
        # Each from its own generator: adding them left the older draws unchanged, and
        # slot k's values do not depend on the number of slots or on the other params.
        def draw(stream: int) -> np.random.Generator:
            return np.random.default_rng([p.seed, stream])

        self.slot_rotation_deg = p.slot_rotation_sigma_deg * draw(8).standard_normal(p.n_slots)
        self.aperture_offsets_nm = p.tape_position_sigma_nm * draw(9).standard_normal((p.n_slots, 2))
        self.focus_offsets_nm = p.focus_offset_sigma_nm * draw(10).standard_normal(p.n_slots)
        self._focus_phase = float(draw(12).uniform(0, 2 * math.pi))
        self.slot_truth = [self._draw_truth(k, np.random.default_rng([p.seed, 11, k])) for k in range(p.n_slots)]
        self.slot_outlines: list[Outline] = [draw_outline(*p.section_px, np.random.default_rng([p.seed, 13, k]))
                                             for k in range(p.n_slots)]
        self.rng = np.random.default_rng(p.seed + 1000)
        self.faults = FaultBook()
        self.t0 = time.monotonic()
        # One model per device; the world holds what they share (specimen, sensor, faults).
        self.stage = StageModel(p, self.faults, self.rng)
        self.tape = TapeModel(p, self.faults, self.prefetch)
        self.column = ColumnModel(p)
        self.frame_id = 0
        self._sections: OrderedDict[int, Future[list[np.ndarray]]] = OrderedDict()
        self._render_lock = threading.Lock()   # the camera's thread and the prefetcher share the cache
        self._prefetcher: ThreadPoolExecutor | None = None
        self._sensor_cache: dict[tuple, tuple[np.ndarray | None, np.ndarray]] = {}

    def inject(self, name: str, count: int = 1, *, after: int = 0, **options: object) -> None:
        """Arm a fault (see faults.FAULTS and docs/simulator.md)."""
        self.faults.inject(name, count, after=after, **options)

    # -- specimen on the tape -----------------------------------------------------------
    def _draw_truth(self, slot: int, rng: np.random.Generator) -> SlotTruth:
        p = self.p
        u = rng.uniform(size=5)
        h, w = p.section_px
        if slot < p.intact_slots:
            return SlotTruth(slot, True)
        if u[0] < p.p_empty:
            return SlotTruth(slot, False)
        damage: list[str] = []
        regions: dict[str, tuple[float, ...]] = {}
        geo = rng.uniform(size=(3, 4))
        if u[1] < p.p_fold:
            # A straight fold: a line through the section, a band of doubled tissue beside it.
            y0, y1 = geo[0, 0] * h, geo[0, 1] * h
            regions["fold"] = (y0, 0.0, y1, float(w), 0.02 * min(h, w) * (1 + geo[0, 2]))
            damage.append("fold")
        if u[2] < p.p_tear:
            x0, x1 = (0.2 + 0.6 * geo[1, 0]) * w, (0.2 + 0.6 * geo[1, 1]) * w
            regions["tear"] = (0.0, x0, float(h), x1, 0.01 * min(h, w) * (1 + geo[1, 2]))
            damage.append("tear")
        if u[3] < p.p_resin:
            cy, cx = geo[2, 0] * h, geo[2, 1] * w
            r = (0.1 + 0.15 * geo[2, 2]) * min(h, w)
            regions["resin"] = (cy, cx, r)
            damage.append("resin")
        return SlotTruth(slot, True, tuple(damage), regions)

    def _damaged_section(self, slot: int) -> np.ndarray:
        truth = self.slot_truth[slot]
        h, w = self.p.section_px
        film = np.float32(self.p.film_transmission)
        if not truth.tissue:
            return np.full((h, w), film, np.float32)
        img = self.specimen.section(slot)
        if truth.damage:
            img = self._apply_damage(slot, img)
        # The section's own outline last: outside it (and in its holes) the beam sees film.
        alpha = outline_alpha(h, w, self.slot_outlines[slot], np.random.default_rng([self.p.seed, 14, slot]))
        return (film + (img - film) * alpha).astype(np.float32)

    def _apply_damage(self, slot: int, img: np.ndarray) -> np.ndarray:
        truth = self.slot_truth[slot]
        h, w = self.p.section_px
        film = np.float32(self.p.film_transmission)
        img = img.copy()
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        noise = cv2.GaussianBlur(np.random.default_rng([self.p.seed, slot, 3]).normal(0, 1, (h, w))
                                 .astype(np.float32), (0, 0), max(h, w) / 80) * (max(h, w) / 20)
        if "resin" in truth.regions:
            cy, cx, r = truth.regions["resin"]
            d = np.hypot(yy - cy, xx - cx) + noise * 0.5 - r
            a = np.clip(0.5 - d / 6, 0, 1)           # soft, ragged edge of the empty patch
            img = img * (1 - a) + np.float32(0.9) * a  # embedding resin: a little less clear than film
        if "fold" in truth.regions:
            y0, x0, y1, x1, width = truth.regions["fold"]
            # Signed distance to the fold line (the crease, from edge to edge of the section);
            # the band on one side is film lying twice: its attenuation adds, so the
            # transmissions multiply. Straight parallel edges, across the whole section.
            n = np.array([x1 - x0, -(y1 - y0)]) / math.hypot(y1 - y0, x1 - x0)   # (y, x), normal to it
            d = (yy - y0) * np.float32(n[0]) + (xx - x0) * np.float32(n[1])
            band = (d > 0) & (d < width)
            img = np.where(band, img * np.roll(img, int(width), axis=0), img)
            img *= 1 - 0.5 * np.exp(-((d / 3) ** 2)).astype(np.float32)  # the crease itself
        if "tear" in truth.regions:
            _, x0, _, x1, width = truth.regions["tear"]
            centre = x0 + (x1 - x0) * yy / h + noise
            gap = np.abs(xx - centre) < width / 2
            img = np.where(gap, film, img)
        return img.astype(np.float32)

    def section_image(self, slot: int) -> np.ndarray:
        """The section's transmission at pixel_nm, damage included (float32, 0..1)."""
        return self._levels(slot, 0)[0]

    def _levels(self, slot: int, level: int) -> list[np.ndarray]:
        """Pyramid of the section image (2x area means), cached for the latest slots."""
        pyr = self._section_future(slot).result()
        with self._render_lock:
            while len(pyr) <= level:
                src = pyr[-1]
                pyr.append(cv2.resize(src, (max(1, src.shape[1] // 2), max(1, src.shape[0] // 2)),
                                      interpolation=cv2.INTER_AREA))
        return pyr

    def _section_future(self, slot: int, *, background: bool = False) -> Future[list[np.ndarray]]:
        """The cached render of a slot's section; started now, in this thread or the prefetcher."""
        with self._render_lock:
            fut = self._sections.get(slot)
            if fut is not None:
                self._sections.move_to_end(slot)
                return fut
            if background:
                if self._prefetcher is None:
                    self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="sim-section")
                fut = self._prefetcher.submit(lambda: [self._damaged_section(slot)])
            else:
                fut = Future()
            self._sections[slot] = fut
            while len(self._sections) > SECTION_CACHE:
                self._sections.popitem(last=False)
        if not background:
            try:
                fut.set_result([self._damaged_section(slot)])
            except BaseException as exc:
                fut.set_exception(exc)
                with self._render_lock:
                    self._sections.pop(slot, None)
                raise
        return fut

    def prefetch(self, slot: int) -> None:
        """Render a slot's section in the background (the tape calls this on a move), so
        that the first frame of a section does not wait seconds for it."""
        if 0 <= slot < self.p.n_slots:
            self._section_future(slot, background=True)

    def close(self) -> None:
        """Stop the background renderer (pending renders are dropped)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

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

    def _sensor(self, binning: int, roi: tuple[int, int, int, int]) -> tuple[np.ndarray | None, np.ndarray]:
        """For a binning and ROI (y, x, h, w): where each output pixel looks on the sensor
        after lens distortion (x, y float32 map, None without distortion), and its gain."""
        key = (binning, roi)
        if key not in self._sensor_cache:
            p = self.p
            sh, sw = p.tile_px
            y, x, h, w = roi
            b = binning
            gain = self.gain[y:y + h, x:x + w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
            sensor_map = None
            if p.lens_distortion_px:
                rr = (y + b * np.arange(h // b) + (b - 1) / 2).astype(np.float32)
                cc = (x + b * np.arange(w // b) + (b - 1) / 2).astype(np.float32)
                yy, xx = np.meshgrid(rr - sh / 2, cc - sw / 2, indexing="ij")
                corner2 = (sh / 2) ** 2 + (sw / 2) ** 2
                # Barrel distortion: a pixel at radius r sees the specimen at r (1 + k r^2).
                k = p.lens_distortion_px / math.sqrt(corner2) / corner2
                f = 1 + k * (yy * yy + xx * xx)
                sensor_map = np.dstack([xx * f + sw / 2, yy * f + sh / 2]).astype(np.float32)
            self._sensor_cache[key] = (sensor_map, gain.astype(np.float32))
        return self._sensor_cache[key]

    def pixel_nm_now(self) -> float:
        """Pixel size at the specimen at the column's present magnification."""
        return self.column.pixel_nm()

    def true_focus_nm(self, slot: int, t: float | None = None) -> float:
        """Where the section of `slot` is in focus now (it drifts slowly with time)."""
        p = self.p
        t = time.monotonic() if t is None else t
        drift = p.focus_drift_nm * math.sin(2 * math.pi * (t - self.t0) / p.focus_drift_period_s
                                            + self._focus_phase)
        return float(self.focus_offsets_nm[slot] + drift)

    def transmission_at(self, slot: int, centre_nm: np.ndarray, *, binning: int = 1,
                        roi: tuple[int, int, int, int] | None = None,
                        pixel_nm: float | None = None) -> np.ndarray:
        """What the beam sees for a frame with the stage at centre_nm (y, x)."""
        p = self.p
        sh, sw = p.tile_px
        roi = roi or (0, 0, sh, sw)
        b = binning
        pix = self.pixel_nm_now() if pixel_nm is None else pixel_nm
        out_h, out_w = roi[2] // b, roi[3] // b
        sensor_map, _ = self._sensor(b, roi)
        # Affine from sensor pixel (x, y) to stage nm (y, x): stage = centre + (sensor - half) * pix.
        theta = math.radians(self.slot_rotation_deg[slot])
        level = max(0, math.floor(math.log2(b * pix / p.pixel_nm) + 1e-9))
        d = 2.0 ** level
        pyr = self._levels(slot, level)
        src = pyr[level]
        c, s = math.cos(-theta), math.sin(-theta)
        rot = np.array([[c, -s], [s, c]])           # acts on (y, x) slot-frame vectors
        base = centre_nm - self.slot_offsets_nm[slot]
        # specimen px (y, x) = rot @ (base + (sensor_yx - half) * pix) / pixel_nm + S/2
        k = pix / p.pixel_nm
        a_yx = rot * k                                # d specimen / d sensor (y, x)
        b_yx = rot @ (base / p.pixel_nm - k * np.array([sh / 2, sw / 2])) + np.array(p.section_px) / 2
        # level px = (specimen + 0.5) / d - 0.5; in OpenCV's (x, y) order.
        m = np.array([
            [a_yx[1, 1], a_yx[1, 0], b_yx[1]],
            [a_yx[0, 1], a_yx[0, 0], b_yx[0]],
        ]) / d
        m[:, 2] += 0.5 / d - 0.5
        film = p.film_transmission
        if sensor_map is None:
            # Output pixel -> sensor pixel is itself affine (binning, ROI offset).
            o = np.array([[b, 0, roi[1] + (b - 1) / 2], [0, b, roi[0] + (b - 1) / 2], [0, 0, 1]])
            t = cv2.warpAffine(src, (np.vstack([m, [0, 0, 1]]) @ o)[:2].astype(np.float32), (out_w, out_h),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=film)
        else:
            src_map = cv2.transform(sensor_map, m.astype(np.float32))
            t = cv2.remap(src, src_map, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=film)
        return self._apply_aperture(slot, t, centre_nm, pix, b, roi)

    def section_corners_nm(self, slot: int) -> np.ndarray:
        """Stage coordinates (y, x) of the corners of the section's trapezoid (the truth for
        ROI finding; its edges wave a little about the lines between them)."""
        theta = math.radians(self.slot_rotation_deg[slot])
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, -s], [s, c]])           # section frame -> slot frame, (y, x)
        # Section pixel i lies at (i - size / 2) pixels from the section's centre (transmission_at).
        corners = (self.slot_outlines[slot].corners - np.array(self.p.section_px) / 2) * self.p.pixel_nm
        return corners @ rot.T + self.slot_offsets_nm[slot]

    def aperture_half_nm(self) -> np.ndarray:
        """Half size (y, x) of a slot's aperture in nm."""
        return np.array(self.p.section_px) * self.p.pixel_nm * self.p.aperture_scale / 2

    def _apply_aperture(self, slot: int, t: np.ndarray, centre_nm: np.ndarray, pix: float, b: int,
                        roi: tuple[int, int, int, int]) -> np.ndarray:
        p = self.p
        sh, sw = p.tile_px
        half = self.aperture_half_nm()
        radius = p.aperture_corner * 2 * half.min()
        rel = centre_nm - self.aperture_offsets_nm[slot]
        # Frame corners relative to the aperture centre (distortion adds a pixel or two).
        span = (np.array([sh, sw]) / 2 + 4) * pix
        if np.all(np.abs(rel) + span <= half - radius):
            return t                                  # wholly inside: the common, fast case
        y, x, h, w = roi
        ys = (rel[0] + (y + b * np.arange(h // b) + (b - 1) / 2 - sh / 2) * pix).astype(np.float32)
        xs = (rel[1] + (x + b * np.arange(w // b) + (b - 1) / 2 - sw / 2) * pix).astype(np.float32)
        qy = np.abs(ys) - (half[0] - radius)
        qx = np.abs(xs) - (half[1] - radius)
        edge = max(pix, 50.0)                          # the tape's edge, about 50 nm soft

        def opening(sdf: np.ndarray) -> np.ndarray:
            return np.clip(0.5 - sdf / edge, 0, 1).astype(np.float32)

        # Signed distance to a rounded rectangle. Away from the corners it is separable
        # (the distance to the nearer straight edge), so the full 2D formula runs only on
        # the corner blocks: an overview frame costs a few row and column vectors.
        a = np.minimum(opening(qy - radius)[:, None], opening(qx - radius)[None, :])
        band = radius + edge                            # beyond it the separable form is exact (0)
        rows, cols = np.flatnonzero((qy > 0) & (qy < band)), np.flatnonzero((qx > 0) & (qx < band))
        if rows.size and cols.size:
            a[np.ix_(rows, cols)] = opening(np.hypot(qy[rows][:, None], qx[cols][None, :]) - radius)
        tape = np.float32(p.tape_transmission)
        a *= t - tape                                   # t inside, the tape's own outside
        a += tape
        return a

    def beam_on(self) -> bool:
        return self.column.beam_on()

    def expose(self, exposure_ms: float, *, binning: int = 1,
               roi: tuple[int, int, int, int] | None = None, stage_nm: np.ndarray | None = None) -> np.ndarray:
        """One uint16 frame at the stage's true position, as the column lets the camera see it.

        stage_nm: the true (y, x) position at the exposure, when the pixels are rendered later
        (a camera reads out while the stage already moves on)."""
        p = self.p
        roi = roi or (0, 0, *p.tile_px)
        if self.faults.take("beam_trip") is not None:
            self.column.trip()
        _, gain = self._sensor(binning, roi)
        self.frame_id += 1
        if self.beam_on():
            pix = self.pixel_nm_now()
            at = self.stage.true if stage_nm is None else stage_nm
            t = self.transmission_at(self.tape.beam_slot, at, binning=binning, roi=roi, pixel_nm=pix)
            defocus_nm = abs(self.column.focus_nm - self.true_focus_nm(self.tape.beam_slot))
            t = defocus.blur(t, p.defocus_blur * defocus_nm / (pix * binning))
            electrons = cv2.multiply(t, gain, scale=p.electrons_per_ms * exposure_ms * binning * binning)
        else:
            electrons = np.zeros(gain.shape, np.float32)
        # Shot noise (Gaussian limit of Poisson: >= tens of electrons per pixel) and read
        # noise, summed in one draw: var = g^2 N + read^2 (digital binning sums the reads).
        # OpenCV's element-wise calls fuse what NumPy would do in several passes.
        g = p.counts_per_electron
        read2 = (p.read_noise_counts * binning) ** 2
        sigma = cv2.sqrt(cv2.addWeighted(electrons, g * g, electrons, 0.0, read2))
        # OpenCV's normal generator is ~4x NumPy's; seeding it from the world's generator
        # keeps frames reproducible for a seed (its state is per thread).
        cv2.setRNGSeed(int(self.rng.integers(2**31)))
        counts = np.empty(electrons.shape, np.float32)
        cv2.randn(counts, 0.0, 1.0)
        counts = cv2.multiply(counts, sigma)
        # + 0.5: the truncating cast below then rounds (counts are >= 0 after the clip).
        counts = cv2.addWeighted(counts, 1.0, electrons, g, p.dark_offset + 0.5)
        np.clip(counts, 0, 65535, out=counts)
        return counts.astype(np.uint16)

