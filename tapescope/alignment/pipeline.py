"""Section processing: flat-field, stitch, render, align to the previous section, write.

Independent of acquisition and hardware: it takes arrays and stage positions and writes
into a Volume. All sections share one canvas in stage pixel coordinates, so a section
lands where the stage put it and alignment only has to correct what the tape and the
stage got wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from uuid import uuid4

import numpy as np

from tapescope.allocator import keep_large_blocks
from tapescope.montage.canvas import Canvas
from tapescope.montage.omezarr import Volume
from tapescope.montage.shard_render import render_section, render_to
from tapescope.montage.transform import SectionTransform
from tapescope.stitching.flatfield import FlatFielded
from tapescope.stitching.lens import RadialDistortion
from tapescope.stitching.section import StitchResult, stitch_section

from .align import SectionAlignment, align_section, repeat_reason, unregistered_reason
from .stack import FlowParams
from .zsolve import PairMatch, SolveParams, matches_of, solve_stack

STRIP_ROWS = 2048   # rows at a time for whole-canvas checks on memory-mapped planes
SCRATCH_PREFIX = "tapescope-section-"
SCRATCH_RESERVE_BYTES = 2 << 30     # left free for tiles (the engine keeps 1 GB + a section's tiles)

log = logging.getLogger(__name__)

MIN_ALIGN_CONFIDENCE = 0.15   # NCC below this: the section did not register to its neighbour
# ...nor when it is not clearly above chance (align.unregistered_reason).
SEAM_FLAG_PX = 1.0            # a stitched pair whose residual exceeds this is a flagged seam
# Live, the section must be done before the scope finishes the next one: a coarser flow
# grid and two passes cost a sixth of the stack defaults (measured 0.18 vs 0.13 px RMS on
# simulated stacks). On real tissue the stack's own settings undo the warps better
# (docs/alignment.md, "The live window"): `[processing] align_flow` chooses.
LIVE_FLOW = FlowParams(patch=96, stride=48, passes=2)
FLOWS = {"live": LIVE_FLOW, "stack": FlowParams()}
LIVE_NEIGHBOURS = 2           # good sections each live section is aligned to (docs/alignment.md)


# Renders section z into the volume from the section's tiles: (z, tile positions, the
# volume-to-tile transform, lens, per-tile linear parts). `render_section` in this process,
# or the same call in another one (acquisition/cluster.py).
FinalRender = Callable[[int, np.ndarray, SectionTransform, RadialDistortion | None, np.ndarray | None], object]


@dataclass
class ReferencePair:
    """Section z aligned to one reference below it: registered (`alignment` and its
    `match`, in the reference's unaligned frame or the volume's, as `frame` says), or
    refused with the reason (`why`) and the confidence it reached."""

    reference: int
    confidence: float
    why: str = ""
    alignment: SectionAlignment | None = None
    match: PairMatch | None = None
    frame: str = "unaligned"     # the reference as imaged ("unaligned") or as written ("aligned")


# Aligns section z to each of the given references (z, reference zs, nearest first), one
# ReferencePair each, in that order: `align_pairs` in this process, or the same call for each
# pair on a cluster's workers (acquisition/cluster.py).
PairAligner = Callable[[int, list[int]], list[ReferencePair]]


def stitch_tiles(raw_tiles: Sequence[np.ndarray], stage_px: np.ndarray, grid: Sequence[tuple[int, int]], *,
                 lens: str | RadialDistortion, gain: np.ndarray | None, dark: float | np.ndarray,
                 tile_model: str) -> StitchResult:
    """One section's registration and solve as the live processor does it (edge strips of
    the raw tiles, flat-fielded as read)."""
    return stitch_section(raw_tiles, stage_px, grid, lens=lens, gain=gain, dark=dark, strips=True,
                          tile_model=tile_model)


def scratch_problem(scratch: Path | None) -> str | None:
    """Why `scratch` cannot hold sections' scratch files (None: it can, or none is set)."""
    if scratch is not None and not Path(scratch).is_dir():
        return f"processing.scratch: {scratch} is not a folder (it must exist before the run)"
    return None


def scratch_prefix(volume_path: Path | None) -> str:
    """Scratch folder prefix of one volume: its name and a hash of its full path (every run
    calls its volume volume.zarr; runs may share a scratch disk)."""
    if volume_path is None:
        return f"{SCRATCH_PREFIX}{os.getpid()}-"
    digest = hashlib.sha1(str(Path(volume_path).resolve()).encode()).hexdigest()[:10]
    return f"{SCRATCH_PREFIX}{Path(volume_path).name}-{digest}-"


def check_scratch_space(shape: tuple[int, int], scratch: Path | None, volume_root: Path | None) -> None:
    """A section's scratch (image, coverage, reference, two masks: 14 bytes a canvas pixel)
    must fit, and on the volume's disk (where the tiles are written too) leave its reserve
    for the tiles still to come: else the section fails here, with an alarm, instead of a
    tile write failing later."""
    need = 14 * shape[0] * shape[1]
    where = scratch or Path(tempfile.gettempdir())
    shares_volume_disk = volume_root is not None and os.stat(where).st_dev == os.stat(volume_root).st_dev
    reserve = SCRATCH_RESERVE_BYTES if shares_volume_disk else 0
    free = shutil.disk_usage(where).free
    if free - need < reserve or free < need:
        raise OSError(f"{free / 1e9:.2f} GB free in {where}; processing a section needs {need / 1e9:.2f} GB "
                      f"of scratch" + (f" and leaves {reserve / 1e9:.0f} GB for the tiles" if reserve else ""))


class Plane:
    """Plane z of a volume level, read a slice at a time as float32: a reference section
    stays in the volume instead of in memory (where it was imaged is where it is non-zero,
    the volume's fill value marking where no tile landed)."""

    def __init__(self, level: object, z: int) -> None:
        self.level, self.z = level, z
        self.shape: tuple[int, int] = tuple(level.shape[1:])  # type: ignore[attr-defined]
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: object) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.level[(self.z, *key)]).astype(np.float32)  # type: ignore[index]


def _overlap_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the canvas where both valid masks are set, read in strips."""
    both = sum(int((np.asarray(a[y:y + STRIP_ROWS]) & np.asarray(b[y:y + STRIP_ROWS])).sum())
               for y in range(0, a.shape[0], STRIP_ROWS))
    return both / float(a.shape[0] * a.shape[1])


def render_montage(folder: Path, name: str, canvas: Canvas, tiles: Sequence[np.ndarray], positions: np.ndarray, *,
                   lens: RadialDistortion | None, linear: np.ndarray | None, device: str) -> str:
    """Section's unaligned montage (its tiles where the stitching put them, on the run's
    canvas) into `folder` as `name` (`MontageStore.files`): written under other names and
    renamed when whole, so a reader never sees half a montage. Returns `name`."""
    oy, ox = np.asarray(canvas.origin, float)
    image_path, valid_path = MontageStore.files(folder, name)
    part = folder / f"{name}.part"
    shutil.rmtree(part, ignore_errors=True)      # a retried task's first try, killed with its worker
    part.mkdir()
    try:
        image = np.lib.format.open_memmap(part / "image.npy", "w+", np.float32, canvas.shape)
        cover = np.lib.format.open_memmap(part / "cover.npy", "w+", np.float32, canvas.shape)
        valid = np.lib.format.open_memmap(part / "valid.npy", "w+", bool, canvas.shape)
        render_to(image, cover, tiles, positions, SectionTransform.identity().shifted(oy, ox), lens=lens,
                  device=device, linear=linear)
        for y in range(0, canvas.shape[0], STRIP_ROWS):
            valid[y:y + STRIP_ROWS] = cover[y:y + STRIP_ROWS] > 0.5
        image.flush()
        valid.flush()
        del image, cover, valid        # the maps go before their files
        (part / "valid.npy").replace(valid_path)
        (part / "image.npy").replace(image_path)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return name


class MontageStore:
    """The unaligned montages of the sections that coming sections may be aligned to, as
    memory-mapped files in one scratch folder (`folder`, which cluster workers must see).
    A section is aligned to its references' unaligned montages, as the offline stack is, so
    its alignment never waits for theirs; a take's files have a name of their own, so a
    retake never changes the pixels a running alignment reads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.current: dict[int, str] = {}      # z -> its montage's name

    @staticmethod
    def files(folder: Path, name: str) -> tuple[Path, Path]:
        return folder / f"{name}.image.npy", folder / f"{name}.valid.npy"

    @staticmethod
    def new_name(z: int) -> str:
        return f"z{z:06d}-{uuid4().hex[:10]}"

    @staticmethod
    def read(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A montage's image and coverage, memory-mapped read-only."""
        image_path, valid_path = MontageStore.files(folder, name)
        return np.load(image_path, mmap_mode="r"), np.load(valid_path, mmap_mode="r")

    def render(self, z: int, canvas: Canvas, tiles: Sequence[np.ndarray], stitched: StitchResult, *,
               device: str) -> str:
        return render_montage(self.folder, self.new_name(z), canvas, tiles, stitched.solution.positions,
                              lens=stitched.lens_applied, linear=stitched.solution.linear, device=device)

    def adopt(self, z: int, name: str) -> None:
        """`name` is section z's montage now (an earlier take's goes)."""
        if (old := self.current.get(z)) is not None and old != name:
            self.discard(old)
        self.current[z] = name

    def get(self, z: int) -> tuple[np.ndarray, np.ndarray] | None:
        name = self.current.get(z)
        return None if name is None else self.read(self.folder, name)

    def discard(self, name: str) -> None:
        for path in self.files(self.folder, name):
            path.unlink(missing_ok=True)

    def drop(self, z: int) -> None:
        if (name := self.current.pop(z, None)) is not None:
            self.discard(name)

    def keep(self, zs: set[int], upto: int) -> None:
        """Drop the montages of sections up to `upto` other than `zs`."""
        for z in [k for k in self.current if k <= upto and k not in zs]:
            self.drop(z)

    def sweep(self, keep: set[str]) -> None:
        """Remove the montages that are neither kept for a section nor in `keep` (those
        under way): a take cancelled or failed after its montage was written."""
        wanted = {*self.current.values(), *keep}
        for path in self.folder.glob("*.npy"):
            if path.name.split(".")[0] not in wanted:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        self.current.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


Montage = tuple[np.ndarray, np.ndarray]     # an unaligned montage's image and coverage


def align_pair(z: int, image: np.ndarray, valid: np.ndarray, rz: int, ref_img: np.ndarray, ref_valid: np.ndarray,
               frame: str, *, elastic: bool, device: str, flow: FlowParams = LIVE_FLOW) -> ReferencePair:
    """Section z (`image`, where `valid`) aligned to reference rz (`ref_img`, `ref_valid`:
    its unaligned montage, frame "unaligned", or its pixels in the volume, "aligned") with
    the live settings; refused with the reason when they overlap too little or it does not
    register."""
    if _overlap_fraction(valid, ref_valid) < 0.05:
        return ReferencePair(rz, 0.0, "too little overlap with the previous section", frame=frame)
    a = align_section(ref_img, image, ref_valid, valid, elastic=elastic, device=device, **flow.section_args())
    if why := unregistered_reason(a.confidence, a.chance, MIN_ALIGN_CONFIDENCE):
        return ReferencePair(rz, a.confidence, why, frame=frame)
    return ReferencePair(rz, a.confidence, alignment=a, match=matches_of(a, rz, z, ref_valid, valid), frame=frame)


def align_pairs(z: int, montage: Montage, references: Sequence[tuple[int, Montage | Plane]], *, elastic: bool,
                device: str, scratch: Path | None, prefix: str, volume_root: Path | None,
                flow: FlowParams = LIVE_FLOW) -> list[ReferencePair]:
    """Section z (its unaligned `montage`) aligned to each of `references`, nearest first:
    a reference's unaligned montage where it is kept, else (a retake, a resumed run) its
    pixels as written in the volume, copied into scratch files once, in strips (the aligner
    reads it piecewise ~1000 times, each a chunk decode from the volume)."""
    image, valid = montage
    results = []
    planes = any(isinstance(src, Plane) for _, src in references)
    with contextlib.ExitStack() as stack:
        if planes:
            check_scratch_space(image.shape, scratch, volume_root)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix, dir=scratch)))
            ref_img = np.lib.format.open_memmap(tmp / "reference.npy", "w+", np.float32, image.shape)
            ref_valid = np.lib.format.open_memmap(tmp / "reference_valid.npy", "w+", bool, image.shape)
        for rz, src in references:
            if isinstance(src, Plane):
                for y in range(0, image.shape[0], STRIP_ROWS):
                    rows = slice(y, y + STRIP_ROWS)
                    ref_img[rows] = src[rows]
                    ref_valid[rows] = ref_img[rows] > 0
                results.append(align_pair(z, image, valid, rz, ref_img, ref_valid, "aligned", elastic=elastic,
                                          device=device, flow=flow))
            else:
                results.append(align_pair(z, image, valid, rz, *src, "unaligned", elastic=elastic, device=device,
                                          flow=flow))
        if planes:
            del ref_img, ref_valid      # the maps go before their files
    return results


@dataclass
class SectionReport:
    z: int
    status: str                   # "ok" | "unaligned" | "failed"
    max_residual_px: float
    flagged_seams: int
    shift_px: tuple[float, float]
    alignment_confidence: float
    tile_status: list[str]
    message: str = ""
    repeats: int | None = None    # the section z repeats (either take may show the wrong section)
    written: bool = True          # False: placed and kept open in the window, written later
    take: int | None = None       # the take judged (its info's "take": the journal line of its section_done)


@dataclass
class Placement:
    """Where a section goes: the verdict of aligning it to the sections below."""

    status: str                                   # "ok" | "unaligned"
    confidence: float
    message: str = ""
    transform: SectionTransform = field(default_factory=SectionTransform.identity)
    shift: tuple[float, float] = (0.0, 0.0)       # where the canvas centre's content came from
    references: list[int] = field(default_factory=list)   # those that registered
    detail: float = float("nan")                  # fine-detail agreement with the nearest
    repeats: int | None = None                    # the section it repeats, if it does


@dataclass
class _Open:
    """A good section kept open in the live window: placed, not yet rendered or recorded;
    each later section's matches place it again (`SectionProcessor._solve_window`)."""

    z: int
    info: dict
    tiles: list[FlatFielded]
    stitched: StitchResult
    max_res: float
    flagged: int
    placed: Placement
    pairs: list[ReferencePair]                 # those that registered
    render: FinalRender | None
    forward: np.ndarray                        # current forward affine (raw -> volume frame)
    fixed_matches: dict[int, PairMatch] = field(default_factory=dict)   # to written references, volume frame


class SectionProcessor:
    """Processes sections in tape order into one Volume (one writer: this object).

    Each section is aligned to the last good one and to up to `neighbours` - 1 good sections
    below it, all read back from the volume, and placed by their matches together (held
    where they were written). `align=False` writes sections where the stage put them;
    `elastic=False` keeps live
    alignment to the rigid/affine pass (no patch flow: a fraction of the time per section,
    for when the scope outruns the CPU); the default is the full elastic alignment. After a
    resume, `prime_from_volume()` reads the last good section back as the reference, so
    the first new section is aligned to it instead of starting a new chain.

    Memory is bounded by a render block, not by the section: the unaligned montage goes to
    memory-mapped files in `scratch` (default: beside the volume) for the aligner, which
    reads in strips; the reference is the previous section in the volume, read as needed;
    the aligned section is rendered from the tiles into the volume shard by shard.

    With a `look_ahead` window, a good section is not written at once: it stays open while
    the next `look_ahead` sections arrive, and each of them places the open sections again,
    all together from all their pairs (the stack solve, as offline), the written sections
    held; the oldest is written when it leaves the window. Its verdict (registered or not,
    a repeat) is given at once, so a section that does not register is re-imaged as before.
    `process` returns each section's verdict; `finished()` hands over the reports of the
    sections written since (those are what is journalled); `flush()` writes the window (the
    end of a run; a retake of a section at or below the window flushes it first).
    """

    def __init__(self, volume: Volume, canvas: Canvas, *, align: bool = True, neighbours: int = LIVE_NEIGHBOURS,
                 gain: np.ndarray | None = None, dark: float = 0.0, elastic: bool = True,
                 device: str = "cpu", lens: str = "estimate", scratch: Path | None = None,
                 tile_model: str = "translation", look_ahead: int = 0, flow: FlowParams = LIVE_FLOW) -> None:
        if volume.shape[1:] != canvas.shape:
            raise ValueError(f"volume {volume.shape[1:]} and canvas {canvas.shape} differ")
        keep_large_blocks()
        self.volume = volume
        self.canvas = canvas
        self.align = align
        self.gain = gain
        self.dark = dark
        self.elastic = elastic
        if neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, got {neighbours}")
        self.neighbours = neighbours
        if look_ahead < 0:
            raise ValueError(f"look_ahead must be 0 or more, got {look_ahead}")
        self.look_ahead = look_ahead if align else 0
        self.flow = flow
        self._open: list[_Open] = []           # the window, in z order
        self._finished: list[SectionReport] = []
        self.device = device
        if lens not in ("estimate", "none"):
            raise ValueError(f"lens must be 'estimate' or 'none', not {lens!r}")
        # The camera's distortion: estimated from the first section whose overlaps show it
        # clearly (stitching/lens.py), then kept: one lens per camera, not per section.
        self.lens_mode = lens
        self.lens: RadialDistortion | None = None
        if tile_model not in ("translation", "affine"):
            raise ValueError(f"tile_model must be 'translation' or 'affine', not {tile_model!r}")
        self.tile_model = tile_model
        self._reference_z: int | None = None
        self._rendering: int | None = None      # z whose pixels the current take has started to write
        root = getattr(volume.group.store, "root", None)
        if problem := scratch_problem(scratch):
            raise ValueError(problem)
        self.volume_root = Path(str(root)) if root is not None else None
        self.scratch = scratch if scratch is not None else (self.volume_root.parent if self.volume_root else None)
        # Scratch is named after the volume: a processor sweeps only what its own volume's
        # killed processor left (one processor writes a volume), never another's.
        self.scratch_prefix = scratch_prefix(self.volume_root)
        if self.scratch is None:
            log.info("volume not on a local disk: section scratch goes to the system's temporary folder")
        else:
            for stale in self.scratch.glob(f"{self.scratch_prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
        base = self.scratch if self.scratch is not None else Path(tempfile.gettempdir())
        self.montages = MontageStore(base / f"{self.scratch_prefix}montages")
        self._transforms: dict[int, SectionTransform] = {}   # of the sections whose montages are kept
        self.processed = 0      # sections this processor has taken in hand

    def close(self) -> None:
        """Remove the montages kept for coming sections (a processor that is not closed
        leaves them to the next processor of its volume, which sweeps them). Sections still
        open in the window are not written: they are not recorded, so the next run or
        `tapescope process` processes them again (`flush` first to write them)."""
        if self._open:
            log.warning("sections %s were open in the alignment window and are not written",
                        self.open_sections)
            self._open.clear()
        self.montages.remove()

    @property
    def lens_settled(self) -> bool:
        """Whether sections stitched now keep their stitching: the lens is estimated, not to
        be estimated, or a section was processed (the first one may estimate it)."""
        return self.lens is not None or self.lens_mode != "estimate" or self.processed > 0

    @property
    def lens_wanted(self) -> str | RadialDistortion:
        """What stitching a section is told about the lens now: the camera's model once one
        was estimated, else the configured mode."""
        return self.lens if self.lens is not None else self.lens_mode

    def stitch(self, raw_tiles: Sequence[np.ndarray], stage_px: np.ndarray,
               grid: Sequence[tuple[int, int]]) -> StitchResult:
        """Register and solve one section's tiles (no volume, no alignment): the part of
        `process` that sections can do at once, anywhere (`stitch_tiles`)."""
        return stitch_tiles(raw_tiles, stage_px, grid, lens=self.lens_wanted, gain=self.gain, dark=self.dark,
                            tile_model=self.tile_model)

    def process(
        self, z: int, raw_tiles: Sequence[np.ndarray], stage_px: np.ndarray,
        grid: Sequence[tuple[int, int]], info: dict, *, stitched: StitchResult | None = None,
        render: FinalRender | None = None, pairs: PairAligner | None = None, montage: str | None = None,
    ) -> SectionReport:
        """Section z: stitch (or take `stitched`, made elsewhere with `lens_wanted`), render
        its unaligned montage (or take `montage`, rendered into `montages.folder` elsewhere),
        align it to the good sections below (or have `pairs` align it to each of them: the
        same alignment in other processes; the placement from those pairs is decided here),
        render into the volume (or have `render` do it: the same rendering in another
        process) and record it; with a window, a good section is kept open instead and
        written later (`finished`). Returns z's verdict."""
        retake = self.flush_for(z)
        self._rendering = None
        self.processed += 1
        # Registration keeps only the tiles' edge strips, flat-fielded; rendering flat-fields
        # each crop as it reads it: no float32 copy of the section's tiles is ever whole.
        if stitched is None:
            stitched = self.stitch(raw_tiles, stage_px, grid)
        tiles = [FlatFielded(t, self.gain, self.dark) for t in raw_tiles]
        lens = stitched.lens_applied
        if self.lens is None and lens is not None:
            self.lens = lens
            log.info("lens distortion estimated on z=%d: k1 %.3g, k2 %.3g (kept for the sections after it)",
                     z, lens.k1, lens.k2)
        sol = stitched.solution
        used = sol.pair_residual[sol.pair_used]
        max_res = float(used.max()) if used.size else 0.0
        flagged = int((used > SEAM_FLAG_PX).sum())

        references = self._references(z)
        if self.align and montage is None:     # what this section and the coming ones are aligned to
            check_scratch_space(self.canvas.shape, self.scratch, self.volume_root)
            montage = self.montages.render(z, self.canvas, tiles, stitched, device=self.device)
        placed = Placement("ok", 1.0)
        opened: _Open | None = None
        try:
            results: list[ReferencePair] = []
            if references:
                if pairs is not None:
                    results = pairs(z, [rz for rz, _ in references])
                    if [r.reference for r in results] != [rz for rz, _ in references]:
                        raise RuntimeError(f"z={z}: aligned to {[r.reference for r in results]}, "
                                           f"not to the references {[rz for rz, _ in references]}")
                else:
                    assert montage is not None
                    own = MontageStore.read(self.montages.folder, montage)
                    results = align_pairs(z, own, references, elastic=self.elastic, device=self.device,
                                          scratch=self.scratch, prefix=self.scratch_prefix,
                                          volume_root=self.volume_root, flow=self.flow)
                placed = self._place(z, results, opening=bool(self.look_ahead) and not retake)
            if self.look_ahead and not retake and placed.status == "ok" and montage is not None:
                opened = _Open(z, info, tiles, stitched, max_res, flagged, placed,
                               [r for r in results if r.alignment is not None], render,
                               np.linalg.inv(placed.transform.affine3))
                try:
                    self._solve_window([*self._open, opened])
                except Exception as exc:      # the pairs' own placements stand; said with the section
                    log.exception("the alignment window's solve failed at z=%d", z)
                    why = f"the window's solve failed ({type(exc).__name__}: {exc}): placed from its own pairs"
                    opened.placed = replace(placed, message="; ".join(m for m in (placed.message, why) if m))
        except BaseException:
            if montage is not None:      # this take's, never kept: an earlier good take's stays
                self.montages.discard(montage)
            raise
        if montage is not None:
            self.montages.adopt(z, montage)
        if opened is not None:
            self._open.append(opened)
            self._transforms[z] = opened.placed.transform
            if self._reference_z is None or z >= self._reference_z:
                self._reference_z = z
            self._close_oldest(keep=self.look_ahead)
            return SectionReport(z, "ok", max_res, flagged, placed.shift, placed.confidence, sol.status,
                                 placed.message, written=False, take=info.get("take"))
        # Rendered once, from the tiles through the transform: pixels are interpolated once.
        self._rendering = z              # from here the volume's pixels of z are this take's
        report = self._write(z, info, tiles, stitched, max_res, flagged, placed, render)
        self._finished.append(report)
        return report

    def finished(self) -> list[SectionReport]:
        """The reports of the sections written since the last call, in the order written."""
        done, self._finished = self._finished, []
        return done

    @property
    def open_sections(self) -> list[int]:
        """The sections placed and kept open in the window, not yet written."""
        return [o.z for o in self._open]

    def flush(self) -> None:
        """Write every section still open in the window (`finished` reports them)."""
        self._close_oldest(keep=0)

    def _close_oldest(self, keep: int) -> None:
        """Write the oldest open sections until `keep` are left open."""
        while len(self._open) > keep:
            self._finished.append(self._close(self._open.pop(0)))

    def flush_for(self, z: int) -> bool:
        """Before section z is taken in hand: whether it is a retake (at or below the last
        good section, open ones included); a retake is aligned to written sections and
        written at once, so the window is written first. Call it before anything else reads
        the montages kept for z's references (they may go with the flush)."""
        retake = self._reference_z is not None and z <= self._reference_z
        if retake:
            self.flush()
        return retake

    def _close(self, o: _Open) -> SectionReport:
        """Write an open section as the window last placed it; the open sections' pairs to
        it are carried into the volume's frame through that placement first, since its
        montage and placement need not be kept once it is written. A failure is that
        section's alone: recorded as missing with the reason, its pairs dropped from the
        open sections, which go on without it."""
        carried = {k: self._in_volume(r, o.placed.transform)[1]
                   for k, other in enumerate(self._open) for r in other.pairs if r.reference == o.z}
        self._rendering = o.z
        try:
            report = self._write(o.z, o.info, o.tiles, o.stitched, o.max_res, o.flagged, o.placed, o.render)
        except Exception as exc:
            log.exception("writing z=%d as it left the alignment window failed", o.z)
            reason = f"not written as it left the alignment window: {type(exc).__name__}: {exc}"
            self.montages.drop(o.z)
            self._transforms.pop(o.z, None)
            for other in self._open:
                other.pairs = [r for r in other.pairs if r.reference != o.z]
            self.record_missing(o.z, o.info, reason)
            return SectionReport(o.z, "failed", o.max_res, o.flagged, (0.0, 0.0), o.placed.confidence,
                                 o.stitched.solution.status, reason, take=o.info.get("take"))
        for k, match in carried.items():
            self._open[k].fixed_matches[o.z] = match
        return report

    def _write(self, z: int, info: dict, tiles: Sequence[np.ndarray], stitched: StitchResult, max_res: float,
               flagged: int, p: Placement, render: FinalRender | None) -> SectionReport:
        """Render section z through its placement into the volume and record it."""
        sol, lens = stitched.solution, stitched.lens_applied
        oy, ox = np.asarray(self.canvas.origin, float)
        if render is None:
            render_section(self.volume, z, tiles, sol.positions, p.transform.shifted(oy, ox), lens=lens,
                           device=self.device, linear=sol.linear)
        else:
            render(z, sol.positions, p.transform.shifted(oy, ox), lens, sol.linear)
        stored = self._save_transform(z, p.transform)
        if stored is not None and self.align:
            self.volume.save_tile_placement(z, sol.positions, sol.linear)
        self.volume.record(z, {
            **info, "status": p.status, "shift_px": list(p.shift), "alignment_confidence": p.confidence,
            "alignment_detail": None if not np.isfinite(p.detail) else p.detail,
            "max_residual_px": max_res, "flagged_seams": flagged, "message": p.message,
            "alignment_references": p.references,
            # A section that did not register is flagged for re-imaging while the tape is
            # still loaded: acquisition reads this flag (and the alarm) and acts on it.
            "needs_reimaging": p.status != "ok", "transform": p.transform.summary(), "transform_file": stored,
            "tile_positions_px": sol.positions.round(3).tolist(), "tile_status": sol.status,
            **({} if sol.linear is None else {"tile_linear": sol.linear.round(7).tolist()}),
            "lens": None if lens is None else {"k1": lens.k1, "k2": lens.k2},
            "window": self.volume.section_window(z),
        })
        if p.status == "ok" and (self._reference_z is None or z >= self._reference_z):
            self._reference_z = z
        elif z == self._reference_z:
            self._reference_lost(z)
        self._keep_montages(z, p)
        return SectionReport(z, p.status, max_res, flagged, p.shift, p.confidence, sol.status, p.message, p.repeats,
                             take=info.get("take"))

    def _solve_window(self, opens: list[_Open]) -> None:
        """Place the `opens` sections again, all together, from every pair they are in (the
        stack solve, as offline): pairs between two of them in their unaligned frames, pairs
        to written sections in the volume's frame with those held where they were written."""
        # A section that starts a chain (no pair below it) stays where the stage put it, as
        # without a window: the volume's frame is the stage's, not the window's mean.
        starts = {o.z for o in opens if not o.pairs}
        free = {o.z for o in opens} - starts
        matches: list[PairMatch] = []
        pinned: set[int] = set(starts)
        for o in opens:
            for r in o.pairs:
                if r.reference in free and r.frame == "unaligned":
                    assert r.match is not None
                    matches.append(r.match)
                    continue
                if r.reference not in o.fixed_matches:   # its placement is final: carried once
                    o.fixed_matches[r.reference] = self._in_volume(r)[1]
                matches.append(o.fixed_matches[r.reference])
                pinned.add(r.reference)
        if not matches:
            return
        initial = {k: np.eye(3) for k in pinned} | {o.z: o.forward for o in opens}
        sol = solve_stack(self.canvas.shape, sorted(free | pinned), matches, initial, self._solve_params,
                          fixed=sorted(pinned))
        for o in opens:
            if o.z in starts:
                continue
            t = sol.transforms[o.z]
            o.forward = sol.forward[o.z]
            o.placed = replace(o.placed, transform=t, shift=self._centre_shift(t))
            if o.z in self._transforms:
                self._transforms[o.z] = t

    @property
    def _solve_params(self) -> SolveParams:
        """The stack solve's settings, its field on the flow's grid."""
        return SolveParams(elastic=self.elastic, field_spacing=self.flow.stride * self.flow.scale)

    def _centre_shift(self, transform: SectionTransform) -> tuple[float, float]:
        """Where the canvas centre's content came from: for a pure translation this is the
        shift s with aligned(p) = moving(p + s)."""
        cy, cx = (np.array(self.canvas.shape, float) - 1) / 2
        sx, sy = transform.apply(np.array(cx), np.array(cy))
        return float(sy - cy), float(sx - cx)

    def missing_montages(self, z: int) -> list[int]:
        """The references section z will be aligned to whose montages are not kept (after a
        resume, or for a retake aligned to older sections): `restore_montage` them first,
        or z is aligned to their pixels in the volume, which places it slightly differently."""
        return [k for k in self._reference_zs(z) if k not in self.montages.current]

    def restore_montage(self, z: int, raw_tiles: Sequence[np.ndarray]) -> None:
        """Section z's unaligned montage again, from its tiles where its record says the
        stitching put them (the same pixels as when it was processed), with its placement."""
        record = self.volume.group.attrs["tapescope"].get("sections", {}).get(str(z), {})
        if record.get("status") != "ok" or "tile_positions_px" not in record:
            raise ValueError(f"section z={z} is not recorded as good with its tile positions: no montage to restore")
        exact = self.volume.load_tile_placement(z) if self.volume_root is not None else None
        if exact is not None:
            positions, linear = exact
        else:
            positions = np.asarray(record["tile_positions_px"], float)
            linear = np.asarray(record["tile_linear"], float) if "tile_linear" in record else None
        if len(positions) != len(raw_tiles):
            raise ValueError(f"section z={z}: {len(raw_tiles)} tiles, its record places {len(positions)}")
        lens = RadialDistortion(float(record["lens"]["k1"]), float(record["lens"]["k2"])) if record.get("lens") \
            else None
        placed = self.volume.load_transform(z)      # no montage kept without its placement
        tiles = [FlatFielded(t, self.gain, self.dark) for t in raw_tiles]
        check_scratch_space(self.canvas.shape, self.scratch, self.volume_root)
        name = render_montage(self.montages.folder, self.montages.new_name(z), self.canvas, tiles, positions,
                              lens=lens, linear=linear, device=self.device)
        self.montages.adopt(z, name)
        self._transforms[z] = placed

    def _keep_montages(self, z: int, placed: Placement) -> None:
        """Keep the montages (and transforms) of the sections coming sections will be aligned
        to, the `neighbours` highest good ones, and of the sections open in the window. A
        retake aligned to older ones reads them from the volume."""
        if placed.status == "ok":
            self._transforms[z] = placed.transform
        else:
            self.montages.drop(z)
        keep = set(sorted(self._good())[-self.neighbours:]) | set(self.open_sections)
        self.montages.keep(keep, max(z, self._reference_z if self._reference_z is not None else z))
        self._transforms = {k: t for k, t in self._transforms.items() if k in self.montages.current}

    def _transform_of(self, z: int) -> SectionTransform:
        """Section z's placement (volume pixel -> its unaligned montage's pixel)."""
        return self._transforms[z] if z in self._transforms else self.volume.load_transform(z)

    def _in_volume(self, r: ReferencePair, placed: SectionTransform | None = None,
                   ) -> tuple[SectionTransform, PairMatch]:
        """A registered pair's transform and matches in the volume's frame: a pair made
        against the reference's unaligned montage is carried through the reference's own
        placement (`placed`, default the one kept or stored)."""
        assert r.alignment is not None and r.match is not None
        if r.frame == "aligned":
            return r.alignment.transform, r.match
        placed = placed if placed is not None else self._transform_of(r.reference)
        px, py = placed.output_of(r.match.p[:, 0], r.match.p[:, 1])
        return (placed.then(r.alignment.transform, self.canvas.shape),
                PairMatch(r.match.fixed_z, r.match.moving_z, np.stack([px, py], 1), r.match.q, r.match.w))

    def _place(self, z: int, results: list[ReferencePair], opening: bool = False) -> Placement:
        """Where section z goes (`Placement`), from its alignment to each of its references
        (`results`: the nearest good section first, then good sections below it). A section
        that repeats the nearest is not placed. Each reference that registered adds its
        matches; with more than one, the section's transform is solved from all of them at
        once, the references held where they were written (`zsolve.solve_stack`), so one
        neighbour that differs more than usual does not decide it alone, and one that does
        not register leaves the others to place the section."""
        registered = [(r.reference, r.alignment, *self._in_volume(r)) for r in results if r.alignment is not None]
        refused = [(r.reference, r.confidence, r.why) for r in results if r.alignment is None]
        nearest = results[0].reference
        if not registered:
            _, conf, why = refused[0]
            below = "; ".join(f"z={r}: {w}" for r, _, w in refused[1:])
            return Placement("unaligned", conf, why + (f" (nor to the sections below: {below})" if below else ""))
        rz, a, transform, _ = registered[0]
        if rz == nearest and (why := repeat_reason(a.confidence, self._typical("alignment_confidence"), rz,
                                                   a.detail, self._typical("alignment_detail"))):
            return Placement("unaligned", a.confidence, why, detail=a.detail, repeats=rz)
        conf = a.confidence
        message = "" if rz == nearest else \
            "aligned to the sections below the previous one: " + "; ".join(f"z={r}: {w}" for r, _, w in refused)
        if len(registered) > 1 and not opening:     # a section opened in the window: the window's solve places it
            zs = [r[0] for r in registered] + [z]
            initial = {r[0]: np.eye(3) for r in registered}
            initial[z] = np.linalg.inv(transform.affine3)
            sol = solve_stack(self.canvas.shape, zs, [r[3] for r in registered], initial, self._solve_params,
                              fixed=[r[0] for r in registered])
            transform = sol.transforms[z]
        return Placement("ok", conf, message, transform, self._centre_shift(transform),
                         [r[0] for r in registered], a.detail)

    def _typical(self, key: str) -> float:
        """How well this run's good neighbours agree (the median of `key`, a section record's
        alignment_confidence or alignment_detail, over the sections aligned to a reference);
        1 while none has been, when a repeat cannot be told from a neighbour."""
        sections = self.volume.group.attrs["tapescope"].get("sections", {})
        seen = [v[key] for v in sections.values()
                if v.get("status") == "ok" and v.get("alignment_references") and v.get(key) is not None]
        attribute = {"alignment_confidence": "confidence", "alignment_detail": "detail"}[key]
        seen += [getattr(o.placed, attribute) for o in self._open if o.placed.references]
        seen = [v for v in seen if np.isfinite(v)]
        return float(np.median(seen)) if seen else 1.0

    def likely_references(self, z: int, before: Sequence[int]) -> list[int]:
        """The sections section z will be aligned to if the sections `before` it (processed
        first, in order) are good, as most are: its pairs to them can be aligned now, while
        those are still being processed, since pairs are made between unaligned montages.
        A retake is aligned as it comes."""
        if not self.align or (self._reference_z is not None and z <= self._reference_z):
            return []
        pending = set(before)
        good = set(self._good()) - pending
        return sorted((k for k in good | pending if k < z), reverse=True)[:self.neighbours]

    def _reference_zs(self, z: int) -> list[int]:
        """The sections section z is aligned to, nearest first: the reference (for a retake,
        a section re-imaged after later ones were processed, the good section below it,
        read back from the volume; a retake does not become the reference) and up to
        `neighbours` - 1 good sections below that; none without alignment or a chain."""
        if not self.align:
            return []
        retake = self._reference_z is not None and z <= self._reference_z
        head = self._good_below(z) if retake else self._reference_z
        if head is None:
            return []
        below = sorted(k for k in self._good() if k < head)[::-1][:max(self.neighbours - 1, 0)]
        return [head, *below]

    def _references(self, z: int) -> list[tuple[int, Montage | Plane]]:
        """Section z's references (`_reference_zs`), each as its unaligned montage where it
        is kept, else its pixels in the volume."""
        refs: list[tuple[int, Montage | Plane]] = []
        window = set(self.open_sections)
        for k in self._reference_zs(z):
            kept = self.montages.get(k)
            if k in window and kept is not None:       # open: not in the volume yet
                refs.append((k, kept))
                continue
            plane = self._read_reference(k)          # refuses a section that is not good
            refs.append((k, plane if kept is None else kept))
        return refs

    def prime_from_volume(self, z: int | None = None) -> int | None:
        """Take section z of the volume (default: the highest z recorded "ok") as the
        reference the next section is aligned to; returns that z, or None when the volume
        holds no good section (the next section then starts the chain, as on a fresh run).

        The reference is read back at level 0, the resolution `process` aligns at (the
        aligner makes its own low-resolution pass from it). Coverage is where the stored
        section is non-zero: the volume's fill value 0 marks where no tile landed.
        """
        self._restore_lens()
        if z is None:
            good = self._good_sections()
            if not good:
                log.info("no good section in the volume: the next section starts the alignment chain")
                self._reference_z = None
                return None
            z = max(good)
        self._read_reference(z)          # refuses a section that is not good
        self._reference_z = z
        log.info("alignment reference primed from z=%d of the volume", z)
        return z

    def _restore_lens(self) -> None:
        """The lens estimated before a resume, from the volume's records: the sections after
        it are stitched and rendered with it, as they would have been without the stop
        (estimating again from the next section would give a slightly different model)."""
        if self.lens is not None or self.lens_mode != "estimate":
            return
        sections = self.volume.group.attrs["tapescope"].get("sections", {})
        seen = sorted((int(k), v["lens"]) for k, v in sections.items() if v.get("lens"))
        if seen:
            self.lens = RadialDistortion(float(seen[0][1]["k1"]), float(seen[0][1]["k2"]))
            log.info("lens distortion of z=%d taken from the volume: k1 %.3g, k2 %.3g",
                     seen[0][0], self.lens.k1, self.lens.k2)

    def _good_sections(self) -> list[int]:
        """The sections recorded good in the volume."""
        sections = self.volume.group.attrs["tapescope"].get("sections", {})
        return [int(k) for k, v in sections.items() if v.get("status") == "ok"]

    def _good(self) -> list[int]:
        """The good sections: recorded so, or placed and open in the window."""
        return sorted({*self._good_sections(), *self.open_sections})

    def _good_below(self, z: int) -> int | None:
        """The highest good section below z (None: z starts a chain)."""
        below = [k for k in self._good() if k < z]
        return max(below) if below else None

    def _read_reference(self, z: int) -> Plane:
        """Section z at level 0, the resolution `process` aligns at, read from the volume as
        the aligner asks for it."""
        self.volume.check_z(z)
        status = self.volume.group.attrs["tapescope"].get("sections", {}).get(str(z), {}).get("status")
        if status != "ok":
            raise ValueError(f"section z={z} is {status or 'not written'} in the volume: not a reference to align to")
        return Plane(self.volume.levels[0], z)

    def _save_transform(self, z: int, transform: SectionTransform) -> str | None:
        try:
            return str(self.volume.save_transform(z, transform))
        except (ValueError, OSError) as exc:   # a volume not on a local disk: the summary stays
            log.warning("transform of z=%d not stored beside the volume: %s", z, exc)
            return None

    def record_missing(self, z: int, info: dict, reason: str) -> None:
        """A section that could not be processed keeps its z, recorded as missing; a retake
        that failed before it wrote a pixel leaves the good section there as it was (an
        earlier take still open in the window is written first)."""
        if z in self.open_sections:
            self.flush()
            self._rendering = None       # the take that failed wrote nothing
        previous = self.volume.group.attrs["tapescope"].get("sections", {}).get(str(z), {})
        if previous.get("status") == "ok" and self._rendering != z:
            log.warning("retake of z=%d failed before rendering (%s): the earlier good take stays", z, reason)
            return
        self.volume.record(z, {**info, "status": "failed", "message": reason})
        if z == self._reference_z:
            self._reference_lost(z)

    def _reference_lost(self, z: int) -> None:
        """The reference section was overwritten by a take that is not good (a retake of it
        failed): the reference is the last good section left in the volume, not those pixels."""
        log.warning("reference z=%d was overwritten by a take that is not good; re-primed from the volume", z)
        self.prime_from_volume()
