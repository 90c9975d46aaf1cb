"""Region of interest: the tissue outline on a slot's overview, and the tiles that cover it.

The overview is a low-resolution image of the search area (the slot's aperture). Tissue
absorbs electrons and has texture; bare resin (or an empty aperture) is bright and flat.
The outline is the largest connected dark region, after vignetting is divided out;
a slot with no such region is *empty*, one whose tissue falls apart into pieces, has holes
of bare film or resin, or a straight line or band across it that attenuates much less (a
tear) or more (a fold: the film lying twice) than its sides, is *damaged*. Both are
recorded and skipped by the engine, not fatal.

All geometry is (y, x) in stage nanometres, as the rest of the acquisition package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    tape: bool = True                 # the opaque tape shows: the field reaches past the aperture

    def inside(self) -> bool:
        """The field may lie inside the section: it cuts the tissue, or it sees no film to
        judge tissue against (an all-tissue field splits its own texture and looks "empty")
        and no tape either. A wider field must judge it."""
        return self.cut or (self.verdict == "empty" and not self.tape)


@dataclass(frozen=True)
class TissueLimits:
    min_contrast: float = 0.10        # tissue ~20 % darker than film; an empty film with dust ~5 %
    min_area_fraction: float = 0.02   # of the search area
    min_main_fraction: float = 0.9    # largest piece / all tissue (crumbs below 1 % left out)
    min_solidity: float = 0.6         # area / convex hull area; below: folded or torn
    max_hole_fraction: float = 0.02   # film-bright holes wider than a cell, of the outline
    min_gap_span: float = 0.3         # a film-bright line this long (of the section's size): a tear
    # Straight strips across the section, in units of its own attenuation (see _strips):
    max_fold_excess: float = 0.5      # a band this much more attenuating than both sides: film lying twice (+1)
    max_tear_loss: float = 0.45       # a line this much less attenuating than both sides: a gap (-1)


SMOOTH_NM = 100.0                     # blur sigma for the tissue mask (x 2.5: ~ a cell)
OPAQUE_BELOW = 0.35                   # of the film level: the tape around the aperture
CELL_NM = 420.0                       # a cell: light cells are not holes, a hole wider than one is
GAP_LEVEL = 0.15                      # of the section's attenuation: bare film (a gap), noise allowed
RESIN_LEVEL = 0.5                     # of the section's attenuation: as clear as blank resin
STRIP_SECTION_PX = 256                # the line test resamples the section to at most this size
STRIP_CHORD = 0.6                     # a line counts where it runs this far through the section (of its size)


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
    tape = bool((norm <= OPAQUE_BELOW).any())
    u8 = np.clip(norm * 200, 0, 255).astype(np.uint8)
    thr, _ = cv2.threshold(u8[aperture > 0].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((u8 < thr) & (aperture > 0)).astype(np.uint8)
    film_level = float(np.median(norm[(aperture > 0) & (mask == 0)])) if (mask == 0).any() else 1.0
    tissue_level = float(np.median(norm[mask > 0])) if mask.any() else film_level
    contrast = 1.0 - tissue_level / max(film_level, 1e-6)
    if contrast < lim.min_contrast or not mask.any():
        return TissueFinding("empty", (), 0.0, contrast, f"no tissue: contrast {contrast:.3f} < {lim.min_contrast}",
                             tape=tape)
    k3 = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k3)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k3, iterations=2)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return TissueFinding("empty", (), 0.0, contrast, "no tissue region after cleaning the mask", tape=tape)
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = 1 + int(np.argmax(areas))
    # Crumbs (dust, debris, a speck of the texture) are not pieces of the section.
    areas_big = areas[areas >= 0.01 * areas.max()]
    cut = bool(mask[:2].any() or mask[-2:].any() or mask[:, :2].any() or mask[:, -2:].any())
    total = float(areas.sum())
    frac = total / max(float(aperture.sum()), 1.0)
    if frac < lim.min_area_fraction:
        return TissueFinding("empty", (), frac, contrast, f"tissue covers {frac:.1%} of the aperture only", cut,
                             tape)
    part = (labels == main).astype(np.uint8)
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(part)
    cv2.drawContours(filled, [contour], -1, 1, -1)
    hull = cv2.convexHull(contour)
    hull_mask = np.zeros_like(part)
    cv2.fillPoly(hull_mask, [hull[:, 0, :]], 1)
    # Attenuation against the film fitted around the section (vignetting divided out), in
    # units of the section's own (median over its core). The core is the hull's, clear of
    # the blurred, wavy rim: a tear from edge to edge is an inlet of the outline, and it
    # must lie inside what is judged.
    core = cv2.erode(hull_mask, np.ones((7, 7), np.uint8))
    att = _attenuation(ov, filled, aperture)
    a0 = float(np.median(att[core > 0])) if core.any() else 0.0
    rel = att / a0 if a0 > 0 else np.ones_like(att)
    holes, gap_span = _film_inside(ov, rel, hull_mask, filled)
    hull_area = float(cv2.contourArea(hull)) or 1.0
    solidity = float(areas[main - 1]) / hull_area
    main_frac = float(areas[main - 1]) / float(areas_big.sum())
    fold_excess, tear_loss = _strips(rel, core)
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
    if fold_excess > lim.max_fold_excess:
        problems.append(f"folded (a straight band across it {fold_excess:+.2f} x its attenuation)")
    if tear_loss > lim.max_tear_loss:
        problems.append(f"torn (a straight line across it -{tear_loss:.2f} x its attenuation)")
    stats_txt = (f"tissue {frac:.0%} of the aperture, contrast {contrast:.2f}, holes {holes:.1%}, "
                 f"gap {gap_span:.0%}, band {fold_excess:+.2f}, line -{tear_loss:.2f}")
    if problems:
        return TissueFinding("damaged", poly, frac, contrast, "; ".join(problems) + f" ({stats_txt})", cut, tape)
    return TissueFinding("tissue", poly, frac, contrast, stats_txt, cut, tape)


def _film_inside(ov: Overview, rel: np.ndarray, hull: np.ndarray, filled: np.ndarray) -> tuple[float, float]:
    """Bare film inside the section's convex hull: (holes and bites wider than a cell, as a
    fraction of the hull; the longest film gap, as a fraction of the section's size).

    Judged on the lightly smoothed overview's attenuation `rel` (the section's own = 1): a
    tear may be a few overview pixels wide. A pale cell attenuates less than the section
    and is no wider than a cell; a resin patch nearly nothing, and wider; a tear nothing,
    and long."""
    bright = ((rel < GAP_LEVEL) & (hull > 0)).astype(np.uint8)
    r = max(1, round(CELL_NM / 2 / ov.pixel_nm))
    wide = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    # Blank resin attenuates a little, as little as the palest neurites: a patch of it
    # counts where it is wider than the thickest neurite (~3 cells; a profile's membrane
    # cuts it off from its neighbours).
    pale = ((rel < RESIN_LEVEL) & (hull > 0)).astype(np.uint8)
    wide |= cv2.morphologyEx(pale, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (6 * r + 1,) * 2))
    holes = float(wide.sum()) / max(float(hull.sum()), 1.0)
    # A tear runs through the tissue: inside the outline, off its rim (where the blur
    # mixes film in and a wavy edge leaves slivers of film between outline and hull).
    gaps = bright & cv2.erode(filled, np.ones((5, 5), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(gaps, connectivity=8)
    ys, xs = np.nonzero(filled)
    size = max(float(ys.max() - ys.min()), float(xs.max() - xs.min()), 1.0)
    spans = [max(stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]) for i in range(1, n)]
    return holes, (max(spans) / size if spans else 0.0)


def _attenuation(ov: Overview, filled: np.ndarray, aperture: np.ndarray) -> np.ndarray:
    """-log(I / film) per pixel: what the specimen takes out of the beam. Attenuations add
    where layers lie on one another (a fold is two layers: twice the section's own).

    The film level is a smooth surface (quadratic in log) fitted to the film around the
    section, so that the frame's vignetting does not read as thicker or thinner tissue."""
    img = cv2.GaussianBlur(ov.image.astype(np.float32), (0, 0), 0.7)
    logi = np.log(np.maximum(img, 1e-3))
    r_out = max(2, round(2 * SMOOTH_NM / ov.pixel_nm))
    film = (cv2.dilate(filled, np.ones((2 * r_out + 1,) * 2, np.uint8)) == 0) & (aperture > 0)
    ys, xs = np.nonzero(film)
    h, w = img.shape
    if ys.size < 50:
        return float(np.percentile(logi, 99)) - logi
    step = max(1, ys.size // 20000)
    ys, xs = ys[::step], xs[::step]

    def terms(y: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        return [np.ones_like(y * x), y, x, y * y, x * x, y * x]

    yn, xn = (ys - h / 2) / h, (xs - w / 2) / w
    coef = np.linalg.lstsq(np.stack(terms(yn, xn), -1), logi[ys, xs], rcond=None)[0]
    # Evaluated as an outer sum: a column of y against a row of x.
    yc = ((np.arange(h) - h / 2) / h).astype(np.float32)[:, None]
    xr = ((np.arange(w) - w / 2) / w).astype(np.float32)[None, :]
    base = sum(np.float32(c) * t for c, t in zip(coef, terms(yc, xr), strict=True))
    return base - logi


def _line_means(r: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, int]:
    """Mean of r along every straight line through the section (a Radon transform of r over
    the section's core, divided by that of the core): rows are directions, columns offsets
    1 pixel apart; NaN where the line runs through less than STRIP_CHORD of the section.
    The section is first resampled to at most STRIP_SECTION_PX. Returns (means, size)."""
    ys, xs = np.nonzero(core)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    c = core[y0:y1, x0:x1].astype(np.float32)
    num = r[y0:y1, x0:x1] * c
    f = max(y1 - y0, x1 - x0) / STRIP_SECTION_PX
    if f > 1:
        dsize = (max(1, round((x1 - x0) / f)), max(1, round((y1 - y0) / f)))
        c = cv2.resize(c, dsize, interpolation=cv2.INTER_AREA)
        num = cv2.resize(num, dsize, interpolation=cv2.INTER_AREA)
    hh, ww = c.shape
    size = max(hh, ww)
    side = math.ceil(math.hypot(hh, ww)) + 2
    canvas = np.zeros((side, side, 2), np.float32)
    oy, ox = (side - hh) // 2, (side - ww) // 2
    canvas[oy:oy + hh, ox:ox + ww, 0] = num
    canvas[oy:oy + hh, ox:ox + ww, 1] = c
    # Steps of 2 / size radians: a line is off by at most a pixel at the section's ends.
    # Turned by a + 90 degrees is turned by a, transposed: rows and columns give both.
    n = max(2, math.ceil(math.pi * size / 4))
    sums = []
    for a in np.arange(n) * 90.0 / n:
        rot = cv2.warpAffine(canvas, cv2.getRotationMatrix2D((side / 2, side / 2), float(a), 1.0), (side, side))
        sums += [rot.sum(axis=1), rot.sum(axis=0)]
    s = np.stack(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(s[..., 1] >= STRIP_CHORD * size, s[..., 0] / s[..., 1], np.nan)
    return means.astype(np.float32), size


def _band_contrast(means: np.ndarray, width: int, flank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each line and each band of `width` lines beside it: the band's mean, and the mean of
    the `flank` lines on each side of it (one line apart). NaN where a flank lies off the
    section: a band must have section on both sides."""
    n = means.shape[0]
    pad = np.full((n, width + 2 * flank + 2), np.nan, np.float32)
    q = np.concatenate([pad, means, pad], 1)
    band = sliding_window_view(q, width, axis=1).mean(-1)
    fl = sliding_window_view(q, flank, axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN windows: off the section
        flm = np.where(np.isfinite(fl).sum(-1) >= (flank + 1) // 2, np.nanmean(fl, -1), np.nan)
    i = np.arange(flank + 1, band.shape[1] - width - 1 - flank)
    return band[:, i], flm[:, i - 1 - flank], flm[:, i + width + 1]


def _strips(rel: np.ndarray, core: np.ndarray) -> tuple[float, float]:
    """Straight strips across the section: (the most a band exceeds both its sides, the most a
    line falls below both its sides), in units of the section's own attenuation.

    A fold is the film lying twice along a straight band: twice the attenuation, across the
    section. A tear is a gap of bare film (no attenuation) along a line across it. Cells
    and mitochondria darken or lighten a line only where it crosses them: averaged along a
    line across the section they average out, a fold or a tear does not. Judged on
    log attenuation in units of the section's own (`rel`, over its `core`), so a band that
    is the film twice counts the same in pale and in dark tissue."""
    if core.sum() < 64:
        return 0.0, 0.0
    means, size = _line_means(rel, core)
    # A fold is a band 2-4 % of the section wide; a tear a line a pixel or two wide.
    k = max(2, round(size / 64))
    band, left, right = _band_contrast(means, k, max(6, 2 * k))
    excess = band - np.maximum(left, right)
    band, left, right = _band_contrast(means, 1, 6)
    loss = np.minimum(left, right) - band
    return (float(np.nanmax(excess)) if np.isfinite(excess).any() else 0.0,
            float(np.nanmax(loss)) if np.isfinite(loss).any() else 0.0)


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
