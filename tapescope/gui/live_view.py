"""Live view: the newest tile, drawn by a timer at display rate, with fixed levels.

Levels are set once from the first frame (0.5 and 99.5 percentiles) and then stay fixed, as
in pyqtgraph's VideoSpeedTest: auto-levelling every frame makes a dim tile look normal and
costs a pass over the pixels. The histogram/LUT control changes them; "Auto levels" resets.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from .latest import Frame, LatestFrame

DRAW_HZ = 30


class LiveView(QtWidgets.QWidget):
    def __init__(self, source: LatestFrame, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.source = source
        self.frame: Frame | None = None
        self.drawn = 0
        self._levels: tuple[float, float] | None = None

        self.title = QtWidgets.QLabel("Live view: no frame yet")
        self.title.setStyleSheet("font-weight: bold;")
        self.auto_btn = QtWidgets.QPushButton("Auto levels")
        self.auto_btn.clicked.connect(self.auto_levels)
        self.glw = pg.GraphicsLayoutWidget()
        self.view = self.glw.addViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.image)
        self.hist = pg.HistogramLUTItem(image=self.image)
        self.glw.addItem(self.hist)
        self.cursor = QtWidgets.QLabel("cursor: -")
        self.cursor.setStyleSheet("font-family: monospace;")

        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.auto_btn)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.glw, 1)
        lay.addWidget(self.cursor)

        self.glw.scene().sigMouseMoved.connect(self._on_mouse)
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(int(1000 / DRAW_HZ))
        self.timer.timeout.connect(self.draw)
        self.timer.start()

    def draw(self) -> bool:
        """Draw the newest frame if one came since the last draw; frames in between are skipped."""
        frame = self.source.take()
        if frame is None:
            return False
        self.show_frame(frame)
        return True

    def show_frame(self, frame: Frame) -> None:
        first = self.frame is None or self.frame.data.shape != frame.data.shape
        self.frame = frame
        disp = frame.display if frame.display is not None else frame.data
        if self._levels is None:
            lo, hi = np.percentile(disp[::4, ::4], (0.5, 99.5))
            self._levels = (float(lo), float(max(hi, lo + 1)))
            self.hist.setLevels(*self._levels)
        self.image.setImage(disp, autoLevels=False, levels=self.hist.getLevels())
        self.image.setRect(QtCore.QRectF(0, 0, frame.data.shape[1], frame.data.shape[0]))
        if first:
            self.view.autoRange(padding=0)
        self.title.setText(f"Live view: {frame.label}")
        self.drawn += 1

    def auto_levels(self) -> None:
        self._levels = None
        if self.frame is not None:
            self.show_frame(self.frame)

    def value_at(self, x: float, y: float) -> float | None:
        """The full-resolution pixel value under image coordinates (x, y), or None outside."""
        if self.frame is None:
            return None
        r, c = int(np.floor(y)), int(np.floor(x))
        h, w = self.frame.data.shape[:2]
        if not (0 <= r < h and 0 <= c < w):
            return None
        return float(self.frame.data[r, c])

    def _on_mouse(self, pos: QtCore.QPointF) -> None:
        p = self.view.mapSceneToView(pos)
        v = self.value_at(p.x(), p.y())
        if v is None:
            self.cursor.setText("cursor: -")
        else:
            self.cursor.setText(f"cursor: x {int(p.x())}, y {int(p.y())}  value {v:.0f}")
