"""The smaller panels: tape, readouts, alarm banner, log, montage preview, run control."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from .model import RunModel, SlotState

SLOT_COLOURS: dict[SlotState, str] = {
    SlotState.PENDING: "#9e9e9e", SlotState.CURRENT: "#e0b000", SlotState.ACQUIRED: "#4caf50",
    SlotState.DONE: "#2e7d32", SlotState.FLAGGED: "#ff9800", SlotState.FAILED: "#e53935",
    SlotState.SKIPPED: "#8d6e63", SlotState.EMPTY: "#90a4ae", SlotState.DAMAGED: "#c62828",
}
SEAM_FLAG_PX = 2.0       # a worst seam residual above this is flagged in the preview


def _title(text: str) -> QtWidgets.QLabel:
    label = QtWidgets.QLabel(text)
    label.setStyleSheet("font-weight: bold;")
    return label


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TapePanel(QtWidgets.QWidget):
    def __init__(self, model: RunModel, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.table = QtWidgets.QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["slot", "barcode", "state", "note"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.NoSelection)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(_title("Tape"))
        lay.addWidget(self.table)

    def refresh(self) -> None:
        slots = sorted(self.model.slots.values(), key=lambda s: s.slot)
        self.table.setRowCount(len(slots))
        for row, info in enumerate(slots):
            cells = [str(info.slot), info.barcode or "-", info.state.value, info.note]
            for col, text in enumerate(cells):
                item = self.table.item(row, col)
                if item is None:
                    item = QtWidgets.QTableWidgetItem()
                    self.table.setItem(row, col, item)
                item.setText(text)
                if col == 2:
                    item.setForeground(QtGui.QBrush(QtGui.QColor(SLOT_COLOURS[info.state])))
                font = item.font()
                font.setBold(info.slot == self.model.current_slot)
                item.setFont(font)
        self.table.resizeColumnsToContents()


class Readouts(QtWidgets.QWidget):
    """Device readouts. A device that has not reported says so, rather than showing a stale value."""

    ROWS = ("stage x, y", "stage", "tape slot", "tape", "column", "camera")

    def __init__(self, model: RunModel, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.form = QtWidgets.QFormLayout()
        self.labels: dict[str, QtWidgets.QLabel] = {}
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(_title("Readouts"))
        lay.addLayout(self.form)

    def refresh(self) -> None:
        for key, value in self.model.readouts.items():
            if key not in self.labels:
                label = QtWidgets.QLabel()
                label.setWordWrap(True)
                label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
                self.labels[key] = label
                self.form.addRow(f"{key}:", label)
            self.labels[key].setText(value)


class AlarmBanner(QtWidgets.QFrame):
    """The newest fault, in red, until the operator acknowledges it; hidden when all is well."""

    def __init__(self, model: RunModel, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.acknowledged = 0
        self.label = QtWidgets.QLabel()
        self.label.setWordWrap(True)
        self.ack = QtWidgets.QPushButton("Acknowledge")
        self.ack.clicked.connect(self.acknowledge)
        lay = QtWidgets.QHBoxLayout(self)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.ack)
        self.setVisible(False)

    def refresh(self) -> None:
        alarms = list(self.model.alarms)
        new = len(alarms) - min(self.acknowledged, len(alarms))
        if not alarms or new <= 0:
            self.setVisible(False)
            return
        last = alarms[-1]
        colour = "#b71c1c" if last.severity == "error" else "#e65100"
        self.setStyleSheet(f"QFrame {{ background: {colour}; }} QLabel {{ color: white; font-size: 14px; "
                           f"font-weight: bold; }}")
        more = f"   (+{new - 1} more, see log)" if new > 1 else ""
        self.label.setText(f"{last.severity.upper()}  {last.source}: {last.message}  "
                           f"[run {self.model.run_state}]{more}")
        self.setVisible(True)

    def acknowledge(self) -> None:
        self.acknowledged = len(self.model.alarms)
        self.setVisible(False)


class LogPanel(QtWidgets.QWidget):
    def __init__(self, model: RunModel, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.text = QtWidgets.QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(model.log.maxlen or 500)
        self.text.setStyleSheet("font-family: monospace; font-size: 11px;")
        self._shown = 0
        self._last: str | None = None
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(_title("Log"))
        lay.addWidget(self.text)

    def refresh(self) -> None:
        lines = list(self.model.log)
        # The model keeps a bounded deque: find where what is shown ends, append the rest.
        start = 0
        if self._last is not None and self._last in lines:
            start = len(lines) - lines[::-1].index(self._last)
        for line in lines[start:]:
            self.text.appendPlainText(line)
        if lines:
            self._last = lines[-1]


class MontagePreview(QtWidgets.QWidget):
    """The last processed section's montage (a coarse pyramid level) and its seam/alignment flags."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = _title("Montage: none processed yet")
        self.flags = QtWidgets.QLabel("")
        self.flags.setWordWrap(True)
        self.glw = pg.GraphicsLayoutWidget()
        self.view = self.glw.addViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.image)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.title)
        lay.addWidget(self.glw, 1)
        lay.addWidget(self.flags)
        # The whole volume, as it grows, in Neuroglancer (the window connects it; enabled once
        # a section has reached the volume).
        self.view_volume = QtWidgets.QPushButton("View the volume (Neuroglancer)")
        self.view_volume.setEnabled(False)
        self.view_volume.setToolTip("Serve the volume on 127.0.0.1 and open it in the browser")
        lay.addWidget(self.view_volume)

    def show_report(self, slot: int, z: int, status: str, residual: float, shift: tuple[float, float],
                    confidence: float, message: str) -> None:
        bad = status != "ok" or not residual <= SEAM_FLAG_PX
        seam = "-" if math.isnan(residual) else f"{residual:.2f} px"
        text = (f"status <b>{status}</b> · worst seam {seam} · shift ({shift[0]:+.1f}, {shift[1]:+.1f}) px · "
                f"align NCC {confidence:.2f}")
        if residual > SEAM_FLAG_PX:
            text += f" · <b>seam residual over {SEAM_FLAG_PX:g} px</b>"
        if message:
            text += f"<br>{message}"
        self.flags.setText(text)
        self.flags.setStyleSheet(f"color: {'#c62828' if bad else '#2e7d32'};")
        self.title.setText(f"Montage: slot {slot} (z={z})")

    def show_image(self, img: np.ndarray) -> None:
        finite = img[np.isfinite(img) & (img > 0)]
        if finite.size:
            lo, hi = np.percentile(finite, (1, 99))
            self.image.setImage(img, autoLevels=False, levels=(float(lo), float(max(hi, lo + 1))))
        else:
            self.image.setImage(img, autoLevels=True)
        self.view.autoRange(padding=0)


class RunControl(QtWidgets.QWidget):
    """Start, pause, resume, skip section, abort (confirmed); state, progress and ETA.

    ``can(verb)`` says which buttons the current run allows; ``do(verb)`` sends the command."""

    VERBS = ("start", "pause", "resume", "skip_section", "abort")

    def __init__(self, model: RunModel, can: Callable[[str], bool], do: Callable[[str], None],
                 parent: QtWidgets.QWidget | None = None, *, confirm_abort: bool = True) -> None:
        super().__init__(parent)
        self.model, self.can, self.do = model, can, do
        self.confirm_abort = confirm_abort
        self.buttons: dict[str, QtWidgets.QPushButton] = {}
        row = QtWidgets.QHBoxLayout()
        for verb in self.VERBS:
            b = QtWidgets.QPushButton(verb.replace("_", " ").capitalize())
            b.clicked.connect(lambda _=False, v=verb: self._clicked(v))
            self.buttons[verb] = b
            row.addWidget(b)
        self.buttons["abort"].setStyleSheet("QPushButton:enabled { color: #b71c1c; font-weight: bold; }")
        self.state = QtWidgets.QLabel()
        self.state.setStyleSheet("font-size: 14px; font-weight: bold;")
        self.bar = QtWidgets.QProgressBar()
        self.bar.setFormat("%v / %m tiles")
        self.detail = QtWidgets.QLabel()
        self.mode = QtWidgets.QLabel()
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(_title("Run"))
        lay.addLayout(row)
        lay.addWidget(self.state)
        lay.addWidget(self.bar)
        lay.addWidget(self.detail)
        lay.addWidget(self.mode)

    def _clicked(self, verb: str) -> None:
        if verb == "abort" and self.confirm_abort:
            answer = QtWidgets.QMessageBox.question(
                self, "Abort the run?", "Abort the run now? Tiles stored so far are kept; "
                "the section in progress is left incomplete.")
            if answer != QtWidgets.QMessageBox.StandardButton.Yes:
                return
        self.do(verb)

    def refresh(self) -> None:
        m = self.model
        for verb, b in self.buttons.items():
            b.setEnabled(self.can(verb))
        self.state.setText(f"state: {m.run_state.upper()}")
        total = max(m.tiles_total, 1)
        self.bar.setRange(0, total)
        self.bar.setValue(min(m.tiles_done, total))
        sec_done = sum(s.state not in (SlotState.PENDING, SlotState.CURRENT) for s in m.slots.values())
        sec_total = len(m.slots)
        if m.engine_progress is not None:   # attached over MQTT, the slots seen are not all the run's
            sec_done, sec_total = int(m.engine_progress.sections_done), int(m.engine_progress.sections_total)
        b = m.backlog
        waiting = "" if b is None else f" · processing behind {b.waiting}" + \
            (f" (oldest {fmt_duration(b.oldest_s)})" if b.waiting else "")
        self.detail.setText(f"sections {sec_done}/{sec_total} · {m.tiles_per_second():.1f} tiles/s · "
                            f"elapsed {fmt_duration(m.elapsed_s() if m.t_start else None)} · "
                            f"ETA {fmt_duration(m.eta_s())}{waiting}")
