"""Region of interest: the tissue outline on a slot's overview, and the tiles that cover it.

The overview is a low-resolution image of the search area (the slot's aperture). Tissue
absorbs electrons and has texture; bare resin (or an empty aperture) is bright and flat.
The outline is the largest connected dark region, after vignetting is divided out;
a slot with no such region is *empty*, one whose tissue falls apart into pieces (a torn
or folded section) is *damaged*. Both are recorded and skipped by the engine, not fatal.

All geometry is (y, x) in stage nanometres, as the rest of the acquisition package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .plan import TilePlan

Polygon = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Overview:
    image: np.ndarray                 # float32, flat-fielded, arbitrary units
    origin_nm: tuple[float, float]    # stage (y, x) of the top-left corner of pixel (0, 0)
    pixel_nm: float

    def to_px(self, yx_nm: np.ndarray) -> np.ndarray:
        return (np.asarray(yx_nm, float) - self.origin_nm) / self.pixel_nm

    def to_nm(self, yx_px: np.ndarray) -> np.ndarray:
        return np.asarray(yx_px, float) * self.pixel_nm + self.origin_nm


@dataclass(frozen=True)
class TissueFinding:
    verdict: str                      # "tissue" | "empty" | "damaged"
    outline_nm: Polygon
    area_fraction: float              # tissue area / search area
    contrast: float                   # (resin - tissue) / resin
    message: str
    cut: bool = False                 # tissue reaches the overview's edge: the field cuts it


@dataclass(frozen=True)
class TissueLimits:
    min_contrast: float = 0.10        # tissue ~20 % darker than film; an empty film with dust ~5 %
    min_area_fraction: float = 0.02   # of the search area
    min_main_fraction: float = 0.9    # largest piece / all tissue (crumbs below 1 % left out)
    min_solidity: float = 0.6         # area / convex hull area; below: folded or torn
    max_hole_fraction: float = 0.02   # film-bright holes wider than a cell, of the outline
    max_fold_fraction: float = 0.02   # tissue much darker than the section's own: lying twice
    min_gap_span: float = 0.3         # a film-bright line this long (of the section's size): a tear


SMOOTH_NM = 100.0                     # blur sigma for the tissue mask (x 2.5: ~ a cell)
OPAQUE_BELOW = 0.35                   # of the film level: the tape around the aperture
CELL_NM = 420.0                       # a cell: light cells are not holes, a hole wider than one is
FOLD_SMOOTH_NM = 150.0                # cells and mitochondria average out; a doubled band does not
FOLD_DARKER = 0.18                    # doubled tissue transmits ~ t^2: ~20 % darker at t ~ 0.8
GAP_LEVEL = 0.35                      # of the tissue contrast, below film: film-bright (a gap)


def find_tissue(ov: Overview, limits: TissueLimits | None = None, margin_nm: float = 0.0) -> TissueFinding:
    """Find the section on an overview. margin_nm grows the outline (so edge tiles are kept).

    Three classes of pixel: the opaque tape (dark, outside the aperture), bare film or resin
    (bright, flat) and tissue (in between, textured). The aperture is what is not opaque;
    tissue is the darker class inside it (Otsu), judged by its contrast to the film."""
    lim = limits or TissueLimits()
    # Smooth over a few cells (~0.4 um): tissue is then a darker *area*, not membranes
    # against cytoplasm, whatever the overview's pixel size.
    sigma = max(1.0, SMOOTH_NM / ov.pixel_nm)
    img = cv2.GaussianBlur(ov.image.astype(np.float32), (0, 0), sigma)
    film = float(np.percentile(img, 99))
    if film <= 0:
        return TissueFinding("empty", (), 0.0, 0.0, "overview is dark: no beam?")
    norm = img / film
    aperture = (norm > OPAQUE_BELOW).astype(np.uint8)
    # Keep clear of the aperture's rim, where the blur mixes tape into film (3 sigma).
    k = 2 * int(np.ceil(3 * sigma)) + 1
    aperture = cv2.erode(aperture, np.ones((k, k), np.uint8))
    inside = norm[aperture > 0]
    if inside.size < 16:
        return TissueFinding("empty", (), 0.0, 0.0, "no aperture in the overview (all opaque)")
    u8 = np.clip(norm * 200, 0, 255).astype(np.uint8)
    thr, _ = cv2.threshold(u8[aperture > 0].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((u8 < thr) & (aperture > 0)).astype(np.uint8)
    film_level = float(np.median(norm[(aperture > 0) & (mask == 0)])) if (mask == 0).any() else 1.0
    tissue_level = float(np.median(norm[mask > 0])) if mask.any() else film_level
    contrast = 1.0 - tissue_level / max(film_level, 1e-6)
    if contrast < lim.min_contrast or not mask.any():
        return TissueFinding("empty", (), 0.0, contrast, f"no tissue: contrast {contrast:.3f} < {lim.min_contrast}")
    k3 = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k3)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k3, iterations=2)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return TissueFinding("empty", (), 0.0, contrast, "no tissue region after cleaning the mask")
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = 1 + int(np.argmax(areas))
    # Crumbs (dust, debris, a speck of the texture) are not pieces of the section.
    areas_big = areas[areas >= 0.01 * areas.max()]
    cut = bool(mask[:2].any() or mask[-2:].any() or mask[:, :2].any() or mask[:, -2:].any())
    total = float(areas.sum())
    frac = total / max(float(aperture.sum()), 1.0)
    if frac < lim.min_area_fraction:
        return TissueFinding("empty", (), frac, contrast, f"tissue covers {frac:.1%} of the aperture only", cut)
    part = (labels == main).astype(np.uint8)
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(part)
    cv2.drawContours(filled, [contour], -1, 1, -1)
    hull = cv2.convexHull(contour)
    hull_mask = np.zeros_like(part)
    cv2.fillPoly(hull_mask, [hull[:, 0, :]], 1)
    holes, gap_span = _film_inside(ov, hull_mask, filled, contrast)
    hull_area = float(cv2.contourArea(hull)) or 1.0
    solidity = float(areas[main - 1]) / hull_area
    main_frac = float(areas[main - 1]) / float(areas_big.sum())
    doubled = _doubled(ov, part, film)
    if margin_nm > 0:
        r = max(1, round(margin_nm / ov.pixel_nm))
        grown = cv2.dilate(filled, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        contours, _ = cv2.findContours(grown, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(contour, 1.0, True)[:, 0, :]        # (x, y) pixels
    # Contour points are pixel centres on the boundary; +0.5 puts them on pixel corners.
    outline = ov.to_nm(approx[:, ::-1].astype(float) + 0.5)
    poly: Polygon = tuple((float(y), float(x)) for y, x in outline)
    problems = []
    if main_frac < lim.min_main_fraction:
        problems.append(f"in pieces (largest piece {main_frac:.0%} of the tissue)")
    if solidity < lim.min_solidity:
        problems.append(f"ragged outline (solidity {solidity:.2f})")
    if holes > lim.max_hole_fraction:
        problems.append(f"holes {holes:.0%} of its area")
    if gap_span > lim.min_gap_span:
        problems.append(f"torn (a film gap across {gap_span:.0%} of it)")
    if doubled > lim.max_fold_fraction:
        problems.append(f"folded ({doubled:.0%} of it doubled)")
    stats_txt = (f"tissue {frac:.0%} of the aperture, contrast {contrast:.2f}, holes {holes:.1%}, "
                 f"gap {gap_span:.0%}, doubled {doubled:.1%}")
    if problems:
        return TissueFinding("damaged", poly, frac, contrast, "; ".join(problems) + f" ({stats_txt})", cut)
    return TissueFinding("tissue", poly, frac, contrast, stats_txt, cut)


def _film_inside(ov: Overview, hull: np.ndarray, filled: np.ndarray, contrast: float) -> tuple[float, float]:
    """Bare film inside the section's convex hull: (holes and bites wider than a cell, as a
    fraction of the hull; the longest film gap, as a fraction of the section's size).

    Judged on the lightly smoothed overview, against the film around the section: a tear
    may be a few overview pixels wide. A pale cell is a little darker than film and no wider
    than a cell; a resin patch is nearly film and wider; a tear is film and long."""
    img = cv2.GaussianBlur(ov.image.astype(np.float32), (0, 0), 0.7)
    p99 = float(np.percentile(img, 99)) or 1.0
    r_out = max(2, round(2 * SMOOTH_NM / ov.pixel_nm))
    around = cv2.dilate(filled, np.ones((2 * r_out + 1,) * 2, np.uint8)) == 0
    film_px = img[around & (img > OPAQUE_BELOW * p99)]
    film = float(np.median(film_px)) if film_px.size else p99
    bright = ((img > film * (1 - GAP_LEVEL * contrast)) & (hull > 0)).astype(np.uint8)
    r = max(1, round(CELL_NM / 2 / ov.pixel_nm))
    wide = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    holes = float(wide.sum()) / max(float(hull.sum()), 1.0)
    # A tear runs through the tissue: inside the outline, off its rim (where the blur
    # mixes film in and a wavy edge leaves slivers of film between outline and hull).
    gaps = bright & cv2.erode(filled, np.ones((5, 5), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(gaps, connectivity=8)
    ys, xs = np.nonzero(filled)
    size = max(float(ys.max() - ys.min()), float(xs.max() - xs.min()), 1.0)
    spans = [max(stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]) for i in range(1, n)]
    return holes, (max(spans) / size if spans else 0.0)


def _doubled(ov: Overview, part: np.ndarray, film: float) -> float:
    """Fraction of the section much darker than its own median: tissue lying twice (a fold)."""
    img = cv2.GaussianBlur(ov.image.astype(np.float32), (0, 0), max(1.0, FOLD_SMOOTH_NM / ov.pixel_nm)) / film
    r = max(1, round(FOLD_SMOOTH_NM * 2 / ov.pixel_nm))
    core = cv2.erode(part, np.ones((2 * r + 1, 2 * r + 1), np.uint8))   # clear of the edge's blur
    t = img[core > 0]
    if t.size == 0:
        return 0.0
    return float(np.mean(t < np.median(t) * (1 - FOLD_DARKER)))


def film_points(ov: Overview, outline_nm: Polygon, tile_px: tuple[int, int], pixel_nm: float,
                n: int = 7) -> list[tuple[float, float]]:
    """Stage positions (y, x) where a whole tile sees bare film: inside the aperture, a tile
    clear of the tissue outline. Spread out (farthest-point order) so that dust and film
    texture average away in a brightfield."""
    img = cv2.GaussianBlur(ov.image.astype(np.float32), (0, 0), 1.0)
    film = float(np.percentile(img, 99)) or 1.0
    ok = (img / film > 0.8).astype(np.uint8)
    tissue = np.zeros_like(ok)
    if outline_nm:
        pts = np.round(ov.to_px(np.array(outline_nm)))[:, ::-1].astype(np.int32)
        cv2.fillPoly(tissue, [pts], 1)
    half = np.array(tile_px) * pixel_nm / 2 / ov.pixel_nm
    k = (2 * int(np.ceil(half.max())) + 3) | 1
    ok = cv2.erode(ok, np.ones((k, k), np.uint8)) & (cv2.dilate(tissue, np.ones((k, k), np.uint8)) == 0)
    ys, xs = np.nonzero(ok)
    if ys.size == 0:
        return []
    cand = np.column_stack([ys, xs]).astype(float)
    chosen = [len(cand) // 2]
    d = np.linalg.norm(cand - cand[chosen[0]], axis=1)
    while len(chosen) < min(n, len(cand)):
        chosen.append(int(np.argmax(d)))
        d = np.minimum(d, np.linalg.norm(cand - cand[chosen[-1]], axis=1))
    return [tuple(map(float, ov.to_nm(cand[i] + 0.5))) for i in chosen]


def validate_polygon(points: Sequence[Sequence[float]], what: str = "ROI polygon") -> Polygon:
    """An operator polygon: at least 3 finite (y, x) points with a non-zero area."""
    pts = [tuple(map(float, p)) for p in points]
    if len(pts) < 3 or any(len(p) != 2 for p in pts):
        raise ValueError(f"{what} needs at least 3 (y, x) points, got {points!r}")
    if not all(math.isfinite(v) for p in pts for v in p):
        raise ValueError(f"{what} has a non-finite coordinate: {points!r}")
    arr = np.array(pts)
    area = 0.5 * abs(np.dot(arr[:, 0], np.roll(arr[:, 1], 1)) - np.dot(arr[:, 1], np.roll(arr[:, 0], 1)))
    if area <= 0:
        raise ValueError(f"{what} has zero area: {points!r}")
    return tuple((p[0], p[1]) for p in pts)


def tiles_covering(polygon_nm: Polygon, tile_px: tuple[int, int], pixel_nm: float,
                   overlap: float) -> list[TilePlan]:
    """Serpentine tile grid over the polygon's bounding box, keeping tiles that touch it.

    Row and column indices are those of the full grid, so neighbours stay neighbours for
    stitching even where tiles outside the ROI were skipped.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    poly = np.asarray(polygon_nm, float)
    th, tw = tile_px[0] * pixel_nm, tile_px[1] * pixel_nm
    sy, sx = th * (1 - overlap), tw * (1 - overlap)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    rows = max(1, math.ceil(max(hi[0] - lo[0] - th, 0) / sy) + 1)
    cols = max(1, math.ceil(max(hi[1] - lo[1] - tw, 0) / sx) + 1)
    cy, cx = (lo + hi) / 2
    y0, x0 = cy - sy * (rows - 1) / 2, cx - sx * (cols - 1) / 2
    # Rasterise the polygon at 1/8 tile: fine enough to see a tile that grazes it.
    res = min(th, tw) / 8
    origin = np.array([y0 - th / 2, x0 - tw / 2])
    shape = (math.ceil((sy * (rows - 1) + th) / res) + 1, math.ceil((sx * (cols - 1) + tw) / res) + 1)
    mask = np.zeros(shape, np.uint8)
    pts = np.round((poly - origin) / res)[:, ::-1].astype(np.int32)
    cv2.fillPoly(mask, [pts], 1)
    cv2.polylines(mask, [pts], True, 1)        # thin polygons still mark their pixels
    tiles = []
    for r in range(rows):
        order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
        for c in order:
            yc, xc = y0 + r * sy, x0 + c * sx
            a = np.floor((np.array([yc - th / 2, xc - tw / 2]) - origin) / res).astype(int)
            b = np.ceil((np.array([yc + th / 2, xc + tw / 2]) - origin) / res).astype(int)
            if mask[max(a[0], 0):b[0], max(a[1], 0):b[1]].any():
                tiles.append(TilePlan(r, c, yc, xc))
    return tiles
