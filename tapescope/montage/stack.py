"""Align a stack of section montages (TIFFs listed in sections.csv) into one OME-Zarr volume.

The work is three kinds of task, all plain functions of paths so that any Dask worker
(or this process) can run them:

1. `inspect_section`: is there tissue in the montage at all (a blank or lost section
   keeps its z and is recorded as missing)?
2. `align_pair`: the transform of one section onto the previous good one, coarse then
   elastic, computed from the raw montages. Pairs are independent, so they all run at
   once; a pair that does not register (a fold, the wrong tissue) takes its section out
   of the chain and the next section is paired across the gap with the last good one.
3. `render_into_volume`: one section rendered shard by shard into the volume with its
   chained transform. One task per section: it is the only writer of that section's
   shards, so sections are written in any order, as they finish.

The chain (section k's transform = previous good section's transform, then the pair's)
is composed here, on the client: it is small and sequential.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from tapescope.allocator import keep_large_blocks

from .align import align_section, block_mean, unregistered_reason
from .blocks import RenderStats, render_section
from .omezarr import Volume
from .transform import SectionTransform

MIN_PAIR_CONFIDENCE = 0.3   # coarse NCC below this: the pair did not register
BLANK_DETAIL = 0.01         # relative band-passed contrast below this: no tissue


class StackError(ValueError):
    """Bad input: names the file, line and what is wrong."""


@dataclass(frozen=True)
class StackEntry:
    z: int
    path: Path


@dataclass(frozen=True)
class AlignParams:
    max_rotation_deg: float = 10.0
    elastic: bool = True
    device: str = "cpu"


@dataclass
class PairResult:
    fixed_z: int
    moving_z: int
    transform: SectionTransform
    confidence: float
    rotation_deg: float
    flow_nodes: int
    flow_rms_px: float
    chance: float = 0.0          # what the same search finds on the moving section mirrored


@dataclass
class SectionOutcome:
    z: int
    file: str
    status: str                 # "ok" | "unaligned" | "missing"
    reference_z: int | None = None
    confidence: float = 0.0
    rotation_deg: float = 0.0
    flow_nodes: int = 0
    flow_rms_px: float = 0.0
    message: str = ""


@dataclass
class StackResult:
    volume: Path
    sections: list[SectionOutcome] = field(default_factory=list)
    summary_csv: Path | None = None


# -- input ---------------------------------------------------------------------------------

def read_stack(stack_dir: Path) -> tuple[list[StackEntry], tuple[int, int]]:
    """Entries of STACK_DIR/sections.csv (header `file,z`) and the common image shape."""
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        raise StackError(f"{stack_dir}: not a directory")
    csv_path = stack_dir / "sections.csv"
    if not csv_path.is_file():
        raise StackError(f"{csv_path}: missing (it lists the sections: header 'file,z')")
    with csv_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0]] != ["file", "z"]:
        raise StackError(f"{csv_path}:1: header must be 'file,z', got {','.join(rows[0]) if rows else 'nothing'!r}")
    entries: list[StackEntry] = []
    seen: dict[int, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise StackError(f"{csv_path}:{line}: expected 2 fields 'file,z', got {len(row)}")
        name, zs = row[0].strip(), row[1].strip()
        try:
            z = int(zs)
        except ValueError:
            raise StackError(f"{csv_path}:{line}: z must be a whole number, got {zs!r}") from None
        if z < 0:
            raise StackError(f"{csv_path}:{line}: z must be >= 0, got {z}")
        if z in seen:
            raise StackError(f"{csv_path}:{line}: z={z} already given on line {seen[z]}")
        path = (stack_dir / name).resolve()
        if not path.is_file():
            raise StackError(f"{csv_path}:{line}: file {name!r} not found in {stack_dir}")
        seen[z] = line
        entries.append(StackEntry(z, path))
    if not entries:
        raise StackError(f"{csv_path}: lists no sections")
    shape: tuple[int, int] | None = None
    for e in entries:
        try:
            with tifffile.TiffFile(e.path) as tf:
                s = tuple(tf.pages[0].shape)
        except Exception as exc:
            raise StackError(f"{e.path}: not a readable TIFF ({exc})") from None
        if len(s) != 2:
            raise StackError(f"{e.path}: expected a 2D greyscale montage, got shape {s}")
        if shape is None:
            shape = (int(s[0]), int(s[1]))
        elif s != shape:
            raise StackError(f"{e.path}: shape {s} differs from {shape} of the first section "
                             "(all montages of a stack share one canvas)")
    assert shape is not None
    return sorted(entries, key=lambda e: e.z), shape


def open_image(path: Path) -> np.ndarray:
    """The montage, memory-mapped where the TIFF allows it (uncompressed, contiguous), so
    rendering reads only the parts each shard needs; otherwise read into RAM."""
    try:
        return tifffile.memmap(path, mode="r")
    except Exception:  # compressed or tiled TIFF: no memory map possible
        return tifffile.imread(path)


def detail_level(img: np.ndarray) -> float:
    """Band-passed contrast relative to the mean at 1/4 resolution: tissue is well above
    BLANK_DETAIL, bare resin with shot noise well below (noise averages away at 1/4).
    Read in strips, so a memory-mapped montage is never loaded whole at full resolution."""
    small, _ = block_mean(img, None, 4)
    band = cv2.GaussianBlur(small, (0, 0), 1.0) - cv2.GaussianBlur(small, (0, 0), 4.0)
    mean = float(abs(small.mean()))
    return float(band.std() / mean) if mean > 0 else 0.0


# -- tasks (run on workers) ------------------------------------------------------------------

def inspect_section(path: Path) -> float:
    return detail_level(open_image(path))


def align_pair(fixed_z: int, fixed_path: Path, moving_z: int, moving_path: Path, params: AlignParams) -> PairResult:
    keep_large_blocks()     # once per worker process
    # Memory-mapped where the TIFF allows: the alignment reads strips and patches.
    fixed = open_image(fixed_path)
    moving = open_image(moving_path)
    a = align_section(fixed, moving, elastic=params.elastic, max_rotation_deg=params.max_rotation_deg,
                      device=params.device)
    return PairResult(fixed_z, moving_z, a.transform, a.confidence, a.rotation_deg, a.flow_nodes, a.flow_rms_px,
                      a.chance)


def render_into_volume(volume_path: Path, z: int, path: Path, transform: SectionTransform,
                       device: str = "cpu") -> RenderStats:
    keep_large_blocks()
    volume = Volume.open(volume_path)
    image = open_image(path)
    # The montage is one "tile" at (0, 0); its own pixels are the source coordinates.
    return render_section(volume, z, [image], np.zeros((1, 2)), transform, ramp=1, device=device)


# -- the driver ----------------------------------------------------------------------------

MapFn = Callable[..., list[Any]]


def local_map(fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
    """Runs the tasks here, one after another (no Dask)."""
    return [fn(*args) for args in zip(*iterables, strict=True)]


def dask_map(client: Any) -> MapFn:
    """Sends each task to the cluster behind a dask.distributed Client and gathers them."""
    def run(fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        cols = [list(it) for it in iterables]
        futures = client.map(fn, *cols, pure=False)
        return client.gather(futures)
    return run


def pyramid_levels(shape: tuple[int, int], smallest: int = 256) -> int:
    return max(2, math.ceil(math.log2(max(max(shape) / smallest, 1))) + 1)


def align_stack(
    stack_dir: Path, out_dir: Path, *, map_fn: MapFn = local_map, params: AlignParams | None = None,
    pixel_nm: float = 4.0, thickness_nm: float = 40.0, chunk: int = 256,
    progress: Callable[[str], None] | None = None,
) -> StackResult:
    """Align every section of STACK_DIR into OUT_DIR/volume.zarr, transforms beside it in
    OUT_DIR/volume.transforms/, and a per-section summary in OUT_DIR/alignment.csv."""
    params = params or AlignParams()
    say = progress or (lambda _msg: None)
    entries, shape = read_stack(stack_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vol_path = out_dir / "volume.zarr"
    if vol_path.exists():
        raise StackError(f"{vol_path} already exists; choose another --out or remove it")
    nz = max(e.z for e in entries) + 1
    volume = Volume.create(vol_path, (nz, *shape), pixel_nm=pixel_nm, thickness_nm=thickness_nm,
                           levels=pyramid_levels(shape), chunk=chunk)
    by_z = {e.z: e for e in entries}
    outcome = {e.z: SectionOutcome(e.z, e.path.name, "ok") for e in entries}

    say(f"inspecting {len(entries)} sections")
    details = map_fn(inspect_section, [e.path for e in entries])
    chain: list[int] = []
    for e, d in zip(entries, details, strict=True):
        if d < BLANK_DETAIL:
            outcome[e.z].status = "missing"
            outcome[e.z].message = f"no tissue (detail {d:.4f} < {BLANK_DETAIL})"
        else:
            chain.append(e.z)
    for z in range(nz):
        if z not in by_z:
            outcome[z] = SectionOutcome(z, "", "missing", message="not listed in sections.csv")

    # Pair each section with the previous one still in the chain; a pair that fails takes
    # its moving section out, and its successor is paired across the gap.
    pairs: dict[int, PairResult] = {}
    todo = list(itertools.pairwise(chain))
    while todo:
        say(f"aligning {len(todo)} section pairs")
        results = map_fn(align_pair, [f for f, _ in todo], [by_z[f].path for f, _ in todo],
                         [m for _, m in todo], [by_z[m].path for _, m in todo], [params] * len(todo))
        failed: set[int] = set()
        for r in sorted(results, key=lambda r: r.moving_z):
            if r.fixed_z in failed:
                continue   # its reference just dropped out: paired again in the next round
            if why := unregistered_reason(r.confidence, r.chance, MIN_PAIR_CONFIDENCE):
                o = outcome[r.moving_z]
                o.status, o.confidence, o.reference_z = "unaligned", r.confidence, r.fixed_z
                o.message = f"did not register to z={r.fixed_z}: {why}"
                failed.add(r.moving_z)
            else:
                pairs[r.moving_z] = r
        chain = [z for z in chain if z not in failed]
        todo = [(f, m) for f, m in itertools.pairwise(chain)
                if m not in pairs or pairs[m].fixed_z != f]

    transforms: dict[int, SectionTransform] = {}
    for i, z in enumerate(chain):
        if i == 0:
            transforms[z] = SectionTransform.identity()
            continue
        r = pairs[z]
        transforms[z] = transforms[chain[i - 1]].then(r.transform, shape)
        o = outcome[z]
        o.reference_z, o.confidence, o.rotation_deg = r.fixed_z, r.confidence, r.rotation_deg
        o.flow_nodes, o.flow_rms_px = r.flow_nodes, r.flow_rms_px
    if chain:
        outcome[chain[0]].confidence = 1.0
    # Sections that did not register are still written, where they lie on their own
    # canvas, so a person can see what went wrong; their status says so.
    for z, o in outcome.items():
        if o.status == "unaligned":
            transforms[z] = SectionTransform.identity()

    render_z = sorted(transforms)
    say(f"rendering {len(render_z)} sections")
    map_fn(render_into_volume, [vol_path] * len(render_z), render_z, [by_z[z].path for z in render_z],
           [transforms[z] for z in render_z], [params.device] * len(render_z))
    for z in render_z:
        volume.save_transform(z, transforms[z])
    for z in sorted(outcome):
        o = outcome[z]
        info: dict[str, Any] = {"file": o.file, "status": o.status, "reference_z": o.reference_z,
                                "alignment_confidence": o.confidence, "message": o.message,
                                "flow_nodes": o.flow_nodes, "flow_rms_px": o.flow_rms_px}
        if z in transforms:
            info["transform"] = transforms[z].summary()
        volume.record(z, info)
    summary = out_dir / "alignment.csv"
    with summary.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["z", "file", "status", "reference_z", "confidence", "rotation_deg", "flow_nodes",
                    "flow_rms_px", "message"])
        for z in sorted(outcome):
            o = outcome[z]
            w.writerow([z, o.file, o.status, "" if o.reference_z is None else o.reference_z,
                        f"{o.confidence:.3f}", f"{o.rotation_deg:.3f}", o.flow_nodes, f"{o.flow_rms_px:.3f}",
                        o.message])
    return StackResult(vol_path, [outcome[z] for z in sorted(outcome)], summary)


def rerender_section(volume_path: Path, z: int, montage: Path, device: str = "cpu") -> RenderStats:
    """Render section z of an aligned volume again from its montage and the transform
    stored beside the volume (e.g. after the montage was re-stitched or the volume lost)."""
    volume = Volume.open(volume_path)
    return render_into_volume(volume_path, z, montage, volume.load_transform(z), device)


def neuroglancer_source(volume: Path, base_url: str = "http://localhost:8000") -> str:
    """Layer source for Neuroglancer once the volume's folder is served over HTTP with
    CORS at `base_url` (Neuroglancer reads zarr v3 + OME-Zarr 0.5 through `zarr://`)."""
    return f"zarr://{base_url.rstrip('/')}/{Path(volume).name}"


def write_stack(stack_dir: Path, images: Sequence[np.ndarray], zs: Sequence[int] | None = None) -> Path:
    """Write montages as a STACK_DIR (uint16 TIFFs + sections.csv): the input of `align`."""
    stack_dir = Path(stack_dir)
    stack_dir.mkdir(parents=True, exist_ok=True)
    zs = list(range(len(images))) if zs is None else list(zs)
    with (stack_dir / "sections.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "z"])
        for z, img in zip(zs, images, strict=True):
            name = f"section_{z:05d}.tif"
            tifffile.imwrite(stack_dir / name, np.clip(np.rint(img), 0, 65535).astype(np.uint16))
            w.writerow([name, z])
    return stack_dir
