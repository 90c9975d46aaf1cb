"""Wire a run together: scope (real or simulated), store, engine, processing, volume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapescope.acquisition.acquisition import Planner
from tapescope.acquisition.calibration import CalibrationSuite
from tapescope.acquisition.engine import Engine, EngineSettings, RunSummary
from tapescope.acquisition.events import Alarm, EventBus
from tapescope.acquisition.journal import RunProgress
from tapescope.acquisition.plan import TilePlan, select_slots, tile_grid
from tapescope.acquisition.processing import ProcessingWorker
from tapescope.acquisition.qc import QCLimits
from tapescope.acquisition.roi import validate_polygon
from tapescope.acquisition.roi_planner import RoiPlanner
from tapescope.acquisition.store import JournalError, RunStore, TileRecord
from tapescope.alignment.pipeline import FLOWS, Canvas, SectionProcessor, scratch_problem
from tapescope.budget import plan_problem, search_extent_nm
from tapescope.config import ConfigError, ScopeConfig, TapeConfig, TapescopeConfig, parse_config
from tapescope.errors import TapescopeError
from tapescope.hardware.barcode_camera import BarcodeCamera, TapeView
from tapescope.hardware.genicam_camera import GenicamCamera
from tapescope.hardware.gridtape import GridTape, Tension
from tapescope.hardware.scope import Scope
from tapescope.montage.omezarr import Volume
from tapescope.montage.writer_lock import WriterLock, lock_path

ALIGN_MARGIN_PX = 256   # canvas border that absorbs section offsets on the tape


def sim_world_params(cfg: TapescopeConfig):  # -> WorldParams; imported lazily (sim only)
    from tapescope.sim_hardware.world import WorldParams

    cam, run = cfg.scope.camera, cfg.run
    rows, cols = run.grid
    ext_y = cam.height * (1 + (rows - 1) * (1 - run.overlap))
    ext_x = cam.width * (1 + (cols - 1) * (1 - run.overlap))
    pad = 2 * ALIGN_MARGIN_PX + 128
    return WorldParams(
        seed=run.seed, n_slots=max([*run.slots, *(run.slot_range or ())]) + 1, tile_px=(cam.height, cam.width),
        pixel_nm=cam.pixel_size_nm, section_px=(int(ext_y) + pad, int(ext_x) + pad),
        thickness_nm=cfg.processing.section_thickness_nm,
    )


@contextlib.asynccontextmanager
async def open_scope(cfg: TapescopeConfig, on_sim: Callable[[Any], None] | None = None,
                     ) -> AsyncIterator[tuple[Scope, ScopeConfig]]:
    """Connect to the configured scope; start the simulator for ports left unset.
    ``on_sim`` receives the SimulatedScope when one is started (tests arm faults through it)."""
    sim = None
    scope_cfg = cfg.scope
    if scope_cfg.simulated:
        from tapescope.sim_hardware.scope import SimulatedScope

        sim = SimulatedScope(sim_world_params(cfg), tape_driver=scope_cfg.tape.driver,
                             stage_driver=scope_cfg.stage.driver, column_driver=scope_cfg.column.driver,
                             camera_bits=scope_cfg.camera.bit_depth)
        await sim.start()
        if on_sim is not None:
            on_sim(sim)
        scope_cfg = sim.scope_config(scope_cfg)
    s, t, c = scope_cfg.stage, scope_cfg.tape, scope_cfg.camera
    assert s.url and t.url and (c.port is not None or c.driver == "genicam")
    scope = Scope.from_ports(
        stage_url=s.url, tape_url=t.url, camera_host=c.host, camera_port=c.port,
        serial_timeout_s=s.timeout_s, settle_timeout_s=s.settle_timeout_s,
        tape_move_timeout_s=t.move_timeout_s, camera_timeout_s=c.timeout_s, baudrate=s.baudrate,
        column_url=scope_cfg.column.url, column_ramp_timeout_s=scope_cfg.column.ramp_timeout_s,
        stage_travel_nm=(s.travel_um[0] * 1e3, s.travel_um[1] * 1e3),
        tape=gridtape(t) if t.driver == "gridtape" else None,
        camera=GenicamCamera(c.device, roi=(0, 0, c.width, c.height), timeout_s=c.timeout_s,
                             pixel_format="Mono8" if c.bit_depth == 8 else None)
        if c.driver == "genicam" and c.device else None,
    )
    try:
        async with scope:
            yield scope, scope_cfg
    finally:
        if sim is not None:
            await sim.stop()


def gridtape(t: TapeConfig) -> GridTape:
    """GridTape's reel controller and tape camera, as configured."""
    assert t.url is not None and t.slots is not None
    c = t.camera
    view = TapeView(px_per_mm=c.px_per_mm, axis_px=c.axis_px, aperture_rows=c.aperture_rows,
                    aperture_mm=c.aperture_mm, digits=c.digits)
    if c.driver == "genicam":
        assert c.device is not None
        camera = BarcodeCamera(GenicamCamera(c.device, timeout_s=c.timeout_s), view=view)
    else:
        assert c.port is not None
        camera = BarcodeCamera.on_frame_protocol(c.host, c.port, view=view, timeout_s=c.timeout_s)
    return GridTape(
        t.url, camera, slots=t.slots,
        slot_pitch_mm=t.slot_pitch_mm, speed_mm_s=t.speed_mm_s, centre_tolerance_mm=t.centre_tolerance_mm,
        tension=Tension(t.tension_zero_counts, t.tension_counts_per_g, t.tension_low_g, t.tension_high_g),
        baudrate=t.baudrate, timeout_s=t.timeout_s, move_timeout_s=t.move_timeout_s)


def plan_grid(cfg: TapescopeConfig) -> list[TilePlan]:
    cam = cfg.scope.camera
    return tile_grid(*cfg.run.grid, (cam.height, cam.width), cam.pixel_size_nm, cfg.run.overlap)


async def acquire_and_process(cfg: TapescopeConfig, out_dir: Path, bus: EventBus, *,
                              on_engine: Callable[[Engine], None] | None = None,
                              on_sim: Callable[[Any], None] | None = None) -> AcquisitionResult:
    """A new run for `tapescope demo` and the GUI: raw tiles and journal in OUT/run, the
    aligned volume in OUT/volume.zarr. Wired exactly as `tapescope acquire` wires a run
    (`run_acquisition`): the same planner, engine settings, processing and checks.

    ``on_engine`` receives the engine before it starts (the GUI uses it for run control);
    ``on_sim`` the simulator, where one is started (the GUI injects faults through it)."""
    if (problem := processing_problem(cfg) or plan_problem(cfg, out_dir)) is not None:
        raise ValueError(problem)
    # Set-up I/O happens once, before any device moves; blocking here is harmless.
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    return await run_acquisition(cfg, out_dir / "run", bus, on_engine=on_engine, on_sim=on_sim,
                                 volume=out_dir / "volume.zarr")


# -- headless acquisition runs (tapescope acquire) ---------------------------------------------

RUN_DEFINING = ("run", "processing")     # config sections a resumed run must not change


class ResumeError(TapescopeError):
    """A run directory that cannot be resumed; the message names why."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_differences(old: TapescopeConfig, new: TapescopeConfig) -> list[str]:
    """Fields that decide what a run images and that differ between two configs."""
    a = _flat({k: old.model_dump(mode="json")[k] for k in RUN_DEFINING})
    b = _flat({k: new.model_dump(mode="json")[k] for k in RUN_DEFINING})
    # Where this host keeps scratch and does its arithmetic, not what is imaged.
    for machine_local in ("processing.scratch", "processing.device", "processing.scheduler", "processing.max_backlog"):
        a.pop(machine_local, None)
        b.pop(machine_local, None)
    cam_a, cam_b = old.scope.camera, new.scope.camera
    for f in ("width", "height", "pixel_size_nm", "bit_depth"):
        a[f"scope.camera.{f}"], b[f"scope.camera.{f}"] = getattr(cam_a, f), getattr(cam_b, f)
    return [f"{k}: run has {a.get(k)!r}, config has {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def snapshot_json(cfg: TapescopeConfig) -> str:
    """The config as the run directory keeps it: every field, defaults included (a resume
    must not pick up a default changed by an upgrade), and the slots said one way only."""
    d = cfg.model_dump(mode="json")
    if cfg.run.slot_range is not None or cfg.run.all_slots:
        del d["run"]["slots"]
    return json.dumps(d, indent=2)


def never_started(run_dir: Path) -> bool:
    """A run directory that a kill left before its journal: only start-up files, no tile."""
    if not run_dir.is_dir():
        return False
    allowed = {"config.json", "config.json.part", "run.log", "tiles", lock_path(run_dir / "volume.zarr").name}
    names = {p.name for p in run_dir.iterdir()}
    return (bool(names) and names <= allowed
            and not any(p.is_file() for p in (run_dir / "tiles").rglob("*")))


def check_resumable(run_dir: Path, cfg: TapescopeConfig) -> TapescopeConfig:
    """The run's config snapshot, if RUN_DIR is a run that can be resumed with CONFIG; else
    ResumeError naming why. Reads only: a refused resume changes nothing on disk."""
    if not run_dir.exists():
        raise ResumeError(f"{run_dir}: no such run directory (a new run is started with --run-dir)")
    if not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: is a file, not a run directory")
    store = RunStore(run_dir)
    if not store.journal_path.exists():
        if never_started(run_dir):
            return cfg
        what = "an empty folder" if not any(run_dir.iterdir()) else "no journal.jsonl here"
        raise ResumeError(f"{run_dir}: {what}: not a tapescope run directory")
    try:
        store.check_journal()
    except (JournalError, OSError) as exc:
        raise ResumeError(f"cannot resume: {exc}") from None
    try:
        snap = parse_config(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    except (OSError, ValueError, ConfigError) as exc:
        raise ResumeError(f"{run_dir}: cannot read the run's config snapshot: {exc}") from None
    diffs = config_differences(snap, cfg)
    if diffs:
        raise ResumeError(f"{run_dir}: the config differs from the one the run started with:\n  "
                          + "\n  ".join(diffs))
    return snap


def open_for_resume(run_dir: Path, cfg: TapescopeConfig) -> tuple[RunStore, TapescopeConfig, dict[str, Any]]:
    """Open a killed run: check it, cut a torn journal line, remove torn tile writes.

    The run continues with the configuration it started with (its snapshot); a CONFIG that
    differs in what decides the images is refused rather than silently mixed in."""
    snap = check_resumable(run_dir, cfg)
    store = RunStore(run_dir)
    torn = store.repair_journal()
    stray = store.stray_files()
    for p in stray:
        p.unlink()
    # Every journalled tile was fsync'd before its line; check the newest of each slot
    # against its checksum all the same (a disk that lied about a flush).
    invalid = []
    latest: dict[int, TileRecord] = {}
    for rec in store.tiles():
        latest[rec.slot] = rec
    for rec in latest.values():
        try:
            RunStore.read_tile(rec)
        except (OSError, ValueError) as exc:
            invalid.append(f"{rec.path.relative_to(run_dir)}: {exc}")
            store.log_event("tile_invalid", slot=rec.slot, row=rec.row, col=rec.col, error=str(exc))
    notes = {"torn_journal_bytes": torn, "torn_tile_files": [str(p.relative_to(run_dir)) for p in stray],
             "invalid_tiles": invalid}
    store.log_event("run_resumed", time=time.time(), **notes)
    # Keep cfg's scope (ports may differ: a restarted simulator, a moved serial adapter), its
    # scratch folder (the disk may be mounted elsewhere on this host) and its device.
    processing = snap.processing.model_copy(update={k: getattr(cfg.processing, k) for k in
                                                    ("scratch", "device", "scheduler", "max_backlog")})
    return store, snap.model_copy(update={"scope": cfg.scope, "mqtt": cfg.mqtt, "processing": processing}), notes


def processing_problem(cfg: TapescopeConfig) -> str | None:
    """Why live processing could not run as configured (a scratch folder that is not there,
    a GPU that is not), checked before a run creates anything."""
    proc = cfg.processing
    if not proc.enabled:
        return None
    if problem := scratch_problem(proc.scratch):
        return problem
    if proc.device == "gpu":
        from tapescope.gpu import probe
        cupy, why = probe()
        if cupy is None:
            return f"processing.device: 'gpu', but {why} (or set 'cpu' or 'auto')"
    if proc.scheduler is not None:
        from tapescope.acquisition.cluster import ClusterError, check_scheduler
        try:
            check_scheduler(proc.scheduler)
        except ClusterError as exc:
            return f"processing.{exc}"
    return None


def engine_settings(cfg: TapescopeConfig) -> EngineSettings:
    r = cfg.run
    return EngineSettings(
        qc=QCLimits(max_retakes=r.max_retakes), device_retries=r.device_retries,
        on_device_failure=r.on_device_failure, retry_window_s=r.retry_window_s, device_probe_s=r.device_probe_s,
        watchdog_stall_s=r.watchdog_stall_s,
        min_free_bytes=int(r.min_free_gb * 1e9), reimage_at_end=r.reimage_at_end,
        processing_wait_s=r.processing_wait_s,
        barcodes={int(k): v for k, v in r.barcodes.items()},
    )


def make_planner(cfg: TapescopeConfig) -> Planner:
    cam, r = cfg.scope.camera, cfg.run
    polygons = {k: validate_polygon(v, f"run.roi_polygons[{k!r}]") for k, v in r.roi_polygons.items()}
    search = (r.aperture_um[0] * 1e3, r.aperture_um[1] * 1e3) if r.aperture_um else None
    return RoiPlanner(mode=r.roi, grid=plan_grid(cfg), polygons=polygons, tile_px=(cam.height, cam.width),
                      pixel_nm=cam.pixel_size_nm, overlap=r.overlap, search_nm=search)


@dataclass
class AcquisitionResult:
    summary: RunSummary
    run_dir: Path
    volume: Path | None
    worker: ProcessingWorker | None
    resume_notes: dict[str, Any]
    slots: list[int]


async def run_acquisition(
    cfg: TapescopeConfig, run_dir: Path, bus: EventBus, *, resume: bool = False,
    on_engine: Callable[[Engine], None] | None = None, password: str | None = None,
    on_sim: Callable[[Any], None] | None = None, volume: Path | None = None,
) -> AcquisitionResult:
    """One run into RUN_DIR (raw tiles, journal, report; the volume in RUN_DIR/volume.zarr
    unless `volume` says where), or its resumption."""
    if (problem := processing_problem(cfg)) is not None:
        raise ValueError(problem)
    # One writer per volume, taken before anything is written (it makes the volume's folder,
    # a new run's, for its lock file).
    writer = WriterLock(volume or run_dir / "volume.zarr", f"the run in {run_dir}") if cfg.processing.enabled \
        else contextlib.nullcontext()
    with writer:
        notes: dict[str, Any] = {}
        if resume and not (run_dir / "journal.jsonl").exists() and never_started(run_dir):
            resume = False     # killed before its journal existed: nothing was recorded, start it
            notes = {"torn_journal_bytes": 0, "torn_tile_files": [], "invalid_tiles": [],
                     "note": "the run had not started; started it"}
        if resume:
            store, cfg, notes = open_for_resume(run_dir, cfg)
        else:
            store = RunStore.create(run_dir, snapshot_json(cfg))
        progress = RunProgress.replay(store)
        cam, r = cfg.scope.camera, cfg.run
        async with open_scope(cfg, on_sim) as (scope, _):
            if r.all_slots:
                slots = select_slots(all_slots=True, tape_slots=await scope.tape.slot_count())
            elif r.slot_range is not None:
                slots = select_slots(slot_range=r.slot_range)
            else:
                slots = select_slots(slots=r.slots)
            z_of_slot = {s: k for k, s in enumerate(slots)}
            worker, vol_path, queue = None, None, None
            if cfg.processing.enabled:
                vol_path = volume or store.dir / "volume.zarr"
                worker = _processing(cfg, store, bus, slots, z_of_slot, vol_path, search_canvas(cfg))
                queue = asyncio.Queue(maxsize=PROCESS_QUEUE)
            # A resumed run keeps the exposure its auto-exposure chose.
            exposure = progress.calibrations.get("auto_exposure", {}).get("exposure_ms", r.exposure_ms)
            engine = Engine(scope, store, bus, slots=slots, exposure_ms=exposure, section_queue=queue,
                            planner=make_planner(cfg), settings=engine_settings(cfg), progress=progress,
                            tile_shape=(cam.height, cam.width), pixel_nm=cam.pixel_size_nm,
                            calibration=CalibrationSuite(tuple(r.calibrate)) if r.calibrate else None)
            if worker is not None:
                worker.on_unregistered = engine.request_reimage   # re-imaged while the tape is loaded
            if on_engine is not None:
                on_engine(engine)
            bridge = None
            if cfg.mqtt.enabled:
                from tapescope.mqtt.bridge import BrokerSettings, MqttBridge

                m = cfg.mqtt
                bridge = MqttBridge(BrokerSettings(m.host, m.port, m.username, password, m.keepalive_s, m.buffer,
                                                   tls=m.tls_files),
                                    bus, cfg.scope.name, engine=engine, run_dir=str(run_dir))
                bridge.start()
            consumer = asyncio.create_task(worker.run(queue)) if worker is not None and queue is not None else None
            try:
                summary = await engine.run()
            finally:
                if consumer is not None:
                    await _finish_processing(consumer, bus)   # what was acquired, even after a failure
                if worker is not None:
                    await asyncio.to_thread(worker.close)
                if bridge is not None:
                    await bridge.stop()
        if worker is not None:
            # What no process of this run has judged (the journal knows, across resumes) is
            # recorded in the volume as missing, with why.
            final = RunProgress.replay(store)
            for slot in slots:
                p = final.slot(slot)
                if p.processing is None:
                    what = "acquired, not processed" if p.tiles else "not acquired"
                    worker.processor.record_missing(z_of_slot[slot], {"slot": slot, "z": z_of_slot[slot]},
                                                    f"{what} (run {summary.state.value})")
        write_report(store, summary, progress, slots, worker, notes)
        return AcquisitionResult(summary, run_dir, vol_path, worker, notes, slots)


PROCESS_QUEUE = 4     # sections waiting for processing; beyond it, processing catches up from disk


def search_canvas(cfg: TapescopeConfig) -> Canvas:
    """The volume's canvas for a run whose sections may lie anywhere in the search extent."""
    cam = cfg.scope.camera
    half = np.array(search_extent_nm(cfg)) / 2 / cam.pixel_size_nm
    corners = np.array([-half, half])
    return Canvas.around(corners - (cam.height / 2, cam.width / 2), (cam.height, cam.width), ALIGN_MARGIN_PX)


async def _finish_processing(consumer: asyncio.Task[None], bus: EventBus) -> None:
    """Wait for the processing worker; a worker that died is an alarm, and the run's report
    and the MQTT goodbye still follow."""
    try:
        await consumer
    except Exception as exc:
        logging.getLogger(__name__).exception("processing worker failed")
        bus.emit(Alarm("processing", f"processing stopped: {type(exc).__name__}: {exc}"))


def _processing(cfg: TapescopeConfig, store: RunStore, bus: EventBus, slots: list[int],
                z_of_slot: dict[int, int], vol_path: Path, canvas: Canvas) -> ProcessingWorker:
    """Volume, section processor and worker of a run; a volume already on disk (a resumed
    run) is opened and the live alignment primed from its last good section."""
    cam, proc = cfg.scope.camera, cfg.processing
    resumed = (vol_path / "zarr.json").exists()
    if resumed:
        volume = Volume.open(vol_path)
    else:
        volume = Volume.create(vol_path, (len(slots), *canvas.shape), pixel_nm=cam.pixel_size_nm,
                               thickness_nm=proc.section_thickness_nm, levels=proc.pyramid_levels, chunk=proc.chunk,
                               dtype="uint8" if cam.bit_depth == 8 else "uint16")
    processor = SectionProcessor(volume, canvas, align=proc.align, elastic=proc.elastic, lens=proc.lens,
                                 scratch=proc.scratch, device=proc.device, neighbours=proc.align_neighbours,
                                 look_ahead=proc.align_look_ahead, flow=FLOWS[proc.align_flow],
                                 tile_model=proc.tile_model)
    if resumed:
        # The next section aligns to the last good one written before the crash, not to nothing.
        primed = processor.prime_from_volume()
        store.log_event("alignment_primed", z=primed)
    cluster = None
    if proc.scheduler is not None:
        from tapescope.acquisition.cluster import SectionCluster
        cluster = SectionCluster(proc.scheduler)
    return ProcessingWorker(store, processor, bus, z_of_slot=z_of_slot, pixel_nm=cam.pixel_size_nm,
                            flatfield=proc.flatfield, cluster=cluster, max_backlog=proc.max_backlog)


def write_report(store: RunStore, summary: RunSummary, progress: RunProgress, slots: list[int],
                 worker: ProcessingWorker | None, notes: dict[str, Any]) -> Path:
    """RUN_DIR/report.json: what happened to each section, and how the run ended."""
    final = RunProgress.replay(store)
    sections = []
    for s in slots:
        p = final.slot(s)
        entry: dict[str, Any] = {"slot": s, "status": p.status or "not reached", "message": p.message,
                                 "tiles": len(p.tiles), "tiles_planned": len(p.plan.tiles) if p.plan else 0,
                                 "tiles_failed_qc": sorted(map(list, p.failed_qc))}
        # From the journal, as everything else here: a resumed run's report keeps the verdicts
        # that earlier processes reached.
        if worker is not None and p.processing is not None:
            entry["processing"] = dict(p.processing)
        sections.append(entry)
    report = {"state": summary.state.value, "reason": summary.reason, "seconds": summary.seconds,
              "tiles": final.tiles_stored, "resumes": final.resumes, "resume_notes": notes, "sections": sections}
    path = store.dir / "report.json"
    store.write_durable(path, json.dumps(report, indent=2).encode())
    return path
