"""Section map: the current slot's overview, ROI and every planned tile, coloured by state.

Acquired tiles are pasted as thumbnails into one mosaic image (one ImageItem, not one item
per tile: a real montage has thousands), and the tile outlines are painted by one item.
Coordinates are stage micrometres, y down as on the camera.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from .model import SECTIONS_KEPT, RunModel, TileInfo, TileState

MOSAIC_MAX_PX = 2048     # longest side of the thumbnail mosaic of one section

COLOURS: dict[TileState, tuple[int, int, int]] = {
    TileState.PLANNED: (150, 150, 150),
    TileState.ACQUIRED: (40, 200, 80),
    TileState.QC_FAILED: (230, 40, 40),
    TileState.RETAKEN: (255, 160, 0),
}


class TileOutlines(pg.GraphicsObject):
    """All tile rectangles of one section, painted in one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles: list[TileInfo] = []
        self.tile_um = (1.0, 1.0)
        self.current: tuple[int, int] | None = None
        self._bounds = QtCore.QRectF()

    def set_tiles(self, tiles: list[TileInfo], tile_um: tuple[float, float],
                  current: tuple[int, int] | None) -> None:
        self.prepareGeometryChange()
        self.tiles, self.tile_um, self.current = tiles, tile_um, current
        rects = [self.rect_of(t) for t in tiles]
        self._bounds = QtCore.QRectF()
        for r in rects:
            self._bounds = self._bounds.united(r)
        self.update()

    def rect_of(self, t: TileInfo) -> QtCore.QRectF:
        h, w = self.tile_um
        return QtCore.QRectF(t.x_nm / 1000 - w / 2, t.y_nm / 1000 - h / 2, w, h)

    def boundingRect(self) -> QtCore.QRectF:
        return self._bounds.adjusted(-1, -1, 1, 1)

    def paint(self, p: QtGui.QPainter, *args: object) -> None:
        for t in self.tiles:
            if math.isnan(t.x_nm):
                continue
            r = self.rect_of(t)
            colour = QtGui.QColor(*COLOURS[t.state])
            if t.state in (TileState.QC_FAILED, TileState.RETAKEN):   # acquired: the thumbnail shows
                fill = QtGui.QColor(colour)
                fill.setAlpha(60)
                p.fillRect(r, fill)
            pen = pg.mkPen(colour, width=2)
            pen.setCosmetic(True)
            p.setPen(pen)
            p.drawRect(r.adjusted(self.tile_um[1] * 0.03, self.tile_um[0] * 0.03,
                                  -self.tile_um[1] * 0.03, -self.tile_um[0] * 0.03))
        if self.current is not None:
            cur = next((t for t in self.tiles if (t.row, t.col) == self.current), None)
            if cur is not None and not math.isnan(cur.x_nm):
                pen = pg.mkPen((255, 255, 0), width=3)
                pen.setCosmetic(True)
                p.setPen(pen)
                p.drawRect(self.rect_of(cur))


class SectionMap(QtWidgets.QWidget):
    tileClicked = QtCore.Signal(int, int, int)   # slot, row, col

    def __init__(self, model: RunModel, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.slot: int | None = None
        self.current_tile: tuple[int, int] | None = None
        self.title = QtWidgets.QLabel("Section map: no section yet")
        self.title.setStyleSheet("font-weight: bold;")
        legend = "  ".join(f"<span style='color: rgb{c}'>&#9632;</span> {s.value}" for s, c in COLOURS.items())
        self.legend = QtWidgets.QLabel(legend)
        self.plot = pg.PlotWidget()
        self.plot.setAspectLocked(True)
        self.plot.invertY(True)
        self.plot.setLabel("bottom", "stage x", units="µm")
        self.plot.setLabel("left", "stage y", units="µm")
        self.plot.setMenuEnabled(False)
        self.overview = pg.ImageItem(axisOrder="row-major")
        self.mosaic_item = pg.ImageItem(axisOrder="row-major")
        # A plain Qt path item: the ROI changes once per section, it needs no curve machinery.
        self.roi = QtWidgets.QGraphicsPathItem()
        roi_pen = pg.mkPen((80, 160, 255), width=2, style=QtCore.Qt.PenStyle.DashLine)
        roi_pen.setCosmetic(True)
        self.roi.setPen(roi_pen)
        self._roi_shown: tuple | None = None
        self.outlines = TileOutlines()
        for item in (self.overview, self.mosaic_item, self.roi, self.outlines):
            self.plot.addItem(item)
        self.mosaic: np.ndarray | None = None
        # Thumbnails may arrive before the map has switched to their slot or before the
        # slot's plan is known: they wait here and are pasted once they can be placed.
        self._pending: dict[int, dict[tuple[int, int], np.ndarray]] = {}
        self._mosaic_geom: tuple[float, float, float] = (0.0, 0.0, 1.0)   # y0_um, x0_um, um per px
        self._levels: tuple[float, float] | None = None
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.title)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.legend)
        self.plot.scene().sigMouseClicked.connect(self._on_click)

    # -- drawing --------------------------------------------------------------------------
    def show_slot(self, slot: int | None) -> None:
        if slot != self.slot:
            if self.slot is not None:
                self._pending.pop(self.slot, None)
            self.slot = slot
            self.current_tile = None
            self.mosaic = None
            self.mosaic_item.clear()
            self.overview.clear()
        self.refresh(autorange=True)

    def refresh(self, autorange: bool = False) -> None:
        m = self.model
        tiles = list(m.tiles_of(self.slot).values())
        tile_um = (m.tile_nm[0] / 1000 or 1.0, m.tile_nm[1] / 1000 or 1.0)
        self.outlines.set_tiles(tiles, tile_um, self.current_tile)
        if self.slot is None:
            return
        done = sum(t.state is not TileState.PLANNED for t in tiles)
        bad = sum(t.state is TileState.QC_FAILED for t in tiles)
        info = m.slots.get(self.slot)
        bc = f" ({info.barcode})" if info and info.barcode else ""
        self.title.setText(f"Section map: slot {self.slot}{bc}  {done}/{len(tiles)} tiles"
                           + (f", {bad} failed QC" if bad else ""))
        roi = m.rois.get(self.slot)
        if roi != self._roi_shown:
            self._roi_shown = roi
            path = QtGui.QPainterPath()
            if roi:
                path.addPolygon(QtGui.QPolygonF([QtCore.QPointF(p[1] / 1000, p[0] / 1000) for p in roi]))
                path.closeSubpath()
            self.roi.setPath(path)
        ov = m.overviews.get(self.slot)
        if ov is not None and self.overview.image is None:
            img, (oy, ox), pnm = ov
            self.overview.setImage(np.asarray(img, dtype=np.float32), autoLevels=True)
            self.overview.setRect(QtCore.QRectF(ox / 1000, oy / 1000, img.shape[1] * pnm / 1000,
                                                img.shape[0] * pnm / 1000))
            self.overview.setOpacity(0.6)
        self._paste_pending()
        if autorange:
            self.plot.autoRange(padding=0.05)

    def add_thumbnail(self, slot: int, row: int, col: int, thumb: np.ndarray) -> None:
        """Keep an acquired tile's thumbnail; paste it as soon as its slot is shown and planned.
        Thumbnails wait for the SECTIONS_KEPT most recent slots only (the rest of a long run's
        would pile up unseen)."""
        self._pending.setdefault(slot, {})[(row, col)] = thumb
        for old in list(self._pending)[:max(0, len(self._pending) - SECTIONS_KEPT)]:
            if old not in (slot, self.slot):
                del self._pending[old]
        if slot == self.slot:
            self._paste_pending()

    def _paste_pending(self) -> None:
        waiting = self._pending.get(self.slot) if self.slot is not None else None
        if not waiting:
            return
        for (row, col), thumb in list(waiting.items()):
            if self._paste(row, col, thumb):
                del waiting[(row, col)]

    def _paste(self, row: int, col: int, thumb: np.ndarray) -> bool:
        """Paste a thumbnail at its planned place; False if it cannot be placed yet."""
        tile = self.model.tiles_of(self.slot).get((row, col))
        if tile is None or math.isnan(tile.x_nm):
            return False
        if self.mosaic is None:
            self._new_mosaic(thumb)
        if self.mosaic is None:
            return False
        y0, x0, um_px = self._mosaic_geom
        th, tw = self.model.tile_nm[0] / 1000, self.model.tile_nm[1] / 1000
        r0 = round((tile.y_nm / 1000 - th / 2 - y0) / um_px)
        c0 = round((tile.x_nm / 1000 - tw / 2 - x0) / um_px)
        h, w = max(1, round(th / um_px)), max(1, round(tw / um_px))
        small = cv2.resize(thumb.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        H, W = self.mosaic.shape
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + h, H), min(c0 + w, W)
        if re <= rs or ce <= cs:
            return True   # planned outside the mosaic: nothing to draw, nothing to wait for
        self.mosaic[rs:re, cs:ce] = small[rs - r0:re - r0, cs - c0:ce - c0]
        if self._levels is None:
            lo, hi = np.percentile(small, (1, 99))
            self._levels = (float(lo), float(max(hi, lo + 1)))
        self.mosaic_item.setImage(self.mosaic, autoLevels=False, levels=self._levels)
        self.mosaic_item.setRect(QtCore.QRectF(x0, y0, W * um_px, H * um_px))
        return True

    def _new_mosaic(self, thumb: np.ndarray) -> None:
        tiles = [t for t in self.model.tiles_of(self.slot).values() if not math.isnan(t.x_nm)]
        th, tw = self.model.tile_nm[0] / 1000, self.model.tile_nm[1] / 1000
        if not tiles or th <= 0 or tw <= 0:
            return
        y0 = min(t.y_nm for t in tiles) / 1000 - th / 2
        x0 = min(t.x_nm for t in tiles) / 1000 - tw / 2
        y1 = max(t.y_nm for t in tiles) / 1000 + th / 2
        x1 = max(t.x_nm for t in tiles) / 1000 + tw / 2
        # As fine as the thumbnails, but never more than MOSAIC_MAX_PX on a side.
        um_px = max(th / thumb.shape[0], tw / thumb.shape[1], max(y1 - y0, x1 - x0) / MOSAIC_MAX_PX)
        shape = (math.ceil((y1 - y0) / um_px), math.ceil((x1 - x0) / um_px))
        self.mosaic = np.full(shape, np.nan, dtype=np.float32)
        self._mosaic_geom = (y0, x0, um_px)
        self._levels = None

    # -- clicks ---------------------------------------------------------------------------
    def tile_at(self, x_um: float, y_um: float) -> TileInfo | None:
        """The tile whose footprint holds (x, y); the nearest centre wins where tiles overlap."""
        best, best_d = None, float("inf")
        for t in self.model.tiles_of(self.slot).values():
            if math.isnan(t.x_nm) or not self.outlines.rect_of(t).contains(QtCore.QPointF(x_um, y_um)):
                continue
            d = (t.x_nm / 1000 - x_um) ** 2 + (t.y_nm / 1000 - y_um) ** 2
            if d < best_d:
                best, best_d = t, d
        return best

    def _on_click(self, ev: object) -> None:
        if self.slot is None:
            return
        p = self.plot.getPlotItem().vb.mapSceneToView(ev.scenePos())  # type: ignore[attr-defined]
        t = self.tile_at(p.x(), p.y())
        if t is not None:
            self.tileClicked.emit(self.slot, t.row, t.col)
