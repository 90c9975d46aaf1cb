"""Streaming registration: pairs as tiles arrive, in any order, from edge strips only."""

from __future__ import annotations

import numpy as np
import pytest

from tapescope.stitching.stream import StreamingStitcher
from tapescope.stitching.synthetic import SyntheticParams, make_tileset


def test_pairs_register_as_soon_as_both_tiles_exist_in_any_order() -> None:
    ts = make_tileset(SyntheticParams(tile=384, rows=2, cols=3, overlap=0.1, seed=8))
    order = [4, 0, 2, 5, 1, 3]
    s = StreamingStitcher(gain=ts.gain, dark=ts.params.dark, strip_px=80)
    seen = set()
    for k in order:
        r, c = ts.grid[k]
        new = s.add(ts.grid[k], ts.tiles[k], ts.stage_px[k])
        expected = {nb for nb in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)) if nb in seen}
        assert len(new) == len(expected)
        seen.add((r, c))
    result = s.finish()
    assert len(result.pairs) == 7
    # finish() lists tiles in arrival order
    pos = result.solution.positions
    truth = ts.truth_px[order]
    err = (pos - pos.mean(0)) - (truth - truth.mean(0))
    assert np.linalg.norm(err, axis=1).max() < 0.1


def test_strips_give_the_positions_whole_tiles_give() -> None:
    ts = make_tileset(SyntheticParams(tile=384, rows=2, cols=2, overlap=0.1, seed=9))
    results = []
    for strip in (None, 90):
        s = StreamingStitcher(gain=ts.gain, dark=ts.params.dark, strip_px=strip)
        for k, rc in enumerate(ts.grid):
            s.add(rc, ts.tiles[k], ts.stage_px[k])
        results.append(s.finish().solution.positions)
    assert np.abs(results[0] - results[1]).max() < 0.02


def test_bad_tiles_are_refused_and_change_nothing() -> None:
    s = StreamingStitcher(strip_px=40)
    s.add((0, 0), np.ones((100, 100), np.uint16), (0, 0))
    with pytest.raises(ValueError, match="added twice"):
        s.add((0, 0), np.ones((100, 100), np.uint16), (0, 0))
    with pytest.raises(ValueError, match="shape"):
        s.add((0, 1), np.ones((100, 90), np.uint16), (0, 90))
    assert s.keys == [(0, 0)] and s.pairs == []


def test_a_thread_pool_gives_the_same_pairs_as_one_thread() -> None:
    ts = make_tileset(SyntheticParams(tile=256, rows=3, cols=3, overlap=0.15, stage_error_px=4, seed=10))
    results = []
    for workers in (1, 2):
        s = StreamingStitcher(gain=ts.gain, dark=ts.params.dark, strip_px=60, workers=workers)
        for k, rc in enumerate(ts.grid):
            s.add(rc, ts.tiles[k], ts.stage_px[k])
        results.append(s.finish())
    one, two = results
    assert [(p.i, p.j) for p in one.pairs] == [(p.i, p.j) for p in two.pairs]
    assert len(one.pairs) == 12
    assert np.array_equal(one.solution.positions, two.solution.positions)
