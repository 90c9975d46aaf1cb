"""Planning a section: overview -> tissue outline (or the operator's polygon) -> tile grid.

`RoiPlanner` decides per slot, in this order: an operator polygon for the slot (or for
'*') overrides everything; mode 'grid' images the configured grid; mode 'auto' takes an
overview of the search area, finds the tissue outline, and covers it with tiles
(roi.tiles_covering). Empty and damaged slots come back as SlotVerdicts: recorded and
skipped, never fatal.

The overview is one frame at a low magnification where the column driver offers one
(stepping out while the field lies inside the section), otherwise a mosaic of frames at
the imaging magnification on a coarse grid over the search area, each reduced to
OVERVIEW_BIN x fewer pixels, then divided by its own vignetting (the median of the reduced
frames), grown by a ring of frames while it lies inside the section.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from .acquisition import Acquisition, SlotVerdict
from .events import OverviewAvailable
from .plan import SectionPlan, TilePlan
from .roi import Overview, Polygon, TissueFinding, TissueLimits, film_points, find_tissue, tiles_covering

OVERVIEW_BIN = 8
# The overview's field holds the search area this many times over: the section's edges
# must be seen against the film around them.
FIELD_MARGIN = 1.25
# At most this many rings of frames are added around a mosaic overview that the section
# fills: each ring widens it by two frames, and costs a frame per tile of its border.
MOSAIC_RINGS = 3


def overview_magnifications(mags: Sequence[float], fov_at_1x_nm: Sequence[float],
                            search_nm: Sequence[float]) -> list[float]:
    """Magnifications to try, highest first: the highest whose field holds the search area
    (FIELD_MARGIN times), then each lower one, for when the section turns out larger."""
    fov = np.asarray(fov_at_1x_nm, float)
    need = np.asarray(search_nm, float) * FIELD_MARGIN
    fits = [m for m in mags if np.all(fov / m >= need)]
    start = max(fits) if fits else min(mags)
    return sorted((m for m in mags if m <= start), reverse=True)


async def survey(take: Callable[[float], Awaitable[np.ndarray]], mags: Sequence[float],
                 pixel_at_1x_nm: float, limits: TissueLimits) -> tuple[Overview, TissueFinding, float]:
    """Overviews at each magnification in turn until the tissue found lies inside the field:
    a section that the field cuts cannot be judged (its outline is the field's edge, its
    pieces may join outside it). take(mag) returns one frame at that magnification, centred
    on the beam axis. Returns the last overview, its finding and its magnification."""
    for i, mag in enumerate(mags):
        img = (await take(mag)).astype(np.float32)
        pix = pixel_at_1x_nm / mag
        h, w = img.shape
        ov = Overview(img, (-h * pix / 2, -w * pix / 2), pix)
        found = find_tissue(ov, limits)
        if not found.inside() or i == len(mags) - 1:
            return ov, found, mag
    raise ValueError("no magnification to survey at")


@dataclass
class RoiPlanner:
    mode: str                                   # "grid" | "auto"
    grid: list[TilePlan]
    polygons: dict[str, Polygon] = field(default_factory=dict)
    tile_px: tuple[int, int] = (512, 512)
    pixel_nm: float = 4.0
    overlap: float = 0.1
    search_nm: tuple[float, float] | None = None     # (h, w) around (0, 0); None: the grid's footprint
    limits: TissueLimits = field(default_factory=TissueLimits)
    film_points: dict[int, list[tuple[float, float]]] = field(default_factory=dict)   # for brightfield

    def search_box(self) -> tuple[float, float]:
        if self.search_nm is not None:
            return self.search_nm
        ys = [t.y_nm for t in self.grid]
        xs = [t.x_nm for t in self.grid]
        th, tw = self.tile_px[0] * self.pixel_nm, self.tile_px[1] * self.pixel_nm
        return (max(ys) - min(ys) + th, max(xs) - min(xs) + tw)

    async def plan(self, engine: Acquisition, slot: int, barcode: str) -> SectionPlan | SlotVerdict:

        poly = self.polygons.get(str(slot), self.polygons.get("*"))
        if poly is not None:
            tiles = tiles_covering(poly, self.tile_px, self.pixel_nm, self.overlap)
            return SectionPlan(slot, barcode, tuple(tiles), poly, "operator")
        if self.mode == "grid":
            return SectionPlan(slot, barcode, tuple(self.grid))
        ov, found = await self.overview(engine, slot)
        engine.store.log_event("overview", slot=slot, shape=list(ov.image.shape), origin_nm=list(ov.origin_nm),
                               pixel_nm=ov.pixel_nm)
        if found.verdict != "tissue":
            return SlotVerdict(found.verdict, found.message)
        self.film_points[slot] = film_points(ov, found.outline_nm, self.tile_px, self.pixel_nm)
        tiles = tiles_covering(found.outline_nm, self.tile_px, self.pixel_nm, self.overlap)
        return SectionPlan(slot, barcode, tuple(tiles), found.outline_nm, "auto")

    async def overview(self, engine: Acquisition, slot: int) -> tuple[Overview, TissueFinding]:
        column = getattr(engine.scope, "column", None)
        if column is not None and getattr(column, "magnifications", None):
            ov, found = await self._overview_low_mag(engine, column)
        else:
            ov, found = await self._overview_mosaic(engine)
        engine.bus.emit(OverviewAvailable(slot, ov.image, ov.origin_nm, ov.pixel_nm))
        return ov, found

    async def _overview_low_mag(self, engine: Acquisition, column: Any) -> tuple[Overview, TissueFinding]:
        """One frame at the highest magnification whose field holds the search area; lower
        ones while the section reaches the field's edge."""
        imaging = (await engine.call_device("column status", column.status, "column")).magnification
        fov = np.array(self.tile_px, float) * self.pixel_nm * imaging
        mags = overview_magnifications(column.magnifications, fov, self.search_box())

        async def take(mag: float) -> np.ndarray:
            await engine.call_device(f"magnification {mag:g}", lambda: column.set_magnification(mag), "column")
            frame, _, _ = await engine.expose_at(TilePlan(0, 0, 0.0, 0.0))
            return frame.data

        try:
            ov, found, _ = await survey(take, mags, self.pixel_nm * imaging, self.limits)
        finally:
            await engine.call_device(f"magnification {imaging:g}", lambda: column.set_magnification(imaging), "column")
        return ov, found

    async def _overview_mosaic(self, engine: Acquisition) -> tuple[Overview, TissueFinding]:
        """A mosaic over the search area; a ring of frames more while the section fills it
        (no column to step out in magnification with). Frames already taken are kept."""
        h_nm, w_nm = self.search_box()
        th, tw = self.tile_px[0] * self.pixel_nm, self.tile_px[1] * self.pixel_nm
        rows, cols = max(1, math.ceil(h_nm / th)), max(1, math.ceil(w_nm / tw))
        small: dict[tuple[int, int], np.ndarray] = {}
        for ring in range(MOSAIC_RINGS + 1):
            ov = await self._mosaic(engine, rows + 2 * ring, cols + 2 * ring, small)
            found = find_tissue(ov, self.limits)
            if not found.inside():
                break
        return ov, found

    async def _mosaic(self, engine: Acquisition, rows: int, cols: int,
                      small: dict[tuple[int, int], np.ndarray]) -> Overview:
        """rows x cols frames centred on the axis, reduced OVERVIEW_BIN x; `small` holds the
        reduced frames by position from the axis in half frames (exact, whatever the grid),
        and frames in it are not taken again."""
        th, tw = self.tile_px[0] * self.pixel_nm, self.tile_px[1] * self.pixel_nm
        y0 = -th * (rows - 1) / 2
        x0 = -tw * (cols - 1) / 2
        bh, bw = self.tile_px[0] // OVERVIEW_BIN, self.tile_px[1] // OVERVIEW_BIN
        at: dict[tuple[int, int], tuple[int, int]] = {}
        for r in range(rows):
            order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
            for c in order:
                key = at[(r, c)] = (2 * r - rows + 1, 2 * c - cols + 1)
                if key in small:
                    continue
                await engine.boundary()          # an overview can take a while: stay controllable
                frame, _, _ = await engine.expose_at(TilePlan(r, c, y0 + r * th, x0 + c * tw))
                small[key] = cv2.resize(frame.data.astype(np.float32), (bw, bh), interpolation=cv2.INTER_AREA)
        # Vignetting is the same in every frame: the median of the mean-normalised frames.
        stack = np.stack([small[k] / max(float(np.median(small[k])), 1e-6) for k in at.values()])
        gain = np.median(stack, axis=0) if len(stack) >= 3 else np.ones((bh, bw), np.float32)
        gain /= max(float(gain.mean()), 1e-6)
        image = np.zeros((rows * bh, cols * bw), np.float32)
        for (r, c), k in at.items():
            image[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = small[k] / np.maximum(gain, 1e-3)
        return Overview(image, (y0 - th / 2, x0 - tw / 2), self.pixel_nm * OVERVIEW_BIN)
