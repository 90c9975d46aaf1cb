"""Pairwise registration: phase correlation of overlap regions with sub-pixel refinement.

`phase_correlate` alone refines its integer peak by an upsampled DFT (Guizar-Sicairos et
al., Opt. Lett. 33, 156 (2008)); `register_pair` instead refines by least squares over
the whole overlap (`refine_shift`), which is more accurate on narrow, noisy strips.
All array work runs on a Backend (NumPy/OpenCV or CuPy).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from scipy import fft as scipy_fft

from .backend import CPU, SINC_TAPS, Backend

UPSAMPLE = 50
WHITEN = 0.5         # 1 = pure phase correlation; 0.5 keeps some weight on strong low frequencies
PRE_BLUR = 1.0       # px; suppresses shot noise, which whitening would amplify
WINDOW_TAPER = 1.0   # Tukey taper fraction; 1 = Hann (the integer peak only: refine_shift does the rest)
REFINE_BLUR = 1.0    # px; smoothing before the least-squares refinement (measured best at 1)
HIGHPASS_BOX = 21    # px; the low-pass removed before refinement (two box passes, ~ a 9 px Gaussian)
COARSE_MIN_PX = 64   # overlaps at least this wide are correlated at half resolution first
RECUT_PX = 3.0       # cut the overlap again only while the correlation still finds a shift over this
MAX_REFINE_PX = 2.0  # a refinement that wanders further than this from the correlation peak failed
LINEAR_REFINE_PX = 1.5  # the same, across a strip sampled linearly (see refine_shift's margins)
MIN_OVERLAP_PX = 6   # narrower than this, two tiles are not compared (the refinement keeps 4 of 6 columns)
MIN_REFINE_PX = 4    # rows (columns) of a strip left for the refinement after its margins, at least
NARROW_PX = 32       # an overlap narrower than this is searched across (`_search_across`)
NARROW_SEARCH_PX = 16  # how far across, each way: the stage error between neighbours, generously
PIECES = 8          # an overlap that no single shift fits is measured in this many pieces along it
MIN_PIECE_PX = 64   # each at least this long (and as long as the strip is wide)
PIECE_SHIFT_PX = 8  # a piece's peak is sought this close to the overlap's own
PIECE_FIT_PX = 1.0  # a piece further than this from the line fitted along the strip is not used
MAX_CHANGE = 0.02   # of the overlap's length: the most two cameras turned or scaled against each other change it
NARROW_FILTER = 2.0  # a strip narrower than this many low-pass widths is band-passed along its length only


@dataclass(frozen=True)
class PairShift:
    dy: float          # position of b minus position of a, in pixels
    dx: float
    confidence: float  # normalised cross-correlation of the overlap after the shift, -1..1
    refused: str = ""  # why the shift is not to be used (confidence 0), for people
    information: tuple[float, float, float] | None = None   # of (dy, dx), from the refinement (`Refined`)
    note: str = ""     # something a person should know about a shift that is used


NOT_REFINED = "no convergence: the sub-pixel refinement did not converge (too little texture in the overlap?)"
LOST = "no overlap: the correlation led to an offset where the tiles no longer overlap"
# Band-passed texture decorrelates over about CORRELATION_AREA_PX pixels, so an overlap of A
# pixels holds ~A / CORRELATION_AREA_PX independent samples, and unrelated texture reaches an
# NCC of 1/sqrt of that by chance, more when the best of many offsets is kept: a pair must
# agree CHANCE_SIGMAS times better. Irrelevant for wide overlaps (0.07 on 92 x 1024 px);
# decisive on narrow ones (0.43 on 10 x 256 px, where a tile from elsewhere reached 0.26).
CORRELATION_AREA_PX = 30.0
CHANCE_SIGMAS = 4.0


def chance_agreement(shape: tuple[int, ...]) -> float:
    """The NCC that unrelated texture can reach on an overlap of this shape."""
    n = max(float(np.prod(shape)) / CORRELATION_AREA_PX, 1.0)
    return CHANCE_SIGMAS / float(np.sqrt(n))


def tukey(n: int, alpha: float) -> np.ndarray:
    """The Tukey (tapered cosine) window, as scipy.signal.windows.tukey(n, alpha): written
    here because importing scipy.signal costs the command line 0.7 s of start-up."""
    if n < 2 or alpha <= 0:
        return np.ones(n)
    alpha = min(alpha, 1.0)
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    left, right = x < alpha / 2, x > 1 - alpha / 2
    w[left] = 0.5 * (1 + np.cos(np.pi * (2 * x[left] / alpha - 1)))
    w[right] = 0.5 * (1 + np.cos(np.pi * (2 * x[right] / alpha - 2 / alpha + 1)))
    return w


@cache
def _window(shape: tuple[int, int]) -> np.ndarray:
    # Only the integer peak comes from here (refine_shift measures the fraction without a
    # window), and Hann found it most reliably on strips narrower than the stage error.
    return np.outer(tukey(shape[0], WINDOW_TAPER), tukey(shape[1], WINDOW_TAPER)).astype(np.float32)


def _upsampled_dft(data: np.ndarray, region: int, factor: int, offset: tuple[float, float]) -> np.ndarray:
    """DFT of `data` upsampled by `factor` on a region x region grid starting at offset."""
    h, w = data.shape
    ky = np.fft.ifftshift(np.arange(h)) - h // 2
    kx = np.fft.ifftshift(np.arange(w)) - w // 2
    ry = np.arange(region) - offset[0]
    rx = np.arange(region) - offset[1]
    ey = np.exp(-2j * np.pi / (h * factor) * np.outer(ry, ky))
    ex = np.exp(-2j * np.pi / (w * factor) * np.outer(kx, rx))
    return ey @ data @ ex


def phase_correlate(
    a: np.ndarray, b: np.ndarray, upsample: int = UPSAMPLE, max_shift: float | None = None,
    backend: Backend = CPU,
) -> tuple[float, float, float]:
    """Shift (dy, dx) such that b(p) ~= a(p + shift), and the peak height.

    Inputs are equal-shaped float arrays; they are mean-subtracted and windowed here.
    `max_shift` confines the peak search to |dy|, |dx| <= max_shift (a refinement
    around a known estimate must not jump to a noise peak elsewhere). The height is
    comparable between calls on equal shapes only.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    xp = backend.xp
    a = backend.asarray(a)
    b = backend.asarray(b)
    win = xp.asarray(_window(a.shape))
    a = (a - a.mean()) * win
    b = (b - b.mean()) * win
    if upsample > 1:
        # The upsampled DFT needs the whole spectrum at the crop's own size.
        h, w = a.shape
        cross = xp.fft.fft2(a) * xp.conj(xp.fft.fft2(b))
        fy, fx = xp.fft.fftfreq(h)[:, None], xp.fft.fftfreq(w)[None, :]
    else:
        # Integer peak only: real FFTs at a fast length, half the work of complex ones;
        # the zero padding beyond the window changes nothing but the speed.
        h, w = (scipy_fft.next_fast_len(n, real=True) for n in a.shape)
        cross = backend.fft.rfft2(a, s=(h, w)) * xp.conj(backend.fft.rfft2(b, s=(h, w)))
        fy, fx = xp.fft.fftfreq(h)[:, None], xp.fft.rfftfreq(w)[None, :]
    # Partial whitening: on narrow, noisy overlap strips pure phase correlation lets
    # high-frequency noise jitter the peak (measured in docs/stitching.md).
    cross /= xp.abs(cross) ** WHITEN + 1e-12
    if PRE_BLUR:
        # A Gaussian blur of both inputs, applied where it is a product: on the spectrum.
        cross *= xp.exp(-4 * np.pi**2 * PRE_BLUR**2 * (fy**2 + fx**2)).astype(cross.real.dtype)
    corr = xp.fft.ifft2(cross).real if upsample > 1 else backend.fft.irfft2(cross, s=(h, w))
    if max_shift is not None:
        ay = xp.abs(xp.fft.fftfreq(h) * h)[:, None]
        ax = xp.abs(xp.fft.fftfreq(w) * w)[None, :]
        corr = xp.where((ay <= max_shift) & (ax <= max_shift), corr, -xp.inf)
    flat = int(xp.argmax(corr))
    peak = (flat // w, flat % w)
    shift = np.array([p if p <= n // 2 else p - n for p, n in zip(peak, (h, w), strict=True)], float)
    height = float(corr[peak])
    if upsample > 1:
        cross_h = backend.to_host(cross)
        region = int(np.ceil(upsample * 1.5))
        centre = np.fix(region / 2.0)
        offset = centre - shift * upsample
        up = _upsampled_dft(np.conj(cross_h), region, upsample, (offset[0], offset[1])).conj()
        fine = np.unravel_index(int(np.argmax(np.abs(up))), up.shape)
        shift = shift + (np.array(fine, float) - centre) / upsample
    return float(shift[0]), float(shift[1]), height


def overlap_slices(shape: tuple[int, int], dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the common area of tile a (at 0,0) and tile b (at dy,dx), same shapes."""
    h, w = shape
    y0, y1 = max(0, dy), min(h, h + dy)
    x0, x1 = max(0, dx), min(w, w + dx)
    if y1 - y0 < MIN_OVERLAP_PX or x1 - x0 < MIN_OVERLAP_PX:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equal-shaped arrays, -1..1."""
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def register_pair(
    a: np.ndarray, b: np.ndarray, nominal: tuple[float, float], iterations: int = 3,
    backend: Backend = CPU, subpixel: bool = True,
) -> PairShift | None:
    """Offset of tile b relative to tile a, starting from the nominal (stage) offset.

    Two stages. (1) Phase correlation finds the integer offset: the overlap is cut at the
    current estimate and correlated again while the shift found is large (windowing both
    crops biases a large shift toward zero). (2) A least-squares (Gauss-Newton)
    refinement over the whole unwindowed overlap measures the remaining sub-pixel shift;
    on noisy strips it halves the error of the windowed correlation peak (docs/stitching.md).
    Returns None where the tiles do not overlap at the nominal offset; a pair whose agreement
    does not stand above chance (`chance_agreement`) has confidence 0 and says so. `subpixel=False`
    stops after stage (1): the integer baseline that benchmarks compare against.
    """
    dy, dx = float(nominal[0]), float(nominal[1])
    conf = 0.0
    sl = overlap_slices(a.shape, round(dy), round(dx))
    if sl is None:
        return None
    # Band-passed one way for every cut of this pair (their agreements are compared).
    narrow = is_narrow(a[sl[0]].shape)
    if min(a[sl[0]].shape) < NARROW_PX:
        # A narrow strip: a stage error across it is a large part of its width, and the
        # windowed correlation cannot see it. Search that axis, keep the cut that agrees best.
        dy, dx = _search_across(a, b, (dy, dx), backend, narrow)
    # Large overlaps are correlated at half resolution first (a quarter of the FFT work):
    # the integer estimate is then good to about a pixel, which the refinement bridges;
    # where it does not, the later rounds correlate at full resolution.
    sl = overlap_slices(a.shape, round(dy), round(dx))
    big = subpixel and sl is not None and min(a[sl[0]].shape) >= COARSE_MIN_PX
    bins = [2] * max(1, iterations - 1) + [1] * iterations if big else [1] * iterations
    confirmed = None
    for k, binning in enumerate(bins):
        ndy, ndx = round(dy), round(dx)
        sl = overlap_slices(a.shape, ndy, ndx)
        if sl is None:
            return PairShift(dy, dx, 0.0, LOST)
        sa, sb = sl
        # b(p) ~= a(p + s) within the crops, so b sits s further from a than the cut.
        sy, sx, _ = phase_correlate(backend.bin(a[sa], binning), backend.bin(b[sb], binning),
                                    upsample=1, backend=backend)
        dy, dx = ndy + sy * binning, ndx + sx * binning
        # A small shift is not biased by a whole pixel: no need to cut again before refining.
        last_of_kind = k == len(bins) - 1 or bins[k + 1] != binning
        if max(abs(sy), abs(sx)) * binning > RECUT_PX and not last_of_kind:
            continue
        ndy, ndx = round(dy), round(dx)
        sl = overlap_slices(a.shape, ndy, ndx)
        if sl is None:
            return PairShift(dy, dx, 0.0, LOST)
        ca, cb = band_pass(a[sl[0]], backend, narrow), band_pass(b[sl[1]], backend, narrow)
        conf = ncc(backend.to_host(ca), backend.to_host(cb))
        floor = chance_agreement(ca.shape)      # of the overlap checked, not the nominal one
        if conf < floor:
            return PairShift(ndy, ndx, 0.0, f"chance agreement: NCC {conf:.2f}, below the {floor:.2f} that "
                             f"unrelated texture reaches on an overlap of {sl[0][0].stop - sl[0][0].start} x "
                             f"{sl[0][1].stop - sl[0][1].start} px")
        if not subpixel:
            return PairShift(ndy, ndx, conf)
        fine = refine_shift(ca, cb, (dy - ndy, dx - ndx), backend=backend, prefiltered=True)
        if fine is not None:
            return PairShift(ndy + fine.dy, ndx + fine.dx, conf, information=fine.information)
        confirmed = (ndy, ndx, ca, cb, conf)
        # The refinement did not converge near this peak: correlate again from here.
    if confirmed is not None:
        # The peak stands above chance, yet no single shift fits the whole overlap: the
        # offset may change along it (tiles of a camera array, rotated or scaled against
        # each other). Measured piece by piece, it is used at the overlap's middle.
        ndy, ndx, ca, cb, conf = confirmed
        piecewise = _piecewise(ca, cb, backend)
        if piecewise is not None:
            fine, change, agreement = piecewise
            return PairShift(ndy + fine.dy, ndx + fine.dx, agreement, information=fine.information,
                             note=f"offset changes by {change:.1f} px along the overlap (tiles rotated or scaled "
                                  "against each other?): measured in pieces, used at its middle")
    # No estimate was confirmed by the refinement: report it, with no weight in the solve.
    return PairShift(dy, dx, 0.0, NOT_REFINED)


def refine_at(a: np.ndarray, b: np.ndarray, offset: tuple[float, float], backend: Backend = CPU) -> PairShift | None:
    """The offset of b from a refined from `offset` alone (no search): the overlap cut there,
    its agreement checked against chance, the least-squares refinement from its fraction.
    None where they do not overlap there, agree no better than chance, or it does not
    converge. For a pair whose neighbours have already said where it must be."""
    ndy, ndx = round(offset[0]), round(offset[1])
    sl = overlap_slices(a.shape, ndy, ndx)
    if sl is None:
        return None
    ca, cb = band_pass(a[sl[0]], backend), band_pass(b[sl[1]], backend)
    conf = ncc(backend.to_host(ca), backend.to_host(cb))
    if conf < chance_agreement(ca.shape):
        return None
    fine = refine_shift(ca, cb, (offset[0] - ndy, offset[1] - ndx), backend=backend, prefiltered=True)
    if fine is None:
        return None
    return PairShift(ndy + fine.dy, ndx + fine.dx, conf, information=fine.information)


def piece_spans(length: int, pieces: int) -> list[tuple[int, int]]:
    """(first, end) of `pieces` near-equal pieces of `length`."""
    return list(itertools.pairwise(np.linspace(0, length, pieces + 1).round().astype(int).tolist()))


def refine_pieces(ca: Any, cb: Any, pieces: int, start: tuple[float, float] | list[tuple[float, float]] = (0.0, 0.0),
                  *, own_peak: bool = False, backend: Backend = CPU,
                  along: int | None = None) -> list[tuple[int, int, Refined]]:
    """Band-passed overlap crops cut into `pieces` equal pieces along their long axis (or
    `along`), each refined from `start` (one for all, or one per piece) or, `own_peak`, from
    its own integer correlation peak within PIECE_SHIFT_PX. Returns (first, end, shift)
    along that axis for each piece that converged."""
    along = int(np.argmax(ca.shape)) if along is None else along
    out = []
    for k, (lo, hi) in enumerate(piece_spans(ca.shape[along], pieces)):
        cut = (slice(None), slice(lo, hi)) if along == 1 else (slice(lo, hi), slice(None))
        pa, pb = ca[cut], cb[cut]
        at = start[k] if isinstance(start, list) else start
        if own_peak:
            sy, sx, _ = phase_correlate(pa, pb, upsample=1, max_shift=PIECE_SHIFT_PX, backend=backend)
            at = (sy, sx)
        fine = refine_shift(pa, pb, at, backend=backend, prefiltered=True)
        if fine is not None:
            out.append((int(lo), int(hi), fine))
    return out


def _piecewise(ca: Any, cb: Any, backend: Backend) -> tuple[Refined, float, float] | None:
    """The offset of band-passed overlap crops measured in up to PIECES pieces along the
    strip (`refine_pieces`, each from its own peak), fitted by a straight line along it.
    Returns the line's value at the middle, with the information of the pieces that fit
    it; how much the offset changes from one end to the other; and the pieces' mean
    agreement (NCC, each at its own shift). None unless it is believable: each piece must
    agree above its own chance level, most pieces must lie on the line (within
    PIECE_FIT_PX), and the change must be one a rotation or scale between two cameras makes
    (MAX_CHANGE of the overlap's length)."""
    along = int(np.argmax(ca.shape))
    n = ca.shape[along]
    tried = min(PIECES, n // max(MIN_PIECE_PX, ca.shape[1 - along]))
    if tried < 3:
        return None
    where, shifts, agree, infos = [], [], [], []
    for lo, hi, fine in refine_pieces(ca, cb, tried, own_peak=True, backend=backend):
        cut = (slice(None), slice(lo, hi)) if along == 1 else (slice(lo, hi), slice(None))
        at = overlap_slices(ca[cut].shape, round(fine.dy), round(fine.dx))
        if at is None:
            continue
        pa, pb = backend.to_host(ca[cut][at[0]]), backend.to_host(cb[cut][at[1]])
        score = ncc(pa, pb)
        if score < chance_agreement(pa.shape):
            continue
        agree.append(score)
        where.append((lo + hi - 1) / 2 - (n - 1) / 2)
        shifts.append(fine.shift)
        infos.append(fine.information)
    t, d = np.asarray(where), np.asarray(shifts)
    keep = np.ones(len(t), bool)
    for _ in range(2):                  # fit, drop the pieces off the line, fit again
        if keep.sum() < max(3, (tried + 1) // 2):
            return None
        design = np.column_stack([np.ones(int(keep.sum())), t[keep]])
        coef, *_ = np.linalg.lstsq(design, d[keep], rcond=None)   # (2, 2): [offset; slope] per axis
        off = np.linalg.norm(d - (coef[0] + t[:, None] * coef[1]), axis=1)
        keep = off <= PIECE_FIT_PX
    if keep.sum() < max(3, (tried + 1) // 2):
        return None
    change = float(np.hypot(*coef[1]) * n)
    if change > MAX_CHANGE * n:
        return None
    info = np.sum([i for i, k in zip(infos, keep, strict=True) if k], axis=0)
    return (Refined(float(coef[0, 0]), float(coef[0, 1]), (float(info[0]), float(info[1]), float(info[2]))), change,
            float(np.mean(np.asarray(agree)[keep])))


def _search_across(a: np.ndarray, b: np.ndarray, nominal: tuple[float, float], backend: Backend,
                   narrow: bool) -> tuple[float, float]:
    """The integer offset of a narrow overlap: each cut across the strip within
    +-NARROW_SEARCH_PX of the nominal is phase-correlated along it, and the offset whose
    band-passed overlap agrees best (NCC) wins."""
    sl = overlap_slices(a.shape, round(nominal[0]), round(nominal[1]))
    assert sl is not None
    h, w = a[sl[0]].shape
    axis = 0 if h < w else 1
    best, best_ncc = nominal, -np.inf
    for off in range(-NARROW_SEARCH_PX, NARROW_SEARCH_PX + 1):
        cut = [round(nominal[0]), round(nominal[1])]
        cut[axis] += off
        cs = overlap_slices(a.shape, cut[0], cut[1])
        if cs is None:
            continue
        sy, sx, _ = phase_correlate(backend.asarray(a[cs[0]]), backend.asarray(b[cs[1]]), upsample=1,
                                    backend=backend)
        cand = (round(cut[0] + sy), round(cut[1] + sx))
        # Beyond the stage's error from the nominal, a peak is chance, however well it agrees.
        if max(abs(cand[0] - nominal[0]), abs(cand[1] - nominal[1])) > 2 * NARROW_SEARCH_PX:
            continue
        cc = overlap_slices(a.shape, *cand)
        if cc is None:
            continue
        score = ncc(backend.to_host(band_pass(a[cc[0]], backend, narrow)),
                    backend.to_host(band_pass(b[cc[1]], backend, narrow)))
        if score > best_ncc:
            best, best_ncc = (float(cand[0]), float(cand[1])), score
    return best


def band_pass(img: Any, backend: Backend = CPU, narrow: bool | None = None) -> Any:
    """Gaussian (REFINE_BLUR) minus a wide box low-pass: shot noise and flat-field residuals
    (slow) both leave, structure stays. Used for the refinement and the confidence, which
    should measure agreement of structure, not of a shared brightness gradient.

    Across a strip narrower than the low-pass, both filters would reach past its edges,
    where each crop is mirrored about its own cut: the mirrored part moves against the
    content, pulling the measured shift toward the cut. There, both filter along it only.
    `narrow` says which (a pair decides once, from its nominal overlap, so that the cuts it
    compares are filtered alike); None decides from the shape."""
    f = backend.asarray(img)
    if narrow is None:
        narrow = is_narrow(f.shape)
    along = int(np.argmax(f.shape)) if narrow else None
    band = backend.blur(f, REFINE_BLUR, along) - backend.lowpass(f, HIGHPASS_BOX, along)
    if along is None:
        return band
    # Each line along the strip to the same contrast: a flat-field error scales the lines of
    # a strip at a tile's edge unequally, and the gradient across the strip (from vignetting,
    # steepest at the edges and opposite in the two tiles) would pull the shift across it.
    rms = backend.xp.sqrt((band * band).mean(axis=along, keepdims=True))
    return band / (rms + 1e-6 * float(rms.max()) + 1e-12)


def is_narrow(shape: tuple[int, ...]) -> bool:
    """An overlap narrow enough to be band-passed along its length only (`band_pass`)."""
    return min(shape) < HIGHPASS_BOX * NARROW_FILTER


@dataclass(frozen=True)
class Refined:
    dy: float
    dx: float
    # Fisher information of (dy, dx) as (yy, yx, xx): the summed outer products of the image
    # gradient over the residual's variance. Its inverse is the shift's covariance for white
    # noise; band-passed noise is not white, so only its ratios between pairs and axes count.
    information: tuple[float, float, float]

    @property
    def shift(self) -> tuple[float, float]:
        return self.dy, self.dx


def refine_shift(
    a: Any, b: Any, start: tuple[float, float], sigma: float = REFINE_BLUR, iterations: int = 12,
    backend: Backend = CPU, prefiltered: bool = False,
) -> Refined | None:
    """Sub-pixel s with b(p) ~= a(p + s), by Gauss-Newton on sum (a(p + s/2) - b(p - s/2))^2.

    Both crops are resampled half-way (windowed sinc, exact fraction), so interpolation
    smooths them alike and its phase error cancels. Every pixel of the overlap counts
    equally: this is the least-squares estimate for white noise, where a windowed
    correlation peak throws away the edges of a narrow strip. Inputs are band-passed
    here (Gaussian `sigma` minus a wide low-pass) unless `prefiltered`. None if it does
    not converge (no texture, or a start off by more than the smoothing can bridge).
    The result carries the shift's information matrix: a narrow strip whose texture runs
    across it says little about the shift across, and the global solve weighs it so.
    """
    xp = backend.xp
    a, b = backend.asarray(a), backend.asarray(b)
    if not prefiltered:
        a = backend.blur(a, sigma) - backend.lowpass(a, HIGHPASS_BOX)
        b = backend.blur(b, sigma) - backend.lowpass(b, HIGHPASS_BOX)
    s = np.array(start, float)
    # Per axis, the margin covers the interpolation's reach and any shift the refinement may
    # still take. Across a strip too narrow for the sinc's margins (a 3 % overlap is 8-15
    # px), that axis is sampled linearly (reach 1 px): both crops are shifted half-way, so
    # both are smoothed alike and the interpolation's phase error still cancels.
    margins, linear, reach = [], [], []
    for axis, n in enumerate(a.shape):
        travel = int(np.ceil((abs(s[axis]) + MAX_REFINE_PX) / 2))
        wide = SINC_TAPS + 2 + travel
        # Linear sampling reaches one pixel while each crop moves less than one (|s| < 2):
        # the walk across a narrow strip is held to LINEAR_REFINE_PX so that one pixel of
        # margin is enough, and an 8 px strip keeps 6 of its columns.
        narrow = int(np.ceil((abs(s[axis]) + LINEAR_REFINE_PX) / 2))
        if n - 2 * wide >= MIN_REFINE_PX:
            margins.append(wide)
            linear.append(False)
            reach.append(MAX_REFINE_PX)
        elif n - 2 * narrow >= MIN_REFINE_PX:
            margins.append(narrow)
            linear.append(True)
            reach.append(LINEAR_REFINE_PX)
        else:
            return None
    my, mx = margins
    lin = (linear[0], linear[1])
    for _ in range(iterations):
        pa = backend.sample_shifted(a, (s[0] / 2, s[1] / 2), lin)[my:-my, mx:-mx]
        pb = backend.sample_shifted(b, (-s[0] / 2, -s[1] / 2), lin)[my:-my, mx:-mx]
        pa = pa - pa.mean()
        pb = pb - pb.mean()
        r = pb - pa   # ~ grad . (s_true - s)
        # The gradient of the mean of both, at this shift: taking it once at the start
        # instead (to save time) correlates it with the noise in r and biased low-dose
        # pairs by 0.1 px (measured).
        mid = (pa + pb) / 2
        gy = xp.gradient(mid, axis=0)
        gx = xp.gradient(mid, axis=1)
        sums = xp.stack([(gy * gy).sum(), (gy * gx).sum(), (gx * gx).sum(), (gy * r).sum(), (gx * r).sum(),
                         (r * r).mean()])
        hyy, hyx, hxx, ry, rx, var = (float(v) for v in backend.to_host(sums))
        det = hyy * hxx - hyx * hyx
        if not det > 1e-9 * max(hyy * hxx, 1e-30):
            return None
        step = np.array([hxx * ry - hyx * rx, hyy * rx - hyx * ry]) / det
        s = s + step
        if (np.abs(s - np.asarray(start)) > reach).any():
            return None
        if np.abs(step).max() < 2e-3:
            break
    var = max(var, 1e-12 * max(hyy, hxx) / max(int(np.prod(pa.shape)), 1))
    return Refined(float(s[0]), float(s[1]), (hyy / var, hyx / var, hxx / var))
