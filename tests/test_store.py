"""The run store: durable tiles, an append-only journal, torn writes detected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tapescope.acquisition.store import RunStore


def test_tile_round_trip(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "run", '{"x": 1}')
    data = np.arange(64, dtype=np.uint16).reshape(8, 8)
    store.write_tile(3, 1, 2, data, y_nm=10.0, x_nm=-5.0, meta={"frame_id": 9})
    again = RunStore(tmp_path / "run")
    [rec] = again.tiles(3)
    assert (rec.row, rec.col, rec.y_nm, rec.x_nm) == (1, 2, 10.0, -5.0)
    assert rec.meta["frame_id"] == 9
    assert np.array_equal(RunStore.read_tile(rec), data)
    assert not list((tmp_path / "run").rglob("*.part"))


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    RunStore.create(tmp_path / "run", "{}")
    with pytest.raises(FileExistsError):
        RunStore.create(tmp_path / "run", "{}")


def test_torn_journal_line_is_ignored(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "run", "{}")
    store.write_tile(0, 0, 0, np.zeros((4, 4), np.uint16), y_nm=0, x_nm=0, meta={})
    with open(store.journal_path, "a") as f:
        f.write('{"event":"tile","slot":0,"row":0,"co')   # power cut mid-append
    assert len(store.tiles()) == 1


def test_corrupted_tile_is_detected(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "run", "{}")
    rec = store.write_tile(0, 0, 0, np.full((16, 16), 7, np.uint16), y_nm=0, x_nm=0, meta={})
    raw = bytearray(rec.path.read_bytes())
    raw[-4] ^= 0xFF                                    # flip a pixel byte on disk
    rec.path.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="checksum"):
        RunStore.read_tile(rec)
    with pytest.raises(OSError, match="checksum"):      # the mapped tile is checked as mapped
        RunStore.open_tile(rec)


def test_a_tile_for_processing_is_mapped_not_held(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "run", "{}")
    data = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    rec = store.write_tile(0, 0, 0, data, y_nm=0, x_nm=0, meta={"barcode": "TS"})
    mapped = RunStore.open_tile(rec)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, data)
