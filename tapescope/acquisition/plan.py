"""The plan of a run: which slots, and the tile grid that covers each section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TilePlan:
    row: int
    col: int
    y_nm: float   # stage position of the tile centre
    x_nm: float

    @property
    def key(self) -> str:
        return f"r{self.row:03d}_c{self.col:03d}"


def tile_grid(
    rows: int, cols: int, tile_hw: tuple[int, int], pixel_nm: float, overlap: float,
    centre_nm: tuple[float, float] = (0.0, 0.0),
) -> list[TilePlan]:
    """A rows x cols grid centred on centre_nm, in serpentine order (no long stage returns)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step_y = tile_hw[0] * (1 - overlap) * pixel_nm
    step_x = tile_hw[1] * (1 - overlap) * pixel_nm
    y0 = centre_nm[0] - step_y * (rows - 1) / 2
    x0 = centre_nm[1] - step_x * (cols - 1) / 2
    tiles = []
    for r in range(rows):
        order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
        tiles.extend(TilePlan(r, c, y0 + r * step_y, x0 + c * step_x) for c in order)
    return tiles
