"""Align a stack of section montages (TIFFs listed in sections.csv) into one OME-Zarr volume.

The work is three kinds of task, all plain functions of paths so that any Dask worker
(or this process) can run them:

1. `inspect_section`: is there tissue in the montage at all (a blank or lost section
   keeps its z, is recorded as missing and flagged for re-imaging)?
2. `align_pair`: one section against one of its predecessors (z-1, z-2, z-3 among the
   sections with tissue): coarse then elastic, computed from the raw montages, given as
   point matches between the two raw images. Pairs are independent, so they all run at once.
3. `render_into_volume`: one section rendered shard by shard into the volume with its
   transform. One task per section: it is the only writer of that section's shards, so
   sections are written in any order, as they finish.

Between 2 and 3, on the client: the gates (a pair that does not register is dropped; a
section that repeats its predecessor, or that no pair registers, is flagged and left out;
its neighbours are matched across it anyway) and the stack-wide solve of every section's
transform from all kept matches at once (`zsolve.solve_stack`; docs/alignment.md).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
import zarr

from tapescope.allocator import keep_large_blocks
from tapescope.errors import TapescopeError
from tapescope.montage.omezarr import Volume, pyramid_levels
from tapescope.montage.shard_render import RenderStats, render_section
from tapescope.montage.transform import SectionTransform

from .align import align_section, block_mean, repeat_reason, unregistered_reason
from .zsolve import PairMatch, SolveParams, chain_initial, groups, matches_of, solve_windowed

MIN_PAIR_CONFIDENCE = 0.2   # coarse NCC below this: the pair did not register (docs/alignment.md)
BLANK_DETAIL = 0.01         # relative band-passed contrast below this: no tissue
NEIGHBOURS = 3              # predecessors each section is matched to
DEFAULT_PIXEL_NM = 4.0      # where neither the montages nor the user say


class StackError(TapescopeError, ValueError):
    """Bad input: names the file, line and what is wrong."""


@dataclass(frozen=True)
class StackEntry:
    z: int
    path: Path


@dataclass(frozen=True)
class FlowParams:
    """The pair's elastic stage (`align.align_section`): patches of `patch` px every `stride`
    px, on `scale` x `scale` block means, `passes` times (`far_passes` for a section's
    farther predecessors), relaxed with `stiffness`."""
    patch: int = 64
    stride: int = 32
    scale: int = 1
    passes: int = 3
    stiffness: float = 0.3
    far_passes: int = 3

    def section_args(self) -> dict[str, Any]:
        """The elastic stage's arguments of `align_section` (a nearest predecessor's passes)."""
        return {"stride": self.stride, "patch": self.patch, "passes": self.passes, "stiffness": self.stiffness,
                "scale": self.scale}


@dataclass(frozen=True)
class AlignParams:
    max_rotation_deg: float = 10.0
    elastic: bool = True
    device: str = "cpu"
    neighbours: int = NEIGHBOURS
    solve: SolveParams = field(default_factory=SolveParams)
    canvas: tuple[int, int] | None = None   # montages smaller than this are padded to it
    flow: FlowParams = field(default_factory=FlowParams)


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
    matches: PairMatch | None = None
    detail: float = float("nan")  # fine-detail NCC after alignment (align.detail_agreement)

    @property
    def coarse(self) -> np.ndarray:
        """The transform's affine part, 3x3, raw fixed -> raw moving."""
        return self.transform.affine3


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
    pairs: int = 0               # registered pairs this section is in
    solve_rms_px: float = 0.0    # RMS of its pairs' matches after the stack-wide solve
    needs_reimaging: bool = False


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


def montage_of(path: Path) -> Path | None:
    """The OME-Zarr montage a path names: a `tapescope stitch` output folder (its
    montage.zarr) or the montage folder itself; None if it names none."""
    for p in (path / "montage.zarr", path):
        if (p / "zarr.json").is_file():
            return p
    return None


def read_sections(paths: Sequence[Path]) -> tuple[list[StackEntry], tuple[int, int], float | None]:
    """(entries, canvas shape, pixel size in nm or None) of what `tapescope align` was given:
    one STACK_DIR with sections.csv, or stitched sections in z order (`tapescope stitch
    --pixel-nm` output folders or their montage.zarr). Montages may differ in size: the
    canvas is the largest, smaller ones are padded at the bottom and right (`Padded`)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise StackError("no sections given")
    if len(paths) == 1 and montage_of(paths[0]) is None:
        entries, shape = read_stack(paths[0])    # a stack folder, or what is wrong with it as one
        return entries, shape, None
    entries, shapes, sizes, dtypes = [], [], set(), set()
    for z, p in enumerate(paths):
        m = montage_of(p)
        if m is None:
            raise StackError(f"{p}: neither a stack folder with sections.csv nor a stitched section (a "
                             "`tapescope stitch --pixel-nm` output folder holding montage.zarr)")
        try:
            group = zarr.open_group(str(m), mode="r", zarr_format=3)
            ms = group.attrs["ome"]["multiscales"][0]
            level = group[ms["datasets"][0]["path"]]
            scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        except (KeyError, IndexError, ValueError, OSError) as exc:
            raise StackError(f"{m}: not an OME-Zarr montage ({type(exc).__name__}: {exc})") from None
        if len(level.shape) != 3 or level.shape[0] != 1:
            raise StackError(f"{m}: expected one section (shape 1 x H x W), got {tuple(level.shape)}")
        sizes.add(float(scale[-1]))
        dtypes.add(np.dtype(level.dtype).name)
        shapes.append(tuple(int(n) for n in level.shape[1:]))
        entries.append(StackEntry(z, m.resolve()))
    if len(dtypes) > 1 or not dtypes <= {"uint8", "uint16"}:
        raise StackError(f"the montages' pixel types are {', '.join(sorted(dtypes))}: the volume keeps one 8- or "
                         "16-bit type, so stitch every section's tiles of one integer type")
    if len(sizes) > 1:
        raise StackError(f"the montages have different pixel sizes ({', '.join(f'{v:g}' for v in sorted(sizes))} nm): "
                         "stitch them at one pixel size")
    canvas = (max(h for h, _ in shapes), max(w for _, w in shapes))
    return entries, canvas, sizes.pop()


def _points(key: tuple) -> bool:
    """Whether `key` picks single pixels: (rows, cols) as two integer arrays."""
    return len(key) == 2 and all(isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.integer) for a in key)


class ZarrPlane:
    """Section 0 of a montage's full-resolution level, read a slice at a time."""

    def __init__(self, path: Path) -> None:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.level = group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]
        self.shape: tuple[int, int] = tuple(self.level.shape[1:])  # type: ignore[assignment]
        self.dtype = np.dtype(self.level.dtype)
        self.ndim = 2

    def __getitem__(self, key: object) -> np.ndarray:
        k = key if isinstance(key, tuple) else (key,)
        if _points(k):
            ys, xs = (np.asarray(a, np.intp) for a in k)
            return np.asarray(self.level.vindex[(np.zeros_like(ys), ys, xs)])
        return np.asarray(self.level[(0, *k)])

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


class Padded:
    """`image` on a larger canvas, zeros (not imaged) below and right of it: montages of
    different sizes aligned on one canvas keep their own pixel coordinates."""

    def __init__(self, image: Any, shape: tuple[int, int]) -> None:
        self.image, self.shape = image, shape
        self.dtype = np.dtype(image.dtype)
        self.ndim = 2

    def __getitem__(self, key: object) -> np.ndarray:
        k = key if isinstance(key, tuple) else (key,)
        if _points(k):          # (rows, cols) of single pixels: the image's where inside, else 0
            ys, xs = (np.asarray(a, np.intp) for a in k)
            h, w = self.image.shape[:2]
            out = np.zeros(ys.shape, self.dtype)
            inside = (ys < h) & (xs < w)
            if inside.any():
                out[inside] = self.image[ys[inside], xs[inside]]
            return out
        k = (*k, *(slice(None),) * (2 - len(k)))
        spans, picks, drop = [], [], []
        for axis, part in enumerate(k):
            n = self.shape[axis]
            if isinstance(part, (int, np.integer)):
                i = int(part) + (n if part < 0 else 0)
                spans.append((i, i + 1))
                picks.append(slice(None))
                drop.append(axis)
            elif isinstance(part, slice):
                start, stop, step = part.indices(n)
                spans.append((start, max(start, stop)))
                picks.append(slice(None, None, step))
            else:
                raise TypeError(f"Padded takes ints and slices, not {type(part).__name__}")
        (y0, y1), (x0, x1) = spans
        out = np.zeros((y1 - y0, x1 - x0), self.dtype)
        h, w = self.image.shape[:2]
        iy1, ix1 = min(y1, h), min(x1, w)
        if iy1 > y0 and ix1 > x0:
            out[:iy1 - y0, :ix1 - x0] = self.image[y0:iy1, x0:ix1]
        out = out[picks[0], picks[1]]
        return out.squeeze(axis=tuple(drop)) if drop else out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


def open_image(path: Path, canvas: tuple[int, int] | None = None) -> Any:
    """The montage: a TIFF memory-mapped where it allows (uncompressed, contiguous) so that
    rendering reads only the parts each shard needs, else read into RAM; an OME-Zarr montage
    read a slice at a time. On a `canvas` larger than it, padded (`Padded`)."""
    if (path / "zarr.json").is_file():
        image: Any = ZarrPlane(path)
    else:
        try:
            image = tifffile.memmap(path, mode="r")
        except Exception:  # compressed or tiled TIFF: no memory map possible
            image = tifffile.imread(path)
    if canvas is not None and tuple(image.shape[:2]) != tuple(canvas):
        return Padded(image, canvas)
    return image


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


class Imaged:
    """Where a montage holds data: non-zero pixels (0 is where no tile landed), read a
    slice at a time so that a memory-mapped montage stays on disk."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.shape = image.shape
        self.dtype = np.dtype(bool)

    def __getitem__(self, key: object) -> np.ndarray:
        return np.asarray(self.image[key]) > 0  # type: ignore[index]


def align_pair(fixed_z: int, fixed_path: Path, moving_z: int, moving_path: Path, params: AlignParams) -> PairResult:
    keep_large_blocks()     # once per worker process
    # Memory-mapped where the TIFF allows: the alignment reads strips and patches.
    fixed = open_image(fixed_path, params.canvas)
    moving = open_image(moving_path, params.canvas)
    fv, mv = Imaged(fixed), Imaged(moving)
    a = align_section(fixed, moving, fv, mv, elastic=params.elastic, max_rotation_deg=params.max_rotation_deg,
                      device=params.device, **params.flow.section_args())
    return PairResult(fixed_z, moving_z, a.transform, a.confidence, a.rotation_deg, a.flow_nodes, a.flow_rms_px,
                      a.chance, matches_of(a, fixed_z, moving_z, fv, mv), a.detail)


def pair_params(todo: Sequence[tuple[int, int]], params: AlignParams, present: Sequence[int]) -> list[AlignParams]:
    """Each pair's settings: `flow.passes` for a section's nearest predecessor in `todo` and
    for every pair across a section missing from `present` (what places the stack past a
    gap), `flow.far_passes` for the other, farther predecessors (their matches weigh little
    in the solve, and each pass after the first costs as much as the first)."""
    nearest: dict[int, int] = {}
    for f, m in todo:
        nearest[m] = max(f, nearest.get(m, f))
    here = set(present)
    far = replace(params, flow=replace(params.flow, passes=params.flow.far_passes))
    return [params if f == nearest[m] or any(z not in here for z in range(f + 1, m)) else far for f, m in todo]


def flag(o: SectionOutcome, status: str, why: str) -> None:
    """Takes a section out of the stack, with the reason; it is queued for re-imaging."""
    o.status, o.message, o.needs_reimaging = status, why, True


def _pairs_to_try(present: Sequence[int], tried: Iterable[tuple[int, int]], k: int,
                  only: Iterable[int] | None = None, among: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Each section of `only` (default: all) with its k nearest predecessors in `among`
    (default: `present`), leaving out pairs already tried."""
    done = set(tried)
    among = sorted(present if among is None else among)
    out = []
    for z in sorted(present if only is None else only):
        below = [i for i in among if i < z]
        out += [(i, z) for i in below[-k:] if (i, z) not in done]
    return out


def match_sections(present: Sequence[int], by_z: dict[int, StackEntry], params: AlignParams, map_fn: MapFn,
                   say: Callable[[str], None], shape: tuple[int, int],
                   ) -> tuple[dict[tuple[int, int], PairResult], dict[int, str], dict[int, str]]:
    """Pairs of every section with its `params.neighbours` predecessors, then more pairs for
    sections the gates cut off from the stack (across a flagged run of sections). Where a
    group of sections that register to each other is still cut off, pairs below the gates
    join it where several agree on where it lies (`agreeing_bridges`), else the one with the
    highest NCC above chance: the volume stays whole, and those sections carry a warning
    instead of being dropped. Returns the registered pairs, the
    flagged sections and the warned sections, each with its reason."""
    pairs: dict[tuple[int, int], PairResult] = {}
    todo = _pairs_to_try(present, (), params.neighbours)
    while True:
        if todo:
            say(f"matching {len(todo)} section pairs")
            results = map_fn(align_pair, [f for f, _ in todo], [by_z[f].path for f, _ in todo],
                             [m for _, m in todo], [by_z[m].path for _, m in todo], pair_params(todo, params, present))
            pairs.update({(r.fixed_z, r.moving_z): r for r in results})
        kept, flagged, cut_off = gate_pairs(present, pairs)
        main = [z for z in present if z not in flagged and z not in cut_off]
        todo = _pairs_to_try(present, pairs, params.neighbours, only=cut_off, among=main)
        if not todo:
            break
    forced: set[tuple[int, int]] = set()
    warned: dict[int, str] = {}
    while cut_off:
        main = [z for z in present if z not in flagged and z not in cut_off]
        group_of = groups(cut_off, [k for k in kept if k[0] in cut_off and k[1] in cut_off])
        first = group_of[min(cut_off)]
        chosen = agreeing_bridges(pairs, kept, main, [z for z in cut_off if group_of[z] == first], shape)
        if not chosen:
            break
        forced |= set(chosen)
        kept, flagged, still = gate_pairs(present, pairs, forced)
        names = ", ".join(f"{i}-{j} (NCC {pairs[(i, j)].confidence:.2f})" for i, j in chosen)
        why = (f"joined to the stack by {len(chosen)} pairs below the gates that agree within {BRIDGE_AGREE_PX} px: "
               if len(chosen) > 1 else "joined to the stack by one pair below the gates: ") + names
        for z in set(cut_off) - set(still):
            warned[z] = why + "; check its alignment"
        cut_off = still
    for z in cut_off:
        flagged[z] = "no registered pair connects it to the rest of the stack"
    return {k: r for k, r in kept.items() if k[0] not in flagged and k[1] not in flagged}, flagged, warned


BRIDGE_AGREE_PX = 6.0   # pairs joining two groups agree when they place one on the other this closely


def agreeing_bridges(pairs: dict[tuple[int, int], PairResult], kept: dict[tuple[int, int], PairResult],
                     main: Sequence[int], group: Sequence[int], shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Pairs below the gates between the stack (`main`) and a group cut off from it that
    agree on where the group lies. Each such pair, with the registered pairs inside each
    side, places the group on the stack; on real serial sections two or three apart, pairs
    at NCC 0.03-0.1 are often right and sometimes tens of px wrong, and their NCC does not
    tell which (docs/alignment.md), but right ones agree with each other and wrong ones
    scatter. The largest set that agrees within BRIDGE_AGREE_PX at the section's corners
    and centre is taken; with no two agreeing, the pair with the highest NCC above chance."""
    inside = {k: r.coarse for k, r in kept.items()}
    fa = chain_initial(main, {k: a for k, a in inside.items() if k[0] in main and k[1] in main})
    fb = chain_initial(group, {k: a for k, a in inside.items() if k[0] in group and k[1] in group})
    h, w = shape
    probe = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1], [(w - 1) / 2, (h - 1) / 2, 1]]).T
    cands: list[tuple[float, tuple[int, int], np.ndarray]] = []
    for (i, j), r in pairs.items():
        if r.confidence <= r.chance:
            continue
        if i in fa and j in fb:        # F_j = F_i o T^-1: the group's frame -> the stack's
            m = fa[i] @ np.linalg.inv(r.coarse) @ np.linalg.inv(fb[j])
        elif i in fb and j in fa:      # F_i = F_j o T
            m = fa[j] @ r.coarse @ np.linalg.inv(fb[i])
        else:
            continue
        cands.append((r.confidence, (i, j), (m @ probe)[:2].T))
    if not cands:
        return []
    agree = [[k for k, other in enumerate(cands) if np.hypot(*(c[2] - other[2]).T).max() <= BRIDGE_AGREE_PX]
             for c in cands]
    best = max(range(len(cands)), key=lambda k: (len(agree[k]), sum(cands[i][0] for i in agree[k])))
    if len(agree[best]) < 2:
        return [max(cands, key=lambda c: c[0])[1]]
    return sorted(cands[k][1] for k in agree[best])


def gate_pairs(present: Sequence[int], pairs: dict[tuple[int, int], PairResult],
               forced: set[tuple[int, int]] | None = None,
               ) -> tuple[dict[tuple[int, int], PairResult], dict[int, str], list[int]]:
    """(registered pairs, flagged sections with the reason, sections outside the largest
    group that registered pairs connect); pairs in `forced` are kept below the gates."""
    flagged: dict[int, str] = {}
    best: dict[int, PairResult] = {}
    for (_, j), r in pairs.items():
        if j not in best or r.confidence > best[j].confidence:
            best[j] = r
    # How each section's best match agrees, typically: coarse NCC and fine detail.
    typical = float(np.median([r.confidence for r in best.values()])) if best else 0.0
    details = [r.detail for r in best.values() if np.isfinite(r.detail)]
    typical_detail = float(np.median(details)) if details else float("nan")
    for (i, j), r in sorted(pairs.items(), key=lambda kv: kv[0][1]):
        if i not in flagged and j not in flagged and (
                why := repeat_reason(r.confidence, typical, i, r.detail, typical_detail)):
            flagged[j] = why
    kept, refused = {}, {}
    for k, r in pairs.items():
        if k[0] in flagged or k[1] in flagged:
            continue
        why = unregistered_reason(r.confidence, r.chance, MIN_PAIR_CONFIDENCE)
        if why and k not in (forced or set()):
            refused[k] = why
        else:
            kept[k] = r
    linked = {z for k in kept for z in k}
    for z in present:
        if z in flagged or z in linked or len(present) < 2:
            continue
        mine = sorted(k for k in refused if z in k)
        near = min(mine, key=lambda k: abs(k[0] - k[1])) if mine else None
        other = None if near is None else (near[0] if near[1] == z else near[1])
        flagged[z] = f"did not register to z={other}: {refused[near]}" if near else "no neighbour to register to"
    # The largest connected group is the stack; the rest must be bridged to it.
    group_of = groups([z for z in present if z not in flagged], kept)
    members: dict[int, list[int]] = {}
    for z, g in group_of.items():
        members.setdefault(g, []).append(z)
    main = max(members.values(), key=lambda g: (len(g), -min(g)), default=[])
    cut_off = [z for z in present if z not in flagged and z not in main]
    return kept, flagged, cut_off


def render_into_volume(volume_path: Path, z: int, path: Path, transform: SectionTransform,
                       device: str = "cpu") -> RenderStats:
    keep_large_blocks()
    volume = Volume.open(volume_path)
    image = open_image(path)
    # The montage is one "tile" at (0, 0); its own pixels are the source coordinates (a
    # montage smaller than the canvas simply covers less of it).
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


def align_stack(
    stack_dir: Path | Sequence[Path], out_dir: Path, *, map_fn: MapFn = local_map, params: AlignParams | None = None,
    pixel_nm: float | None = None, thickness_nm: float = 40.0, chunk: int = 256,
    progress: Callable[[str], None] | None = None,
) -> StackResult:
    """Align every section (of STACK_DIR, or the stitched sections given: `read_sections`)
    into OUT_DIR/volume.zarr, transforms beside it in OUT_DIR/volume.transforms/, and a
    per-section summary in OUT_DIR/alignment.csv. The pixel size is the montages' own, else
    `pixel_nm`, else DEFAULT_PIXEL_NM (said)."""
    say = progress or (lambda _msg: None)
    entries, shape, own_nm = read_sections([stack_dir] if isinstance(stack_dir, (str, Path)) else stack_dir)
    if own_nm is not None and pixel_nm is not None and abs(own_nm - pixel_nm) > 1e-9 * own_nm:
        raise StackError(f"--pixel-nm {pixel_nm:g} differs from the montages' own {own_nm:g} nm")
    pixel_nm = own_nm or pixel_nm or DEFAULT_PIXEL_NM
    say(f"{len(entries)} sections on a {shape[0]} x {shape[1]} px canvas, {pixel_nm:g} nm pixels"
        + ("" if own_nm or pixel_nm != DEFAULT_PIXEL_NM else " (assumed: give --pixel-nm)")
        + f", {thickness_nm:g} nm sections")
    params = replace(params or AlignParams(), canvas=shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vol_path = out_dir / "volume.zarr"
    if vol_path.exists():
        raise StackError(f"{vol_path} already exists; choose another --out or remove it")
    nz = max(e.z for e in entries) + 1
    dtype = np.dtype(open_image(entries[0].path).dtype)   # the montages' bit depth is kept
    volume = Volume.create(vol_path, (nz, *shape), pixel_nm=pixel_nm, thickness_nm=thickness_nm,
                           levels=pyramid_levels(shape), chunk=chunk,
                           dtype=dtype.name if dtype in (np.uint8, np.uint16) else "uint16")
    by_z = {e.z: e for e in entries}
    # A stitched section is named by its stitch folder (every montage is montage.zarr).
    outcome = {e.z: SectionOutcome(e.z, e.path.parent.name if e.path.name == "montage.zarr" else e.path.name, "ok")
               for e in entries}

    say(f"inspecting {len(entries)} sections")
    details = map_fn(inspect_section, [e.path for e in entries])
    present: list[int] = []
    for e, d in zip(entries, details, strict=True):
        if d < BLANK_DETAIL:
            flag(outcome[e.z], "missing", f"no tissue (detail {d:.4f} < {BLANK_DETAIL})")
        else:
            present.append(e.z)
    for z in range(nz):
        if z not in by_z:
            outcome[z] = SectionOutcome(z, "", "missing", message="not listed in sections.csv")

    kept, flagged, warned = match_sections(present, by_z, params, map_fn, say, shape)
    for z, why in flagged.items():
        flag(outcome[z], "unaligned", why)
    for z, why in warned.items():
        outcome[z].message = why
    aligned = [z for z in present if z not in flagged]
    transforms: dict[int, SectionTransform] = {}
    if aligned:
        say(f"solving {len(aligned)} sections together from {len(kept)} pairs")
        initial = chain_initial(aligned, {k: r.coarse for k, r in kept.items()})
        solution = solve_windowed(shape, aligned, [r.matches for r in kept.values() if r.matches is not None],
                                  initial, replace(params.solve, elastic=params.elastic))
        transforms = solution.transforms
        for z in aligned:
            o = outcome[z]
            mine = sorted((k for k in kept if k[1] == z), reverse=True)
            if mine:
                r = kept[mine[0]]
                o.reference_z, o.confidence, o.rotation_deg = r.fixed_z, r.confidence, r.rotation_deg
                o.flow_nodes, o.flow_rms_px = r.flow_nodes, r.flow_rms_px
            else:   # the first section: nothing below it, its best pair above says how it registers
                o.confidence = max((r.confidence for k, r in kept.items() if z in k), default=1.0)
            o.pairs = len([k for k in kept if z in k])
            if z in solution.held:
                o.message = "; ".join(filter(None, [o.message, (
                    "the solve rejected every match of its pairs as an outlier: placed by its pairs' "
                    "coarse alignment alone, with no distortion; check its alignment")]))
                say(f"z={z}: {o.message}")
            res = [solution.residual_px[k] for k in kept if z in k and np.isfinite(solution.residual_px[k])]
            o.solve_rms_px = float(np.sqrt(np.mean(np.square(res)))) if res else 0.0

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
                                "flow_nodes": o.flow_nodes, "flow_rms_px": o.flow_rms_px, "pairs": o.pairs,
                                "solve_rms_px": o.solve_rms_px, "needs_reimaging": o.needs_reimaging}
        if z in transforms:
            info["transform"] = transforms[z].summary()
            info["window"] = volume.section_window(z)
        volume.record(z, info)
    summary = out_dir / "alignment.csv"
    with summary.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["z", "file", "status", "reference_z", "confidence", "rotation_deg", "flow_nodes",
                    "flow_rms_px", "pairs", "solve_rms_px", "needs_reimaging", "message"])
        for z in sorted(outcome):
            o = outcome[z]
            w.writerow([z, o.file, o.status, "" if o.reference_z is None else o.reference_z,
                        f"{o.confidence:.3f}", f"{o.rotation_deg:.3f}", o.flow_nodes, f"{o.flow_rms_px:.3f}",
                        o.pairs, f"{o.solve_rms_px:.3f}", int(o.needs_reimaging), o.message])
    return StackResult(vol_path, [outcome[z] for z in sorted(outcome)], summary)


def rerender_section(volume_path: Path, z: int, montage: Path, device: str = "cpu") -> RenderStats:
    """Render section z of an aligned volume again from its montage and the transform
    stored beside the volume (e.g. after the montage was re-stitched or the volume lost)."""
    volume = Volume.open(volume_path)
    return render_into_volume(volume_path, z, montage, volume.load_transform(z), device)


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
