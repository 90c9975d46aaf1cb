"""Stacks with known truth for the alignment benchmark, and the residual against it.

A stack is made from sections that are already aligned (real ssTEM published aligned, or
the simulator's specimen cut into sections): each section z is seen through its own known
warp W_z (raw pixel -> truth pixel: rotation about the centre, translation, three smooth
waves), so raw_z(q) = truth_z(W_z(q)); pixels whose truth lies outside the section are
0 (not imaged). An aligner returns, for every output pixel p, the raw pixel T_z(p) it
draws there; it is right when W_z(T_z(p)) is the same truth point G(p) for every section.

The stack's frame is not determined by its sections (any map common to all of them fits
the data as well), so the residual is taken after removing the one affine G common to all
sections that fits best: |W_z(T_z(p)) - G(p)|, over output pixels whose raw point lies
inside the section's imaged area. `common_removed` also removes the mean of that error
over z at each p (a smooth warp shared by all sections), which no method can know either.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "sstem_cardona2010"


def real_sections() -> list[np.ndarray] | None:
    """The 16 real ssTEM sections (float32, 0..255), or None where the data is absent."""
    if not (REAL / "0.png").is_file():
        return None
    return [cv2.imread(str(REAL / f"{i}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) for i in range(16)]


@dataclass
class Warp:
    angle_deg: float
    shift_xy: tuple[float, float]
    centre_xy: tuple[float, float]
    waves: list[tuple[float, float, float, float, float]]   # amplitude, kx, ky, phase, direction

    @property
    def affine3(self) -> np.ndarray:
        """The rotation about the centre and the shift, 3x3 over (x, y, 1)."""
        a = np.radians(self.angle_deg)
        c, s = np.cos(a), np.sin(a)
        (cx, cy), (sx, sy) = self.centre_xy, self.shift_xy
        return np.array([[c, -s, cx - c * cx + s * cy + sx], [s, c, cy - s * cx - c * cy + sy], [0, 0, 1.0]])

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.radians(self.angle_deg)
        cx, cy = self.centre_xy
        u, v = x - cx, y - cy
        bx = np.cos(a) * u - np.sin(a) * v + cx + self.shift_xy[0]
        by = np.sin(a) * u + np.cos(a) * v + cy + self.shift_xy[1]
        for amp, kx, ky, ph, d in self.waves:
            s = amp * np.sin(kx * x + ky * y + ph)
            bx = bx + s * np.cos(d)
            by = by + s * np.sin(d)
        return bx, by


def random_warp(rng: np.random.Generator, shape: tuple[int, int], max_rotation_deg: float = 5.0,
                max_shift_frac: float = 0.1, elastic_px: float = 3.0) -> Warp:
    """Rotation <= max_rotation_deg, translation <= max_shift_frac of the section, and a
    smooth field of at most `elastic_px` (three waves of 0.6-1.4 section widths)."""
    h, w = shape
    waves = []
    for _ in range(3):
        wl = rng.uniform(0.6, 1.4) * max(h, w)
        d = rng.uniform(0, np.pi)
        waves.append((elastic_px / 3 * rng.uniform(0.7, 1.0), 2 * np.pi / wl * np.cos(d), 2 * np.pi / wl * np.sin(d),
                      rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)))
    ang = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    r = rng.uniform(0, max_shift_frac * min(h, w))
    t = rng.uniform(0, 2 * np.pi)
    return Warp(ang, (float(r * np.cos(t)), float(r * np.sin(t))), ((w - 1) / 2, (h - 1) / 2), waves)


@dataclass
class TruthStack:
    images: dict[int, np.ndarray]      # z -> raw section (0 where nothing was imaged)
    warps: dict[int, Warp]             # z -> W_z
    shape: tuple[int, int]


def make_truth_stack(sections: list[np.ndarray], seed: int, *, drop: tuple[int, ...] = (),
                     noise: float = 0.0, **warp: float) -> TruthStack:
    """Warp every section but those in `drop` by its own random warp."""
    rng = np.random.default_rng(seed)
    shape = sections[0].shape
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    images, warps = {}, {}
    for z, sec in enumerate(sections):
        wz = random_warp(rng, shape, **warp)
        if z in drop:
            continue
        bx, by = wz.apply(xx, yy)
        img = cv2.remap(sec.astype(np.float32), bx.astype(np.float32), by.astype(np.float32), cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inside = (bx >= 0) & (bx <= w - 1) & (by >= 0) & (by <= h - 1)
        if noise:
            img = img * (1 + noise * rng.normal(0, 1, shape)).astype(np.float32)
        images[z] = np.where(inside, np.maximum(img, 1e-3), 0).astype(np.float32)
        warps[z] = wz
    return TruthStack(images, warps, shape)


@dataclass
class Residual:
    per_z: dict[int, np.ndarray]        # z -> residual lengths (px), common affine removed
    per_z_common: dict[int, np.ndarray]  # ... and the common field removed

    def rms(self, common: bool = False) -> float:
        d = self.per_z_common if common else self.per_z
        allr = np.concatenate(list(d.values())) if d else np.zeros(0)
        return float(np.sqrt((allr ** 2).mean())) if allr.size else float("nan")

    def rms_z(self, common: bool = False) -> dict[int, float]:
        d = self.per_z_common if common else self.per_z
        return {z: float(np.sqrt((r ** 2).mean())) for z, r in sorted(d.items())}

    def growth(self) -> float:
        """Mean RMS of the last three sections over that of the first three."""
        r = list(self.rms_z().values())
        return float(np.mean(r[-3:]) / np.mean(r[:3])) if len(r) >= 6 else float("nan")


def _truth_points(stack: TruthStack, z: int, m: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output points, the truth points drawn there, their flat grid index) of a map, where it
    draws a pixel section z imaged."""
    h, w = stack.shape
    gh, gw = m.shape[:2]
    gy, gx = np.mgrid[0:gh, 0:gw] * step
    sx, sy = m[..., 0], m[..., 1]
    ok = np.isfinite(sx) & np.isfinite(sy) & (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    iy = np.clip(np.rint(np.nan_to_num(sy)), 0, h - 1).astype(int)
    ix = np.clip(np.rint(np.nan_to_num(sx)), 0, w - 1).astype(int)
    ok &= stack.images[z][iy, ix] > 0
    tx, ty = stack.warps[z].apply(sx[ok], sy[ok])
    return np.stack([gx[ok], gy[ok]], 1).astype(np.float64), np.stack([tx, ty], 1), np.flatnonzero(ok)


def residual(stack: TruthStack, maps: dict[int, np.ndarray], step: int = 8) -> Residual:
    """`maps[z]`: (gh, gw, 2) raw (x, y) drawn at output (i*step, j*step), nan where none."""
    pts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for z, m in maps.items():
        pts[z] = _truth_points(stack, z, m, step)
    # One affine G(p) for all sections, least squares.
    p = np.concatenate([v[0] for v in pts.values()])
    t = np.concatenate([v[1] for v in pts.values()])
    design = np.column_stack([p, np.ones(len(p))])
    g, *_ = np.linalg.lstsq(design, t, rcond=None)
    per_z, errs = {}, {}
    for z, (pz, tz, flat) in pts.items():
        e = tz - np.column_stack([pz, np.ones(len(pz))]) @ g
        errs[z] = (flat, e)
        per_z[z] = np.hypot(e[:, 0], e[:, 1])
    size = next(iter(maps.values())).shape[0] * next(iter(maps.values())).shape[1]
    total, count = np.zeros((size, 2)), np.zeros(size)
    for flat, e in errs.values():
        total[flat] += e
        count[flat] += 1
    mean = total / np.maximum(count, 1)[:, None]
    per_common = {z: np.hypot(*(e - mean[flat]).T) for z, (flat, e) in errs.items()}
    return Residual(per_z, per_common)


def transform_maps(transforms: dict, shape: tuple[int, int], step: int = 8) -> dict[int, np.ndarray]:
    """Maps (as `residual` takes them) of SectionTransforms."""
    h, w = shape
    gy, gx = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
    out = {}
    for z, t in transforms.items():
        sx, sy = t.apply(gx, gy)
        out[z] = np.stack([sx, sy], -1)
    return out


def invert(t: object, pts: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Output points p with t.apply(p) = pts (n, 2; x first), by fixed-point iteration (the
    field is smooth and small against the affine)."""
    inv = np.linalg.inv(t.affine3)  # type: ignore[attr-defined]
    p = pts @ inv[:2, :2].T + inv[:2, 2]
    for _ in range(iterations):
        sx, sy = t.apply(p[:, 0], p[:, 1])  # type: ignore[attr-defined]
        p = p - np.stack([sx - pts[:, 0], sy - pts[:, 1]], 1) @ inv[:2, :2].T
    return p


def consistency(stack: TruthStack, maps: dict[int, np.ndarray], reference: dict, step: int = 8) -> Residual:
    """Residual against the aligner's own result on the sections before they were warped
    (`reference`: z -> SectionTransform of that run), instead of against the published
    alignment: does the aligner undo the known warps, wherever it puts the sections? Blind
    to what both runs share (following the tissue's own drift, say), so it is reported
    beside `residual`, not instead of it."""
    per: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for z, m in maps.items():
        if z not in reference:
            continue
        pz, tz, _ = _truth_points(stack, z, m, step)
        per[z] = (pz, invert(reference[z], tz))
    p = np.concatenate([v[0] for v in per.values()])
    t = np.concatenate([v[1] for v in per.values()])
    g, *_ = np.linalg.lstsq(np.column_stack([p, np.ones(len(p))]), t, rcond=None)
    out = {z: np.hypot(*(p0 - np.column_stack([pz, np.ones(len(pz))]) @ g).T) for z, (pz, p0) in per.items()}
    return Residual(out, out)


def map_transform(m: np.ndarray, step: int = 8) -> object:
    """A sampled map (as `residual` takes it) as a SectionTransform: an affine fitted to it
    plus the rest as its field (where the map is undefined, the affine alone)."""
    from tapescope.montage.transform import SectionTransform

    gh, gw = m.shape[:2]
    gy, gx = (np.mgrid[0:gh, 0:gw] * step).astype(np.float64)
    ok = np.isfinite(m).all(-1)
    design = np.column_stack([gx[ok], gy[ok], np.ones(ok.sum())])
    fit, *_ = np.linalg.lstsq(design, m[ok], rcond=None)
    affine = np.stack([gx, gy, np.ones_like(gx)], -1) @ fit
    field = np.where(ok[..., None], m - affine, 0.0).astype(np.float32)
    # SectionTransform's field nodes cover the output edge to edge, one more than the samples.
    field = np.pad(field, ((0, 1), (0, 1), (0, 0)), mode="edge")
    return SectionTransform(fit.T, field, step)


# -- the four numbers every real stack supports (bench_align_stack.py) ---------------------

def error_vectors(stack: TruthStack, maps: dict[int, np.ndarray], reference: dict | None = None,
                  step: int = 8) -> dict[int, np.ndarray]:
    """Per section, the error vector (gh*gw, 2) at every output grid point, nan where the map
    draws nothing the section imaged, after the one affine common to all sections: against
    the truth (`reference` None: W_z(T_z(p))), or against the aligner's own unwarped run
    (`reference`: z -> its SectionTransform; the point found there for the same tissue)."""
    pts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for z, m in maps.items():
        if reference is not None and z not in reference:
            continue
        pz, tz, flat = _truth_points(stack, z, m, step)
        pts[z] = (pz, invert(reference[z], tz) if reference is not None else tz, flat)
    p = np.concatenate([v[0] for v in pts.values()])
    t = np.concatenate([v[1] for v in pts.values()])
    g, *_ = np.linalg.lstsq(np.column_stack([p, np.ones(len(p))]), t, rcond=None)
    size = next(iter(maps.values())).shape[0] * next(iter(maps.values())).shape[1]
    out = {}
    for z, (pz, tz, flat) in pts.items():
        e = np.full((size, 2), np.nan)
        e[flat] = tz - np.column_stack([pz, np.ones(len(pz))]) @ g
        out[z] = e
    return out


@dataclass
class Measures:
    """Global RMS, local RMS (the change of error between consecutive sections: what a
    tracer crossing them sees), the same across the missing section, and growth along z."""
    global_px: float
    local_px: float
    gap_px: float
    growth: float

    def cells(self) -> str:
        return f"{self.global_px:5.2f} / {self.local_px:5.2f} / {self.gap_px:5.2f} / {self.growth:5.2f}"


def _rms(v: list[np.ndarray]) -> float:
    a = np.concatenate([x[np.isfinite(x).all(1)] for x in v]) if v else np.zeros((0, 2))
    return float(np.sqrt((a ** 2).sum(1).mean())) if len(a) else float("nan")


def measures(errors: dict[int, np.ndarray]) -> Measures:
    zs = sorted(errors)
    local, gap = [], []
    for a, b in itertools.pairwise(zs):
        (local if b - a == 1 else gap).append(errors[b] - errors[a])
    per_z = [_rms([errors[z]]) for z in zs]
    growth = float(np.mean(per_z[-3:]) / np.mean(per_z[:3])) if len(per_z) >= 6 else float("nan")
    return Measures(_rms([errors[z] for z in zs]), _rms(local), _rms(gap), growth)


def patch_means(errors: dict[int, np.ndarray], grid: tuple[int, int], patches: int = 4) -> dict[int, np.ndarray]:
    """The error vectors averaged over each patch of a `patches` x `patches` grid (a quarter
    of the section a side): one vector per patch, nan where the patch holds none. What a
    patch-wise measurement of the aligned sections (one shift per patch) reports."""
    gh, gw = grid
    ys = np.array_split(np.arange(gh), patches)
    xs = np.array_split(np.arange(gw), patches)
    out = {}
    for z, e in errors.items():
        e = e.reshape(gh, gw, 2)
        cells = []
        for y in ys:
            for x in xs:
                block = e[y[0]:y[-1] + 1, x[0]:x[-1] + 1].reshape(-1, 2)
                ok = np.isfinite(block).all(1)
                cells.append(block[ok].mean(0) if ok.sum() >= 0.5 * len(block) else np.full(2, np.nan))
        out[z] = np.array(cells)
    return out
