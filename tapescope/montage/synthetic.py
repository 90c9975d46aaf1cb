"""Simulated section stacks with known transforms, for tests and the alignment benchmark.

Every section is ONE specimen image seen through its own known transform (rotation,
translation, a smooth elastic warp), plus noise. Using one image, not the specimen's
neighbouring sections, matters: real adjacent sections differ in content, and on the
simulated specimen that moves the best alignment by a few pixels from the true
placement (docs/alignment.md), which would swamp a sub-pixel accuracy measurement.

Truth: raw_k(q) = base(G_k(q)). Section 0 is the reference frame, so the ideal aligned
section is out_k(p) = raw_k(M_k(p)) with G_k(M_k(p)) = G_0(p); the residual of an
estimated M_k at p is |G_k(M_k(p)) - G_0(p)| in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from tapescope.neurites import NeuriteParams, NeuriteSpecimen

from .transform import SectionTransform


@dataclass
class TrueWarp:
    """G: raw pixel (x, y) -> base pixel: rotation about the centre, shift, elastic."""
    angle_deg: float
    shift_xy: tuple[float, float]
    centre_xy: tuple[float, float]
    pad: float
    waves: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # each wave: (amplitude px, kx, ky, phase, direction angle) -> a smooth displacement

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.radians(self.angle_deg)
        cx, cy = self.centre_xy
        u, v = x - cx, y - cy
        bx = np.cos(a) * u - np.sin(a) * v + cx + self.shift_xy[0] + self.pad
        by = np.sin(a) * u + np.cos(a) * v + cy + self.shift_xy[1] + self.pad
        for amp, kx, ky, ph, d in self.waves:
            s = amp * np.sin(kx * x + ky * y + ph)
            bx = bx + s * np.cos(d)
            by = by + s * np.sin(d)
        return bx, by


@dataclass
class SimStack:
    images: list[np.ndarray]          # raw sections, float32
    valid: list[np.ndarray]           # where each section was imaged
    truth: list[TrueWarp]
    missing: list[int]                # sections that hold no tissue (blank)

    def residual(self, z: int, transform: SectionTransform, step: int = 8,
                 chain: dict[int, SectionTransform] | None = None) -> np.ndarray:
        """Residual displacement (px) of an estimated transform of section z against the
        truth, on a grid of output pixels whose source lies inside section z's image and,
        with `chain` (the other sections' transforms), inside each of theirs: where a
        section was aligned through a chain of neighbours, only the area the chain shares
        is determined by the data."""
        err = self.residual_map(z, transform, step, chain)
        return err[np.isfinite(err)]

    def residual_map(self, z: int, transform: SectionTransform, step: int = 8,
                     chain: dict[int, SectionTransform] | None = None) -> np.ndarray:
        """`residual` on its grid (output pixels every `step`), nan where it is not taken."""
        h, w = self.images[0].shape
        y, x = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
        ok = self.valid[0][y.astype(int), x.astype(int)].copy()
        for zz, t in {**(chain or {}), z: transform}.items():
            sx, sy = t.apply(x, y)
            inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
            iy = np.clip(np.rint(sy), 0, h - 1).astype(int)
            ix = np.clip(np.rint(sx), 0, w - 1).astype(int)
            ok &= inside & self.valid[zz][iy, ix]
        sx, sy = transform.apply(x[ok], y[ok])
        gx, gy = self.truth[z].apply(sx, sy)
        rx, ry = self.truth[0].apply(x[ok], y[ok])
        err = np.full(x.shape, np.nan)
        err[ok] = np.hypot(gx - rx, gy - ry)
        return err


    def mutual_residual(self, transforms: dict[int, SectionTransform], step: int = 8) -> np.ndarray:
        """Residual (px) between every two sections of `transforms` where both are imaged:
        |G_a(T_a(p)) - G_b(T_b(p))|, the distance between the specimen points the two draw
        at the same output pixel. Free of the stack's frame, which a stack-wide solve chooses
        from all sections (no section is the reference): this is what tracing across
        sections needs."""
        h, w = self.images[0].shape
        y, x = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
        where: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for z, t in transforms.items():
            sx, sy = t.apply(x, y)
            inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
            iy = np.clip(np.rint(sy), 0, h - 1).astype(int)
            ix = np.clip(np.rint(sx), 0, w - 1).astype(int)
            gx, gy = self.truth[z].apply(sx, sy)
            where[z] = (inside & self.valid[z][iy, ix], gx, gy)
        out = []
        zs = sorted(where)
        for k, a in enumerate(zs):
            for b in zs[k + 1:]:
                ok = where[a][0] & where[b][0]
                out.append(np.hypot(where[a][1] - where[b][1], where[a][2] - where[b][2])[ok])
        return np.concatenate(out) if out else np.zeros(0)


def make_stack(
    n: int = 6, shape: tuple[int, int] = (768, 768), *, seed: int = 0, max_rotation_deg: float = 5.0,
    max_shift_px: float = 200.0, elastic_px: float = 3.0, missing: tuple[int, ...] = (3,),
    partial: tuple[int, ...] = (), noise: float = 0.02,
) -> SimStack:
    """n sections of `shape` cut from one specimen image; sections in `missing` are blank
    resin, sections in `partial` were imaged over only part of their area."""
    rng = np.random.default_rng(seed)
    h, w = shape
    pad = int(max_shift_px + np.hypot(h, w) / 2 * np.sin(np.radians(max_rotation_deg)) + 4 * elastic_px + 16)
    params = NeuriteParams(height_px=h + 2 * pad, width_px=w + 2 * pad, n_sections=1, seed=seed + 11)
    base = NeuriteSpecimen(params).section(0)
    images, valid, truth = [], [], []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for z in range(n):
        if z == 0:
            g = TrueWarp(0.0, (0.0, 0.0), ((w - 1) / 2, (h - 1) / 2), pad)
        else:
            waves = []
            for _ in range(3):
                wl = rng.uniform(300, 700)
                d = rng.uniform(0, np.pi)
                waves.append((elastic_px / np.sqrt(3) * rng.uniform(0.7, 1.0), 2 * np.pi / wl * np.cos(d),
                              2 * np.pi / wl * np.sin(d), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)))
            ang = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
            shift = tuple(float(s) for s in rng.uniform(-max_shift_px, max_shift_px, 2) / np.sqrt(2))
            g = TrueWarp(ang, shift, ((w - 1) / 2, (h - 1) / 2), pad, waves)
        truth.append(g)
        bx, by = g.apply(xx, yy)
        img = cv2.remap(base, bx.astype(np.float32), by.astype(np.float32), cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_REFLECT)
        v = np.ones(shape, bool)
        if z in missing:
            img = np.full(shape, 0.97, np.float32)
        if z in partial:
            v[:, int(w * 0.6):] = False
        img = img * (1 + noise * rng.normal(0, 1, shape)).astype(np.float32)
        images.append(np.where(v, img, 0).astype(np.float32))
        valid.append(v)
    return SimStack(images, valid, truth, list(missing))
