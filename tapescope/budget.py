"""Does a run's plan fit this scope and this machine? Checked before anything is created.

A plan that cannot fit (tiles outside the stage's travel, one section's tiles larger than the
free disk, a simulated specimen larger than the free memory) is refused with one line that
names what does not fit, before a run directory, a device or a simulator exists. The engine
still checks the disk before each section (the disk fills while a run goes on); this check
only refuses what could never work.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from tapescope.acquisition.disk import section_need
from tapescope.config import TapescopeConfig

SCRATCH_BYTES_PER_PX = 14     # a section's alignment scratch (alignment/pipeline.py)
SIM_BYTES_PER_PX = 4 * 3      # float32 section, its pyramid and render temporaries
SIM_SECTIONS_HELD = 3         # the simulator keeps the sections around the beam rendered


def search_extent_nm(cfg: TapescopeConfig) -> tuple[float, float]:
    """The area a section may occupy: the aperture (auto ROI) or the configured grid's footprint."""
    cam, r = cfg.scope.camera, cfg.run
    if r.roi == "auto" and r.aperture_um is not None:
        return (r.aperture_um[0] * 1e3, r.aperture_um[1] * 1e3)
    rows, cols = r.grid
    return (cam.height * (1 + (rows - 1) * (1 - r.overlap)) * cam.pixel_size_nm,
            cam.width * (1 + (cols - 1) * (1 - r.overlap)) * cam.pixel_size_nm)


def tiles_per_section(cfg: TapescopeConfig) -> int:
    """The most tiles one section can need: the grid, or the search extent covered at the overlap."""
    cam, r = cfg.scope.camera, cfg.run
    if r.roi == "grid":
        return r.grid[0] * r.grid[1]
    ext = search_extent_nm(cfg)
    n = 1
    for extent, px in zip(ext, (cam.height, cam.width), strict=True):
        tile, step = px * cam.pixel_size_nm, px * (1 - r.overlap) * cam.pixel_size_nm
        n *= max(1, math.ceil((extent - tile) / step) + 1)
    return n


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where it would be created)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int:
    """Free space on the file system that `path` is on (or would be on, once created)."""
    return shutil.disk_usage(_existing(path)).free


def _device_of(path: Path) -> int:
    return os.stat(_existing(path)).st_dev


def available_memory() -> int:
    """Memory a new allocation can have without swapping (MemAvailable), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def travel_problem(cfg: TapescopeConfig) -> str | None:
    """Tiles or ROI points the stage cannot reach (travel centred on the beam axis)."""
    travel = tuple(t * 1e3 for t in cfg.scope.stage.travel_um)
    ext = search_extent_nm(cfg)
    if ext[0] > travel[0] or ext[1] > travel[1]:
        what = "aperture" if cfg.run.roi == "auto" and cfg.run.aperture_um else f"grid {list(cfg.run.grid)}"
        return (f"run: the {what} spans {ext[0] / 1e3:.0f} x {ext[1] / 1e3:.0f} um, more than the stage's "
                f"travel of {travel[0] / 1e3:.0f} x {travel[1] / 1e3:.0f} um (scope.stage.travel_um)")
    for key, poly in cfg.run.roi_polygons.items():
        for y, x in poly:
            if abs(y) > travel[0] / 2 or abs(x) > travel[1] / 2:
                return (f"run.roi_polygons[{key!r}]: point ({y:.0f}, {x:.0f}) nm lies outside the stage's "
                        f"travel of +-{travel[0] / 2e3:.0f} x +-{travel[1] / 2e3:.0f} um")
    return None


def plan_problem(cfg: TapescopeConfig, run_dir: Path | None = None) -> str | None:
    """Why this plan cannot run here (None: it fits). Without `run_dir`, only what does not
    depend on the machine (`tapescope config check`)."""
    if (why := travel_problem(cfg)) is not None:
        return why
    if run_dir is None:
        return None
    cam, r = cfg.scope.camera, cfg.run
    n = tiles_per_section(cfg)
    section = section_need(n, (cam.height, cam.width))
    need = section + r.min_free_gb * 1e9
    free = _free_bytes(run_dir)
    if need > free:
        return (f"run: one section is {n} tiles ({_gb(section)}); with the {r.min_free_gb:g} GB reserve "
                f"(run.min_free_gb) it needs {_gb(need)}, and {run_dir} has {_gb(free)} free")
    ext = search_extent_nm(cfg)
    canvas_px = (ext[0] / cam.pixel_size_nm + 1024) * (ext[1] / cam.pixel_size_nm + 1024)
    if cfg.processing.enabled:
        scratch_dir = cfg.processing.scratch or run_dir
        scratch = canvas_px * SCRATCH_BYTES_PER_PX
        # The tiles and the reserve count against the scratch disk only where it is the run's.
        shared = _device_of(scratch_dir) == _device_of(run_dir)
        scratch_free = _free_bytes(scratch_dir)
        if scratch + (need if shared else 0) > scratch_free:
            return (f"processing: a section's alignment scratch is {_gb(scratch)}, more than {scratch_dir} "
                    f"has free besides the tiles ({_gb(scratch_free)} free); set "
                    "processing.scratch to a larger disk or processing.enabled = false")
    if cfg.scope.simulated:
        sim = canvas_px * SIM_BYTES_PER_PX * SIM_SECTIONS_HELD
        memory = available_memory()
        if sim > memory:
            return (f"run: the simulated specimen for a {ext[0] / 1e3:.0f} x {ext[1] / 1e3:.0f} um section needs "
                    f"about {_gb(sim)} of memory, and {_gb(memory)} is available")
    return None
