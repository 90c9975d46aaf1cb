"""Run the simulator as its own process: `tapescope sim serve` (see docs/simulator.md).

Prints the ports as a TOML snippet for a scope config, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from tapescope.config import ScopeConfig

from .backdoor import start_backdoor
from .faults import parse_fault_spec
from .scope import SimulatedScope
from .world import WorldParams

READY = "# simulator ready"
CONTROL = "# control backdoor:"


def scope_snippet(sim: SimulatedScope, base: ScopeConfig | None = None) -> str:
    """The [scope] tables that point a config at this simulator's ports."""
    sc = sim.scope_config(base)
    lines = ["[scope.stage]", f'url = "{sc.stage.url}"', "", "[scope.tape]", f'url = "{sc.tape.url}"']
    if sc.tape.driver == "gridtape":
        lines += ['driver = "gridtape"', f"slots = {sc.tape.slots}", f"slot_pitch_mm = {sc.tape.slot_pitch_mm:g}",
                  "", "[scope.tape.camera]", f'host = "{sc.tape.camera.host}"', f"port = {sc.tape.camera.port}"]
    lines += ["", "[scope.column]", f'url = "{sc.column.url}"', ""]
    c = sc.camera
    if c.driver == "tcp":
        lines += ["[scope.camera]", f'host = "{c.host}"', f"port = {c.port}",
                  f"height = {c.height}", f"width = {c.width}", f"pixel_size_nm = {c.pixel_size_nm:g}"]
    return "\n".join(lines)


async def serve(params: WorldParams, faults: list[str], *, camera_port: int = 0,
                out: TextIO = sys.stdout, stop: asyncio.Event | None = None,
                scope: ScopeConfig | None = None, control_port: int | None = None) -> None:
    """Start every emulator, arm `faults` (specs as on the command line), print, serve.
    ``scope``: its drivers say which interfaces to serve (GridTape's, temscript's).
    ``control_port``: also serve the control backdoor there (0: any free port; backdoor.py)."""
    specs = [parse_fault_spec(f) for f in faults]   # refuse bad specs before opening anything
    sc = scope or ScopeConfig()
    sim = SimulatedScope(params, tape_driver=sc.tape.driver, stage_driver=sc.stage.driver,
                         column_driver=sc.column.driver, camera_bits=sc.camera.bit_depth)
    for name, count, after, options in specs:
        sim.inject(name, count, after=after, **options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    control: asyncio.Server | None = None
    try:
        async with sim:
            print(f"# tapescope simulator: seed {params.seed}, {params.n_slots} slots; "
                  "put these tables in a config's [scope]", file=out)
            print(scope_snippet(sim, scope), file=out)
            armed = ", ".join(f"{n} x{c}" for n, c in sim.world.faults.armed().items()) or "none"
            print(f"# faults armed: {armed}", file=out)
            if control_port is not None:
                control = await start_backdoor(sim.world.faults, control_port)
                print(f"{CONTROL} 127.0.0.1:{control.sockets[0].getsockname()[1]}", file=out)
            print(f"{READY}; Ctrl-C stops it", file=out, flush=True)
            await stop.wait()
            fired = [name for _, name in sim.world.faults.fired]
            print(f"# stopping; faults fired: {', '.join(fired) or 'none'}", file=out, flush=True)
    finally:
        if control is not None:
            control.close()
            await control.wait_closed()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
