"""The `tapescope` command line."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tapescope.allocator import keep_large_blocks
from tapescope.cli.stitch import stitch as stitch_command

if TYPE_CHECKING:
    from tapescope.config import TapescopeConfig

# Each command imports what it needs when it runs: `tapescope stitch` must not pay for the
# configuration models, asyncio or the engine's events (start-up is part of its speed).

app = typer.Typer(help="tapescope: serial-section TEM on tape, from tape to zarr.",
                  no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
sim_app = typer.Typer(help="Run the hardware simulator.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.command("stitch")(stitch_command)
mqtt_app = typer.Typer(help="Set up MQTT for remote monitoring (docs/mqtt.md).", no_args_is_help=True)
app.add_typer(mqtt_app, name="mqtt")

console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from tapescope import __version__

        console.print(f"tapescope {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log what every step does (INFO)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="log errors only"),
) -> None:
    """Options for every command: `tapescope --verbose stitch ...`."""
    if verbose and quiet:
        raise _fail("--verbose and --quiet exclude each other")
    if verbose or quiet:
        logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
        logging.getLogger("tapescope").setLevel(logging.INFO if verbose else logging.ERROR)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(path: Path | None) -> TapescopeConfig:
    from tapescope.config import ConfigError, TapescopeConfig, load_config

    if path is None:
        return TapescopeConfig()
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@config_app.command("check")
def config_check(file: Path = typer.Argument(..., help="TOML config file to validate")) -> None:
    """Validate a config file without touching any hardware."""
    from tapescope.acquisition.disk import section_bytes
    from tapescope.budget import plan_problem, tiles_per_section

    cfg = _load(file)
    if (problem := plan_problem(cfg)) is not None:
        raise _fail(f"{file}: {problem}")
    sim = "simulated" if cfg.scope.simulated else "hardware"
    cam = cfg.scope.camera
    n = tiles_per_section(cfg)
    console.print(f"[green]ok[/]: {file} ({sim} scope '{cfg.scope.name}', "
                  f"{len(cfg.run.slots)} slots, grid {cfg.run.grid[0]}x{cfg.run.grid[1]}; up to {n} tiles, "
                  f"{section_bytes(n, (cam.height, cam.width)) / 1e9:.2f} GB a section)")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="output folder"),
    sections: int = typer.Option(3, "--sections", min=1, max=64, help="sections (tape slots) to image"),
    grid: tuple[int, int] = typer.Option((3, 3), "--grid", help="tile grid per section: ROWS COLS"),
    config: Path | None = typer.Option(None, "--config", "--scope",
                                       help="TOML config, e.g. the ports `tapescope sim serve` printed "
                                       "(defaults: embedded, simulator in-process)"),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="replace OUT/run and OUT/volume.zarr of an earlier demo"),
) -> None:
    """Image a few sections of a simulated tape and write a stitched, aligned volume."""
    import asyncio

    from tapescope.acquisition.events import Alarm, Event, EventBus, SectionProcessed, TileAcquired
    from tapescope.runner import acquire_and_process

    if grid[0] < 1 or grid[1] < 1 or grid[0] * grid[1] > 400:
        raise _fail(f"--grid must be between 1x1 and 400 tiles, got {grid[0]}x{grid[1]}")
    cfg = _load(config)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={
        "slots": list(range(sections)), "grid": grid})})
    targets = [out / "run", out / "volume.zarr"]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise _fail(f"{', '.join(map(str, existing))} already exist; pass --overwrite to replace them")
    for p in existing:
        shutil.rmtree(p)

    bus = EventBus()
    n_tiles = sections * grid[0] * grid[1]
    alarms: list[str] = []
    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    t_acq = progress.add_task("acquire", total=n_tiles)
    t_proc = progress.add_task("stitch+align", total=sections)

    def on_event(ev: Event) -> None:
        if isinstance(ev, TileAcquired):
            progress.advance(t_acq)
        elif isinstance(ev, SectionProcessed):
            progress.advance(t_proc)
        elif isinstance(ev, Alarm):
            alarms.append(f"{ev.source}: {ev.message}")
            progress.console.print(f"[yellow]{ev.severity}[/] {ev.source}: {ev.message}")

    bus.subscribe(on_event)
    t0 = time.monotonic()
    with progress:
        result = asyncio.run(acquire_and_process(cfg, out, bus))
    elapsed = time.monotonic() - t0

    table = Table(title="tapescope demo", show_header=True)
    for col in ("z", "slot", "status", "max seam residual px", "alignment shift px", "align NCC"):
        table.add_column(col)
    worker = result.worker
    for slot, rep in sorted(worker.reports.items() if worker else []):
        table.add_row(str(rep.z), str(slot), rep.status, f"{rep.max_residual_px:.2f}",
                      f"({rep.shift_px[0]:+.1f}, {rep.shift_px[1]:+.1f})", f"{rep.alignment_confidence:.2f}")
    for slot, why in sorted(worker.failed.items() if worker else []):
        table.add_row("-", str(slot), "failed", "-", "-", why)
    console.print(table)
    s = result.summary
    console.print(f"sections {s.sections}, tiles {s.tiles}, time {elapsed:.1f} s, run {s.state.value}")
    console.print(f"raw tiles and journal: {result.run_dir}")
    if result.volume is not None:
        console.print(f"volume: {result.volume}  (look at it: tapescope view {result.volume})", soft_wrap=True)
    if s.state.value != "done" or (worker is not None and worker.failed):
        raise typer.Exit(1)


@app.command()
def gui(
    sim: bool = typer.Option(False, "--sim", help="drive a local engine against the built-in simulator"),
    mqtt: str | None = typer.Option(None, "--mqtt", help="attach to a headless run: "
                                    "mqtt://[user[:password]@]HOST[:PORT]/SCOPE (password also from "
                                    "$TAPESCOPE_MQTT_PASSWORD)"),
    config: Path | None = typer.Option(None, "--config", help="TOML config (defaults: embedded)"),
    out: Path = typer.Option(Path("gui-out"), "--out", help="folder for the runs started from the GUI"),
    start: bool = typer.Option(False, "--start", help="start a run as soon as the window opens"),
    sim_fault: str | None = typer.Option(None, "--sim-fault",
                                         help="inject a simulator fault, e.g. camera@12 (after 12 tiles)"),
    screenshot: Path | None = typer.Option(None, "--screenshot", help="save a PNG of the window and exit"),
    after: float = typer.Option(3.0, "--after", min=0.0, help="seconds before --screenshot is taken"),
) -> None:
    """The operator GUI: live view, section map, tape, QC and run control."""
    from tapescope.gui.app import ensure_display

    if mqtt is not None and sim:
        raise _fail("--sim and --mqtt exclude each other: drive a local engine, or attach to a run")
    if mqtt is not None:
        from tapescope.gui.remote import MqttTarget

        try:
            target = MqttTarget.parse(mqtt)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if screenshot is not None:
            ensure_display()
        from tapescope.gui.remote import run_remote_gui

        raise typer.Exit(run_remote_gui(target, screenshot=screenshot, after_s=after))
    cfg = _load(config)
    if sim and not cfg.scope.simulated:
        raise _fail("--sim with a config whose [scope] ports are all set: leave a port unset to simulate")
    if not sim and cfg.scope.simulated:
        raise _fail("no scope configured: pass --sim, or a --config whose [scope] names the ports")
    from tapescope.gui.session import SimFault

    try:
        fault = SimFault.parse(sim_fault) if sim_fault else None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if screenshot is not None:
        ensure_display()
    try:
        from tapescope.gui.app import run_gui
    except ImportError as exc:
        raise _fail(f"the GUI needs Qt: pip install 'tapescope[gui]' ({exc})") from None
    raise typer.Exit(run_gui(cfg, out, start=start, fault=fault, screenshot=screenshot, after_s=after))


@sim_app.command("serve")
def sim_serve(
    config: Path | None = typer.Option(None, "--config", help="TOML config: [run] sets seed, slots and "
                                       "section size, [scope.camera] the sensor, [scope.*] driver the "
                                       "interfaces served (gridtape, temscript)"),
    fault: list[str] = typer.Option([], "--fault", help="arm a fault: NAME[:COUNT][,after=N][,key=value...]; "
                                    "repeatable; names in docs/simulator.md"),
    slots: int = typer.Option(16, "--slots", min=1, max=100_000, help="slots on the simulated tape (at least "
                              "those the config's run images)"),
    camera_port: int = typer.Option(0, "--camera-port", min=0, max=65535, help="camera TCP port (0: any free)"),
    control_port: int | None = typer.Option(None, "--control-port", min=0, max=65535,
                                            help="also serve the control backdoor (arm faults while it runs) "
                                            "on 127.0.0.1:PORT (0: any free); docs/simulator.md"),
) -> None:
    """Serve the simulated stage, tape, column and camera; print their ports as config tables."""
    import asyncio
    import dataclasses

    from tapescope.runner import sim_world_params
    from tapescope.sim_hardware.faults import FaultBook, FaultError, parse_fault_spec
    from tapescope.sim_hardware.serve import serve
    from tapescope.sim_hardware.world import WorldParams

    cfg = _load(config)
    params: WorldParams = sim_world_params(cfg)
    params = dataclasses.replace(params, n_slots=max(params.n_slots, slots))
    try:
        for spec in fault:   # validate every spec before anything starts
            name, count, after, options = parse_fault_spec(spec)
            FaultBook().inject(name, count, after=after, **options)
        asyncio.run(serve(params, fault, camera_port=camera_port, scope=cfg.scope, control_port=control_port))
    except FaultError as exc:
        raise _fail(f"--fault: {exc}") from None
    except OSError as exc:
        raise _fail(f"cannot start the simulator: {exc}", 1) from None


@app.command()
def align(
    sections: list[Path] = typer.Argument(..., help="a folder with sections.csv (header 'file,z') and one TIFF per "
                                          "section, or stitched sections in z order (`tapescope stitch --pixel-nm` "
                                          "output folders)"),
    out: Path = typer.Option(..., "--out", help="output folder: volume.zarr, volume.transforms/, alignment.csv"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="dask scheduler tcp://HOST:PORT "
                                         "(default: a LocalCluster on this machine)"),
    workers: int = typer.Option(2, "--workers", help="LocalCluster worker processes"),
    device: str = typer.Option("cpu", "--device", help="cpu, gpu (CuPy) or auto"),
    pixel_nm: float | None = typer.Option(None, "--pixel-nm", help="pixel size, nm (default: the montages' own; "
                                          "4 nm for TIFFs, said)"),
    thickness_nm: float = typer.Option(40.0, "--thickness-nm", help="section thickness, nm"),
) -> None:
    """Align a stack of section montages into an OME-Zarr volume (rigid, affine, elastic)."""
    from tapescope.cli.align import run_align

    given = sections[0] if len(sections) == 1 else sections
    raise typer.Exit(run_align(given, out, scheduler=scheduler, workers=workers, device=device,
                               pixel_nm=pixel_nm, thickness_nm=thickness_nm, console=console,
                               err_console=err_console))


@app.command()
def process(
    run_dir: Path = typer.Argument(..., help="a run directory (journal.jsonl, config.json, tiles/)"),
    out: Path | None = typer.Option(None, "--out", help="the volume to write (default RUN_DIR/volume.zarr); "
                                    "an existing one of this run is completed, not replaced"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="dask scheduler tcp://HOST:PORT for stitching "
                                         "and rendering (default: the run's [processing] scheduler, else here)"),
    sections: str | None = typer.Option(None, "--sections", help="A-B: only sections z = A..B (inclusive)"),
    config: Path | None = typer.Option(None, "--config", help="TOML config whose [processing] fields replace "
                                       "the run's"),
) -> None:
    """A finished run's raw tiles to the aligned volume, as live processing does it; resumable
    (exit codes: 0 ok, 1 some section not ok, 2 bad input)."""
    from tapescope.cli.process import run_process

    override = _load(config) if config is not None else None
    raise typer.Exit(run_process(run_dir, out, scheduler=scheduler, sections=sections, override=override,
                                 console=console, err_console=err_console))


@app.command()
def view(
    volume: Path = typer.Argument(..., help="a volume folder, e.g. RUN_DIR/volume.zarr"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free one)"),
    napari: bool = typer.Option(False, "--napari", help="open it in napari instead of Neuroglancer"),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="open the browser where there is a display"),
) -> None:
    """Look at a volume: serve it to Neuroglancer (its own client, no internet) or open napari."""
    import asyncio

    from tapescope.view.state import ViewError

    if napari:
        from tapescope.view.napari_view import open_in_napari

        try:
            open_in_napari(volume)
        except ViewError as exc:
            raise _fail(str(exc)) from None
        return
    from tapescope.view.server import serve

    async def main() -> None:
        try:
            server = serve(volume, port)
        except ViewError as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            raise _fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (try --port 0)") from None
        console.print(f"serving {volume} on {server.base} (Ctrl-C to stop)\n"
                      f"open: {server.viewer_url}   (Neuroglancer on the volume; {server.base}/ leads there)\n"
                      f"data: {server.base}/volume/   state: {server.base}/state.json", highlight=False,
                      soft_wrap=True)
        if browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            webbrowser.open(server.viewer_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    asyncio.run(main())


@mqtt_app.command("certs")
def mqtt_certs(
    directory: Path = typer.Argument(..., help="folder for ca.crt/ca.key, broker.crt/.key and ROLE.crt/.key"),
    host: list[str] = typer.Option([], "--host", help="a name or address clients use to reach the broker "
                                   "(repeat; localhost and 127.0.0.1 are always included)"),
    client: list[str] = typer.Option([], "--client", help="a client certificate for this role: engine, operator "
                                     "or viewer (repeat)"),
    days: int = typer.Option(825, "--days", min=1, max=3650, help="validity of the broker's and clients' certificates"),
) -> None:
    """Make the facility's CA (kept when it exists), the broker's certificate and client certificates."""
    from tapescope.mqtt.certs import CertError, make_all

    try:
        made = make_all(directory, host, client, days=days)
    except CertError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write certificates to {directory}: {exc.strerror or exc}") from None
    for issued in made:
        console.print(f"{issued.cert}  (key {issued.key}, owner-only)", highlight=False)
    console.print("renew: run this command again before the certificates expire; the CA is kept, so clients "
                  "keep trusting the broker (docs/mqtt.md)", highlight=False)


@app.command()
def acquire(
    config: Path = typer.Argument(..., help="TOML run configuration"),
    resume: Path | None = typer.Option(None, "--resume", help="continue the run in this directory"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="directory of a new run (default runs/SCOPE-TIME)"),
) -> None:
    """Run an acquisition headless (exit codes: 0 ok, 3 needs attention, 4 failed, 5 aborted, 2 bad input)."""
    from tapescope.cli.acquire import run_headless

    cfg = _load(config)
    if resume is not None and run_dir is not None:
        raise _fail("give --resume RUN_DIR or --run-dir DIR, not both")
    target = resume or run_dir or Path("runs") / f"{cfg.scope.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    raise typer.Exit(run_headless(cfg, target, resume=resume is not None, console=console))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keep_large_blocks()
    app()

