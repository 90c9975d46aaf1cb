"""Bad input is refused with one line naming the problem, exit code 2, and nothing on disk
changed: the real `tapescope` command line in a subprocess, each case checked for its
message, for the absence of a traceback and for an unchanged folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tapescope.stitching.tileset import write_tileset

TINY = """
[scope.camera]
width = 64
height = 64
[run]
slot_range = [0, 0]
grid = [1, 2]
exposure_ms = 2.0
[processing]
enabled = false
"""


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tapescope.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for w in words:
        assert w in out, (w, out)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_numbers_that_are_not_finite_are_refused_before_a_run(tmp_path: Path) -> None:
    for field, line in (("pixel_size_nm", "[scope.camera]\npixel_size_nm = inf\n"),
                        ("overlap", "[run]\noverlap = nan\n"),
                        ("section_thickness_nm", "[processing]\nsection_thickness_nm = inf\n")):
        cfg = tmp_path / f"{field}.toml"
        cfg.write_text(line)
        before = snapshot(tmp_path)
        assert_refused(cli("config", "check", cfg), field)
        assert_refused(cli("acquire", cfg, "--run-dir", tmp_path / "run"), field)
        assert snapshot(tmp_path) == before


def test_a_plan_that_cannot_fit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # Beyond the stage's travel: config check already says so.
    far = tmp_path / "far.toml"
    far.write_text("[scope.camera]\nwidth = 16384\nheight = 16384\n[run]\ngrid = [1000, 1000]\n")
    before = snapshot(tmp_path)
    assert_refused(cli("config", "check", far), "travel")
    assert_refused(cli("acquire", far, "--run-dir", tmp_path / "run"), "travel")
    # Within the travel, but a section of a million tiles (0.5 TB) and its simulated specimen
    # fit neither this disk nor this memory: refused at once, no simulator started.
    huge = tmp_path / "huge.toml"
    huge.write_text("[run]\ngrid = [1000, 1000]\n")
    before = snapshot(tmp_path)
    assert_refused(cli("acquire", huge, "--run-dir", tmp_path / "run"), "GB")
    assert snapshot(tmp_path) == before
    # A reserve no disk has.
    reserve = tmp_path / "reserve.toml"
    reserve.write_text(TINY.replace("[processing]", "min_free_gb = 900000\n[processing]"))
    before = snapshot(tmp_path)
    assert_refused(cli("acquire", reserve, "--run-dir", tmp_path / "run"), "run.min_free_gb")
    assert snapshot(tmp_path) == before


def test_a_file_where_a_folder_is_expected_is_refused(tmp_path: Path, config: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    before = snapshot(tmp_path)
    assert_refused(cli("acquire", config, "--run-dir", file), "is a file")
    assert_refused(cli("acquire", config, "--resume", file), "is a file")
    assert_refused(cli("acquire", config, "--run-dir", file / "below"), "cannot create")
    assert_refused(cli("stitch", tmp_path, "--out", file), "is a file")
    assert snapshot(tmp_path) == before


def test_resume_of_nothing_does_not_start_a_run(tmp_path: Path, config: Path) -> None:
    assert_refused(cli("acquire", config, "--resume", tmp_path / "typo"), "no such run directory")
    assert not (tmp_path / "typo").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(tmp_path)
    assert_refused(cli("acquire", config, "--resume", empty), "empty folder")
    assert snapshot(tmp_path) == before       # no run.log left behind either


def test_a_corrupt_journal_line_is_refused_with_its_number(tmp_path: Path, config: Path) -> None:
    run = tmp_path / "run"
    r = cli("acquire", config, "--run-dir", run)
    assert r.returncode == 0, r.stdout + r.stderr
    journal = run / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"event":"tile","slot":0,"ro' + b"\n"        # a line torn in the middle of the file
    journal.write_bytes(b"".join(lines))
    before = snapshot(tmp_path)
    assert_refused(cli("acquire", config, "--resume", run), "line 3", "journal.jsonl")
    assert snapshot(tmp_path) == before


def test_a_torn_last_line_is_still_resumed(tmp_path: Path, config: Path) -> None:
    """What a crash leaves (a last line without its newline) is expected, cut and resumed."""
    run = tmp_path / "run"
    assert cli("acquire", config, "--run-dir", run).returncode == 0
    journal = run / "journal.jsonl"
    journal.write_bytes(journal.read_bytes() + b'{"event":"tile","slot":0,"row":77')
    r = cli("acquire", config, "--resume", run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b'"row":77' not in journal.read_bytes()


def test_stitch_refuses_tiles_of_mixed_pixel_types(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 4000, (64, 64)).astype(np.uint16) for _ in range(3)]
    tiles.append(tiles[0].astype(np.float32))
    write_tileset(tmp_path / "set", tiles, [(0, 0), (0, 1), (1, 0), (1, 1)],
                  np.array([[0, 0], [0, 58], [58, 0], [58, 58]], float))
    before = snapshot(tmp_path)
    assert_refused(cli("stitch", tmp_path / "set", "--out", tmp_path / "out"), "float32", "uint16")
    assert snapshot(tmp_path) == before
