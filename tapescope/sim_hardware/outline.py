"""A section's outline as a real one looks: a trapezoid cut from the block face, with
slightly wavy edges and a few small holes.

The trimmed block face is a trapezoid: the knife cuts its two parallel edges, the
trimming blade its slanted sides. Edges are never perfectly straight (the section
stretches and curls a little as it floats off the knife), and a few small holes are
where the resin or tissue broke. All in section pixels, (y, x), the section's image
spanning (h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

EDGE_MARGIN = 0.01        # of the section's size: the outline stays inside its image
TAPER = (0.90, 0.95)      # narrow edge / wide edge; the insets stay within the grid's padding
WAVE = 0.004              # edge waviness, of the section's size
HOLE_RADIUS = (0.004, 0.012)
HOLES = (2, 5)            # how many small holes (high bound exclusive)
SOFT_PX = 1.5             # edge softness, section pixels


@dataclass(frozen=True)
class Outline:
    corners: np.ndarray                       # (4, 2) (y, x), in order around the trapezoid
    holes: tuple[tuple[float, float, float], ...]   # (cy, cx, r)


def draw_outline(h: int, w: int, rng: np.random.Generator) -> Outline:
    """The trapezoid's corners and the holes, drawn from `rng`."""
    m = EDGE_MARGIN * min(h, w)
    # Symmetric about the section's centre, pixel (h / 2, w / 2).
    y0, y1 = m, h - m
    left, right = m, w - m
    inset = (1 - rng.uniform(*TAPER)) * (right - left) / 2
    wide_top = bool(rng.integers(2))           # which parallel edge the knife met first
    top = (left, right) if wide_top else (left + inset, right - inset)
    bot = (left + inset, right - inset) if wide_top else (left, right)
    corners = np.array([[y0, top[0]], [y0, top[1]], [y1, bot[1]], [y1, bot[0]]], float)
    holes = []
    for _ in range(int(rng.integers(*HOLES))):
        r = rng.uniform(*HOLE_RADIUS) * min(h, w)
        holes.append((float(rng.uniform(0.15, 0.85) * h), float(rng.uniform(0.15, 0.85) * w), float(r)))
    return Outline(corners, tuple(holes))


def outline_alpha(h: int, w: int, outline: Outline, rng: np.random.Generator) -> np.ndarray:
    """Tissue fraction per pixel (float32, 0 outside, 1 inside, soft at the edge)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Signed distance to the convex trapezoid: the largest of its edges' half-plane distances.
    d = np.full((h, w), -np.inf, np.float32)
    c = outline.corners
    centre = c.mean(axis=0)
    for i in range(4):
        a, b = c[i], c[(i + 1) % 4]
        n = np.array([b[1] - a[1], -(b[0] - a[0])]) / np.hypot(*(b - a))     # a normal (y, x)
        if np.dot(centre - a, n) > 0:
            n = -n                                                            # pointing out
        np.maximum(d, (yy - a[0]) * np.float32(n[0]) + (xx - a[1]) * np.float32(n[1]), out=d)
    # Wavy edges: a smooth random field, drawn coarse and enlarged (cheap for large sections).
    coarse = rng.normal(0, 1, (max(4, h // 64), max(4, w // 64))).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 1.5)
    coarse /= max(float(coarse.std()), 1e-6)
    d += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * np.float32(WAVE * min(h, w))
    alpha = np.clip(0.5 - d / SOFT_PX, 0, 1)
    for cy, cx, r in outline.holes:
        y0, y1 = max(0, int(cy - r - 3)), min(h, int(cy + r + 4))
        x0, x1 = max(0, int(cx - r - 3)), min(w, int(cx + r + 4))
        dist = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx) - r
        alpha[y0:y1, x0:x1] *= np.clip(0.5 + dist / SOFT_PX, 0, 1)
    return alpha.astype(np.float32)
