"""The disk a section's raw tiles take: the engine checks it before each section, the plan
check (tapescope/budget.py) before the run."""

from __future__ import annotations

TILE_BYTES_PER_PX = 2         # uint16 TIFF, uncompressed
DISK_MARGIN = 1.1             # TIFF headers, journal, file system


def section_bytes(n_tiles: int, tile_hw: tuple[int, int]) -> int:
    """A section's raw tiles as stored, without file overhead."""
    return n_tiles * tile_hw[0] * tile_hw[1] * TILE_BYTES_PER_PX


def section_need(n_tiles: int, tile_hw: tuple[int, int]) -> int:
    """Disk a section's tiles take, file overhead included (DISK_MARGIN)."""
    return int(section_bytes(n_tiles, tile_hw) * DISK_MARGIN)
