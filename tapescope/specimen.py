"""A synthetic neuropil volume, cut into sections, as a TEM sees it.

Cells are the cells of a 3D Voronoi tessellation, so their membranes run continuously
from one section to the next; mitochondria are 3D capsules inside cells and vesicles
are small 3D spheres clustered in boutons. A section is the slice at z = index *
thickness. Intensities follow TEM contrast: stained membranes and organelles are dark
(fewer electrons reach the camera), cytoplasm is light, empty resin is lightest.

Everything is drawn from one seed, so the same (seed, section, region) always gives the
same picture: the ground truth of the simulated world and of the stitching tests' tile
sets. The alignment tests use `neurites.NeuriteSpecimen` (docs/simulator.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class SpecimenParams:
    height_px: int = 2048          # extent of every section, in imaging pixels
    width_px: int = 2048
    pixel_nm: float = 4.0
    thickness_nm: float = 40.0
    n_sections: int = 8
    cell_diameter_nm: float = 420.0
    seed: int = 1


class Specimen:
    """Transmission (0..1, fraction of beam reaching the camera) of each section."""

    def __init__(self, params: SpecimenParams) -> None:
        self.p = params
        rng = np.random.default_rng(params.seed)
        p = params
        depth_nm = p.n_sections * p.thickness_nm
        h_nm, w_nm = p.height_px * p.pixel_nm, p.width_px * p.pixel_nm
        vol = h_nm * w_nm * (depth_nm + 2 * p.cell_diameter_nm)
        n_cells = max(8, int(vol / p.cell_diameter_nm**3 * 1.5))
        # Seeds in nm, (y, x, z); z padded so the first/last sections are not special.
        self.seeds = np.column_stack([
            rng.uniform(-p.cell_diameter_nm, h_nm + p.cell_diameter_nm, n_cells),
            rng.uniform(-p.cell_diameter_nm, w_nm + p.cell_diameter_nm, n_cells),
            rng.uniform(-p.cell_diameter_nm, depth_nm + p.cell_diameter_nm, n_cells),
        ])
        self.cell_tone = rng.uniform(0.70, 0.88, n_cells)
        # Mitochondria: capsules (segment a->b, radius). Steep to the section plane, as in
        # neurites cut across: a capsule lying flat would slide far from section to section.
        n_mito = max(4, n_cells // 3)
        a = self.seeds[rng.integers(0, n_cells, n_mito)] + rng.normal(0, 60, (n_mito, 3))
        direction = rng.normal(0, 1, (n_mito, 3)) * np.array([0.45, 0.45, 1.0])
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        length = rng.uniform(250, 900, n_mito)
        self.mito_a = a
        self.mito_b = a + direction * length[:, None]
        self.mito_r = rng.uniform(55, 110, n_mito)
        # Vesicles: ~40 nm spheres in clusters (boutons) around a subset of seeds.
        n_boutons = max(3, n_cells // 4)
        centres = self.seeds[rng.integers(0, n_cells, n_boutons)]
        per = rng.integers(40, 140, n_boutons)
        self.vesicles = np.concatenate([
            c + rng.normal(0, 130, (k, 3)) for c, k in zip(centres, per, strict=True)
        ])
        self.vesicle_r = rng.uniform(16, 24, len(self.vesicles))
        self._texture_seed = int(rng.integers(0, 2**31))

    @cached_property
    def _tree(self) -> cKDTree:
        return cKDTree(self.seeds)

    def z_nm(self, section: int) -> float:
        return (section + 0.5) * self.p.thickness_nm

    def section(self, index: int) -> np.ndarray:
        """Transmission image of one section, float32 in [0, 1], shape (height_px, width_px)."""
        p = self.p
        z = self.z_nm(index)
        # Cells: Voronoi labels and the distance gap to the second-nearest seed, computed on
        # a 4x coarser grid and interpolated (the gap is smooth, so this costs no detail).
        step = 4
        gy = (np.arange(0, p.height_px, step) + step / 2) * p.pixel_nm
        gx = (np.arange(0, p.width_px, step) + step / 2) * p.pixel_nm
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        pts = np.column_stack([yy.ravel(), xx.ravel(), np.full(yy.size, z)])
        d, idx = self._tree.query(pts, k=2)
        gap = ((d[:, 1] - d[:, 0]) / 2).reshape(yy.shape).astype(np.float32)
        label = idx[:, 0].reshape(yy.shape)
        size = (p.width_px, p.height_px)
        gap = cv2.resize(gap, size, interpolation=cv2.INTER_LINEAR)
        tone = cv2.resize(self.cell_tone[label].astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
        tone = cv2.GaussianBlur(tone, (0, 0), 3)

        img = tone
        membrane_nm = 7.0
        img *= 1 - 0.75 * np.exp(-((gap / membrane_nm) ** 2))
        # Extracellular space: a thin lighter band beside each membrane pair.
        img += 0.05 * np.exp(-(((gap - 14) / 5) ** 2))

        self._draw_mitochondria(img, z)
        draw_vesicles(img, self.vesicles, self.vesicle_r, z, self.p.pixel_nm)
        # Fine granular texture of stained cytoplasm.
        trng = np.random.default_rng(self._texture_seed + index)
        grain = cv2.GaussianBlur(trng.normal(0, 1, img.shape).astype(np.float32), (0, 0), 1.5)
        img *= 1 + 0.06 * grain
        return np.clip(img, 0.02, 1.0, out=img)

    def _draw_mitochondria(self, img: np.ndarray, z: float) -> None:
        p = self.p
        for a, b, r in zip(self.mito_a, self.mito_b, self.mito_r, strict=True):
            # Cross-section of the capsule with the plane z: points whose distance to the
            # segment is < r. Skip capsules that do not reach this plane.
            if min(a[2], b[2]) - r > z or max(a[2], b[2]) + r < z:
                continue
            lo = (np.minimum(a[:2], b[:2]) - r) / p.pixel_nm
            hi = (np.maximum(a[:2], b[:2]) + r) / p.pixel_nm
            y0, x0 = np.maximum(np.floor(lo).astype(int), 0)
            y1, x1 = np.minimum(np.ceil(hi).astype(int), [p.height_px, p.width_px])
            if y0 >= y1 or x0 >= x1:
                continue
            yx = np.stack(np.mgrid[y0:y1, x0:x1], -1)   # only the capsule's box, not the whole section
            q = np.concatenate([yx * p.pixel_nm, np.full((y1 - y0, x1 - x0, 1), z)], -1)
            ab = b - a
            t = np.clip(((q - a) @ ab) / (ab @ ab), 0, 1)
            dist = np.linalg.norm(q - (a + t[..., None] * ab), axis=-1)
            inside = dist < r
            if not inside.any():
                continue
            region = img[y0:y1, x0:x1]
            # Dark matrix, a darker double membrane at the rim, lighter cristae stripes.
            cristae = 0.5 + 0.5 * np.cos(t * np.linalg.norm(ab) / 28.0)
            matrix = 0.42 + 0.12 * cristae
            rim = np.exp(-(((dist - r) / 6.0) ** 2))
            region[inside] = (matrix * (1 - 0.6 * rim))[inside]


def draw_vesicles(img: np.ndarray, vesicles: np.ndarray, radius_nm: np.ndarray, z: float, pixel_nm: float) -> None:
    """The vesicles (spheres: centres (n, 3) as (y, x, z) nm, radii in nm) cut by the section
    at depth z, drawn into `img` in place."""
    dz = np.abs(vesicles[:, 2] - z)
    sel = dz < radius_nm
    for (cy, cx, _), rr, d in zip(vesicles[sel], radius_nm[sel], dz[sel], strict=True):
        r_px = np.sqrt(rr**2 - d**2) / pixel_nm
        centre = (round(cx / pixel_nm * 4), round(cy / pixel_nm * 4))
        if r_px < 1.0:
            continue
        # A vesicle is a dark ring (its membrane) with a lighter lumen.
        cv2.circle(img, centre, round(r_px * 4), 0.5, thickness=2, shift=2, lineType=cv2.LINE_AA)
