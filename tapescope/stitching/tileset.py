"""Tile sets on disk (`tiles.csv` + TIFFs, from any scope) and the `tapescope stitch` command.

Input: `TILESET_DIR/tiles.csv` with the header `file,row,col,y,x` (file relative to the
CSV, row/col the grid index, y/x the nominal top-left in pixels) and one 2-D TIFF per row.
Output: `OUT_DIR/positions.csv` (`file,y,x,residual_px,status,a_yy,a_yx,a_xy,a_xx`: pixel
(qy, qx) of the tile lands at (y, x) + A (qy, qx), A the identity unless each tile has its own
linear part, `--tile-model affine`) and `OUT_DIR/pairs.csv`
(one row per registered pair, with its residual after the solve and whether it is a
flagged seam). Everything is read and checked before anything is written, and the output
files are written under temporary names and renamed at the end: bad input, or a failure
part-way, leaves no partial output.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from tapescope.errors import TapescopeError

from .backend import Backend
from .flatfield import estimate_flatfield, flatfield_from_references
from .section import strip_width
from .solve import SEAM_PX
from .stream import StitchResult, StreamingStitcher

HEADER = ["file", "row", "col", "y", "x"]
POSITIONS_HEADER = ["file", "y", "x", "residual_px", "status", "a_yy", "a_yx", "a_xy", "a_xx"]
PAIRS_HEADER = ["file_a", "file_b", "dy", "dx", "confidence", "used", "residual_px", "seam", "reason"]


class TileSetError(TapescopeError, ValueError):
    """The tile set on disk is not usable; the message names the file and what is wrong."""


@dataclass
class DiskTileSet:
    root: Path
    files: list[str]
    grid: list[tuple[int, int]]
    nominal: np.ndarray            # (n, 2) y, x


def read_tiles_csv(tileset_dir: Path) -> DiskTileSet:
    csv_path = tileset_dir / "tiles.csv"
    if not tileset_dir.is_dir():
        raise TileSetError(f"{tileset_dir}: not a directory")
    if not csv_path.is_file():
        raise TileSetError(f"{csv_path}: missing (a tile set needs tiles.csv with header {','.join(HEADER)})")
    try:
        text = csv_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TileSetError(f"{csv_path}: cannot be read: {exc}") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise TileSetError(f"{csv_path}: empty (expected the header {','.join(HEADER)} and one row per tile)")
    header = [h.strip() for h in rows[0]]
    if header != HEADER:
        raise TileSetError(f"{csv_path}: header is {','.join(header)!r}, expected {','.join(HEADER)!r}")
    if len(rows) == 1:
        raise TileSetError(f"{csv_path}: has a header but no tiles")
    files, grid, nominal = [], [], []
    seen_files: dict[str, int] = {}
    seen_cells: dict[tuple[int, int], int] = {}
    for line, r in enumerate(rows[1:], start=2):
        where = f"{csv_path} line {line}"
        if len(r) != len(HEADER):
            raise TileSetError(f"{where}: {len(r)} fields, expected {len(HEADER)} ({','.join(HEADER)})")
        name = r[0].strip()
        try:
            row, col = int(r[1]), int(r[2])
        except ValueError:
            raise TileSetError(f"{where}: row and col must be integers, got {r[1]!r}, {r[2]!r}") from None
        try:
            y, x = float(r[3]), float(r[4])
        except ValueError:
            raise TileSetError(f"{where}: y and x must be numbers, got {r[3]!r}, {r[4]!r}") from None
        if not (math.isfinite(y) and math.isfinite(x)):
            raise TileSetError(f"{where}: y and x must be finite, got {r[3]!r}, {r[4]!r}")
        if not name:
            raise TileSetError(f"{where}: empty file name")
        key = os.path.normpath(name)
        if key in seen_files:
            raise TileSetError(f"{where}: file {name} is already listed on line {seen_files[key]}")
        if (row, col) in seen_cells:
            raise TileSetError(f"{where}: grid cell ({row}, {col}) is already used on line {seen_cells[(row, col)]}")
        seen_files[key] = line
        seen_cells[(row, col)] = line
        files.append(name)
        grid.append((row, col))
        nominal.append((y, x))
    return DiskTileSet(tileset_dir, files, grid, np.array(nominal, float))


def read_image(path: Path, what: str = "tile") -> np.ndarray:
    """A greyscale TIFF or PNG image, as stored (8- or 16-bit, or float for TIFF)."""
    if not path.is_file():
        raise TileSetError(f"{path}: {what} file is missing")
    if path.suffix.lower() == ".png":
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise TileSetError(f"{path}: not a readable PNG")
        if img.ndim == 3:
            raise TileSetError(f"{path}: {what} must be a greyscale image, got {img.shape[2]} colour channels")
        return img
    try:
        img = tifffile.imread(path)
    except Exception as exc:   # tifffile raises many types for corrupt files
        raise TileSetError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    img = np.squeeze(img)
    if img.ndim != 2:
        raise TileSetError(f"{path}: {what} must be a 2-D greyscale image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise TileSetError(f"{path}: {what} has unsupported pixel type {img.dtype}")
    return img


TILE_FORMATS = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG"}


def load_tiles(ts: DiskTileSet) -> list[np.ndarray]:
    formats = {TILE_FORMATS.get(Path(name).suffix.lower(), Path(name).suffix or "no suffix") for name in ts.files}
    unknown = formats - set(TILE_FORMATS.values())
    if unknown:
        raise TileSetError(f"{ts.root}: tiles must be TIFF (.tif, .tiff) or PNG (.png), "
                           f"got {', '.join(sorted(unknown))}")
    if len(formats) > 1:
        # One camera writes one format: a mix is two sources (or a half-converted set).
        raise TileSetError(f"{ts.root}: the tiles mix {' and '.join(sorted(formats))} files; a set has one format")
    tiles = []
    for name in ts.files:
        img = read_image(ts.root / name)
        if tiles and img.shape != tiles[0].shape:
            raise TileSetError(f"{ts.root / name}: shape {img.shape} differs from {ts.files[0]}'s {tiles[0].shape}"
                               " (all tiles of a set must have one shape)")
        if tiles and img.dtype != tiles[0].dtype:
            # A float tile among integer tiles is another camera's or another step's output:
            # its scale is unknown, so converting it would mix two intensity scales silently.
            raise TileSetError(f"{ts.root / name}: pixel type {img.dtype} differs from {ts.files[0]}'s "
                               f"{tiles[0].dtype} (all tiles of a set must have one pixel type)")
        tiles.append(img)
    return tiles


@dataclass
class StitchRun:
    tileset: DiskTileSet
    result: StitchResult
    flatfield: str                 # what was used, for the summary
    seconds: float
    megapixels: float
    textured: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))   # per tile (`textured`)
    montage: Path | None = None    # the rendered montage (OME-Zarr), if asked for
    tileset_dtype: str = ""        # the tiles' pixel type


# Called as (out_dir, tiles, positions, gain, dark, lens, info, linear=...) -> the montage written.
MontageWriter = Callable[..., Path]


def run_stitch(
    tileset_dir: Path, out_dir: Path, backend: Backend, flatfield: str = "auto", dark: Path | None = None,
    warn: Callable[[str], None] = lambda _m: None, lens: str = "estimate",
    render: MontageWriter | None = None, tile_model: str = "translation",
) -> StitchRun:
    """Read, check, stitch and write; raises TileSetError (and writes nothing) on bad input.
    With `render`, the montage is also rendered (the command passes montage/stitched.py's
    writer: stitching itself does not depend on the renderer)."""
    t0 = time.perf_counter()
    ts = read_tiles_csv(tileset_dir)
    tiles = load_tiles(ts)
    shape = tiles[0].shape
    dark_img: np.ndarray | float = 0.0
    if dark is not None:
        dark_img = read_image(dark, "dark reference").astype(np.float32)
        if dark_img.shape != shape:
            raise TileSetError(f"{dark}: dark reference shape {dark_img.shape} differs from the tiles' {shape}")
    gain: np.ndarray | None
    if flatfield == "none":
        gain, used = None, "none"
    elif flatfield == "auto":
        try:
            gain = estimate_flatfield(tiles, dark=dark_img)
            used = "estimated from the tiles"
        except ValueError as exc:
            gain, used = None, "none (could not estimate)"
            warn(f"flat-field not applied: {exc}")
    else:
        bright = read_image(Path(flatfield), "flat-field reference")
        if bright.shape != shape:
            raise TileSetError(f"{flatfield}: flat-field shape {bright.shape} differs from the tiles' {shape}")
        try:
            gain = flatfield_from_references(bright, dark_img)
        except ValueError as exc:
            raise TileSetError(f"{flatfield}: {exc}") from None
        used = f"reference {flatfield}"
    # Only the edge strips are flat-fielded and kept: registration reads nothing else.
    stitcher = StreamingStitcher(gain=gain, dark=dark_img, backend=backend,
                                 strip_px=strip_width(shape, ts.nominal, ts.grid))
    for name, rc, pos, tile in zip(ts.files, ts.grid, ts.nominal, tiles, strict=True):
        del name
        stitcher.add(rc, tile, pos)
    result = stitcher.finish(lens=lens, tile_model=tile_model)
    write_outputs(out_dir, ts, result)
    montage = None
    if render is not None:
        montage = render(out_dir, tiles, result.solution.positions, gain, dark_img, result.lens_applied,
                         {"tileset": str(tileset_dir.resolve()), "tiles": len(tiles), "tile_model": tile_model},
                         linear=result.solution.linear)
    return StitchRun(ts, result, used, time.perf_counter() - t0, stitcher.pixels / 1e6, textured(tiles), montage,
                     str(tiles[0].dtype))


TEXTURE_FRACTION = 0.25   # of the set's well-textured tiles' detail: below it, a tile is blank (bare resin)


def textured(tiles: list[np.ndarray]) -> np.ndarray:
    """Which tiles carry texture (tissue) rather than bare resin or an empty field: their
    band-passed contrast (2-8 px: structure, not shot noise, not vignetting) relative to
    their mean, against the 90th percentile of the set's."""
    detail = []
    for t in tiles:
        f = np.asarray(t, np.float32)[::2, ::2]
        band = cv2.GaussianBlur(f, (0, 0), 1.0) - cv2.GaussianBlur(f, (0, 0), 4.0)
        detail.append(float(band.std() / max(float(f.mean()), 1e-6)))
    d = np.array(detail)
    return d >= TEXTURE_FRACTION * np.percentile(d, 90) if len(d) else np.zeros(0, bool)


def tile_status(result: StitchResult) -> list[str]:
    """ok | stage (placed by the stage prior alone) | failed (its pairs disagree by more than a seam)."""
    sol = result.solution
    return ["failed" if s == "ok" and r > SEAM_PX else s for s, r in zip(sol.status, sol.tile_residual, strict=True)]


def write_outputs(out_dir: Path, ts: DiskTileSet, result: StitchResult) -> None:
    sol = result.solution
    status = tile_status(result)
    linear = sol.linear if sol.linear is not None else np.tile(np.eye(2), (len(ts.files), 1, 1))
    positions = [POSITIONS_HEADER] + [
        [f, f"{p[0]:.4f}", f"{p[1]:.4f}", f"{r:.4f}", s, *(f"{v:.7f}" for v in a.ravel())]
        for f, p, r, s, a in zip(ts.files, sol.positions, sol.tile_residual, status, linear, strict=True)
    ]
    pairs = [PAIRS_HEADER] + [
        [ts.files[p.i], ts.files[p.j], f"{p.dy:.4f}", f"{p.dx:.4f}", f"{p.confidence:.4f}", int(u),
         "" if not u else f"{r:.4f}", int(bool(u) and r > SEAM_PX), why or p.note]
        for p, u, r, why in zip(result.pairs, sol.pair_used, sol.pair_residual, sol.pair_reason, strict=True)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for name, rows in (("positions.csv", positions), ("pairs.csv", pairs)):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
            staged.append((Path(tmp), out_dir / name))
            with os.fdopen(fd, "w", newline="") as fh:
                csv.writer(fh).writerows(rows)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_tileset(tileset_dir: Path, tiles: list[np.ndarray], grid: list[tuple[int, int]], nominal: np.ndarray) -> None:
    """Write tiles as TIFFs plus tiles.csv in the format read_tiles_csv reads."""
    tileset_dir.mkdir(parents=True, exist_ok=True)
    rows = [HEADER]
    for k, (tile, (r, c), (y, x)) in enumerate(zip(tiles, grid, nominal, strict=True)):
        name = f"tile_{k:05d}_r{r:03d}_c{c:03d}.tif"
        tifffile.imwrite(tileset_dir / name, tile)
        rows.append([name, str(r), str(c), f"{y:.3f}", f"{x:.3f}"])
    with open(tileset_dir / "tiles.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
