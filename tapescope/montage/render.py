"""Render a section montage from tiles and their solved positions, feathered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tapescope.stitching.lens import RadialDistortion, camera_pixels

from .lens_map import LensMap, lens_map
from .transform import SectionTransform
from .warp import CvWarp, Warp


def montage_bounds(positions: np.ndarray, tile_shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Integer origin (y, x) and shape of the canvas that holds every tile."""
    lo = np.floor(positions.min(axis=0)).astype(int)
    hi = np.ceil(positions.max(axis=0) + np.array(tile_shape)).astype(int)
    return lo, (int(hi[0] - lo[0]), int(hi[1] - lo[1]))


def _ramp(s: np.ndarray, n: int, ramp: float) -> np.ndarray:
    """The feather weight's 1D profile at (fractional) tile coordinates s: rising linearly
    from the tile's edge over `ramp` pixels, 1 inside, 0 outside the tile."""
    r = np.minimum(s, np.float32(n - 1) - s)
    inside = r >= 0
    r += np.float32(1.0)
    r *= np.float32(1.0 / ramp)
    np.clip(r, 0, 1, out=r)
    r *= inside
    return r


def check_tile_shapes(tiles: Sequence[np.ndarray], index: Sequence[int] | None = None,
                      shape: tuple[int, int] | None = None) -> None:
    """Every tile has the camera frame of the first (or `shape`); the odd one out is named.
    Extents are worked out from one frame, so a tile of another size would be cut short."""
    if not len(tiles):
        return
    shape = shape or tuple(tiles[0].shape[:2])
    for k, t in enumerate(tiles):
        if tuple(t.shape[:2]) != shape:
            i = k if index is None else int(index[k])
            raise ValueError(f"tile {i} is {tuple(t.shape[:2])} px, the section's tiles are {shape}: "
                             "a section's tiles share one camera frame")


def tile_corners(positions: np.ndarray, shape: tuple[int, int], linear: np.ndarray | None = None) -> np.ndarray:
    """(n, 4, 2): where the corners of each tile's frame, (0, 0) to (h, w), land (y, x)."""
    h, w = shape
    q = np.array([[0.0, 0.0], [0.0, w], [h, 0.0], [h, w]])
    pos = np.asarray(positions, float)
    if linear is None:
        return pos[:, None, :] + q[None]
    return pos[:, None, :] + np.einsum("nij,cj->nci", np.asarray(linear, float), q)


def tilt_px(shape: tuple[int, int], linear: np.ndarray | None) -> int:
    """How far a tile's own linear part moves any of its pixels from where a translation
    would put it, at most, rounded up: the margin the tile's bounds widen by."""
    if linear is None or not len(linear):
        return 0
    return int(np.ceil(np.abs(tile_corners(np.zeros((len(linear), 2)), shape, linear - np.eye(2))).max()))


CELL_PX = 128       # grid, anchored at output (0, 0), on which each pixel is one tile's alone or blended
FIELD_REACH = 1.9   # |bicubic field| <= this x its largest node: (sum of |OpenCV's cubic weights|)^2


@dataclass(frozen=True)
class _Setup:
    """What every region of one render call shares: the tiles, their frame, the transform's reach."""

    tiles: Sequence[np.ndarray]
    positions: np.ndarray               # (n, 2): top-left (y, x) of every tile
    transform: SectionTransform
    inv: np.ndarray                     # 3x3 inverse of the affine
    shape: tuple[int, int]              # of a tile
    ramp: int
    lens: RadialDistortion | None
    bend: int                           # how far the lens moves a pixel at most, rounded up
    lens_table: LensMap | None          # the lens's inverse on a grid (None: solved exactly)
    reach: float                        # how far the field moves a pixel at most, in source pixels
    warp: Warp
    linear: np.ndarray | None = None    # (n, 2, 2): each tile's own linear part (pixel q lands at
                                        # position + linear @ q); None: a translation per tile
    inv_linear: np.ndarray | None = None
    tilt: int = 0                       # `tilt_px` of linear

    @property
    def affine(self) -> bool:
        """Output to tile pixels is an affine (no field, no lens): the warp makes no maps."""
        return self.lens is None and self.transform.field is None

    def region_matrix(self, i: int, ry: int, rx: int, cy0: int, cx0: int) -> np.ndarray:
        """2 x 3 affine from (x, y) of an output region at (ry, rx) to tile i's crop at (cy0, cx0)."""
        m = np.asarray(self.transform.matrix, np.float64)
        py, px = self.positions[i]
        out = m.copy()
        if self.inv_linear is not None:
            # Section -> tile through the tile's inverse linear part, in (x, y) order.
            b = self.inv_linear[i][::-1, ::-1]
            out[:, :2] = b @ m[:, :2]
            out[:, 2] = b @ (m[:, :2] @ np.array([rx, ry], float) + m[:, 2] - np.array([px, py])) - [cx0, cy0]
            return out
        out[0, 2] = m[0, 0] * rx + m[0, 1] * ry + m[0, 2] - px - cx0
        out[1, 2] = m[1, 0] * rx + m[1, 1] * ry + m[1, 2] - py - cy0
        return out

    @classmethod
    def of(cls, tiles: Sequence[np.ndarray], positions: np.ndarray, transform: SectionTransform,
           ramp: int | None, lens: RadialDistortion | None, warp: Warp | None = None,
           linear: np.ndarray | None = None) -> _Setup:
        if not len(tiles):
            raise ValueError("no tiles to render")
        th, tw = tiles[0].shape[:2]
        if lens is not None and lens.is_identity:
            lens = None
        # The lens moves a pixel most at the sensor's corner: crops and parts widen by that.
        bend = 0 if lens is None else lens.bend_px((th, tw))
        table = None if lens is None else lens_map(lens, (th, tw), bend + 4)
        fmax = float(np.abs(transform.field).max()) if transform.field is not None else 0.0
        inv = np.linalg.inv(np.vstack([np.asarray(transform.matrix, np.float64), [0, 0, 1]]))
        lin = None if linear is None else np.asarray(linear, np.float64).reshape(-1, 2, 2)
        return cls(tiles, np.asarray(positions, float), transform, inv, (th, tw),
                   ramp or max(4, min(th, tw) // 16), lens, bend, table, FIELD_REACH * fmax, warp or CvWarp(),
                   lin, None if lin is None else np.linalg.inv(lin), tilt_px((th, tw), lin))

    def source_boxes(self, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """(n, 4) bounds (y_lo, y_hi, x_lo, x_hi) of the section points that output boxes
        [y0, y1] x [x0, x1] (last pixels included) sample: corners through the affine (exact
        for a parallelogram), widened by the field's reach."""
        m = np.asarray(self.transform.matrix, np.float64)
        cx = np.stack([x0, x1, x0, x1], -1).astype(np.float64)
        cy = np.stack([y0, y0, y1, y1], -1).astype(np.float64)
        sx = m[0, 0] * cx + m[0, 1] * cy + m[0, 2]
        sy = m[1, 0] * cx + m[1, 1] * cy + m[1, 2]
        r = self.reach
        return np.stack([sy.min(-1) - r, sy.max(-1) + r, sx.min(-1) - r, sx.max(-1) + r], -1)

    def source_box(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """`source_boxes` of the one output box (y0, x0, h, w)."""
        return self.source_boxes(np.array([y0]), np.array([y0 + h - 1]), np.array([x0]), np.array([x0 + w - 1]))[0]

    def near(self, box: np.ndarray) -> np.ndarray:
        """Indices of the tiles that can reach into section box `box` (lens and bilinear
        margin included), each checked to have the camera frame of tile 0. A block meets a
        few tiles of a section's thousands: everything per tile runs over these only."""
        th, tw = self.shape
        py, px = self.positions[:, 0], self.positions[:, 1]
        m = self.bend + 2 + self.tilt
        idx = np.flatnonzero((py - m <= box[1]) & (py + th + m >= box[0])
                             & (px - m <= box[3]) & (px + tw + m >= box[2]))
        check_tile_shapes([self.tiles[i] for i in idx], idx, (th, tw))
        return idx

    def crop_box(self, box: np.ndarray, i: int) -> tuple[int, int, int, int]:
        """(cy0, cy1, cx0, cx1): the part of tile i that section box `box` needs, with the
        lens's bend and one pixel of margin for interpolation; empty where they miss."""
        th, tw = self.shape
        py, px = self.positions[i]
        b = self.bend
        y0, y1, x0, x1 = box[0] - py, box[1] - py, box[2] - px, box[3] - px
        if self.inv_linear is not None:
            # The box's corners through the tile's inverse linear part: its bounds in the tile.
            q = np.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]]) @ self.inv_linear[i].T
            y0, y1, x0, x1 = q[:, 0].min(), q[:, 0].max(), q[:, 1].min(), q[:, 1].max()
        return (max(int(np.floor(y0)) - 1 - b, 0), min(int(np.ceil(y1)) + 2 + b, th),
                max(int(np.floor(x0)) - 1 - b, 0), min(int(np.ceil(x1)) + 2 + b, tw))

    def tile_maps(self, mx: np.ndarray, my: np.ndarray, i: int, cy0: int, cx0: int) -> tuple[np.ndarray, np.ndarray]:
        """Section maps turned into maps of tile i's crop at (cy0, cx0): in place, except
        through a tile's own linear part (new arrays then)."""
        py, px = self.positions[i]
        # Section -> tile, then tile -> crop by an integer: exact, so a pixel samples the same
        # point whichever region it is rendered in (blocks equal the whole render, bit for
        # bit; the affine path without maps agrees to OpenCV's 1/1024 px, docs/montage.md).
        mx -= np.float32(px)
        my -= np.float32(py)
        if self.inv_linear is not None:
            (byy, byx), (bxy, bxx) = self.inv_linear[i].astype(np.float32)
            mx, my = bxx * mx + bxy * my, byy * my + byx * mx
        if self.lens is not None:
            if self.lens_table is None:
                my, mx = camera_pixels(self.lens, my, mx, self.shape)
            else:
                my, mx = self.lens_table.apply(my, mx)
            # Far outside a strongly bent sensor the inverse diverges (inf, nan). Such points
            # see nothing of this tile: sent off it, as a nan would blank the others' sum.
            lost = ~(np.isfinite(mx) & np.isfinite(my))
            if lost.any():
                mx[lost] = -2 - self.shape[1]
                my[lost] = -2 - self.shape[0]
        mx -= np.float32(cx0)
        my -= np.float32(cy0)
        return mx, my


def _sorted_cells(s: _Setup, block: tuple[int, int, int, int],
                  near: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tile alone draws each CELL_PX cell that meets the block: (cell row edges, cell
    column edges, owner per cell: a tile's index, or -1 where tiles blend or none lands).

    A cell is one tile's alone where every point it samples lies where that tile's feather
    weight is 1 and no other tile reaches: its pixels are then that tile's, pulled through
    the maps once, with no weights to pull, add and divide (most of a montage's area).
    Cells are whole cells of the global grid, so the sorting of a pixel does not depend
    on the block it is rendered in. `near`: the tiles that can reach the block (all if None)."""
    y0, x0, h, w = block
    near = np.arange(len(s.positions)) if near is None else near
    c = CELL_PX
    rows = np.arange(y0 // c, (y0 + h - 1) // c + 1) * c
    cols = np.arange(x0 // c, (x0 + w - 1) // c + 1) * c
    th, tw = s.shape
    if min(th, tw) - 2 * s.ramp < 3 * c:
        # Tiles this small hold a cell or two alone at most: the regions would cost more
        # calls than they save (256 px tiles: 7 % slower sorted). All blended, one region.
        return rows, cols, np.full((len(rows), len(cols)), -1)
    cy, cx = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
    box = s.source_boxes(cy, cy + c - 1, cx, cx + c - 1)
    py, px = s.positions[near, 0][None, :], s.positions[near, 1][None, :]
    b, r = s.bend + s.tilt, s.ramp
    ylo, yhi = box[:, 0:1] - py - b, box[:, 1:2] - py + b
    xlo, xhi = box[:, 2:3] - px - b, box[:, 3:4] - px + b
    # Bilinear reads floor(q) and the pixel after: both where the weight is 1, i.e. at least
    # ramp - 1 from the edge; one pixel more for the float32 maps' rounding.
    inside = (ylo >= r) & (yhi <= th - r - 1) & (xlo >= r) & (xhi <= tw - r - 1)
    # A tile adds nothing at q outside (-1, n) on either axis (zero border, zero weight).
    reaches = ~((yhi < -1.5) | (ylo > th + 0.5) | (xhi < -1.5) | (xlo > tw + 0.5))
    alone = inside.any(1) & (reaches.sum(1) == 1)
    owner = np.where(alone, near[inside.argmax(1)] if len(near) else -1, -1).reshape(len(rows), len(cols))
    return rows, cols, owner


def _regions(block: tuple[int, int, int, int], rows: np.ndarray, cols: np.ndarray,
             owner: np.ndarray) -> list[tuple[tuple[int, int, int, int], int]]:
    """The block cut into rectangles of cells with one owner: runs along each row of cells,
    merged with the run above where they span the same columns (overlaps are bands, so a
    block is a handful of rectangles, not one call per cell)."""
    y0, x0, h, w = block
    c = CELL_PX
    done: list[tuple[int, int, int, int, int]] = []     # (row0, row1, col0, col1, owner)
    open_: dict[tuple[int, int, int], int] = {}          # (col0, col1, owner) -> first row
    for i in range(owner.shape[0]):
        runs, j = [], 0
        while j < owner.shape[1]:
            k = j
            while k + 1 < owner.shape[1] and owner[i, k + 1] == owner[i, j]:
                k += 1
            runs.append((j, k + 1, int(owner[i, j])))
            j = k + 1
        for key in list(open_):
            if key not in runs:
                done.append((open_.pop(key), i, *key))
        for key in runs:
            open_.setdefault(key, i)
    done += [(r0, owner.shape[0], *key) for key, r0 in open_.items()]
    out = []
    for r0, r1, c0, c1, who in done:
        ya, yb = max(int(rows[r0]), y0), min(int(rows[r1 - 1]) + c, y0 + h)
        xa, xb = max(int(cols[c0]), x0), min(int(cols[c1 - 1]) + c, x0 + w)
        out.append(((ya, xa, yb - ya, xb - xa), who))
    return out


def _one_tile(s: _Setup, i: int, region: tuple[int, int, int, int], dst: np.ndarray) -> None:
    """Draw a region that tile i alone covers at full weight: one pull through the maps."""
    ry, rx, rh, rw = region
    cy0, cy1, cx0, cx1 = s.crop_box(s.source_box(ry, rx, rh, rw), i)
    crop = np.asarray(s.tiles[i][cy0:cy1, cx0:cx1], np.float32)
    if s.affine:
        s.warp.draw_affine(crop, s.region_matrix(i, ry, rx, cy0, cx0), dst)
        return
    mx, my = s.tile_maps(*s.transform.block_maps(ry, rx, rh, rw), i, cy0, cx0)
    s.warp.draw(crop, mx, my, dst)


def _blend(s: _Setup, region: tuple[int, int, int, int], near: np.ndarray, image: np.ndarray,
           cover: np.ndarray) -> None:
    """Render a region where tiles overlap (or none lands), feathered, into `image` and its
    weight sum into `cover` (views of the region's shape). `near`: the tiles that can reach it."""
    y0, x0, h, w = region
    th, tw = s.shape
    mx, my = (None, None) if s.affine else s.transform.block_maps(y0, x0, h, w)
    box = s.source_box(y0, x0, h, w)
    acc, wsum = s.warp.sums(image, cover)
    inv = s.inv
    slack = (s.reach + s.bend) * float(np.abs(inv[:2, :2]).sum(axis=1).max()) + 2.0
    frames = tile_corners(s.positions[near] - 1, (th + 1, tw + 1), None if s.linear is None else s.linear[near])
    for i, frame in zip(near, frames, strict=True):
        cy0, cy1, cx0, cx1 = s.crop_box(box, i)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        # The part of the region the tile can land on: its corners through the inverse
        # affine, widened by what the field and lens can add. The per-pixel work below runs
        # on that part only, so a region costs about its own size however many tiles reach in.
        corners = np.column_stack([frame[:, 1], frame[:, 0], np.ones(4)])
        out_xy = corners @ inv[:2].T
        bx0 = max(int(np.floor(out_xy[:, 0].min() - slack)) - x0, 0)
        bx1 = min(int(np.ceil(out_xy[:, 0].max() + slack)) - x0 + 1, w)
        by0 = max(int(np.floor(out_xy[:, 1].min() - slack)) - y0, 0)
        by1 = min(int(np.ceil(out_xy[:, 1].max() + slack)) - y0 + 1, h)
        if bx0 >= bx1 or by0 >= by1:
            continue
        # Feather weight in the tile's own pixels (separable: one outer product over the
        # crop), the crop premultiplied by it, both pulled through the same maps: the
        # weight needs no per-pixel arithmetic in output coordinates (13 % faster). Outside
        # the tile both are 0 (BORDER_CONSTANT), so a tile's weight ends within one pixel.
        wy = _ramp(np.arange(cy0, cy1, dtype=np.float32), th, s.ramp)
        wx = _ramp(np.arange(cx0, cx1, dtype=np.float32), tw, s.ramp)
        wt = np.outer(wy, wx)
        crop = np.multiply(s.tiles[i][cy0:cy1, cx0:cx1], wt, dtype=np.float32)
        at = (slice(by0, by1), slice(bx0, bx1))
        if mx is None or my is None:
            s.warp.add_pulled_affine(acc, wsum, at, crop, wt, s.region_matrix(i, y0 + by0, x0 + bx0, cy0, cx0))
            continue
        tx, ty = s.tile_maps(mx[by0:by1, bx0:bx1].copy(), my[by0:by1, bx0:bx1].copy(), i, cy0, cx0)
        s.warp.add_pulled(acc, wsum, at, crop, wt, tx, ty)
    s.warp.finish(acc, wsum, image, cover)


def render_block(
    tiles: Sequence[np.ndarray], positions: np.ndarray, transform: SectionTransform,
    block: tuple[int, int, int, int], ramp: int | None = None, lens: RadialDistortion | None = None,
    warp: Warp | None = None, out: tuple[np.ndarray, np.ndarray] | None = None, linear: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the output block (y0, x0, h, w) of a section, feathered: (image, coverage).

    Output pixel p shows the section at `transform.apply(p)`, in the coordinates the tile
    `positions` (top-left, (y, x)) are given in. Only the tiles that reach into the block
    are touched, and only the part of each that is needed is read (a memory-mapped tile is
    never loaded whole), so memory is bounded by the block, not by the section. `lens`,
    the camera's distortion, is taken out of every tile on the way (none: tiles as taken).
    Where one tile alone lands at full weight, coverage is 1 and its pixels are drawn
    directly; elsewhere tiles are blended and coverage is their summed feather weight.
    `warp` does the per-pixel work (warp.py: OpenCV by default, CuPy on a GPU). `out`:
    float32 (image, coverage) arrays of the block's shape to draw into (views of a larger
    image: no copy), returned. `linear` (n, 2, 2): each tile's own linear part, for tiles
    from cameras turned or scaled against each other (pixel q of tile k lands at
    positions[k] + linear[k] @ q, before `transform`); None: a translation per tile.
    """
    s = _Setup.of(tiles, positions, transform, ramp, lens, warp, linear)
    y0, x0, h, w = block
    # Near the block's cells, whole cells of the grid: a cell is sorted the same whichever
    # block it is rendered in only if every tile that reaches any of it is considered.
    c = CELL_PX
    cy0, cx0 = y0 // c * c, x0 // c * c
    near = s.near(s.source_box(cy0, cx0, -(-(y0 + h - cy0) // c) * c, -(-(x0 + w - cx0) // c) * c))
    image, cover = out if out is not None else (np.empty((h, w), np.float32), np.empty((h, w), np.float32))
    for region, who in _regions(block, *_sorted_cells(s, block, near)):
        ry, rx, rh, rw = region
        at = (slice(ry - y0, ry - y0 + rh), slice(rx - x0, rx - x0 + rw))
        if who >= 0:
            _one_tile(s, who, region, image[at])
            cover[at] = 1.0
        else:
            _blend(s, region, near, image[at], cover[at])
    return image, cover


def render_montage(
    tiles: Sequence[np.ndarray], positions: np.ndarray, origin: np.ndarray,
    shape: tuple[int, int], ramp: int | None = None, transform: SectionTransform | None = None,
    lens: RadialDistortion | None = None, linear: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend tiles into a float32 canvas of `shape` whose (0, 0) is at `origin`, in RAM.

    Returns (image, coverage); coverage is 0 where no tile lands. Each tile is placed
    with its sub-pixel position (bilinear) and weighted by a feather ramp, so seams fade
    over `ramp` pixels instead of stepping. `transform` (canvas pixel -> canvas pixel of
    the unaligned section) aligns the section while rendering; `linear`, each tile's own
    linear part (render_block). For sections too large
    for RAM, `blocks.render_section` renders shard by shard with the same `render_block`.
    """
    oy, ox = np.asarray(origin, float)
    t = transform or SectionTransform.identity()
    # Canvas pixel -> stage pixel: shift by the canvas origin after the transform.
    t = t.shifted(oy, ox)
    return render_block(tiles, positions, t, (0, 0, shape[0], shape[1]), ramp, lens, linear=linear)
