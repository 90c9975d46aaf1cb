"""Pairwise registration: phase correlation of overlap regions with sub-pixel refinement.

The integer peak of the phase correlation is refined by an upsampled DFT around it
(Guizar-Sicairos et al., Opt. Lett. 33, 156 (2008)), which reaches a few hundredths of a
pixel without upsampling the whole correlation surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

UPSAMPLE = 50
WHITEN = 0.5     # 1 = pure phase correlation; 0.5 keeps some weight on strong low frequencies
PRE_BLUR = 1.0   # px; suppresses shot noise, which pure whitening would amplify


@dataclass(frozen=True)
class PairShift:
    dy: float          # position of b minus position of a, in pixels
    dx: float
    confidence: float  # normalised cross-correlation of the overlap after the shift, -1..1


def _window(shape: tuple[int, int]) -> np.ndarray:
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1])).astype(np.float32)


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
) -> tuple[float, float, float]:
    """Shift (dy, dx) such that b(p) ~= a(p + shift), and the peak height (0..1).

    Inputs are equal-shaped float arrays; they are mean-subtracted and windowed here.
    `max_shift` confines the peak search to |dy|, |dx| <= max_shift (a refinement
    around a known estimate must not jump to a noise peak elsewhere).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if PRE_BLUR:
        a = cv2.GaussianBlur(a.astype(np.float32), (0, 0), PRE_BLUR)
        b = cv2.GaussianBlur(b.astype(np.float32), (0, 0), PRE_BLUR)
    win = _window(a.shape)
    fa = np.fft.fft2((a - a.mean()) * win)
    fb = np.fft.fft2((b - b.mean()) * win)
    cross = fa * np.conj(fb)
    # Partial whitening: on narrow, noisy overlap strips pure phase correlation lets
    # high-frequency noise jitter the peak (measured in docs/stitching.md).
    cross /= np.abs(cross) ** WHITEN + 1e-12
    corr = np.fft.ifft2(cross).real
    h, w = corr.shape
    if max_shift is not None:
        fy = np.abs(np.fft.fftfreq(h) * h)[:, None]
        fx = np.abs(np.fft.fftfreq(w) * w)[None, :]
        corr = np.where((fy <= max_shift) & (fx <= max_shift), corr, -np.inf)
    peak = np.unravel_index(int(np.argmax(corr)), corr.shape)
    shift = np.array([p if p <= n // 2 else p - n for p, n in zip(peak, (h, w), strict=True)], float)
    height = float(corr[peak])
    if upsample > 1:
        region = int(np.ceil(upsample * 1.5))
        centre = np.fix(region / 2.0)
        offset = centre - shift * upsample
        up = _upsampled_dft(np.conj(cross), region, upsample, (offset[0], offset[1])).conj()
        fine = np.unravel_index(int(np.argmax(np.abs(up))), up.shape)
        shift = shift + (np.array(fine, float) - centre) / upsample
    return float(shift[0]), float(shift[1]), height


def overlap_slices(shape: tuple[int, int], dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the common area of tile a (at 0,0) and tile b (at dy,dx), same shapes."""
    h, w = shape
    y0, y1 = max(0, dy), min(h, h + dy)
    x0, x1 = max(0, dx), min(w, w + dx)
    if y1 - y0 < 8 or x1 - x0 < 8:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equal-shaped arrays, -1..1."""
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def register_pair(a: np.ndarray, b: np.ndarray, nominal: tuple[float, float], iterations: int = 3) -> PairShift | None:
    """Offset of tile b relative to tile a, starting from the nominal (stage) offset.

    The overlap is cut at the current estimate and correlated again until the integer
    part settles: windowing both crops biases a large residual shift toward zero, so the
    final sub-pixel step must measure a shift of under a pixel. Returns None where the
    tiles do not overlap at the nominal offset.
    """
    dy, dx = float(nominal[0]), float(nominal[1])
    for _ in range(iterations):
        ndy, ndx = round(dy), round(dx)
        sl = overlap_slices(a.shape, ndy, ndx)
        if sl is None:
            return None
        sa, sb = sl
        # b(p) ~= a(p + s) within the crops, so b sits s further from a than the cut.
        sy, sx, _ = phase_correlate(a[sa].astype(np.float32), b[sb].astype(np.float32))
        dy, dx = ndy + sy, ndx + sx
        if round(dy) == ndy and round(dx) == ndx:
            break
    check = overlap_slices(a.shape, round(dy), round(dx))
    conf = ncc(_detail(a[check[0]]), _detail(b[check[1]])) if check else 0.0
    return PairShift(dy, dx, conf)


def _detail(img: np.ndarray) -> np.ndarray:
    """Band-pass (difference of Gaussians): the confidence should measure agreement of
    structure, not of a shared brightness gradient, which matches at any shift."""
    f = img.astype(np.float32)
    return cv2.GaussianBlur(f, (0, 0), 1.0) - cv2.GaussianBlur(f, (0, 0), 6.0)
