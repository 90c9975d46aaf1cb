"""The topic tree (docs/mqtt.md) and the JSON payload of each event on it: encoding
(``messages_for``, the engine's bridge) and decoding (``events_of``, a remote window)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tapescope.acquisition.events import (
    Alarm,
    DeviceStatus,
    Event,
    ProcessingBacklog,
    Progress,
    RunFinished,
    SectionFinished,
    SectionPlanned,
    SectionProcessed,
    SectionStarted,
    StateChanged,
    TileAcquired,
)

ROOT = "tapescope"
DEVICE_META = ("moving", "age_s", "time")      # bridge fields of a device readout that are not readings


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
        case ProcessingBacklog():
            p = {"waiting": event.waiting, "oldest_s": _num(event.oldest_s), "in_flight": event.in_flight,
                 "limit": event.limit, "time": now}
            return [Message(f"{r}/processing", p, 0, True)]
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


@dataclass(frozen=True)
class EngineOnline(Event):
    """The engine's ``online`` message (retained; its last will says it went away)."""

    online: bool
    run_dir: str = ""
    reason: str = ""


# -- topic -> event ---------------------------------------------------------------------------

def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def events_of(suffix: str, p: dict[str, Any], retained: bool = False) -> list[Event]:
    """The engine events one telemetry message stands for (``suffix``: the topic below the root).

    The inverse of ``tapescope.mqtt.topics.messages_for``; topics it does not know give none."""
    match suffix.split("/"):
        case ["state"]:
            return [StateChanged(str(p.get("old") or ""), str(p["state"]), str(p.get("reason") or ""))]
        case ["progress"]:
            return [Progress(int(p["sections_done"]), int(p["sections_total"]), int(p["tiles_done"]),
                             int(p["tiles_total"]), _float(p.get("tiles_per_s")), _float(p.get("eta_s")),
                             int(p.get("slot", -1)))]
        case ["processing"]:
            return [ProcessingBacklog(int(p["waiting"]), _float(p.get("oldest_s")), int(p.get("in_flight", 0)),
                                      int(p.get("limit", 0)))]
        case ["section"]:
            started = SectionStarted(int(p["slot"]), str(p.get("barcode") or ""))
            if "tiles" not in p:        # an engine from before the plan was published
                return [started]
            tiles = tuple((int(r), int(c), float(y), float(x)) for r, c, y, x in p["tiles"])
            tile_nm = (float(p["tile_nm"][0]), float(p["tile_nm"][1]))
            roi = tuple((float(y), float(x)) for y, x in p.get("roi_nm") or ())
            return [started, SectionPlanned(started.slot, started.barcode, roi, tiles, tile_nm,
                                            str(p.get("roi_source") or "grid"))]
        case ["section", "processed"]:
            sy, sx = p.get("shift_px") or (None, None)
            return [SectionProcessed(int(p["slot"]), int(p["z"]), str(p["status"]),
                                     _float(p.get("max_residual_px")), (_float(sy), _float(sx)),
                                     _float(p.get("alignment_confidence")), str(p.get("message") or ""))]
        case ["section", "finished"]:
            return [SectionFinished(int(p["slot"]), str(p["status"]), int(p["n_tiles"]), int(p.get("n_failed_qc", 0)),
                                    str(p.get("message") or ""))]
        case ["tile"]:
            qc = {k: p[k] for k in ("std", "focus", "saturation", "resin") if p.get(k) is not None}
            qc["faults"] = list(p.get("faults") or [])
            return [TileAcquired(int(p["slot"]), int(p["row"]), int(p["col"]), int(p.get("index", 0)),
                                 _float(p.get("mean")), _float(p.get("x_nm")), _float(p.get("y_nm")), qc,
                                 int(p.get("attempt", 1)), int(p.get("n_tiles", 0)))]
        case ["alarm"]:
            return [Alarm(str(p["source"]), str(p["message"]), str(p.get("severity", "error")))]
        case ["alarm", "last"] if retained:      # live alarms come on <root>/alarm; this is for late joiners
            return [Alarm(str(p["source"]), f"(before this window attached) {p['message']}",
                          str(p.get("severity", "error")))]
        case ["device", name]:
            status = {k: v for k, v in p.items() if k not in DEVICE_META}
            return [DeviceStatus(name, status, bool(p.get("moving", False)))]
        case ["run"]:
            return [RunFinished(str(p["state"]), int(p.get("sections", 0)), int(p.get("tiles", 0)),
                                _float(p.get("seconds")))]
        case ["online"]:
            return [EngineOnline(bool(p["online"]), str(p.get("run_dir") or ""), str(p.get("reason") or ""))]
    return []
