"""Section-to-section alignment.

`align_translation`: translation only, coarse at low resolution then refined.
`align_section`: rigid then affine at low resolution (robust to rotations of several
degrees), then elastic (sub-pixel patch flow relaxed on a spring mesh). See
docs/alignment.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft

from tapescope.montage.array_backend import array_module
from tapescope.montage.render import render_block
from tapescope.montage.transform import SectionTransform
from tapescope.montage.warp import warp_for
from tapescope.stitching.register import ncc, phase_correlate

from .flow import clean_flow, flow_rows, relax_mesh

COARSE_FACTOR = 4


@dataclass(frozen=True)
class SectionShift:
    dy: float          # where `moving` content sits relative to `fixed`, pixels
    dx: float
    confidence: float  # NCC of the (coarse) overlap after alignment


def _shifted_common(fixed: np.ndarray, moving: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = fixed.shape
    y0, y1 = max(0, -dy), min(h, h - dy)
    x0, x1 = max(0, -dx), min(w, w - dx)
    return fixed[y0:y1, x0:x1], moving[y0 + dy:y1 + dy, x0 + dx:x1 + dx]


def _fill_invalid(img: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    img = img.astype(np.float32)
    if valid is None:
        return img
    return np.where(valid, img, img[valid].mean() if valid.any() else 0).astype(np.float32)


def align_translation(
    fixed: np.ndarray, moving: np.ndarray,
    fixed_valid: np.ndarray | None = None, moving_valid: np.ndarray | None = None,
) -> SectionShift:
    """Shift s with moving(p + s) ~= fixed(p), for equal-shaped images.

    Pixels outside each image's own valid mask (no tile landed) are filled with that
    image's mean. Each image keeps its own mask on purpose: one shared mask would put
    the same sharp border into both images, and borders correlate at zero shift.
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"shapes differ: {fixed.shape} vs {moving.shape}")
    f = _fill_invalid(fixed, fixed_valid)
    m = _fill_invalid(moving, moving_valid)
    k = COARSE_FACTOR
    small = (f.shape[1] // k, f.shape[0] // k)
    fs = cv2.resize(f, small, interpolation=cv2.INTER_AREA)
    ms = cv2.resize(m, small, interpolation=cv2.INTER_AREA)
    # phase_correlate(a, b) gives s with b(p) = a(p + s); we want moving(p + s) = fixed(p).
    cy, cx, _ = phase_correlate(ms, fs, upsample=1)
    iy, ix = round(cy * k), round(cx * k)
    # Refine at full resolution on the common area of the coarse estimate.
    a, b = _shifted_common(f, m, iy, ix)
    ry, rx, _ = phase_correlate(b, a, max_shift=2 * k)
    dy, dx = iy + ry, ix + rx
    # Confidence on the coarse images: shot noise is averaged away there, so the NCC
    # measures agreement of structure, not the dose.
    # Only pixels that both images really imaged count (the fill would dilute the NCC).
    cy, cx = round(dy / k), round(dx / k)
    a2, b2 = _shifted_common(fs, ms, cy, cx)
    both = np.ones(a2.shape, bool)
    for valid, own in ((fixed_valid, True), (moving_valid, False)):
        if valid is not None:
            vs = cv2.resize(valid.astype(np.float32), small, interpolation=cv2.INTER_AREA) > 0.99
            va, vb = _shifted_common(vs, vs, cy, cx)
            both &= va if own else vb
    conf = ncc(a2[both], b2[both]) if both.sum() > 16 else 0.0
    return SectionShift(dy, dx, conf)


# -- rigid, affine and elastic alignment ---------------------------------------------------

COARSE_TARGET_PX = 512        # coarse stage works on images about this size
ROTATION_STEP_DEG = 1.0
AFFINE_MIN_GAIN = 0.02      # NCC an affine must add over rigid to be kept
# ...and it must be one neighbouring sections can have: their cutting compression differs by a
# few %, so an affine that stretches or shears more than this fitted noise (seen on 470 px live
# montages: 8-18 % scale and 0.16 shear, compounding along the chain); rigid is kept instead.
AFFINE_MAX_STRAIN = 0.05
STRIP_ROWS = 4096           # rows read at a time by the low-resolution pass


@dataclass
class SectionAlignment:
    transform: SectionTransform   # output (fixed frame) pixel -> moving pixel
    confidence: float             # NCC of the coarse overlap after alignment
    rotation_deg: float
    flow_nodes: int               # patch vectors kept after cleaning
    flow_rms_px: float            # scatter of the kept vectors about the relaxed mesh
    overlap: float                # fraction of the fixed image's valid area that overlaps
    chance: float = 0.0           # confidence the same search reaches on a pair known to be wrong
    flow_weight: np.ndarray | None = None   # (gh, gw) the last pass's node weights (0: not kept)
    stride: int = 32                        # of the flow grid
    shape: tuple[int, int] = (0, 0)         # (h, w) of the images aligned
    detail: float = float("nan")            # fine-detail NCC after alignment (detail_agreement)


# A pair registers only when it agrees CHANCE_FACTOR times better than chance: the higher of
# what the same search finds on the moving section mirrored (`_coarse_affine(..., chance=True)`)
# and CHANCE_SIGMAS standard deviations of the NCC of unrelated images with the pair's texture
# (`null_sigma`). One mirrored search is one draw from a wide distribution where the content is
# coarse (on the simulator's neurites at 320-384 px it drew -0.09 to 0.22, below zero for a
# third of the pairs, where wrong tissue reached 0.22); the sigma says how wide it is. In sigma
# units the mirrored search reaches 1.3-5.3 on real ssTEM and the simulator alike; real
# neighbours score 7.6-31, wrong tissue at most 5.3 on the simulator and 3.8-5.7 on real stacks
# (sections 400-500 nm apart; FIB-SEM slices 1.3 um apart, whose columns run along z), where the
# absolute floor refuses it (docs/alignment.md). Where chance is high (a small montage, chance
# 0.3-0.4 on 2x2 tiles) the factor is not asked for (CHANCE_MAX), only that the pair agrees
# better than chance.
CHANCE_FACTOR = 1.25
# ECC converges on a real pair in about ten iterations; on the mirrored section it has
# nothing to converge to and may run all 200 (~10 ms each at 512 px: 0.5 s of a pair's 0.8 s
# coarse stage where it does). Stopped at 20, the chance moved by at most 0.015 NCC on 76
# real pairs (FIB-SEM, VNC, Cardona; neighbours to 600 nm apart), mostly set by 3 null
# sigmas anyway, and no pair's verdict changed (docs/alignment.md).
ECC_ITERATIONS = 200
CHANCE_ECC_ITERATIONS = 20
CHANCE_MAX = 0.25
CHANCE_SIGMAS = 3.0
# Below the absolute floor a pair still registers when it stands far clear of chance: real
# serial sections under a few px of distortion agree at a coarse NCC of only 0.13-0.19 two or
# three sections apart, and even some neighbours do (Cardona 2010: 0.16), yet 2.4-4.8x above
# chance (neighbours at least 2.5x); wrong tissue reaches at most 1.9x (FIB-SEM slices 1.3 um
# apart; 1.6x ssTEM 400-500 nm apart, 1.3x the simulator's other specimens) (docs/alignment.md).
CLEAR_FACTOR = 2.25
CLEAR_FLOOR = 0.12


# The same section imaged twice agrees far better than neighbours do: its NCC leaves less than
# REPEAT_GAP of what the stack's own neighbours leave unexplained (1 - their typical NCC), and
# is at least REPEAT_FLOOR. Real neighbours: 0.2-0.4, a repeat 0.9+; a stack whose neighbours
# all agree at 0.9 (one image under different warps) has no outlier to flag.
REPEAT_FLOOR = 0.6
REPEAT_GAP = 0.25
# The coarse NCC sees the section's shape as much as its content, and two takes of one section
# differ in where the tissue lies in the aperture: a repeat reached only 0.75-0.78 on the
# simulator beside neighbours at 0.3-0.5. The finest detail (membranes, vesicles: a band of
# 0.7-2 px) tells them apart: neighbours 40-50 nm apart share almost none of it (real ssTEM
# 0.01-0.07, simulator 0.08-0.17), a repeat most of it (simulator 0.86). This test applies
# where the stack's own neighbours share little detail (typical <= REPEAT_DETAIL_TYPICAL); a
# stack of one image under different warps shares it everywhere and has no repeat to flag.
DETAIL_BAND_PX = (0.7, 2.0)
DETAIL_WINDOW_PX = 1024
REPEAT_DETAIL_FLOOR = 0.5
REPEAT_DETAIL_GAP = 0.5
REPEAT_DETAIL_TYPICAL = 0.5


def repeat_reason(confidence: float, typical: float, reference_z: int,
                  detail: float = float("nan"), typical_detail: float = float("nan")) -> str:
    """Why a section whose coarse NCC with section `reference_z` is `confidence` (fine-detail
    NCC `detail`), where neighbours typically agree at `typical` (`typical_detail`), is a
    repeat of it ("" if it is not). NaN: not measured."""
    if confidence >= max(REPEAT_FLOOR, 1 - REPEAT_GAP * (1 - typical)):
        return (f"repeats z={reference_z} (NCC {confidence:.2f}; neighbours here agree at {typical:.2f}): "
                "the same section imaged twice, a tape slip?")
    if (np.isfinite(detail) and np.isfinite(typical_detail) and typical_detail <= REPEAT_DETAIL_TYPICAL
            and detail >= max(REPEAT_DETAIL_FLOOR, 1 - REPEAT_DETAIL_GAP * (1 - typical_detail))):
        return (f"repeats z={reference_z} (fine detail NCC {detail:.2f}; neighbours here share "
                f"{typical_detail:.2f}): the same section imaged twice, a tape slip?")
    return ""


def _band(img: np.ndarray) -> np.ndarray:
    lo, hi = DETAIL_BAND_PX
    return cv2.GaussianBlur(img, (0, 0), lo) - cv2.GaussianBlur(img, (0, 0), hi)


def detail_agreement(fixed: np.ndarray, moving: np.ndarray, transform: SectionTransform,
                     fixed_valid: np.ndarray | None = None, moving_valid: np.ndarray | None = None,
                     window: int = DETAIL_WINDOW_PX) -> float:
    """NCC of the finest detail (DETAIL_BAND_PX) of `fixed` and `moving` drawn through
    `transform`, in a window of at most `window` px (and half the section) about the middle of
    the fixed section's imaged area; NaN where they share too little of it. Reads only the
    window (memory-mapped inputs stay on disk)."""
    h, w = fixed.shape
    window = min(window, max(h, w) // 2)
    if fixed_valid is not None:
        rows = np.flatnonzero(np.asarray(fixed_valid[:, w // 2], bool))
        cols = np.flatnonzero(np.asarray(fixed_valid[h // 2], bool))
        cy = int(np.median(rows)) if rows.size else h // 2
        cx = int(np.median(cols)) if cols.size else w // 2
    else:
        cy, cx = h // 2, w // 2
    half = window // 2
    y0, x0 = max(0, min(cy - half, h - window)), max(0, min(cx - half, w - window))
    y1, x1 = min(h, y0 + window), min(w, x0 + window)
    f = np.asarray(fixed[y0:y1, x0:x1], np.float32)
    ok = np.ones(f.shape, bool) if fixed_valid is None else np.asarray(fixed_valid[y0:y1, x0:x1], bool)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    sx, sy = transform.apply(xx, yy)
    # The moving section's pixels under the window (plus a margin for the interpolation).
    my0, mx0 = max(0, int(np.floor(sy.min())) - 2), max(0, int(np.floor(sx.min())) - 2)
    my1, mx1 = min(moving.shape[0], int(np.ceil(sy.max())) + 3), min(moving.shape[1], int(np.ceil(sx.max())) + 3)
    if my1 - my0 < 8 or mx1 - mx0 < 8:
        return float("nan")
    src = np.asarray(moving[my0:my1, mx0:mx1], np.float32)
    mapx, mapy = (sx - mx0).astype(np.float32), (sy - my0).astype(np.float32)
    m = cv2.remap(src, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    inside = np.isfinite(m)
    if moving_valid is not None:
        mv = np.asarray(moving_valid[my0:my1, mx0:mx1], np.float32)
        inside &= cv2.remap(mv, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0.99
    both = ok & inside
    # Away from the edges of what was imaged, where the band-pass sees the edge, not the tissue.
    both = cv2.erode(both.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    if both.sum() < 1024:
        return float("nan")
    fill_f, fill_m = float(f[both].mean()), float(m[both].mean())
    fb = _band(np.where(both, f, fill_f).astype(np.float32))
    mb = _band(np.where(both, m, fill_m).astype(np.float32))
    return ncc(fb[both], mb[both])


def unregistered_reason(confidence: float, chance: float, min_confidence: float) -> str:
    """Why a pair with this coarse `confidence` and `chance` did not register ("" if it did)."""
    clear = chance <= CHANCE_MAX and confidence >= max(CLEAR_FLOOR, CLEAR_FACTOR * chance)
    if confidence < min_confidence and not clear:
        return (f"alignment confidence {confidence:.2f} < {min_confidence}"
                + (f" and not {CLEAR_FACTOR:g}x chance ({chance:.2f})" if confidence >= CLEAR_FLOOR else ""))
    # Where chance is high (a small montage) the factor asks too much, but a pair that agrees no
    # better than chance (the section mirrored agrees as well: a reference turned upside down)
    # never registers.
    if confidence < (CHANCE_FACTOR if chance <= CHANCE_MAX else 1.0) * chance:
        return (f"alignment confidence {confidence:.2f} is not clearly above chance ({chance:.2f}, the same "
                "search on the section mirrored, or three null sigmas): the wrong tissue?")
    return ""


class AsFloat32:
    """`a` as float32, converted a slice at a time: a memory-mapped mask stays on disk."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.shape = a.shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: object) -> np.ndarray:
        return np.asarray(self.a[key], np.float32)  # type: ignore[index]


def _scale_matrix(k: float) -> np.ndarray:
    """Coarse pixel c -> full pixel k*c + (k-1)/2 (INTER_AREA puts a coarse pixel's centre
    in the middle of the k x k block it averages), as a 3x3 over (x, y, 1)."""
    o = (k - 1) / 2
    return np.array([[k, 0, o], [0, k, o], [0, 0, 1.0]])


def block_mean(img: np.ndarray, valid: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k x k block means of the image (invalid pixels filled with the valid mean) and of
    its valid mask (> 0.99: wholly imaged), read in strips of rows so that a memory-mapped
    section of any size is never loaded whole."""
    h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    step = k * max(1, STRIP_ROWS // k)
    total, count = 0.0, 0
    for y in range(0, h, step):
        strip = np.asarray(img[y:y + step, :w], np.float32)
        v = None if valid is None else np.asarray(valid[y:y + step, :w], bool)
        total += float(strip.sum() if v is None else strip[v].sum())
        count += strip.size if v is None else int(v.sum())
    fill = total / count if count else 0.0
    small = np.empty((h // k, w // k), np.float32)
    vs = np.ones((h // k, w // k), bool)
    size = (w // k, None)
    for y in range(0, h, step):
        strip = np.asarray(img[y:y + step, :w], np.float32)
        rows = strip.shape[0] // k
        size = (w // k, rows)
        if valid is not None:
            v = np.asarray(valid[y:y + step, :w], np.float32)
            strip = np.where(v > 0, strip, np.float32(fill))
            vs[y // k:y // k + rows] = cv2.resize(v, size, interpolation=cv2.INTER_AREA) > 0.99
        small[y // k:y // k + rows] = cv2.resize(strip, size, interpolation=cv2.INTER_AREA)
    return small, vs


def _warp(img: np.ndarray, m: np.ndarray, shape: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """out(p) = img(m @ p), m a 2x3 over (x, y, 1)."""
    return cv2.warpAffine(img.astype(np.float32), np.asarray(m[:2], np.float64), (shape[1], shape[0]),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=fill)


@dataclass
class _Coarse:
    transform: SectionTransform
    confidence: float
    rotation_deg: float
    overlap: float
    chance: float = 0.0


def coarse_affine(
    fixed: np.ndarray, moving: np.ndarray, fixed_valid: np.ndarray | None = None,
    moving_valid: np.ndarray | None = None, *, max_rotation_deg: float = 10.0,
) -> tuple[SectionTransform, float, float]:
    """Rigid then affine alignment at low resolution: (transform, confidence, rotation).

    Rigid: the moving image is turned in 1 degree steps over +-max_rotation_deg and each
    candidate is phase-correlated; the sharpest peak gives angle and shift. Affine: the
    ECC maximisation (OpenCV) refines it, masked to where the fixed section was imaged.
    The transform maps full-resolution fixed pixels to moving pixels.
    """
    c = _coarse_affine(fixed, moving, fixed_valid, moving_valid, max_rotation_deg)
    return c.transform, c.confidence, c.rotation_deg


def _coarse_affine(fixed: np.ndarray, moving: np.ndarray, fixed_valid: np.ndarray | None,
                   moving_valid: np.ndarray | None, max_rotation_deg: float, chance: bool = False) -> _Coarse:
    """The coarse search; with `chance`, also the confidence the same search reaches on a
    pair that cannot match: the moving section turned upside down (a mirror image is never
    a rotation of +-10 deg), with the same content, noise and coverage. The search fits
    something to any content; pipeline.py asks for clearly more than that."""
    k = max(1, int(np.ceil(max(fixed.shape) / COARSE_TARGET_PX)))
    fs, fv = block_mean(fixed, fixed_valid, k)
    ms, mv = block_mean(moving, moving_valid, k)
    c = _coarse_small(fs, fv, ms, mv, k, max_rotation_deg)
    if chance:
        mirrored = _coarse_small(fs, fv, np.ascontiguousarray(ms[::-1]), np.ascontiguousarray(mv[::-1]), k,
                                 max_rotation_deg, CHANCE_ECC_ITERATIONS).confidence
        c.chance = max(mirrored, CHANCE_SIGMAS * null_sigma(fs, fv, ms, mv))
    return c


def _autocorrelation(img: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the normalised autocorrelation of `img` over the pixels `ok`, the number of pixel
    pairs at each lag), every lag at once (FFT, zero-padded: no wrap-around)."""
    h, w = img.shape
    m = ok.astype(np.float32)
    a = (img.astype(np.float32) - np.float32(img[ok].mean())) * m if ok.any() else np.zeros((h, w), np.float32)
    size = (2 * h, 2 * w)
    r = scipy.fft.irfft2(np.abs(scipy.fft.rfft2(a, size)) ** 2, size)
    n = np.rint(scipy.fft.irfft2(np.abs(scipy.fft.rfft2(m, size)) ** 2, size))
    rho = np.where(n > 0, r / np.maximum(n, 1), 0.0)
    return (rho / rho[0, 0] if rho[0, 0] > 0 else rho), n


def null_sigma(fixed: np.ndarray, fixed_ok: np.ndarray, moving: np.ndarray, moving_ok: np.ndarray) -> float:
    """The standard deviation of the NCC of two unrelated images with these images' texture,
    at one placement: each pixel's product is correlated with its neighbours' as far as both
    images' autocorrelations reach, so the variance is sum over lags of rho_f * rho_m * pairs,
    over the pixels squared. Coarse content (cells a tenth of the image wide) leaves few
    independent samples, and chance agreement is large; fine texture, small."""
    rf, nf = _autocorrelation(fixed, fixed_ok)
    rm, _ = _autocorrelation(moving, moving_ok)
    n = float(nf[0, 0])
    if n < 16:
        return 0.0
    # Lags that at least a quarter of the pixels share: beyond, rho is a few pixels' noise.
    use = nf >= n / 4
    return float(np.sqrt(max(float((rf * rm * nf)[use].sum(dtype=np.float64)) / n**2, 0.0)))


def _coarse_small(fs: np.ndarray, fv: np.ndarray, ms: np.ndarray, mv: np.ndarray, k: int,
                  max_rotation_deg: float, ecc_iterations: int = ECC_ITERATIONS) -> _Coarse:
    """Rigid then affine on the k-times reduced images (valid masks fv, mv), each ECC
    refinement stopped after `ecc_iterations`."""
    h, w = fs.shape
    centre = ((w - 1) / 2, (h - 1) / 2)
    fill = float(ms.mean())
    best: tuple[float, np.ndarray] | None = None
    score_best = -np.inf
    steps = int(np.floor(max_rotation_deg / ROTATION_STEP_DEG))
    for ang in np.arange(-steps, steps + 1) * ROTATION_STEP_DEG:
        rot = np.vstack([cv2.getRotationMatrix2D(centre, float(ang), 1.0), [0, 0, 1]])
        turned = _warp(ms, np.linalg.inv(rot), (h, w), fill)   # turned(q) = ms(rot^-1 q)
        sy, sx, score = phase_correlate(turned, fs, upsample=1)  # fs(p) = turned(p + s)
        if score > score_best:
            score_best = score
            shift = np.array([[1, 0, sx], [0, 1, sy], [0, 0, 1.0]])
            best = (float(ang), np.linalg.inv(rot) @ shift)
    assert best is not None
    angle, m = best

    def ecc(start: np.ndarray, motion: int) -> np.ndarray:
        try:
            criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, ecc_iterations, 1e-6)
            _, warp = cv2.findTransformECC(fs, ms, start[:2].astype(np.float32), motion, criteria,
                                           fv.astype(np.uint8), 3)
            return np.vstack([warp.astype(np.float64), [0, 0, 1]])
        except cv2.error:
            # ECC did not converge (too little texture in the overlap): keep the start, the
            # confidence says how good it is.
            return start

    def score(tc: np.ndarray) -> float:
        """NCC over pixels both sections really imaged."""
        aligned = _warp(ms, tc, (h, w))
        both = fv & (_warp(mv.astype(np.float32), tc, (h, w)) > 0.99)
        return ncc(fs[both], aligned[both]) if both.sum() > 16 else 0.0

    rigid = ecc(m, cv2.MOTION_EUCLIDEAN)
    affine = ecc(rigid, cv2.MOTION_AFFINE)
    conf_rigid, conf_affine = score(rigid), score(affine)
    # Affine only where it explains clearly more than rigid: on neighbouring sections whose
    # content differs, a free scale and shear otherwise fit the content's drift (measured
    # on the simulator: 0.6 % scale, 7 px at the centre of a 1500 px canvas).
    strain = float(np.abs(np.linalg.svd(affine[:2, :2], compute_uv=False) - 1).max())
    better = conf_affine > conf_rigid + AFFINE_MIN_GAIN and strain <= AFFINE_MAX_STRAIN
    tc, conf = (affine, conf_affine) if better else (rigid, conf_rigid)
    s = _scale_matrix(k)
    full = s @ tc @ np.linalg.inv(s)
    rot = float(np.degrees(np.arctan2(full[1, 0], full[0, 0])))
    moved_valid = _warp(mv.astype(np.float32), tc, (h, w)) > 0.99
    overlap = float(moved_valid[fv].mean()) if fv.any() else 0.0
    return _Coarse(SectionTransform(full[:2]), conf, rot if np.isfinite(rot) else angle, overlap)


def _reduce(img: np.ndarray, ok: np.ndarray | None, s: int) -> tuple[np.ndarray, np.ndarray | None]:
    """s x s block means of a strip and its valid mask (wholly valid blocks only); the strip
    itself at s = 1."""
    return (img, ok) if s == 1 else block_mean(img, ok, s)


def _fit_grid(u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A node field (gh, gw, 2) cut or edge-extended to `shape`."""
    gh, gw = shape
    u = u[:gh, :gw]
    return np.pad(u, ((0, gh - u.shape[0]), (0, gw - u.shape[1]), (0, 0)), mode="edge")


def align_section(
    fixed: np.ndarray, moving: np.ndarray, fixed_valid: np.ndarray | None = None,
    moving_valid: np.ndarray | None = None, *, elastic: bool = True, max_rotation_deg: float = 10.0,
    stride: int = 32, patch: int = 64, passes: int = 3, stiffness: float = 0.3, scale: int = 1, device: str = "cpu",
) -> SectionAlignment:
    """Align `moving` to `fixed` (same canvas): coarse rigid + affine, then elastic.

    The elastic stage measures a patch flow between the fixed image and the moving image
    warped by the current transform, cleans it, relaxes it on a spring mesh and adds the
    result (rotated into the moving frame) to the transform's field; each further pass
    measures what the last left, where the patches' window no longer biases the peak.
    Inputs may be memory-mapped: they are read in strips and patches, never whole.
    With `scale` s > 1 the flow is measured on s x s block means (`stride` and `patch` in
    those reduced pixels): s^2 fewer patches for the same area of tissue per patch.
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"shapes differ: {fixed.shape} vs {moving.shape}")
    xp = array_module(device)
    warp = warp_for(device)
    coarse = _coarse_affine(fixed, moving, fixed_valid, moving_valid, max_rotation_deg, chance=True)
    transform, conf, rot = coarse.transform, coarse.confidence, coarse.rotation_deg
    nodes, rms = 0, 0.0
    weight = None
    if elastic:
        shape = fixed.shape
        s = max(1, int(scale))
        small = (shape[0] // s, shape[1] // s)
        out_stride = stride * s      # the field's grid in output pixels
        mv = None if moving_valid is None else AsFloat32(moving_valid)
        field = np.zeros((*SectionTransform.grid_shape(shape, out_stride), 2), np.float32)

        def fixed_rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
            img = fixed[y0 * s:y1 * s, :small[1] * s]
            ok = None if fixed_valid is None else np.asarray(fixed_valid[y0 * s:y1 * s, :small[1] * s], bool)
            return _reduce(np.asarray(img, np.float32), ok, s)

        for _ in range(passes):
            current = SectionTransform(transform.matrix, field, out_stride)

            def moving_rows(y0: int, y1: int, t: SectionTransform = current) -> tuple[np.ndarray, np.ndarray]:
                # The moving strip rendered through the current transform on demand: the
                # warped section is never whole in memory (render_block reads what it needs).
                block = (y0 * s, 0, (y1 - y0) * s, small[1] * s)
                img, cover = render_block([moving], np.zeros((1, 2)), t, block, ramp=1, warp=warp)
                ok = cover > 0.99
                if mv is not None:
                    ok &= render_block([mv], np.zeros((1, 2)), t, block, ramp=1, warp=warp)[0] > 0.99
                reduced, reduced_ok = _reduce(img, ok, s)
                assert reduced_ok is not None
                return reduced, reduced_ok

            flow = flow_rows(fixed_rows, moving_rows, small, stride=stride, patch=patch, max_shift=patch / 8,
                             xp=xp, source_scale=s)
            weight = clean_flow(flow)
            u = relax_mesh(flow, weight, stiffness=stiffness)
            keep = weight > 0
            nodes = int(keep.sum())
            rms = s * float(np.sqrt(((flow.vectors - u)[keep] ** 2).sum(-1).mean())) if nodes else 0.0
            # Flow u is in reduced output pixels; the field is added in moving pixels, on the
            # field's grid (one node more where the full size is not a multiple of s).
            u = _fit_grid(u * s, field.shape[:2])
            field = field + (u.reshape(-1, 2) @ current.linear.T).reshape(field.shape).astype(np.float32)
        transform = SectionTransform(transform.matrix, field, out_stride)
        stride = out_stride
    overlap = coarse.overlap
    detail = detail_agreement(fixed, moving, transform, fixed_valid, moving_valid)
    return SectionAlignment(transform, conf, rot, nodes, rms, overlap, coarse.chance, weight, stride,
                            (int(fixed.shape[0]), int(fixed.shape[1])), detail)
