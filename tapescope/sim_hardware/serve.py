"""Run the simulator as its own process: `tapescope sim serve` (see docs/simulator.md).

Prints the ports as a TOML snippet for a scope config, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from .faults import parse_fault_spec
from .scope import SimulatedScope
from .world import WorldParams

READY = "# simulator ready"


def scope_snippet(sim: SimulatedScope) -> str:
    """The [scope] tables that point a config at this simulator's ports."""
    p = sim.world.p
    return "\n".join([
        "[scope.stage]", f'url = "{sim.stage.port}"', "",
        "[scope.tape]", f'url = "{sim.tape.port}"', "",
        "[scope.column]", f'url = "{sim.column.port}"', "",
        "[scope.camera]", f'host = "{sim.camera.host}"', f"port = {sim.camera.port}",
        f"height = {p.tile_px[0]}", f"width = {p.tile_px[1]}", f"pixel_size_nm = {p.pixel_nm:g}",
    ])


async def serve(params: WorldParams, faults: list[str], *, camera_port: int = 0,
                out: TextIO = sys.stdout, stop: asyncio.Event | None = None) -> None:
    """Start every emulator, arm `faults` (specs as on the command line), print, serve."""
    specs = [parse_fault_spec(f) for f in faults]   # refuse bad specs before opening anything
    sim = SimulatedScope(params)
    for name, count, after, options in specs:
        sim.inject(name, count, after=after, **options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with sim:
            print(f"# tapescope simulator: seed {params.seed}, {params.n_slots} slots; "
                  "put these tables in a config's [scope]", file=out)
            print(scope_snippet(sim), file=out)
            armed = ", ".join(f"{n} x{c}" for n, c in sim.world.faults.armed().items()) or "none"
            print(f"# faults armed: {armed}", file=out)
            print(f"{READY}; Ctrl-C stops it", file=out, flush=True)
            await stop.wait()
            fired = [name for _, name in sim.world.faults.fired]
            print(f"# stopping; faults fired: {', '.join(fired) or 'none'}", file=out, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
