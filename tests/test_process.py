"""`tapescope process`: a finished run's raw tiles to the volume, with the live code, resumable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from tapescope.acquisition.store import RunStore
from tapescope.cli import app
from tapescope.montage.omezarr import Volume
from tapescope.montage.synthetic import make_stack

DEMO_CONFIG = """
[processing]
elastic = false
"""
SECTIONS = 6


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapescope.cli", *args]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path with its size and modification time: 'nothing changed'."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def same_volume(live: Path, other: Path, depth: int, within_px: float = 0.1) -> None:
    """Transforms within `within_px` over the whole canvas; the same pixels where they
    agree; the same per-section verdicts."""
    a, b = Volume.open(live), Volume.open(other)
    assert a.shape == b.shape and a.levels[0].dtype == b.levels[0].dtype
    h, w = a.shape[1:]
    yy, xx = np.mgrid[0:h:16, 0:w:16].astype(float)
    ra, rb = a.group.attrs["tapescope"]["sections"], b.group.attrs["tapescope"]["sections"]
    for z in range(depth):
        assert rb[str(z)]["status"] == ra[str(z)]["status"] == "ok", (z, ra[str(z)], rb[str(z)])
        pa, pb = a.load_transform(z).apply(xx, yy), b.load_transform(z).apply(xx, yy)
        moved = max(np.abs(pa[0] - pb[0]).max(), np.abs(pa[1] - pb[1]).max())
        assert moved < within_px, (z, moved)
        for k in range(len(a.levels)):
            assert np.array_equal(np.asarray(a.levels[k][z]), np.asarray(b.levels[k][z])), (z, k)
        for key in ("tile_positions_px", "shift_px", "max_residual_px", "alignment_references", "lens"):
            assert ra[str(z)][key] == rb[str(z)][key], (z, key)


def test_process_matches_the_live_run_and_resumes_after_kills(tmp_path: Path) -> None:
    """To the bit without the live alignment window; with one, a resume places the open
    sections again with the written ones held, which is not the uninterrupted run's solve."""
    cfg = tmp_path / "demo.toml"
    cfg.write_text(DEMO_CONFIG + "align_look_ahead = 0\n")
    out = tmp_path / "demo"
    r = subprocess.run(cli("demo", "--out", str(out), "--sections", str(SECTIONS), "--grid", "2", "2",
                           "--config", str(cfg)), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = out / "run"
    before = tree(run_dir)
    # The demo's camera is 16-bit, and so is everything after it.
    assert tifffile.imread(next((run_dir / "tiles").rglob("*.tif"))).dtype == np.uint16
    assert all(level.dtype == np.uint16 for level in Volume.open(out / "volume.zarr").levels)

    t0 = time.monotonic()
    r = subprocess.run(cli("process", str(run_dir), "--out", str(tmp_path / "offline.zarr")),
                       capture_output=True, text=True, timeout=400)
    whole = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("skipped") == 0 and all(f"z={z} slot {z}: ok" in r.stdout for z in range(SECTIONS))
    same_volume(out / "volume.zarr", tmp_path / "offline.zarr", SECTIONS)
    assert tree(run_dir) == before                     # the run is read, never written

    # Killed at random points, three times, then let finish: the same volume.
    rng = random.Random(int(os.environ.get("TAPESCOPE_KILL_SEED", "27")))
    target = tmp_path / "resumed.zarr"
    per_section = whole / SECTIONS
    done_after_kill = []
    for _ in range(3):
        p = subprocess.Popen(cli("process", str(run_dir), "--out", str(target)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        assert p.stdout is not None
        # Killed a random time into a random section: 0 or 1 sections after the set-up.
        wait_for, started = rng.randint(0, 1), False
        for line in p.stdout:
            started = started or line.startswith("processing ")
            wait_for -= ": ok, seam" in line
            if started and wait_for <= 0:
                break
        time.sleep(rng.uniform(0.0, 0.8 * per_section))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        records = Volume.open(target).group.attrs["tapescope"]["sections"]
        done_after_kill.append(sorted(int(z) for z, v in records.items() if v["status"] == "ok"))
    assert len(done_after_kill[-1]) < SECTIONS, done_after_kill   # the kills did stop it short
    r = subprocess.run(cli("process", str(run_dir), "--out", str(target)), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("already in the volume, skipped") == len(done_after_kill[-1])
    same_volume(out / "volume.zarr", target, SECTIONS)
    # No scratch left behind by the killed processes.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tapescope-section-")]
    assert tree(run_dir) == before


runner = CliRunner()


def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path: Path) -> None:
    not_a_run = tmp_path / "notarun"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    run_dir = tiny_run(tmp_path / "run", np.uint16)
    listen = __import__("socket").socket()
    listen.bind(("127.0.0.1", 0))
    port = listen.getsockname()[1]
    listen.close()                                      # nothing listens there now
    before = {p: tree(p) for p in (tmp_path,)}
    cases = [
        ([str(not_a_run)], "not a tapescope run directory"),
        ([str(a_file)], "is a file, not a run directory"),
        ([str(tmp_path / "nowhere")], "no such run directory"),
        ([str(run_dir), "--scheduler", f"tcp://127.0.0.1:{port}"], "cannot connect"),
        ([str(run_dir), "--scheduler", "127.0.0.1"], "expected tcp://HOST:PORT"),
        ([str(run_dir), "--sections", "2-9"], "--sections 2-9"),
        ([str(run_dir), "--sections", "x"], "--sections x"),
        ([str(run_dir), "--out", str(a_file)], "is not a volume"),
    ]
    for args, words in cases:
        res = runner.invoke(app, ["process", *args])
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in res.output.replace("\n", ""), \
            (args, res.output)
    assert {p: tree(p) for p in (tmp_path,)} == before


def test_a_volume_has_one_writer_and_a_killed_writer_leaves_no_lock(tmp_path: Path) -> None:
    """A second writer of a volume (here `process`, while another process holds it) is bad
    input, naming the holder; once the holder is killed the kernel has dropped its lock and
    `process` writes the volume."""
    run_dir = tiny_run(tmp_path / "run", np.uint16)
    out = tmp_path / "v.zarr"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys; from pathlib import Path; from tapescope.montage.writer_lock import "
                               f"WriterLock; held = WriterLock(Path({str(out)!r}), 'the run in /runs/r7').acquire(); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        res = runner.invoke(app, ["process", str(run_dir), "--out", str(out)])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        text = res.output.replace("\n", "")
        assert len(lines) == 1 and "is being written by the run in /runs/r7" in text and f"pid {holder.pid}" in text
        assert tree(tmp_path) == before and not out.exists()
    finally:
        holder.kill()
        holder.wait(10)
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert Volume.open(out).group.attrs["tapescope"]["sections"]["1"]["status"] == "ok"


def test_a_reference_retaken_since_is_not_made_again_from_the_newer_tiles(tmp_path: Path) -> None:
    """Slot 1 was retaken after it was processed and the retake never was (the tiles are
    rewritten in place; the volume keeps the good take). A later `process` must not rebuild
    z=1's montage from the retake's tiles at the good take's positions: z=2 is aligned to z=1
    as written, and an alarm says why."""
    run_dir = tiny_run(tmp_path / "run", np.uint16, sections=3)
    out = tmp_path / "v.zarr"
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(out), "--sections", "0-1"])
    assert res.exit_code == 0, res.output
    store = RunStore(run_dir)
    for r in store.tiles(1):                # the retake: another picture at the same places
        data = tifffile.imread(r.path)
        store.write_tile(1, r.row, r.col, np.ascontiguousarray(data[::-1]), y_nm=r.y_nm, x_nm=r.x_nm,
                         meta={"barcode": "B1"})
    store.log_event("section_done", slot=1, status="complete", n_tiles=4, time=time.time())
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(out), "--sections", "2-2"])
    assert res.exit_code == 0, res.output
    text = res.output.replace("\n", "")
    assert "montage of z=1 not made again (its tiles are a newer take" in text, res.output
    assert "montage of z=0" not in text                       # z=0's tiles are its own: made again
    records = Volume.open(out).group.attrs["tapescope"]["sections"]
    assert records["2"]["status"] == "ok" and records["2"]["alignment_references"] == [1, 0]


# -- an 8-bit tile set --------------------------------------------------------------------

TILE, STEP = 224, 200         # 2 x 2 tiles per section, 24 px overlap


def tiny_run(run_dir: Path, dtype: type, sections: int = 2) -> Path:
    """A run directory written as the engine writes one (config snapshot, tiles, journal):
    `sections` consecutive synthetic sections of 2 x 2 tiles in `dtype`."""
    from tapescope.config import TapescopeConfig
    from tapescope.runner import snapshot_json

    pixel_nm = 4.0
    cfg = TapescopeConfig.model_validate({
        "scope": {"camera": {"width": TILE, "height": TILE, "pixel_size_nm": pixel_nm}},
        "run": {"slots": list(range(sections)), "grid": [2, 2], "overlap": (TILE - STEP) / TILE},
        "processing": {"elastic": False, "pyramid_levels": 2, "chunk": 64},
    })
    store = RunStore.create(run_dir, snapshot_json(cfg))
    st = make_stack(sections, (STEP + TILE, STEP + TILE), seed=3, max_rotation_deg=1, max_shift_px=8, missing=())
    top = 250 if dtype == np.uint8 else 60000
    for slot, img in enumerate(st.images):
        for r in range(2):
            for c in range(2):
                tile = img[r * STEP:r * STEP + TILE, c * STEP:c * STEP + TILE]
                data = np.clip(tile * top, 0, top).astype(dtype)
                # Tile centres in stage nm, the grid centred on the aperture as the planner does.
                y = ((r - 0.5) * STEP) * pixel_nm
                x = ((c - 0.5) * STEP) * pixel_nm
                store.write_tile(slot, r, c, data, y_nm=y, x_nm=x, meta={"barcode": f"B{slot}"})
        store.log_event("section_done", slot=slot, status="complete", n_tiles=4, time=time.time())
    return run_dir


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_volume_keeps_the_tiles_bit_depth(tmp_path: Path, dtype: type) -> None:
    run_dir = tiny_run(tmp_path / "run", dtype)
    assert tifffile.imread(next((run_dir / "tiles").rglob("*.tif"))).dtype == dtype
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(tmp_path / "v.zarr")])
    assert res.exit_code == 0, res.output
    vol = Volume.open(tmp_path / "v.zarr")
    assert all(level.dtype == dtype for level in vol.levels)
    for z in range(2):
        plane = np.asarray(vol.levels[0][z])
        imaged = plane[plane > 0]
        assert imaged.size > 0.5 * STEP * STEP and imaged.max() > np.iinfo(dtype).max // 3
    sections = vol.group.attrs["tapescope"]["sections"]
    assert [sections[str(z)]["status"] for z in range(2)] == ["ok", "ok"]
    assert json.loads(json.dumps(sections["1"]["shift_px"]))     # aligned, recorded


def test_an_8_bit_camera_gives_8_bit_tiles_and_volume_live_and_offline(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[scope.camera]\nbit_depth = 8\n" + DEMO_CONFIG)
    out = tmp_path / "demo"
    r = subprocess.run(cli("demo", "--out", str(out), "--sections", "2", "--grid", "2", "2", "--config", str(cfg)),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stdout and "error" not in r.stdout        # QC judged the 8-bit tiles as tiles
    tiles = [tifffile.imread(f) for f in (out / "run" / "tiles").rglob("*.tif")]
    assert len(tiles) == 8 and all(t.dtype == np.uint8 for t in tiles)
    assert 40 < float(np.mean([t.mean() for t in tiles])) < 200       # the 8-bit range is used, not its floor
    live = Volume.open(out / "volume.zarr")
    assert all(level.dtype == np.uint8 for level in live.levels)
    assert [live.group.attrs["tapescope"]["sections"][z]["status"] for z in "01"] == ["ok", "ok"]
    res = runner.invoke(app, ["process", str(out / "run"), "--out", str(tmp_path / "offline.zarr")])
    assert res.exit_code == 0, res.output
    same_volume(out / "volume.zarr", tmp_path / "offline.zarr", 2)


def test_qc_judges_an_8_bit_frame_at_its_own_full_scale() -> None:
    from tapescope.acquisition.qc import QCLimits, evaluate

    rng = np.random.default_rng(1)
    tissue = np.clip(rng.normal(120, 25, (256, 256)), 0, 255).astype(np.uint8)
    assert evaluate(tissue, QCLimits(), reference_focus=None).faults == ()  # 120 of 255 is not 'dark'
    dark = np.clip(rng.normal(1, 0.5, (256, 256)), 0, 255).astype(np.uint8)
    assert "dark" in evaluate(dark, QCLimits(), reference_focus=None).faults
    burnt = tissue.copy()
    burnt[:64] = 255
    assert "saturated" in evaluate(burnt, QCLimits(), reference_focus=None).faults
    assert QCLimits().for_frame(np.dtype(np.uint16)) == QCLimits()


def test_process_on_a_dask_cluster_writes_the_same_volume(tmp_path: Path, dask_processes) -> None:
    """Stitching, the alignment of each section to each of its references (elastic) and the
    render on two worker processes: the volume of the engine's own process to 0.01 px."""
    from distributed import Client, get_task_stream

    sections = 4
    run_dir = tiny_run(tmp_path / "run", np.uint16, sections=sections)
    cfg = tmp_path / "elastic.toml"
    cfg.write_text("[processing]\nelastic = true\n")
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(tmp_path / "here.zarr"), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    dask_processes.wait_for_workers(2)
    with Client(dask_processes.address, timeout="30s") as client, get_task_stream(client) as stream:
        res = runner.invoke(app, ["process", str(run_dir), "--out", str(tmp_path / "there.zarr"),
                                  "--config", str(cfg), "--scheduler", dask_processes.address])
    assert res.exit_code == 0, res.output
    same_volume(tmp_path / "here.zarr", tmp_path / "there.zarr", sections, within_px=0.01)
    records = Volume.open(tmp_path / "there.zarr").group.attrs["tapescope"]["sections"]
    pairs = [(z, r) for z in range(sections) for r in records[str(z)]["alignment_references"]]
    assert pairs == [(1, 0), (2, 1), (2, 0), (3, 2), (3, 1)]
    assert Volume.open(tmp_path / "there.zarr").load_transform(3).field is not None     # elastic it was
    ran = [(t["key"].split("-")[0], t["worker"]) for t in stream.data]
    # Each section stitched and rendered on the workers (stitching again where the lens
    # estimated from an earlier section arrived after it had started), by both of them;
    # each pair aligned there once, none for nothing.
    assert sum(k == "render_task" for k, _ in ran) == sections and sum(k == "stitch_task" for k, _ in ran) >= 3, ran
    assert sum(k == "align_task" for k, _ in ran) == len(pairs), ran
    assert len({w for _, w in ran}) == 2, ran
    # Sections in flight, no chain: pairs are made montage to montage, so a section's pair to
    # the section just below can run before that section is placed and rendered (with the
    # references as written, it had to wait for that render). Which ready task a free worker
    # takes is the scheduler's choice, so at least one of the two.
    span = {tuple(t["key"].split("-")[:-1]): (min(s["start"] for s in t["startstops"]),
                                               max(s["stop"] for s in t["startstops"])) for t in stream.data}
    ahead = [span[("align_task", str(z + 1), str(z))][0] < span[("render_task", str(z))][0] for z in (1, 2)]
    assert any(ahead), span


def test_an_alignment_window_on_a_dask_cluster_writes_the_same_volume(tmp_path: Path, dask_processes) -> None:
    """With `align_look_ahead`, sections are written as they leave the window, from the
    renders kept for them: on two worker processes the same volume as in this process (the
    pairs with the stack's flow settings, `align_flow`); and the window placed them near
    section-by-section placement."""
    sections = 5
    run_dir = tiny_run(tmp_path / "run", np.uint16, sections=sections)
    window = tmp_path / "window.toml"
    window.write_text("[processing]\nelastic = true\nalign_look_ahead = 2\nalign_flow = \"stack\"\n")
    plain = tmp_path / "plain.toml"
    plain.write_text("[processing]\nelastic = true\nalign_flow = \"stack\"\n")
    for name, cfg in (("here", window), ("plain", plain)):
        res = runner.invoke(app, ["process", str(run_dir), "--out", str(tmp_path / f"{name}.zarr"), "--config",
                                  str(cfg)])
        assert res.exit_code == 0, res.output
        assert all(f"z={z} slot {z}: ok" in res.output for z in range(sections)), res.output
    dask_processes.wait_for_workers(2)
    res = runner.invoke(app, ["process", str(run_dir), "--out", str(tmp_path / "there.zarr"), "--config",
                              str(window), "--scheduler", dask_processes.address])
    assert res.exit_code == 0, res.output
    same_volume(tmp_path / "here.zarr", tmp_path / "there.zarr", sections, within_px=0.01)
    a, b = Volume.open(tmp_path / "here.zarr"), Volume.open(tmp_path / "plain.zarr")
    h, w = a.shape[1:]
    yy, xx = np.mgrid[0:h:16, 0:w:16].astype(float)
    apart = []
    for z in range(sections):      # where the section was imaged
        imaged = np.asarray(b.levels[0][z])[::16, ::16] > 0
        moved = np.array(a.load_transform(z).apply(xx, yy)) - b.load_transform(z).apply(xx, yy)
        apart.append(float(np.hypot(*moved)[imaged].max()))
    # The first section stays where the stage put it; the rest within the pairs' own
    # differences (which placement is nearer the truth: test_montage_pipeline).
    assert apart[0] == 0.0 and max(apart) < 2.0, apart


def test_a_take_is_processed_when_its_own_section_processed_is_journalled(tmp_path: Path) -> None:
    """With an alignment window an older take can be written (and journalled) after a newer
    take of the same slot was acquired: the newer one is still due, and a resume takes it."""
    from tapescope.acquisition.events import EventBus
    from tapescope.acquisition.processing import ProcessingWorker
    from tapescope.alignment.pipeline import Canvas, SectionProcessor

    run_dir = tiny_run(tmp_path / "run", np.uint16, sections=2)
    store = RunStore(run_dir)
    first = next(i for i, e in enumerate(store.events()) if e["event"] == "section_done" and e["slot"] == 1)
    store.log_event("section_done", slot=1, status="complete", n_tiles=4, reimage=True, time=time.time())
    store.log_event("section_processed", slot=1, z=1, status="ok", take=first, time=time.time())
    vol = Volume.create(tmp_path / "v.zarr", (2, 64, 64), pixel_nm=4, thickness_nm=40, levels=1, chunk=64)
    worker = ProcessingWorker(store, SectionProcessor(vol, Canvas(np.zeros(2, int), (64, 64))), EventBus(),
                              z_of_slot={0: 0, 1: 1}, pixel_nm=4.0)
    try:
        assert [s for s, _ in worker.unprocessed()] == [0, 1]
        store.log_event("section_processed", slot=1, z=1, status="ok", time=time.time())   # an older journal: no take
        assert [s for s, _ in worker.unprocessed()] == [0]
    finally:
        worker.close()
