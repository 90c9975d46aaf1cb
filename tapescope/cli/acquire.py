"""`tapescope acquire CONFIG [--resume RUN_DIR]`: a headless run with rich progress.

Exit codes (also in docs/acquisition.md):
    0  done, every section with tissue complete (empty slots are fine)
    3  done, but some section needs a person: flagged for re-imaging, damaged, skipped,
       wrong barcode, not processed
    4  failed (a device fault that retries did not cure, with on_device_failure = "fail")
    5  aborted (operator, MQTT, Ctrl-C, SIGTERM)
    2  bad input: configuration, run directory, resume refused
Logs: RUN_DIR/run.log (structured, one JSON object per line) besides the console.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tapescope.acquisition.engine import Engine, RunState
from tapescope.acquisition.events import (
    Alarm,
    Event,
    EventBus,
    ProcessingBacklog,
    SectionFinished,
    StateChanged,
    TileAcquired,
)
from tapescope.acquisition.events import Progress as ProgressEvent
from tapescope.budget import plan_problem
from tapescope.config import TapescopeConfig
from tapescope.hardware.errors import DeviceError

EXIT_OK, EXIT_BAD_INPUT, EXIT_ATTENTION, EXIT_FAILED, EXIT_ABORTED = 0, 2, 3, 4, 5
NEEDS_ATTENTION = frozenset({"flagged", "damaged", "skipped", "wrong_barcode", "not reached"})


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"time": record.created, "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def exit_code(state: RunState, sections: list[dict[str, Any]]) -> int:
    if state is RunState.ABORTED:
        return EXIT_ABORTED
    if state is not RunState.DONE:
        return EXIT_FAILED
    bad = [s for s in sections if s["status"] in NEEDS_ATTENTION
           or s.get("processing", {}).get("status") == "failed"]
    return EXIT_ATTENTION if bad else EXIT_OK


def run_headless(cfg: TapescopeConfig, run_dir: Path, *, resume: bool, console: Console) -> int:
    from tapescope.runner import ResumeError, check_resumable, run_acquisition

    def refuse(message: str) -> int:
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT

    # Everything that can refuse the run is checked before anything is created or changed.
    if run_dir.exists() and not run_dir.is_dir():
        return refuse(f"{run_dir} is a file, not a run directory")
    if not resume and (run_dir / "journal.jsonl").exists():
        return refuse(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
    if resume:
        try:
            check_resumable(run_dir, cfg)
        except ResumeError as exc:
            return refuse(str(exc))
    if (problem := plan_problem(cfg, run_dir)) is not None:
        return refuse(problem)
    password = os.environ.get(cfg.mqtt.password_env) if cfg.mqtt.enabled else None
    if cfg.mqtt.enabled and (files := cfg.mqtt.tls_files) is not None:
        from tapescope.mqtt.tls import TlsError

        try:
            files.context()
        except TlsError as exc:
            return refuse(f"mqtt: {exc}")
    if cfg.mqtt.enabled and cfg.mqtt.username and password is None and cfg.mqtt.cert_file is None:
        console.print(f"[bold red]error:[/] mqtt.enabled: set the password in ${cfg.mqtt.password_env}")
        return EXIT_BAD_INPUT
    from tapescope.runner import processing_problem

    if (problem := processing_problem(cfg)) is not None:
        return refuse(problem)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return refuse(f"cannot create the run directory {run_dir}: {exc.strerror or exc}")
    for h in logging.getLogger().handlers:     # the console keeps warnings; run.log gets INFO too
        if h.level == logging.NOTSET:
            h.setLevel(logging.WARNING)
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(JsonLogFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger("tapescope").setLevel(logging.INFO)
    bus = EventBus()
    progress = Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=False)
    t_sec = progress.add_task("sections", total=None, info="")
    t_tile = progress.add_task("tiles", total=None, info="")
    t_backlog = progress.add_task("processing", total=None, info="", visible=cfg.processing.enabled)
    log = logging.getLogger("tapescope.acquire")

    def on_event(ev: Event) -> None:
        if isinstance(ev, ProgressEvent):
            progress.update(t_sec, completed=ev.sections_done, total=ev.sections_total,
                            info=f"slot {ev.slot}" if ev.slot >= 0 else "")
            progress.update(t_tile, completed=ev.tiles_done, total=max(ev.tiles_total, ev.tiles_done),
                            info=f"{ev.tiles_per_s:.1f} tiles/s")
        elif isinstance(ev, Alarm):
            progress.console.print(f"[yellow]{ev.severity}[/] {ev.source}: {ev.message}", highlight=False)
        elif isinstance(ev, StateChanged):
            log.info("state %s -> %s (%s)", ev.old, ev.new, ev.reason)
            if ev.new in ("paused", "recovering"):
                progress.console.print(f"[cyan]{ev.new}[/]: {ev.reason}", highlight=False)
        elif isinstance(ev, ProcessingBacklog):
            progress.update(t_backlog, info=f"{ev.waiting} sections waiting, oldest {ev.oldest_s:.0f} s"
                            + (f", {ev.in_flight} in flight" if ev.in_flight else ""))
        elif isinstance(ev, SectionFinished):
            log.info("slot %d: %s %s", ev.slot, ev.status, ev.message)
        elif isinstance(ev, TileAcquired) and ev.qc.get("faults"):
            log.warning("slot %d r%d c%d stored with QC faults %s", ev.slot, ev.row, ev.col, ev.qc["faults"])

    bus.subscribe(on_event)
    engines: list[Engine] = []

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        # Ctrl-C or SIGTERM: abort at the next tile boundary, so the tile in flight is kept.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: engines and engines[0].abort(f"signal {signal.Signals(s).name}"))
        return await run_acquisition(cfg, run_dir, bus, resume=resume, on_engine=engines.append, password=password)

    if cfg.processing.enabled:
        console.print(f"watch the volume as it grows: tapescope view {run_dir / 'volume.zarr'}", highlight=False,
                      soft_wrap=True)
    t0 = time.monotonic()
    try:
        with progress:
            result = asyncio.run(main())
    except ResumeError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return EXIT_BAD_INPUT
    except DeviceError as exc:
        # A device that does not answer at start-up (after the scope's own tries): nothing
        # was imaged in this start; say which, and how to go on.
        console.print(f"[bold red]error:[/] cannot start: {exc}; nothing was imaged. Check the device, then "
                      f"continue the run: tapescope acquire CONFIG --resume {run_dir}", highlight=False,
                      soft_wrap=True)
        return EXIT_FAILED
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    report = json.loads((run_dir / "report.json").read_text())
    table = Table(title=f"run {run_dir}")
    for col in ("slot", "status", "tiles", "QC failed", "processing", "note"):
        table.add_column(col)
    for s in report["sections"]:
        table.add_row(str(s["slot"]), s["status"], f"{s['tiles']}/{s['tiles_planned']}",
                      str(len(s["tiles_failed_qc"])), s.get("processing", {}).get("status", "-"),
                      s["message"] or s.get("processing", {}).get("message", ""))
    console.print(table)
    summ = result.summary
    code = exit_code(summ.state, report["sections"])
    console.print(f"run {summ.state.value}{': ' + summ.reason if summ.reason else ''}; "
                  f"{report['tiles']} tiles stored; {time.monotonic() - t0:.1f} s; exit code {code}", highlight=False)
    if result.resume_notes:
        n = result.resume_notes
        console.print(f"resumed: torn journal bytes {n['torn_journal_bytes']}, torn tile files "
                      f"{len(n['torn_tile_files'])}, invalid tiles {len(n['invalid_tiles'])}", highlight=False)
    console.print(f"run directory: {run_dir} (report.json, journal.jsonl, run.log"
                  + (", volume.zarr)" if result.volume else ")"), highlight=False)
    if result.volume:
        console.print(f"look at it: tapescope view {result.volume}", highlight=False, soft_wrap=True)
    return code
