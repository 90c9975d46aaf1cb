"""A synthetic neuropil volume of neurites that move between sections as real tissue does.

The alignment tests' specimen; not yet the simulated world's (docs/simulator.md says why).

Neurites are tubes that run through the block: each has an axis that crosses the
section plane at a point that moves as z grows, and a section's cells are the power
diagram (a Voronoi diagram weighted by each neurite's calibre) of those points, so
membranes run continuously from one section to the next and move between sections the
way real tissue does (docs/simulator.md, "The specimen", has the measurements):

- a smooth tilt field, varying across the block over micrometres and slowly along z,
  carries the neurites of a region together, so a patch of tissue keeps moving the same
  way for several sections; its mean over the block drifts the whole section slowly;
- each neurite also has its own tilt, and neurites begin and end, so the picture changes
  within a patch as well;
- mitochondria are capsules inside a neurite that move with it; vesicles are small 3D
  spheres clustered in boutons;
- a fine texture that a TEM projects through the section, new in every section
  (`projected_texture`; 0 to compare with a block-face FIB-SEM).

A section is the slice at z = (index + 0.5) * thickness. Intensities follow TEM contrast:
stained membranes and organelles are dark (fewer electrons reach the camera), cytoplasm is
light. Everything is drawn from one seed, so the same (seed, section, region) always gives
the same picture: the ground truth that the stitching and alignment tests measure against.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from .specimen import SpecimenParams, draw_vesicles


@dataclass(frozen=True)
class NeuriteParams(SpecimenParams):
    """`SpecimenParams` and how the tissue moves with z (tilts are nm sideways per nm of depth)."""
    flow_tilt: float = 0.22           # RMS of the smooth tilt field
    flow_scale_nm: float = 2500.0     # its wavelength across the block (middle of the range drawn)
    flow_depth_nm: float = 1500.0     # its wavelength along z
    drift_tilt: float = 0.0           # a tilt common to the whole block (the field's own mean drifts it already)
    neurite_tilt: float = 0.5         # RMS of each neurite's own tilt
    neurite_length_nm: float = 800.0   # mean length of a neurite before it ends (or leaves)
    # RMS of the fine texture a TEM projects through the section (ribosomes, microtubules cut
    # across, stain: correlation length PROJECTED_NM), new in every section. Real ssTEM at
    # 4-4.6 nm holds 1.8x the fine contrast of the bare neurites (docs/simulator.md); a FIB-SEM
    # images a block face and holds less (0 to compare with one: bench_specimen_drift.py).
    projected_texture: float = 0.06


N_MODES = 24            # plane waves in the tilt field: enough that it looks random
MEMBRANE_NM = 7.0       # half-width of a stained membrane pair cut square
GRAIN_NM = 6.0          # correlation length of the cytoplasm's stain grain
GRAIN_CONTRAST = 0.02   # its RMS, relative
PROJECTED_NM = 8.0      # correlation length of the texture a TEM projects (projected_texture)
# Neurites per cell_diameter^2 of section (before thick ones take over thin ones). Twice as
# many looked more like the medulla's many small profiles, but let the alignment take
# another specimen for a neighbour (confidence 0.47, tests/test_montage_pipeline.py).
DENSITY = 1.0
MITO_PER_PROFILE = 0.2
WALL_SLANT = 0.3       # RMS slant of a neurite's membrane to the section's normal
TONE = (0.65, 0.90)   # cytoplasm's range from neurite to neurite


class NeuriteSpecimen:
    """Transmission (0..1, fraction of beam reaching the camera) of each section."""

    def __init__(self, params: NeuriteParams) -> None:
        self.p = p = params
        rng = np.random.default_rng(params.seed)
        depth_nm = p.n_sections * p.thickness_nm
        h_nm, w_nm = p.height_px * p.pixel_nm, p.width_px * p.pixel_nm
        spacing = p.cell_diameter_nm
        self._flow(rng)
        # Neurites: a centre (y, x) at their mid depth, a span in z, their own tilt and a
        # calibre. The area is padded by how far a neurite can travel sideways, so that the
        # section's edges are as full as its middle.
        length = p.neurite_length_nm
        reach = 3 * p.neurite_tilt * length / 2 + self._flow_reach + 2 * spacing
        z_lo, z_hi = -length, depth_nm + length
        area = (h_nm + 2 * reach) * (w_nm + 2 * reach)
        n = max(16, int(DENSITY * area / spacing**2 * (z_hi - z_lo) / length))
        self.centre = np.column_stack([rng.uniform(-reach, h_nm + reach, n),
                                       rng.uniform(-reach, w_nm + reach, n)])
        self.z_mid = rng.uniform(z_lo, z_hi, n)
        self.half_len = rng.exponential(length, n) / 2 + 0.25 * length
        self.tilt = rng.normal(0, p.neurite_tilt / np.sqrt(2), (n, 2))
        # Calibre as a power-diagram weight: most neurites thin, some thick (a thick one
        # takes over the thin ones near its axis).
        thick = rng.random(n) < 0.12
        self.radius = np.where(thick, rng.uniform(0.6, 1.4, n), rng.uniform(0.0, 0.45, n)) * spacing
        self.tone = rng.uniform(TONE[0], TONE[1], n)
        # How obliquely each neurite's membrane crosses the section (nm sideways per nm of
        # depth): a section is a slab, so an oblique membrane shows as a wider, paler band.
        self.wall_tilt = np.abs(rng.normal(0, WALL_SLANT, n))
        # Mitochondria: capsules (a span in z about z_c, a radius) in a neurite, off its axis.
        # About MITO_PER_PROFILE of the neurites in a section hold a mitochondrion: a
        # neurite is alive over 1.5 lengths on average, a mitochondrion over ~1 um.
        n_mito = max(4, int(n * MITO_PER_PROFILE * 1.5 * length / 1000.0))
        self.mito_owner = rng.integers(0, n, n_mito)
        self.mito_zc = self.z_mid[self.mito_owner] + rng.uniform(-1, 1, n_mito) * self.half_len[self.mito_owner]
        self.mito_half = rng.uniform(200, 800, n_mito)
        self.mito_r = rng.uniform(50, 120, n_mito)
        self.mito_offset = rng.normal(0, 0.12 * spacing, (n_mito, 2))
        # In-plane elongation (a mitochondrion that runs obliquely) and its direction.
        self.mito_aspect = 1 + rng.exponential(0.5, n_mito)
        self.mito_angle = rng.uniform(0, np.pi, n_mito)
        # Vesicles: ~40 nm spheres in clusters (boutons) in some neurites.
        n_boutons = max(3, n // 6)
        owner = rng.integers(0, n, n_boutons)
        zc = self.z_mid[owner] + rng.uniform(-1, 1, n_boutons) * self.half_len[owner]
        per = rng.integers(40, 140, n_boutons)
        ves = []
        for i, z, k in zip(owner, zc, per, strict=True):
            centre = self._axis(np.array([i]), z)[0]
            ves.append(np.column_stack([centre + rng.normal(0, 110, (k, 2)), z + rng.normal(0, 110, k)]))
        self.vesicles = np.concatenate(ves)
        self.vesicle_r = rng.uniform(16, 24, len(self.vesicles))
        self._texture_seed = int(rng.integers(0, 2**31))

    def _flow(self, rng: np.random.Generator) -> None:
        """The smooth tilt field: N_MODES plane waves in (y, x, z), plus a block-wide tilt
        whose direction turns slowly with z."""
        p = self.p
        wavelength = p.flow_scale_nm * rng.uniform(0.6, 1.6, N_MODES)
        angle = rng.uniform(0, 2 * np.pi, N_MODES)
        self._k = (2 * np.pi / wavelength)[:, None] * np.column_stack([np.sin(angle), np.cos(angle)])
        self._kz = 2 * np.pi / (p.flow_depth_nm * rng.uniform(0.6, 1.6, N_MODES)) * rng.choice([-1, 1], N_MODES)
        self._phase = rng.uniform(0, 2 * np.pi, N_MODES)
        direction = rng.uniform(0, 2 * np.pi, N_MODES)
        # Each wave's tilt amplitude, so that the field's RMS (both components) is flow_tilt.
        self._amp = p.flow_tilt * np.sqrt(2 / N_MODES) * np.column_stack([np.sin(direction), np.cos(direction)])
        self._drift_dir = float(rng.uniform(0, 2 * np.pi))
        self._drift_turn = 4 * p.flow_depth_nm          # nm of depth per radian of turn
        waves = float(np.abs(self._amp).sum(0).max() / np.abs(self._kz).min())
        self._flow_reach = waves + p.drift_tilt * 2 * self._drift_turn

    def _displacement(self, yx: np.ndarray, z: float) -> np.ndarray:
        """How far the tissue at yx (nm, at z = 0) has moved sideways at depth z: the tilt
        field integrated along z (in closed form: each wave's sine)."""
        arg = yx @ self._k.T + self._phase
        waves = (np.sin(arg + self._kz * z) - np.sin(arg)) / self._kz
        t, d = self._drift_turn, self._drift_dir
        drift = self.p.drift_tilt * t * np.array([np.cos(d) - np.cos(d + z / t), np.sin(d + z / t) - np.sin(d)])
        return waves @ self._amp + drift

    def _axis(self, idx: np.ndarray, z: float) -> np.ndarray:
        """Where the axes of neurites idx cross the plane z, nm (y, x)."""
        c = self.centre[idx]
        return c + self.tilt[idx] * (z - self.z_mid[idx])[:, None] + self._displacement(c, z)

    def z_nm(self, section: int) -> float:
        return (section + 0.5) * self.p.thickness_nm

    def section(self, index: int) -> np.ndarray:
        """Transmission image of one section, float32 in [0, 1], shape (height_px, width_px)."""
        p = self.p
        z = self.z_nm(index)
        spacing = p.cell_diameter_nm
        alive = np.flatnonzero(np.abs(z - self.z_mid) < self.half_len)
        axes = self._axis(alive, z)
        # A neurite ends by thinning away over its last 100 nm: its weight falls far below
        # its neighbours' and its cell closes.
        end = np.clip((np.abs(z - self.z_mid[alive]) - self.half_len[alive] + 100) / 100, 0, 1)
        weight = self.radius[alive] ** 2 * (1 - end) - end * (1.5 * spacing) ** 2
        # The power diagram through a plain nearest-neighbour search: lifting each point by
        # sqrt(C - weight) makes the 3D distance squared the power distance plus C.
        lift = np.sqrt(weight.max() + 1.0 - weight)
        tree = cKDTree(np.column_stack([axes, lift]))
        # The two nearest in power on a 4x coarser grid. Between two neurites the power
        # difference is linear in the position, so each coarse point's pair gives the
        # signed distance to the membrane between them at every pixel near it: exact at full
        # resolution (interpolating the distance itself would blunt its V-shaped minimum at
        # the membrane into dashes).
        step = 4
        ch, cw = -(-p.height_px // step), -(-p.width_px // step)
        gy = (np.arange(ch) * step + (step - 1) / 2) * p.pixel_nm
        gx = (np.arange(cw) * step + (step - 1) / 2) * p.pixel_nm
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        _, near = tree.query(np.column_stack([yy.ravel(), xx.ravel(), np.zeros(yy.size)]), k=2)
        a1, a2 = axes[near[:, 0]], axes[near[:, 1]]
        sep = np.maximum(np.linalg.norm(a1 - a2, axis=1), 1.0)
        normal = (a1 - a2) / sep[:, None]
        # s(q) = (P2 - P1) / (2 sep) = q . normal + offset, positive on neurite 1's side.
        offset = ((a2**2).sum(1) - (a1**2).sum(1) - weight[near[:, 1]] + weight[near[:, 0]]) / (2 * sep)
        size = (cw * step, ch * step)

        def fine(v: np.ndarray) -> np.ndarray:
            return cv2.resize(v.reshape(ch, cw), size, interpolation=cv2.INTER_NEAREST)[:p.height_px, :p.width_px]

        fy = (np.arange(p.height_px, dtype=np.float32) * p.pixel_nm)[:, None]
        fx = (np.arange(p.width_px, dtype=np.float32) * p.pixel_nm)[None, :]
        s = fine(normal[:, 0].astype(np.float32)) * fy
        s += fine(normal[:, 1].astype(np.float32)) * fx
        s += fine(offset.astype(np.float32))
        gap = np.abs(s)
        wall = self.wall_tilt[alive].astype(np.float32)
        slant = fine(wall[near[:, 0]] + wall[near[:, 1]]) * (p.thickness_nm / 2)
        tone_of = self.tone[alive].astype(np.float32)
        tone = np.where(s >= 0, fine(tone_of[near[:, 0]]), fine(tone_of[near[:, 1]]))
        tone = cv2.GaussianBlur(tone, (0, 0), 3)

        img = tone
        # A membrane pair is ~7 nm of stain; never thinner than about a pixel, as the
        # section's thickness and the optics spread it.
        membrane_nm = max(MEMBRANE_NM, 1.0 * p.pixel_nm)
        width = np.sqrt(membrane_nm**2 + slant**2)
        img *= 1 - 0.8 * np.sqrt(membrane_nm / width) * np.exp(-((gap / width) ** 2))
        # Extracellular space: a thin lighter band beside each membrane pair.
        img += 0.05 * np.exp(-(((gap - 2 * width) / 5) ** 2))

        self._draw_mitochondria(img, z)
        draw_vesicles(img, self.vesicles, self.vesicle_r, z, self.p.pixel_nm)
        # Fine granular texture of stained cytoplasm.
        trng = np.random.default_rng(self._texture_seed + index)
        grain = trng.standard_normal(img.shape, dtype=np.float32)
        blur = max(GRAIN_NM / p.pixel_nm, 0.8)
        grain = cv2.GaussianBlur(grain, (0, 0), blur)
        # Unit variance whatever the blur, then the stain's contrast.
        img *= 1 + GRAIN_CONTRAST * 2 * np.sqrt(np.pi) * blur * grain
        if p.projected_texture:
            fine = trng.standard_normal(img.shape, dtype=np.float32)
            blur = max(PROJECTED_NM / p.pixel_nm, 0.8)
            fine = cv2.GaussianBlur(fine, (0, 0), blur)
            img *= 1 + p.projected_texture * 2 * np.sqrt(np.pi) * blur * fine
        return np.clip(img, 0.02, 1.0, out=img)

    def _draw_mitochondria(self, img: np.ndarray, z: float) -> None:
        p = self.p
        dz = np.abs(z - self.mito_zc)
        owner = self.mito_owner
        # Only while its neurite is there: a mitochondrion does not outlive its neurite.
        on = np.flatnonzero((dz < self.mito_half) & (np.abs(z - self.z_mid[owner]) < self.half_len[owner]))
        if not len(on):
            return
        # Capsule: full radius along its middle, rounded over the last radius at each end.
        over = np.maximum(dz[on] - (self.mito_half[on] - self.mito_r[on]), 0)
        radius = np.sqrt(np.maximum(self.mito_r[on] ** 2 - over**2, 0))
        centres = self._axis(self.mito_owner[on], z) + self.mito_offset[on]
        for k, (cy, cx), r in zip(on, centres, radius, strict=True):
            long_r = r * self.mito_aspect[k]
            y0, x0 = max(int((cy - long_r) / p.pixel_nm) - 1, 0), max(int((cx - long_r) / p.pixel_nm) - 1, 0)
            y1 = min(int((cy + long_r) / p.pixel_nm) + 2, p.height_px)
            x1 = min(int((cx + long_r) / p.pixel_nm) + 2, p.width_px)
            if r < p.pixel_nm or y0 >= y1 or x0 >= x1:
                continue
            # Only the capsule's box, not the whole section.
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) * p.pixel_nm
            c, s = np.cos(self.mito_angle[k]), np.sin(self.mito_angle[k])
            u = ((yy - cy) * s + (xx - cx) * c) / self.mito_aspect[k]     # along its length, shrunk
            v = (xx - cx) * -s + (yy - cy) * c
            dist = np.hypot(u, v)
            inside = dist < r
            if not inside.any():
                continue
            region = img[y0:y1, x0:x1]
            # Dark matrix, a darker double membrane at the rim, lighter cristae stripes.
            cristae = 0.5 + 0.5 * np.cos(u * self.mito_aspect[k] / 28.0)
            matrix = 0.24 + 0.10 * cristae
            rim = np.exp(-(((dist - r) / 6.0) ** 2))
            region[inside] = (matrix * (1 - 0.6 * rim))[inside]
