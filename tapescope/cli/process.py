"""`tapescope process RUN_DIR [--out VOLUME] [--scheduler ADDR] [--sections A-B] [--config F]`.

A run's raw tiles to the aligned volume, after the run, with the live processing's code
(`ProcessingWorker` and `SectionProcessor`: the run's flat-field, stitch, render, align) and
its settings (the run's config snapshot; the fields that --config's [processing] table
names override them). Resumable: a section the volume records as processed is skipped, so
a killed `process` goes on where it stopped. Nothing is written into the run directory.

Exit codes: 0 every section chosen is ok; 1 some did not register or failed; 2 bad input
(one line, nothing changed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tifffile
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tapescope.acquisition.cluster import SectionCluster
from tapescope.acquisition.events import Alarm, Event, EventBus, SectionProcessed
from tapescope.acquisition.plan import select_slots
from tapescope.acquisition.processing import ProcessingWorker
from tapescope.acquisition.store import JournalError, RunStore
from tapescope.alignment.pipeline import FLOWS, SectionProcessor
from tapescope.config import ConfigError, TapescopeConfig, parse_config
from tapescope.errors import TapescopeError
from tapescope.montage.omezarr import Volume
from tapescope.montage.writer_lock import WriterLock
from tapescope.runner import processing_problem, search_canvas


class ProcessError(TapescopeError):
    """Bad input to `tapescope process`; the message names it."""


def open_run(run_dir: Path, override: TapescopeConfig | None) -> tuple[RunStore, TapescopeConfig]:
    """The run's store and its config (the snapshot, [processing] overridden where the
    override's file sets a field). Reads only."""
    if not run_dir.is_dir():
        raise ProcessError(f"{run_dir}: no such run directory" if not run_dir.exists()
                           else f"{run_dir}: is a file, not a run directory")
    store = RunStore(run_dir)
    if not store.journal_path.exists() or not (run_dir / "config.json").exists():
        raise ProcessError(f"{run_dir}: no journal.jsonl and config.json here: not a tapescope run directory")
    try:
        store.check_journal()
        cfg = parse_config(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    except (JournalError, ConfigError, OSError, ValueError) as exc:
        raise ProcessError(f"{run_dir}: cannot read the run: {exc}") from None
    if override is not None:
        given = override.processing
        cfg = cfg.model_copy(update={"processing": cfg.processing.model_copy(
            update={k: getattr(given, k) for k in given.model_fields_set})})
    if not store.tiles():
        raise ProcessError(f"{run_dir}: the run holds no tiles")
    return store, cfg


def run_slots(cfg: TapescopeConfig, store: RunStore) -> list[int]:
    """The run's slots in tape order, as the live run numbered them (z = index). A run of
    every slot on the tape knows the tape's length from the tape; here it is taken as up to
    the last slot the journal names."""
    r = cfg.run
    if r.all_slots:
        seen = [int(e["slot"]) for e in store.events() if "slot" in e]
        return select_slots(all_slots=True, tape_slots=max(seen) + 1)
    if r.slot_range is not None:
        return select_slots(slot_range=r.slot_range)
    return select_slots(slots=r.slots)


def parse_sections(text: str | None, depth: int) -> range:
    """--sections A-B (z, inclusive) or A; all sections when not given."""
    if text is None:
        return range(depth)
    try:
        first, _, last = text.partition("-")
        a, b = int(first), int(last or first)
    except ValueError:
        raise ProcessError(f"--sections {text}: expected A-B (section numbers z, inclusive) or A") from None
    if not 0 <= a <= b < depth:
        raise ProcessError(f"--sections {text}: the run has sections z = 0..{depth - 1}")
    return range(a, b + 1)


def tile_dtype(store: RunStore) -> str:
    """The volume's sample type: the camera's (uint8 tiles give a uint8 volume), else uint16."""
    with tifffile.TiffFile(store.tiles()[0].path) as tif:
        return "uint8" if tif.series[0].dtype.itemsize == 1 else "uint16"


def check_volume(path: Path, shape: tuple[int, int, int], dtype: str, pixel_nm: float) -> None:
    """An existing --out must be this run's volume (a killed `process`, or the live run's)."""
    if path.exists() and not (path / "zarr.json").exists():
        raise ProcessError(f"--out {path}: exists and is not a volume")
    if not path.exists():
        return
    try:
        volume = Volume.open(path)
    except Exception as exc:     # zarr's errors for a broken group are many; each is bad input here
        raise ProcessError(f"--out {path}: cannot open the volume: {exc}") from None
    scale = volume.group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    if volume.shape != shape or str(volume.levels[0].dtype) != dtype or abs(scale[-1] - pixel_nm) > 1e-9:
        raise ProcessError(f"--out {path}: a volume of {volume.shape} {volume.levels[0].dtype} at {scale[-1]} nm, "
                           f"this run needs {shape} {dtype} at {pixel_nm} nm: not this run's volume")


def run_process(run_dir: Path, out: Path | None, *, scheduler: str | None, sections: str | None,
                override: TapescopeConfig | None, console: Console, err_console: Console) -> int:
    cluster = None
    try:
        store, cfg = open_run(run_dir, override)
        proc, cam = cfg.processing, cfg.scope.camera
        slots = run_slots(cfg, store)
        chosen = parse_sections(sections, len(slots))
        if (problem := processing_problem(cfg.model_copy(update={
                "processing": proc.model_copy(update={"enabled": True})}))) is not None:
            raise ProcessError(problem)
        volume_path = out or run_dir / "volume.zarr"
        canvas = search_canvas(cfg)
        shape, dtype = (len(slots), *canvas.shape), tile_dtype(store)
        check_volume(volume_path, shape, dtype, cam.pixel_size_nm)
        address = scheduler or proc.scheduler
        if address:
            cluster = SectionCluster(address)
        # Last of the checks: a lock taken here is a file beside the volume.
        lock = WriterLock(volume_path, f"tapescope process {run_dir}").acquire()
    except TapescopeError as exc:
        if cluster is not None:
            cluster.close()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    try:
        if (volume_path / "zarr.json").exists():
            volume = Volume.open(volume_path)
        else:
            volume = Volume.create(volume_path, shape, pixel_nm=cam.pixel_size_nm,
                                   thickness_nm=proc.section_thickness_nm, levels=proc.pyramid_levels,
                                   chunk=proc.chunk, dtype=dtype)
        processor = SectionProcessor(volume, canvas, align=proc.align, elastic=proc.elastic, lens=proc.lens,
                                     scratch=proc.scratch, device=proc.device, neighbours=proc.align_neighbours,
                                     look_ahead=proc.align_look_ahead, flow=FLOWS[proc.align_flow],
                                     tile_model=proc.tile_model)
        processor.prime_from_volume()      # the reference and the lens of a process that was stopped
        bus = EventBus()
        z_of_slot = {s: k for k, s in enumerate(slots)}
        worker = ProcessingWorker(store, processor, bus, z_of_slot=z_of_slot, pixel_nm=cam.pixel_size_nm,
                                  flatfield=proc.flatfield, journal=False, cluster=cluster)
        cluster = None                     # the worker closes it
        return _run(worker, [s for s in slots if z_of_slot[s] in chosen], volume_path, address, console)
    finally:
        if cluster is not None:
            cluster.close()
        lock.release()


def _run(worker: ProcessingWorker, slots: list[int], volume_path: Path, address: str | None,
         console: Console) -> int:
    """Process, with a progress bar and one line per section; then the per-section table."""
    progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("stitch+align", total=len(slots))
    started = [time.monotonic()]

    def on_event(ev: Event) -> None:
        if isinstance(ev, SectionProcessed):
            took = time.monotonic() - started[0]
            started[0] = time.monotonic()
            progress.console.print(f"z={ev.z} slot {ev.slot}: {ev.status}, seam {ev.max_residual_px:.2f} px, shift "
                                   f"({ev.shift_px[0]:+.1f}, {ev.shift_px[1]:+.1f}) px, NCC "
                                   f"{ev.alignment_confidence:.2f}, {took:.1f} s"
                                   + (f": {ev.message}" if ev.message else ""), highlight=False)
            progress.advance(task)
        elif isinstance(ev, Alarm):
            progress.console.print(f"[yellow]{ev.severity}[/] {ev.source}: {ev.message}", highlight=False)

    def on_skip(slot: int, z: int) -> None:
        progress.console.print(f"z={z} slot {slot}: already in the volume, skipped", highlight=False)
        progress.advance(task)

    worker.bus.subscribe(on_event)
    console.print(f"processing {len(slots)} sections of {worker.store.dir} into {volume_path} "
                  f"({'dask ' + address if address else 'in this process'})", highlight=False, soft_wrap=True)
    t0 = time.monotonic()
    try:
        with progress:
            worker.process_offline(slots, on_skip=on_skip)
    finally:
        worker.close()
    records = worker.processor.volume.group.attrs["tapescope"].get("sections", {})
    table = Table(title="tapescope process", show_header=True)
    for col in ("z", "slot", "status", "max seam residual px", "alignment shift px", "align NCC"):
        table.add_column(col)
    bad = 0
    for slot in slots:
        z = worker.z_of_slot[slot]
        r = records.get(str(z), {})
        status = r.get("status", "not written")
        bad += status != "ok" and not str(r.get("message", "")).startswith("no section to process")
        if status in ("ok", "unaligned"):
            sy, sx = r.get("shift_px", (0.0, 0.0))
            table.add_row(str(z), str(slot), status, f"{r.get('max_residual_px', 0.0):.2f}", f"({sy:+.1f}, {sx:+.1f})",
                          f"{r.get('alignment_confidence', 0.0):.2f}")
        else:
            table.add_row(str(z), str(slot), status, "-", "-", str(r.get("message", "")))
    console.print(table)
    console.print(f"sections {len(slots)}, not ok {bad}, time {time.monotonic() - t0:.1f} s")
    console.print(f"volume: {volume_path}  (look at it: tapescope view {volume_path})", soft_wrap=True,
                  highlight=False)
    return 1 if bad else 0
