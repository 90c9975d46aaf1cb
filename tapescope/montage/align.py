"""Section-to-section alignment: translation, coarse at low resolution then refined.

Each section is registered to the previous good section. Rotation, affine and elastic
stages come later (see docs/); a translation is what the tape's slot position error
mostly is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tapescope.stitching.register import ncc, phase_correlate

COARSE_FACTOR = 4


@dataclass(frozen=True)
class SectionShift:
    dy: float          # where `moving` content sits relative to `fixed`, pixels
    dx: float
    confidence: float  # NCC of the (coarse) overlap after alignment


def _shifted_common(fixed: np.ndarray, moving: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = fixed.shape
    y0, y1 = max(0, -dy), min(h, h - dy)
    x0, x1 = max(0, -dx), min(w, w - dx)
    return fixed[y0:y1, x0:x1], moving[y0 + dy:y1 + dy, x0 + dx:x1 + dx]


def _fill_invalid(img: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    img = img.astype(np.float32)
    if valid is None:
        return img
    return np.where(valid, img, img[valid].mean() if valid.any() else 0).astype(np.float32)


def align_translation(
    fixed: np.ndarray, moving: np.ndarray,
    fixed_valid: np.ndarray | None = None, moving_valid: np.ndarray | None = None,
) -> SectionShift:
    """Shift s with moving(p + s) ~= fixed(p), for equal-shaped images.

    Pixels outside each image's own valid mask (no tile landed) are filled with that
    image's mean. Each image keeps its own mask on purpose: one shared mask would put
    the same sharp border into both images, and borders correlate at zero shift.
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"shapes differ: {fixed.shape} vs {moving.shape}")
    f = _fill_invalid(fixed, fixed_valid)
    m = _fill_invalid(moving, moving_valid)
    k = COARSE_FACTOR
    small = (f.shape[1] // k, f.shape[0] // k)
    fs = cv2.resize(f, small, interpolation=cv2.INTER_AREA)
    ms = cv2.resize(m, small, interpolation=cv2.INTER_AREA)
    # phase_correlate(a, b) gives s with b(p) = a(p + s); we want moving(p + s) = fixed(p).
    cy, cx, _ = phase_correlate(ms, fs, upsample=1)
    iy, ix = round(cy * k), round(cx * k)
    # Refine at full resolution on the common area of the coarse estimate.
    a, b = _shifted_common(f, m, iy, ix)
    ry, rx, _ = phase_correlate(b, a, max_shift=2 * k)
    dy, dx = iy + ry, ix + rx
    # Confidence on the coarse images: shot noise is averaged away there, so the NCC
    # measures agreement of structure, not the dose.
    # Only pixels that both images really imaged count (the fill would dilute the NCC).
    cy, cx = round(dy / k), round(dx / k)
    a2, b2 = _shifted_common(fs, ms, cy, cx)
    both = np.ones(a2.shape, bool)
    for valid, own in ((fixed_valid, True), (moving_valid, False)):
        if valid is not None:
            vs = cv2.resize(valid.astype(np.float32), small, interpolation=cv2.INTER_AREA) > 0.99
            va, vb = _shifted_common(vs, vs, cy, cx)
            both &= va if own else vb
    conf = ncc(a2[both], b2[both]) if both.sum() > 16 else 0.0
    return SectionShift(dy, dx, conf)
