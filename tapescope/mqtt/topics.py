"""The topic tree (docs/mqtt.md) and the JSON payload of each event on it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tapescope.acquisition.events import (
    Alarm,
    DeviceStatus,
    Event,
    Progress,
    RunFinished,
    SectionFinished,
    SectionPlanned,
    SectionProcessed,
    StateChanged,
    TileAcquired,
)

ROOT = "tapescope"


def root(scope: str) -> str:
    return f"{ROOT}/{scope}"


@dataclass(frozen=True)
class Message:
    topic: str
    payload: dict[str, Any]
    qos: int = 0
    retain: bool = False
    essential: bool = False     # state and alarms: kept in preference when the buffer is full


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x     # JSON has no NaN


def messages_for(event: Event, scope: str) -> list[Message]:
    """The MQTT messages one engine event becomes (none for events that carry pixels)."""
    r = root(scope)
    now = time.time()
    match event:
        case StateChanged(old=old, new=new, reason=reason):
            return [Message(f"{r}/state", {"state": new, "old": old, "reason": reason, "time": now},
                            1, True, True)]
        case Progress():
            p = {"sections_done": event.sections_done, "sections_total": event.sections_total,
                 "tiles_done": event.tiles_done, "tiles_total": event.tiles_total,
                 "tiles_per_s": _num(event.tiles_per_s), "eta_s": _num(event.eta_s), "slot": event.slot,
                 "time": now}
            return [Message(f"{r}/progress", p, 0, True)]
        case SectionPlanned():
            # The tiles go with the plan (about 30 bytes a tile: 150 kB for a 5000-tile section,
            # once per section), so that a window attached from elsewhere can draw the map.
            p = {"slot": event.slot, "barcode": event.barcode, "n_tiles": len(event.tiles),
                 "roi_source": event.roi_source, "roi_nm": [list(v) for v in event.roi_nm],
                 "tiles": [[r_, c, round(y, 1), round(x, 1)] for r_, c, y, x in event.tiles],
                 "tile_nm": list(event.tile_nm), "time": now}
            return [Message(f"{r}/section", p, 1, True)]
        case SectionProcessed():
            p = {"slot": event.slot, "z": event.z, "status": event.status,
                 "max_residual_px": _num(event.max_residual_px), "shift_px": [_num(v) for v in event.shift_px],
                 "alignment_confidence": _num(event.alignment_confidence), "message": event.message, "time": now}
            return [Message(f"{r}/section/processed", p, 1, True, event.status != "ok")]
        case SectionFinished():
            p = {"slot": event.slot, "status": event.status, "n_tiles": event.n_tiles,
                 "n_failed_qc": event.n_failed_qc, "message": event.message, "time": now}
            return [Message(f"{r}/section/finished", p, 1, True, True)]
        case TileAcquired():
            qc = event.qc
            p = {"slot": event.slot, "row": event.row, "col": event.col, "index": event.index,
                 "n_tiles": event.n_tiles, "attempt": event.attempt, "x_nm": _num(event.x_nm),
                 "y_nm": _num(event.y_nm), "mean": _num(event.mean), "std": _num(qc.get("std", math.nan)),
                 "focus": _num(qc.get("focus", math.nan)), "saturation": _num(qc.get("saturation", math.nan)),
                 "resin": qc.get("resin"), "faults": qc.get("faults", []), "time": now}
            return [Message(f"{r}/tile", p, 0, False)]
        case Alarm():
            p = {"source": event.source, "message": event.message, "severity": event.severity, "time": now}
            return [Message(f"{r}/alarm", p, 1, False, True), Message(f"{r}/alarm/last", p, 1, True, True)]
        case RunFinished():
            p = {"state": event.state, "sections": event.sections, "tiles": event.tiles,
                 "seconds": event.seconds, "time": now}
            return [Message(f"{r}/run", p, 1, True, True)]
        case DeviceStatus():
            return []       # the bridge's heartbeat publishes device status at its own rates
    return []
