"""Simulator and driver speed, each against a baseline measured in the same run.

- stage query round trip (Stage.position() over a pty to the ASI emulator) against a bare
  SerialLine echo over the same kind of pty: the driver's own cost on top of transport;
- simulated tile rate (render + noise + TCP transfer) against NumPy drawing the same
  number of Poisson pixels: the simulator's cost per frame relative to its noise alone.

Prints medians of repeated runs and the ratio. Run: make bench
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from tapescope.hardware.camera import Camera
from tapescope.hardware.serial_line import SerialLine
from tapescope.hardware.stage import Stage
from tapescope.sim_hardware.pty_server import PtyLineServer
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

N_QUERIES = 300
N_FRAMES = 20


class Echo(PtyLineServer):
    recv_eol = b"\r"
    send_eol = b"\r\n"

    def handle(self, line: str) -> str:
        return line


async def timed(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


async def main() -> None:
    params = WorldParams(tile_px=(1024, 1024), section_px=(2048, 2048), n_slots=2)
    echo = Echo()
    await echo.start()
    async with SimulatedScope(params) as sim:
        line = SerialLine("echo", echo.port, timeout_s=1.0)
        await line.open()
        stage = Stage(sim.stage.port)
        await stage.connect()
        base = await timed(lambda: line.query("W X Y"), N_QUERIES)
        drv = await timed(stage.position, N_QUERIES)
        print(f"stage query   median {drv * 1e3:.3f} ms  | bare pty echo {base * 1e3:.3f} ms"
              f"  | ratio {drv / base:.2f}")
        await stage.close()
        await line.close()

        cam = Camera("127.0.0.1", sim.camera.port, timeout_s=30)
        await cam.connect()
        await cam.set_exposure(1.0)
        await cam.trigger()     # renders and caches the section
        frame = await timed(cam.trigger, N_FRAMES)
        await cam.close()
    await echo.stop()
    rng = np.random.default_rng(0)
    lam = np.full(params.tile_px, 100.0)
    samples = []
    for _ in range(N_FRAMES):
        t = time.perf_counter()
        rng.poisson(lam)
        samples.append(time.perf_counter() - t)
    noise = statistics.median(samples)
    mpx = params.tile_px[0] * params.tile_px[1] / 1e6
    print(f"sim tile 1024^2  median {frame * 1e3:.1f} ms ({1 / frame:.1f} tiles/s, {mpx / frame:.1f} Mpx/s)"
          f"  | numpy poisson alone {noise * 1e3:.1f} ms  | ratio {frame / noise:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
