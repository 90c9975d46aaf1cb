"""Simulator and driver speed, each against a baseline measured in the same run.

- stage and column query round trips (Stage.position(), Column.status() over a pty to the
  emulators) against a bare SerialLine echo over the same kind of pty: the driver's and
  emulator's own cost on top of the transport;
- simulated tile rate for 2048x2048 frames on ONE core (OpenCV limited to one thread):
  the world's render alone and the whole path (render + noise + TCP + driver), against
  NumPy drawing the same number of Poisson pixels, and against the 10 frames/s that the
  simulated camera must beat (it must never be the bottleneck);
- the same at overview magnification (16x larger pixels, the aperture mask in view).

Prints medians of repeated runs and ratios. Run: make bench  (or python bench/bench_sim.py)
"""

from __future__ import annotations

import asyncio
import statistics
import time

import cv2
import numpy as np

from tapescope.hardware.camera import Camera
from tapescope.hardware.column import Column
from tapescope.hardware.serial_line import SerialLine
from tapescope.hardware.stage import Stage
from tapescope.sim_hardware.pty_server import PtyLineServer
from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import SimWorld, WorldParams

N_QUERIES = 300
N_FRAMES = 20
REQUIRED_FPS = 10.0
TILE = (2048, 2048)


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


def timed_sync(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


async def queries(params: WorldParams) -> None:
    echo = Echo()
    await echo.start()
    async with SimulatedScope(params) as sim:
        line = SerialLine("echo", echo.port, timeout_s=1.0)
        await line.open()
        stage = Stage(sim.stage.port)
        column = Column(sim.column.port)
        await stage.connect()
        await column.connect()
        base = await timed(lambda: line.query("W X Y"), N_QUERIES)
        drv = await timed(stage.position, N_QUERIES)
        col = await timed(column.status, N_QUERIES)
        print(f"stage query   median {drv * 1e3:.3f} ms  | bare pty echo {base * 1e3:.3f} ms  | ratio {drv / base:.2f}")
        print(f"column query  median {col * 1e3:.3f} ms  | bare pty echo {base * 1e3:.3f} ms  | ratio {col / base:.2f}")
        await column.close()
        await stage.close()
        await line.close()
    await echo.stop()


async def tcp_frames(params: WorldParams, mag: float | None = None) -> float:
    async with SimulatedScope(params) as sim:
        if mag is not None:
            sim.world.column.magnification = mag
        cam = Camera("127.0.0.1", sim.camera.port, timeout_s=30)
        await cam.connect()
        await cam.set_exposure(0.01)   # exposure time ~0: what is left is the simulator's cost
        await cam.trigger()            # renders and caches the section
        frame = await timed(cam.trigger, N_FRAMES)
        await cam.close()
    return frame


def main() -> None:
    cv2.setNumThreads(1)   # one core, as the issue asks; NumPy's RNG is single-threaded anyway
    params = WorldParams(tile_px=TILE, section_px=(4096, 4096), n_slots=2)
    asyncio.run(queries(WorldParams(tile_px=(64, 64), section_px=(256, 256), n_slots=2)))

    rng = np.random.default_rng(0)
    lam = np.full(TILE, 2000.0)
    noise = timed_sync(lambda: rng.poisson(lam), N_FRAMES)
    mpx = TILE[0] * TILE[1] / 1e6

    world = SimWorld(params)
    world.expose(20.0)                # section render and caches, not part of the tile rate
    render = timed_sync(lambda: world.expose(20.0), N_FRAMES)
    whole = asyncio.run(tcp_frames(params))
    world.column.magnification = params.imaging_mag / 16
    world.expose(20.0)
    overview = timed_sync(lambda: world.expose(20.0), N_FRAMES)

    def line(name: str, t: float) -> str:
        return (f"{name:<28} median {t * 1e3:6.1f} ms ({1 / t:5.1f} tiles/s, {mpx / t:6.1f} Mpx/s)"
                f"  | numpy poisson alone {noise * 1e3:.1f} ms: ratio {t / noise:.2f}"
                f"  | vs {REQUIRED_FPS:g} fps needed: {1 / t / REQUIRED_FPS:.1f}x")

    print(line("sim render 2048^2, 1 core", render))
    print(line("sim frame over TCP 2048^2", whole))
    print(line("sim overview 2048^2", overview))


if __name__ == "__main__":
    main()
