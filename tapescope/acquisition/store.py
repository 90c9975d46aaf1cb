"""The run directory: config snapshot, raw tiles as TIFF, and an fsync'd journal.

Law 1: a tile counts as acquired only once its file is durable *and* its journal line
is durable, in that order. A crash between the two leaves an orphan file (retaken on
resume), never a journal line without its tile.

    RUN_DIR/config.json          the configuration the run used
    RUN_DIR/journal.jsonl        one JSON object per line, append-only
    RUN_DIR/tiles/slot_NNNNN/rRRR_cCCC.tif
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tapescope.errors import TapescopeError


class JournalError(TapescopeError, ValueError):
    """A journal line that is neither an entry nor a torn last line; the message names it."""


@dataclass(frozen=True)
class TileRecord:
    slot: int
    row: int
    col: int
    path: Path
    y_nm: float        # stage encoder readback at exposure
    x_nm: float
    crc32: int
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.journal_path = self.dir / "journal.jsonl"
        self._lock = threading.Lock()

    @classmethod
    def create(cls, run_dir: str | Path, config_json: str) -> RunStore:
        d = Path(run_dir)
        if (d / "journal.jsonl").exists():
            raise FileExistsError(f"{d} already holds a run (journal.jsonl exists)")
        (d / "tiles").mkdir(parents=True, exist_ok=True)
        store = cls(d)
        store.write_durable(d / "config.json", config_json.encode())
        store.log_event("run_started", time=time.time())
        return store

    def write_durable(self, path: Path, data: bytes) -> None:
        """Write a whole file atomically and durably (temp file, fsync, rename, fsync dir)."""
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def log_event(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n"
        # The engine (loop thread) and processing (worker thread) both append: one at a time,
        # or a long line written in several syscalls could interleave with another.
        with self._lock, open(self.journal_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def tile_path(self, slot: int, row: int, col: int) -> Path:
        return self.dir / "tiles" / f"slot_{slot:05d}" / f"r{row:03d}_c{col:03d}.tif"

    def write_tile(
        self, slot: int, row: int, col: int, data: np.ndarray, *, y_nm: float, x_nm: float,
        meta: dict[str, Any],
    ) -> TileRecord:
        path = self.tile_path(slot, row, col)
        path.parent.mkdir(parents=True, exist_ok=True)
        crc = zlib.crc32(np.ascontiguousarray(data).tobytes())
        full = {**meta, "slot": slot, "row": row, "col": col, "y_nm": y_nm, "x_nm": x_nm, "crc32": crc}
        tmp = path.with_name(path.name + ".part")
        tifffile.imwrite(tmp, data, description=json.dumps(full), metadata=None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        self.log_event("tile", slot=slot, row=row, col=col,
                       file=str(path.relative_to(self.dir)), y_nm=y_nm, x_nm=x_nm, crc32=crc,
                       meta=meta)
        return TileRecord(slot, row, col, path, y_nm, x_nm, crc, meta)

    def events(self) -> Iterator[dict[str, Any]]:
        """Journal entries in order. A torn last line (crash mid-append) is ignored; any other
        line that is not a JSON object raises JournalError naming the line."""
        if not self.journal_path.exists():
            return
        with open(self.journal_path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JournalError(f"{self.journal_path}: line {number} is not valid JSON ({exc.msg}); "
                                       "only a torn last line is expected after a crash") from None
                if not isinstance(entry, dict) or "event" not in entry:
                    raise JournalError(f"{self.journal_path}: line {number} is not a journal entry")
                yield entry

    def check_journal(self) -> int:
        """Read the whole journal; raise JournalError at the first corrupt line. Returns the
        number of entries."""
        return sum(1 for _ in self.events())

    @staticmethod
    def record_of(run_dir: Path, e: dict[str, Any]) -> TileRecord:
        return TileRecord(e["slot"], e["row"], e["col"], run_dir / e["file"],
                          e["y_nm"], e["x_nm"], e["crc32"], e.get("meta", {}))

    def tiles(self, slot: int | None = None) -> list[TileRecord]:
        """Stored tiles in acquisition order. A retake supersedes the earlier record of its
        position (it keeps the position's place in the order): no duplicates."""
        out: dict[tuple[int, int, int], TileRecord] = {}
        for e in self.events():
            if e["event"] == "tile" and (slot is None or e["slot"] == slot):
                out[(e["slot"], e["row"], e["col"])] = self.record_of(self.dir, e)
        return list(out.values())

    def repair_journal(self) -> int:
        """Cut a torn last line (a crash mid-append) so that new lines start clean.
        Returns the number of bytes removed."""
        if not self.journal_path.exists():
            return 0
        raw = self.journal_path.read_bytes()
        keep = raw.rfind(b"\n") + 1
        if keep == len(raw):
            return 0
        with open(self.journal_path, "rb+") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(raw) - keep

    def stray_files(self) -> list[Path]:
        """Tile files that no journal line accounts for: writes torn by a crash."""
        known = {self.dir / e["file"] for e in self.events() if e["event"] == "tile"}
        tiles_dir = self.dir / "tiles"
        found = tiles_dir.rglob("*") if tiles_dir.exists() else iter(())
        return sorted(p for p in found if p.is_file() and p not in known)

    @staticmethod
    def read_tile(rec: TileRecord) -> np.ndarray:
        data = tifffile.imread(rec.path)
        if zlib.crc32(np.ascontiguousarray(data).tobytes()) != rec.crc32:
            raise OSError(f"{rec.path}: pixel checksum does not match the journal")
        return data

    @staticmethod
    def open_tile(rec: TileRecord) -> np.ndarray:
        """The tile mapped from its file rather than held (a section's tiles do not all sit in
        memory while it is processed), the map itself checked against the journal's checksum.
        A file that cannot be mapped (compressed; out of file handles) is read instead."""
        try:
            mapped = tifffile.memmap(rec.path, mode="r")
        except (ValueError, OSError):
            return RunStore.read_tile(rec)
        if zlib.crc32(np.ascontiguousarray(mapped).tobytes()) != rec.crc32:
            raise OSError(f"{rec.path}: pixel checksum does not match the journal")
        return mapped


def section_inputs(records: Sequence[TileRecord], pixel_nm: float,
                   ) -> tuple[list[np.ndarray], np.ndarray, list[tuple[int, int]]]:
    """A section's tiles (mapped, checked against the journal), their stage positions as
    top-left pixels and their grid cells: what the section processor takes."""
    tiles = [RunStore.open_tile(r) for r in records]
    h, w = tiles[0].shape
    # Stage encoder gives the tile centre; positions are top-left, in pixels.
    stage_px = np.array([[r.y_nm, r.x_nm] for r in records]) / pixel_nm - (h / 2, w / 2)
    return tiles, stage_px, [(r.row, r.col) for r in records]
