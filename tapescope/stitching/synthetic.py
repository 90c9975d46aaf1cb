"""Synthetic tile sets with known truth: what the stitching tests and benchmarks measure against.

A montage is cut from one section of the synthetic specimen (tapescope/specimen.py, the
simulator's too; not yet the neurites, docs/simulator.md says why) at true positions that
differ from the nominal (stage) ones by a random stage error, then passed through a camera
model: lens distortion, vignetting and dust (gain), shot noise at a given dose, read noise and
a dark offset. Blank tiles see bare resin: the specimen under
them is replaced by a uniform field, as over a torn corner or a hole in the section.
`texture="fluorescence"` images stained nuclei instead (`nuclei_field`): bright, sparse,
smooth blobs on a dark background, the other texture a stitcher meets (light microscopy
of the same sections, ashlar's home ground).

Tiles are resampled with a cubic spline at exact sub-pixel coordinates: OpenCV's warps
quantise the fractional position to 1/32 px and linear interpolation has a phase error that
depends on the fraction, either of which would put a bias of a few hundredths of a pixel
into the very truth that registration is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.ndimage import map_coordinates, spline_filter

from tapescope.specimen import Specimen, SpecimenParams

from .lens import RadialDistortion, camera_points

RESIN = 0.97   # transmission of bare resin (as the simulator's world uses)


@dataclass(frozen=True)
class SyntheticParams:
    tile: int = 1024                   # square tiles, px
    rows: int = 4
    cols: int = 4
    overlap: float = 0.09              # nominal fraction of the tile shared with a neighbour
    stage_error_px: float = 10.0       # RMS length of the stage's position error
    dose: float = 200.0                # electrons per pixel at full transmission
    counts_per_electron: float = 4.0
    dark: float = 100.0
    read_noise: float = 6.0
    vignetting: float = 0.25           # relative fall-off at the sensor corner
    dust: int = 3                      # dark blots on the scintillator
    blank: tuple[tuple[int, int], ...] = ()   # (row, col) of tiles over bare resin
    # The section's edge inside the montage: bare resin within this many tiles of the montage's
    # border (0.3: the outer tiles see a third of their field off the section), the edge wavy.
    resin_border: float = 0.0
    distortion: RadialDistortion = field(default_factory=RadialDistortion)
    # Each tile's own turn and scale, as a camera array's: each entry of A - I (below) drawn
    # with this RMS (0.004: 4 mrad, 0.4 %, 2 px at the edge of a 1024 px tile).
    camera_linear: float = 0.0
    seed: int = 1
    texture: str = "em"                # "em": the neuropil specimen; "fluorescence": `nuclei_field`
    # A stack of sections: give every set of the stack the same `sections` and `room_px` (the
    # specimen is drawn from them) and each its own `section` and `shift_px` (|shift| <= room).
    sections: int = 1                  # sections the specimen holds
    section: int = 0                   # which one this set images (consecutive ones differ as real ones do)
    room_px: int = 0                   # specimen beyond the montage on each side, for the shift
    shift_px: tuple[float, float] = (0.0, 0.0)   # where the section lies on the tape: its tiles see it moved


@dataclass
class TileSet:
    params: SyntheticParams
    tiles: list[np.ndarray]            # uint16 camera frames
    grid: list[tuple[int, int]]
    stage_px: np.ndarray               # (n, 2) nominal top-left (y, x), px
    truth_px: np.ndarray               # (n, 2) true top-left (y, x), px
    gain: np.ndarray                   # the camera's true gain field, mean 1
    blank: np.ndarray                  # (n,) bool
    truth_linear: np.ndarray | None = None   # (n, 2, 2) each tile's A (camera_linear), or None

    def seam_error(self, positions: np.ndarray, linear: np.ndarray | None = None, samples: int = 9,
                   lens: RadialDistortion | None = None) -> np.ndarray:
        """Per pair of grid neighbours, the RMS over points of their true overlap of how far
        apart the two tiles put the same specimen point (px): what a seam shows, free of the
        montage's own translation, turn and scale, which nothing in the tiles fixes. `lens`:
        the model the positions were solved with (none: tiles taken as undistorted)."""
        n, t = len(self.grid), self.params.tile
        true_lin = self.truth_linear if self.truth_linear is not None else np.tile(np.eye(2), (n, 1, 1))
        lin = np.tile(np.eye(2), (n, 1, 1)) if linear is None else np.asarray(linear, float)
        pos = np.asarray(positions, float)
        shape = (t, t)
        true_lens, fit_lens = self.params.distortion, lens or RadialDistortion()
        where = {rc: k for k, rc in enumerate(self.grid)}
        grid = np.stack(np.meshgrid(np.linspace(0, t - 1, samples), np.linspace(0, t - 1, samples),
                                    indexing="ij"), -1).reshape(-1, 2)
        out = []
        for (r, c), a in where.items():
            for nb in ((r, c + 1), (r + 1, c)):
                b = where.get(nb)
                if b is None:
                    continue
                # Points of tile a, where tile b sees them too (the truth's inverse).
                world = self.truth_px[a] + (grid + true_lens.at(grid, shape)) @ true_lin[a].T
                qb = camera_points(true_lens, (world - self.truth_px[b]) @ np.linalg.inv(true_lin[b]).T, shape)
                inside = ((qb >= 0) & (qb <= t - 1)).all(1)
                if not inside.any():
                    continue
                qa, qb = grid[inside], qb[inside]
                gap = (pos[a] + (qa + fit_lens.at(qa, shape)) @ lin[a].T) - (pos[b] + (qb + fit_lens.at(qb, shape))
                                                                              @ lin[b].T)
                out.append(float(np.sqrt((gap**2).sum(1).mean())))
        return np.array(out)

    def error(self, positions: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
        """Position error (n, 2) after removing the free translation of the montage, which
        is measured over the tiles in `among` (bool mask; default all): leave out tiles
        placed by the stage, whose own error would otherwise shift every other tile's."""
        p = np.asarray(positions, float)
        m = np.ones(len(p), bool) if among is None else np.asarray(among, bool)
        return (p - p[m].mean(0)) - (self.truth_px - self.truth_px[m].mean(0))


def camera_gain(shape: tuple[int, int], vignetting: float, dust: int, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    gain = 1.0 - vignetting * r2 / 2
    for _ in range(dust):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(4, 12) * h / 512
        gain *= 1 - 0.15 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return (gain / gain.mean()).astype(np.float32)


NUCLEUS_PX = (5.0, 11.0)   # semi-axes of a nucleus: DAPI at ~0.65 um/px
NUCLEI_COVER = 0.45        # fraction of the field under a nucleus, before overlaps
BACKGROUND = 0.04          # autofluorescence, relative to the brightest nucleus


def nuclei_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Stained nuclei as a widefield fluorescence camera sees them (0..1): ellipses of
    random size, brightness and orientation with a chromatin speckle, blurred by the
    optics, on a dim background. Unlike EM, most of the signal is low-frequency and
    the background between nuclei carries almost no structure."""
    h, w = shape
    lo, hi = NUCLEUS_PX
    n = max(1, int(NUCLEI_COVER * h * w / (np.pi * ((lo + hi) / 2) ** 2)))
    img = np.zeros((h, w), np.float32)
    for _ in range(n):
        centre = (int(rng.uniform(0, w) * 16), int(rng.uniform(0, h) * 16))     # 4 fractional bits
        axes = (int(rng.uniform(lo, hi) * 16), int(rng.uniform(lo, hi) * 16))
        layer = np.zeros_like(img)
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA, shift=4)
        np.maximum(img, layer * float(rng.uniform(0.3, 1.0)), out=img)
    speckle = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2)
    img *= 1 + 0.6 * speckle / max(float(speckle.std()), 1e-6)
    img = cv2.GaussianBlur(np.clip(img, 0, None), (0, 0), 1.3)      # the objective's blur
    return np.clip(BACKGROUND + img, 0, 1)


def make_tileset(p: SyntheticParams) -> TileSet:
    rng = np.random.default_rng(p.seed)
    step = round(p.tile * (1 - p.overlap))
    if not 0 <= p.section < p.sections or np.abs(p.shift_px).max() > p.room_px:
        raise ValueError(f"section {p.section} of {p.sections}, shift {p.shift_px} within room {p.room_px} px")
    margin = int(4 * p.stage_error_px) + 16 + p.room_px
    h = (p.rows - 1) * step + p.tile + 2 * margin
    w = (p.cols - 1) * step + p.tile + 2 * margin
    if p.texture == "em":
        spec = Specimen(SpecimenParams(height_px=h, width_px=w, n_sections=p.sections, seed=p.seed))
        image = spec.section(p.section).astype(np.float64)
    elif p.texture == "fluorescence":
        image = nuclei_field((h, w), np.random.default_rng(p.seed + 2)).astype(np.float64)
    else:
        raise ValueError(f"texture must be 'em' or 'fluorescence', not {p.texture!r}")
    grid = [(r, c) for r in range(p.rows) for c in range(p.cols)]
    stage = np.array([[margin + r * step, margin + c * step] for r, c in grid], float)
    truth = stage + rng.normal(0, p.stage_error_px / np.sqrt(2), stage.shape) + np.asarray(p.shift_px, float)
    blank = np.array([rc in set(p.blank) for rc in grid])
    bare = RESIN if p.texture == "em" else BACKGROUND      # what is there where the specimen is not
    for k in np.flatnonzero(blank):
        y, x = np.floor(truth[k]).astype(int)
        image[y:y + p.tile + 1, x:x + p.tile + 1] = bare
    if p.resin_border > 0:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        wave = 0.15 * p.tile * np.sin(2 * np.pi * (yy + xx) / (3.1 * p.tile) + p.seed)
        inset = margin + p.resin_border * p.tile + wave
        off = (yy < inset) | (yy > h - inset) | (xx < inset) | (xx > w - inset)
        image[off] = bare
    coeffs = spline_filter(image, order=3)
    gain = camera_gain((p.tile, p.tile), p.vignetting, p.dust, rng)
    dy, dx = p.distortion.displacement((p.tile, p.tile))
    yy, xx = np.mgrid[0:p.tile, 0:p.tile].astype(np.float64)
    tiles = []
    noise = np.random.default_rng(p.seed + 1)
    linear = None
    if p.camera_linear > 0:
        linear = np.eye(2)[None] + np.random.default_rng(p.seed + 3).normal(0, p.camera_linear, (len(grid), 2, 2))
    for k in range(len(grid)):
        ty, tx = truth[k]
        # Pixel (u, v) of the camera sees the specimen at the tile's origin + A (u, v) + lens
        # displacement: a barrel lens pulls the corners' view inward.
        u, v = yy + dy, xx + dx
        if linear is not None:
            u, v = linear[k, 0, 0] * u + linear[k, 0, 1] * v, linear[k, 1, 0] * u + linear[k, 1, 1] * v
        coords = np.stack([ty + u, tx + v])
        t = map_coordinates(coeffs, coords, order=3, prefilter=False, mode="nearest")
        electrons = np.clip(p.dose * t * gain, 0, None)
        counts = noise.poisson(electrons).astype(np.float32) * p.counts_per_electron
        counts += p.dark + noise.normal(0, p.read_noise, counts.shape)
        tiles.append(np.clip(np.rint(counts), 0, 65535).astype(np.uint16))
    return TileSet(p, tiles, grid, stage, truth, gain, blank, linear)
