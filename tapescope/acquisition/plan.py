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


@dataclass(frozen=True)
class SectionPlan:
    """What will be imaged on one slot. Journalled before the first tile, so that a resumed
    run images the same tiles at the same places (no hole, no duplicate)."""

    slot: int
    barcode: str
    tiles: tuple[TilePlan, ...]
    roi_nm: tuple[tuple[float, float], ...] = ()    # (y, x) polygon; () = the whole grid
    roi_source: str = "grid"                        # "grid" | "auto" | "operator"

    def to_json(self) -> dict:
        return {"slot": self.slot, "barcode": self.barcode, "roi_source": self.roi_source,
                "roi_nm": [list(p) for p in self.roi_nm],
                "tiles": [[t.row, t.col, t.y_nm, t.x_nm] for t in self.tiles]}

    @classmethod
    def from_json(cls, d: dict) -> SectionPlan:
        return cls(int(d["slot"]), str(d["barcode"]),
                   tuple(TilePlan(int(r), int(c), float(y), float(x)) for r, c, y, x in d["tiles"]),
                   tuple((float(y), float(x)) for y, x in d.get("roi_nm", [])), str(d.get("roi_source", "grid")))


def select_slots(*, slots: list[int] | None = None, slot_range: tuple[int, int] | None = None,
                 all_slots: bool = False, tape_slots: int | None = None) -> list[int]:
    """The slots to image, in tape order: a list, an inclusive range, or every slot on the tape."""
    if sum(x is not None and x is not False for x in (slots, slot_range, all_slots or None)) != 1:
        raise ValueError("give exactly one of: a slot list, a slot range, or all slots")
    if all_slots:
        if tape_slots is None:
            raise ValueError("'all slots' needs the tape's slot count")
        chosen = list(range(tape_slots))
    elif slot_range is not None:
        first, last = slot_range
        if last < first:
            raise ValueError(f"slot range {first}..{last} is empty")
        chosen = list(range(first, last + 1))
    else:
        assert slots is not None
        chosen = sorted(slots)
    if tape_slots is not None and chosen and chosen[-1] >= tape_slots:
        raise ValueError(f"slot {chosen[-1]} is beyond the tape's {tape_slots} slots (0..{tape_slots - 1})")
    return chosen
