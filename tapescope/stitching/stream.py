"""Streaming registration: a pair is registered as soon as both of its tiles exist.

    stitcher = StreamingStitcher(gain=gain, dark=dark, strip_px=200)
    for tile in acquisition:                       # any order
        stitcher.add((row, col), frame, (y_px, x_px))   # registers with neighbours present
    result = stitcher.finish()                     # the global solve, at the section's end

Only the four edge strips of each tile are kept (and flat-fielded), `strip_px` wide,
which must cover the nominal overlap plus the stage error; without `strip_px` whole
tiles are kept. Memory is then 4 * strip_px * side per tile instead of side^2, and the
flat-field division touches only the pixels registration reads.
Neighbours are the tiles one grid step right/left/down/up; the pair is always ordered
(left, right) or (top, bottom), as `neighbour_pairs` orders it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .affine import PATCH_PX, AffineFit, measure_warped, relative_affine, solve_affine
from .backend import CPU, Backend
from .flatfield import apply_flatfield
from .lens import LensFit, PatchOffset, RadialDistortion, fit_lens, measure_patches, pair_correction
from .register import MIN_OVERLAP_PX, refine_at, register_pair
from .solve import MIN_CONFIDENCE, Pair, Solution, solve_positions

Key = tuple[int, int]
LENS_PROBE_TILES = 4     # side of the block of tiles first asked whether the overlaps show a lens
SECOND_LOOK_PX = 0.5     # a pair registered again must land this close to where its neighbours put it


@dataclass
class _Stored:
    index: int
    position: np.ndarray                      # nominal top-left (y, x), px
    strips: dict[str, np.ndarray] = field(default_factory=dict)   # "top" | "bottom" | "left" | "right" | "all"


@dataclass
class StitchResult:
    solution: Solution
    pairs: list[Pair]                  # as measured (before any lens correction)
    lens: LensFit | None = None        # the lens model estimated from this montage, if asked
    lens_applied: RadialDistortion | None = None   # the model the solve corrected for
    affine: AffineFit | None = None    # with an affine per tile: the fit (solution.linear holds the tiles')


class StreamingStitcher:
    def __init__(
        self, *, gain: np.ndarray | None = None, dark: float | np.ndarray = 0.0,
        strip_px: int | None = None, backend: Backend = CPU, workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.gain = gain
        self.dark = dark
        self.strip_px = strip_px
        self.backend = backend
        self.shape: tuple[int, int] | None = None
        self._tiles: dict[Key, _Stored] = {}
        self.keys: list[Key] = []
        self.pairs: list[Pair] = []
        self.pixels = 0          # raw pixels received (for rates)
        # workers > 1: pairs are registered on a thread pool (FFTs, OpenCV filters and NumPy
        # reductions release the GIL), add() returns at once and finish() collects them.
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="stitch") if workers > 1 else None
        self._pending: list[Future[Pair | None]] = []

    def add(self, key: Key, tile: np.ndarray, nominal_yx: tuple[float, float] | np.ndarray) -> list[Pair]:
        """Take one tile; register it with every neighbour already here. Returns the new pairs
        (with workers > 1: none; they are registered in the background and finish() has them)."""
        if key in self._tiles:
            raise ValueError(f"tile {key} was added twice")
        if tile.ndim != 2:
            raise ValueError(f"tile {key} must be 2-D, got shape {tile.shape}")
        if self.shape is None:
            self.shape = tile.shape
            if self.strip_px is not None and not 8 <= self.strip_px <= min(tile.shape):
                raise ValueError(f"strip_px {self.strip_px} must be between 8 and the tile side {min(tile.shape)}")
        elif tile.shape != self.shape:
            raise ValueError(f"tile {key} has shape {tile.shape}, the others {self.shape}")
        stored = _Stored(len(self.keys), np.asarray(nominal_yx, float).reshape(2), self._cut(tile))
        self._tiles[key] = stored
        self.keys.append(key)
        self.pixels += tile.size
        r, c = key
        new = []
        for other, before in (((r, c - 1), True), ((r - 1, c), True), ((r, c + 1), False), ((r + 1, c), False)):
            if other in self._tiles:
                first, second = (self._tiles[other], stored) if before else (stored, self._tiles[other])
                if self._pool is not None:
                    self._pending.append(self._pool.submit(self._register, first, second, other[0] == r))
                    continue
                pair = self._register(first, second, horizontal=other[0] == r)
                if pair is not None:
                    self.pairs.append(pair)
                    new.append(pair)
        return new

    def wait(self) -> None:
        """Collect every background registration (in the order they were asked for)."""
        pending, self._pending = self._pending, []
        for future in pending:
            pair = future.result()
            if pair is not None:
                self.pairs.append(pair)

    def close(self) -> None:
        """Finish background work and stop the pool (finish() does this too)."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def finish(self, lens: str | RadialDistortion = "none", tile_model: str = "translation") -> StitchResult:
        """The global solve over every pair registered so far.

        lens: "none"; a known RadialDistortion (one per camera, e.g. from an earlier
        montage) whose effect on each pair's offset is subtracted before the solve; or
        "estimate": fit k1 to patch offsets along every confident overlap (lens.py) and
        apply it if it explains the patch residuals (LensFit.accepted).

        tile_model: "translation" (one camera: tiles differ by where the stage put them) or
        "affine" (each tile its own turn and scale too: a camera array; affine.py), solved
        from patches in a grid over every confident overlap.
        """
        if not isinstance(lens, RadialDistortion) and lens not in ("none", "estimate"):
            raise ValueError(f"lens must be 'none', 'estimate' or a RadialDistortion, not {lens!r}")
        if tile_model not in ("translation", "affine"):
            raise ValueError(f"tile_model must be 'translation' or 'affine', not {tile_model!r}")
        try:
            result = self._finish(lens)
            if tile_model == "affine" and self.shape is not None:
                stage = self._stage()
                grid = self.patch_offsets(size=PATCH_PX)
                solution, fit = solve_affine(stage, self.pairs, grid, self.shape, result.lens_applied)
                # Measured again with both crops resampled onto each other through the first
                # fit: what is left within a patch is then a shift, which least squares
                # measures without bias.
                again = self.patch_offsets(size=PATCH_PX, through=fit, lens=result.lens_applied)
                # A strip too narrow to resample (the spline needs 2 px at each edge) keeps
                # its first look.
                seen = {(p.i, p.j) for p in again}
                grid = again + [p for p in grid if (p.i, p.j) not in seen]
                solution, fit = solve_affine(stage, self.pairs, grid, self.shape, result.lens_applied)
                result = replace(result, solution=solution, affine=fit)
            return result
        finally:
            self.close()

    def _finish(self, lens: str | RadialDistortion) -> StitchResult:
        self.wait()
        stage = self._stage()
        if lens == "none" or self.shape is None:
            solution, measured = self._second_look(stage, self.pairs, solve_positions(stage, self.pairs), None)
            return StitchResult(solution, measured)
        fit = None
        model = lens if isinstance(lens, RadialDistortion) else None
        patches: list[PatchOffset] = []
        if lens == "estimate":
            # Whether the overlaps show a lens is asked of a block of tiles first (one
            # parameter does not need a thousand patches: 3 x 3 tiles estimate it within
            # 2-4 %); only a lens found there is worth measuring every overlap for.
            probe = self._central_pairs(LENS_PROBE_TILES)
            patches = self.patch_offsets(probe)
            fit = fit_lens(patches, stage, self.shape)
            # The rest of the overlaps too where the probe found a lens (to fit it on all of
            # them and correct every pair) or had too few patches (blank resin, a hole).
            if (fit is None or fit.accepted) and len(probe) < len(self.pairs):
                patches += self.patch_offsets([p for p in self.pairs if p not in probe])
                fit = fit_lens(patches, stage, self.shape)
            model = fit.model if fit is not None and fit.accepted else None
        pairs = self.pairs
        if model is not None and not model.is_identity:
            patches = patches or self.patch_offsets()
            pairs = corrected_pairs(self.pairs, patches, model, self.shape)
        else:
            model = None
        solution, measured = self._second_look(stage, pairs, solve_positions(stage, pairs), model)
        return StitchResult(solution, measured, fit, model)

    def _stage(self) -> np.ndarray:
        """(n, 2) the tiles' nominal positions, in the order they were added."""
        return np.array([self._tiles[k].position for k in self.keys]).reshape(-1, 2)

    def _second_look(self, stage: np.ndarray, pairs: list[Pair], solution: Solution,
                     model: RadialDistortion | None) -> tuple[Solution, list[Pair]]:
        """Pairs left out (an outlier, or no convergence) between two tiles that other pairs
        placed, registered again from where those put them: on a strip of a few pixels the
        search across can keep a wrong cut that agrees well (a membrane running across
        looks alike a few pixels over), or one the refinement cannot walk back from; the
        neighbours' offset is within a pixel. Taken where it converges within
        SECOND_LOOK_PX of that, and the montage solved again. `pairs` are what the solve
        took (the lens taken out where `model`); returns the solution and the pairs as
        measured (`StitchResult.pairs`), those registered again among them."""
        measured = list(self.pairs)
        if self.shape is None:
            return solution, measured
        by_index = {st.index: st for st in self._tiles.values()}
        again = list(pairs)
        for k, (p, why) in enumerate(zip(pairs, solution.pair_reason, strict=True)):
            if not why.startswith(("outlier", "no convergence")) or "stage" in (solution.status[p.i],
                                                                                  solution.status[p.j]):
                continue
            predicted = solution.positions[p.j] - solution.positions[p.i]
            if model is not None:            # the tiles' raw offset: the lens put back
                predicted = predicted + pair_correction(model, self.shape, predicted)
            a, b = by_index[p.i], by_index[p.j]
            sa, sb, origin = self._strips(a, b, self.keys[p.i][0] == self.keys[p.j][0])
            local = predicted - origin
            got = refine_at(sa, sb, (float(local[0]), float(local[1])), backend=self.backend)
            if got is None or np.hypot(got.dy - local[0], got.dx - local[1]) > SECOND_LOOK_PX:
                continue
            raw = np.array([got.dy, got.dx]) + origin
            d = raw - pair_correction(model, self.shape, raw) if model is not None else raw
            note = f"registered again from where its neighbours put it ({why.split(':')[0]} at first)"
            again[k] = Pair(p.i, p.j, float(d[0]), float(d[1]), got.confidence, information=got.information,
                            note=note)
            measured[k] = replace(again[k], dy=float(raw[0]), dx=float(raw[1]))
        if again == pairs:
            return solution, measured
        return solve_positions(stage, again), measured

    def _central_pairs(self, side: int) -> list[Pair]:
        """The pairs among the side x side tiles around the middle of the grid."""
        rows = sorted({k[0] for k in self.keys})
        cols = sorted({k[1] for k in self.keys})

        def block(values: list[int]) -> set[int]:
            first = max(0, (len(values) - side) // 2)
            return set(values[first:first + side])

        in_rows, in_cols = block(rows), block(cols)
        inside = {self._tiles[k].index for k in self.keys if k[0] in in_rows and k[1] in in_cols}
        return [p for p in self.pairs if p.i in inside and p.j in inside]

    def patch_offsets(self, pairs: list[Pair] | None = None, size: int | None = None,
                      through: AffineFit | None = None, lens: RadialDistortion | None = None) -> list[PatchOffset]:
        """Offsets of patches along every confident overlap (of `pairs`, default all), for the
        lens fit; with `size`, in a grid of patches of about that side (`measure_patches`);
        with `through` too, each pair's crops resampled onto each other through that fit
        first (`affine.measure_warped`; `lens`: the model the fit took out)."""
        by_index = {st.index: st for st in self._tiles.values()}

        def measure(p: Pair) -> list[PatchOffset]:
            a, b = by_index[p.i], by_index[p.j]
            horizontal = self.keys[p.i][0] == self.keys[p.j][0]
            sa, sb, origin = self._strips(a, b, horizontal)
            if through is not None:
                relative = relative_affine(through.positions, through.linear, p.i, p.j)
                return measure_warped(sa, sb, p.i, p.j, origin, np.zeros(2), relative, size or PATCH_PX,
                                      self.backend, lens, self.shape)
            local = (p.dy - origin[0], p.dx - origin[1])
            return measure_patches(sa, sb, p.i, p.j, local, origin, np.zeros(2), backend=self.backend, size=size)

        confident = [p for p in (self.pairs if pairs is None else pairs) if p.confidence >= MIN_CONFIDENCE]
        # On the registration threads where there are some (each pair's patches are its own).
        per_pair = self._pool.map(measure, confident) if self._pool is not None else map(measure, confident)
        return [patch for patches in per_pair for patch in patches]

    # -- internals ---------------------------------------------------------------------
    def _cut(self, tile: np.ndarray) -> dict[str, np.ndarray]:
        s = self.strip_px
        views = {"all": (slice(None), slice(None))} if s is None else {
            "top": (slice(0, s), slice(None)), "bottom": (slice(-s, None), slice(None)),
            "left": (slice(None), slice(0, s)), "right": (slice(None), slice(-s, None)),
        }
        out = {}
        for name, sl in views.items():
            gain = None if self.gain is None else self.gain[sl]
            dark = self.dark[sl] if isinstance(self.dark, np.ndarray) and self.dark.ndim == 2 else self.dark
            out[name] = apply_flatfield(tile[sl], gain, dark)
        return out

    def _strips(self, a: _Stored, b: _Stored, horizontal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The crops of a and b that hold their overlap, and where a's crop starts in a."""
        if self.strip_px is None:
            return a.strips["all"], b.strips["all"], np.zeros(2)
        if horizontal:
            return a.strips["right"], b.strips["left"], np.array([0.0, self.shape[1] - self.strip_px])
        return a.strips["bottom"], b.strips["top"], np.array([self.shape[0] - self.strip_px, 0.0])

    def _register(self, a: _Stored, b: _Stored, horizontal: bool) -> Pair | None:
        sa, sb, origin = self._strips(a, b, horizontal)
        local = b.position - a.position - origin
        shift = register_pair(sa, sb, (float(local[0]), float(local[1])), backend=self.backend)
        if shift is None:
            d = b.position - a.position
            return Pair(a.index, b.index, float(d[0]), float(d[1]), 0.0,
                        f"no overlap: the tiles do not overlap ({MIN_OVERLAP_PX} px at least) at their stage positions")
        return Pair(a.index, b.index, shift.dy + origin[0], shift.dx + origin[1], shift.confidence, shift.refused,
                    shift.information, shift.note)


def corrected_pairs(pairs: list[Pair], patches: list[PatchOffset], model: RadialDistortion,
                    shape: tuple[int, int]) -> list[Pair]:
    """Pair offsets with the lens taken out: the mean over the pair's patches of
    m - (D(qb) - D(qb + m)), each patch corrected where it was measured (a whole-overlap
    offset averages a distortion that varies along the seam with weights nobody knows)."""
    by_pair: dict[tuple[int, int], list[np.ndarray]] = {}
    for p in patches:
        c = model.at(p.qb, shape) - model.at(p.qb + p.m, shape)
        by_pair.setdefault((p.i, p.j), []).append(p.m - c)
    out = []
    for p in pairs:
        est = by_pair.get((p.i, p.j))
        if est:
            d = np.mean(est, axis=0)
        else:
            d = np.array([p.dy, p.dx]) - pair_correction(model, shape, np.array([p.dy, p.dx]))
        out.append(replace(p, dy=float(d[0]), dx=float(d[1])))
    return out
