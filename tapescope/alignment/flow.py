"""Fine (elastic) alignment: a sub-pixel patch flow, cleaned, relaxed on a spring mesh.

As in SOFIMA and TrakEM2, the fixed and the (coarsely aligned) moving section are cut
into patches on a regular grid and each patch pair is correlated; bad vectors are
dropped; a spring mesh, one node per patch, pulls the survivors into a smooth field.
Two differences from SOFIMA:

- the peak is refined by an upsampled DFT around it (as `stitching.register` does for
  tile pairs), so each vector is sub-pixel, not integer;
- the mesh is linear (zero-length springs to the data and between neighbours), so its
  equilibrium is one sparse linear solve instead of thousands of integration steps.

The patch correlation is batched and written against an array module: NumPy here,
CuPy where a GPU is present (`device.array_module`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft as scipy_fft
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from tapescope.montage.array_backend import to_numpy

WHITEN = 0.5        # same partial whitening as the tile registration (docs/stitching.md)
PRE_BLUR = 1.0      # px, Gaussian applied in the Fourier domain
UPSAMPLE = 20       # 0.05 px steps
BATCH = 256         # patches per batched FFT
STRIP_PX = 1 << 22  # pixels of one strip asked of a row source at a time (16 MB as float32)


@dataclass
class Flow:
    """Displacements on the grid of node (i, j) at (y, x) = (i * stride, j * stride):
    the moving image matches the fixed one at p + flow(p)."""
    vectors: np.ndarray   # (gh, gw, 2) float32, (dx, dy)
    quality: np.ndarray   # (gh, gw) float32, peak sharpness; 0 where not measured
    stride: int


def _hann(n: int, xp: ModuleType) -> object:
    w = xp.hanning(n).astype(xp.float32)
    return w[:, None] * w[None, :]


def _rfft2(xp: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(rfft2, irfft2) over the last two axes: the patches are real, so half the spectrum is
    the whole of it, at half the work of complex FFTs. On the CPU scipy.fft, on every core (on
    batches of float32 patches 7x faster than numpy.fft); CuPy's own on a GPU."""
    if xp is np:
        return (lambda x: scipy_fft.rfft2(x, workers=-1)), (lambda x, s: scipy_fft.irfft2(x, s, workers=-1))
    return xp.fft.rfft2, (lambda x, s: xp.fft.irfft2(x, s))


def _full_spectrum(half: Any, size: int, xp: ModuleType) -> Any:
    """The (n, P, P) spectrum of real patches from its (n, P, P // 2 + 1) half: X[k1, k2] =
    conj(X[-k1, -k2])."""
    n = half.shape[0]
    full = xp.empty((n, size, size), half.dtype)
    full[:, :, :size // 2 + 1] = half
    rows = (-xp.arange(size)) % size
    cols = size - xp.arange(size // 2 + 1, size)
    full[:, :, size // 2 + 1:] = xp.conj(half[:, rows][:, :, cols])
    return full


def batched_phase_correlate(
    a: np.ndarray, b: np.ndarray, max_shift: float, upsample: int = UPSAMPLE, xp: ModuleType = np,
) -> tuple[np.ndarray, np.ndarray]:
    """Shifts s (n, 2) as (dy, dx) with b(p) ~= a(p + s), and peak sharpness (n,), for
    n square patch pairs (n, P, P); peaks are searched within |s| <= max_shift."""
    n, size, _ = a.shape
    a = xp.asarray(a, xp.float32)
    b = xp.asarray(b, xp.float32)
    win = _hann(size, xp)
    rfft2, irfft2 = _rfft2(xp)
    fa = rfft2((a - a.mean(axis=(1, 2), keepdims=True)) * win)
    fb = rfft2((b - b.mean(axis=(1, 2), keepdims=True)) * win)
    f = xp.fft.fftfreq(size).astype(xp.float32)
    fr = xp.fft.rfftfreq(size).astype(xp.float32)
    half = fa * xp.conj(fb)
    if PRE_BLUR:
        g = xp.exp(-2 * (np.pi * PRE_BLUR) ** 2 * (f[:, None] ** 2 + fr[None, :] ** 2))
        half *= (g * g).astype(xp.float32)   # both images blurred: the transfer function twice
    mag = xp.abs(half)
    half /= (xp.sqrt(mag) if WHITEN == 0.5 else mag ** WHITEN) + 1e-12
    corr = irfft2(half, (size, size))
    cross = _full_spectrum(half, size, xp)      # the upsampled DFT below takes all of it
    fi = xp.abs(f * size)
    inside = ((fi[:, None] <= max_shift) & (fi[None, :] <= max_shift)).ravel()
    where = xp.nonzero(inside)[0]
    # Only the searched part of each surface: peak, and its sharpness (how far the peak
    # stands above the rest of the searched surface).
    vals = corr.reshape(n, -1)[:, where]
    best = xp.argmax(vals, axis=1)
    peak = vals[xp.arange(n), best]
    sharp = (peak - vals.mean(axis=1)) / (vals.std(axis=1) + 1e-12)
    idx = where[best]
    py, px = idx // size, idx % size
    shift = xp.stack([xp.where(py > size // 2, py - size, py), xp.where(px > size // 2, px - size, px)], 1)
    shift = shift.astype(xp.float64)
    # Upsampled DFT around the integer peak (Guizar-Sicairos 2008), all patches at once.
    region = int(np.ceil(upsample * 1.5))
    centre = float(np.fix(region / 2.0))
    offset = centre - shift * upsample                       # (n, 2)
    k = (xp.fft.ifftshift(xp.arange(size)) - size // 2).astype(xp.float64)
    r = xp.arange(region, dtype=xp.float64)
    c = -2j * np.pi / (size * upsample)
    # The patch's DFT matrices exp(c (r - o) k) split into one matrix shared by every patch,
    # exp(c r k), and a per-patch diagonal exp(-c o k): the products are then two large
    # matrix products against the shared matrices (BLAS), not n small ones. complex64 is
    # ample: the peak is located to 1/upsample px, not to 1e-7.
    e_y = xp.exp(c * r[:, None] * k[None, :]).astype(xp.complex64)             # (R, P)
    e_x = xp.exp(c * k[:, None] * r[None, :]).astype(xp.complex64)             # (P, R)
    d_y = xp.exp(-c * offset[:, 0:1] * k[None, :]).astype(xp.complex64)        # (n, P)
    d_x = xp.exp(-c * k[None, :] * offset[:, 1:2]).astype(xp.complex64)        # (n, P)
    m = d_y[:, :, None] * xp.conj(cross) * d_x[:, None, :]                      # (n, P, P)
    y = (m.reshape(n * size, size) @ e_x).reshape(n, size, region)              # (n, P, R)
    up = xp.abs((xp.ascontiguousarray(y.transpose(0, 2, 1)).reshape(n * region, size) @ e_y.T)
                .reshape(n, region, region).transpose(0, 2, 1))
    fine = xp.argmax(up.reshape(n, -1), axis=1)
    shift = shift + xp.stack([fine // region, fine % region], 1).astype(xp.float64) * (1.0 / upsample) \
        - centre / upsample
    return to_numpy(shift), to_numpy(sharp).astype(np.float32)


RowSource = Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]


class _Strips:
    """Serves the flow's row windows, which move down the image and overlap by half (patch =
    2 x stride), from strips of at least `rows` rows asked of `source` at a time. Asked
    window by window, every row was read (for the moving image: rendered through the
    transform) twice, each window by its own call; this was 30 % of a pair's matching."""

    def __init__(self, source: RowSource, height: int, rows: int) -> None:
        self.source, self.height, self.rows = source, height, rows
        self.y0 = self.y1 = 0
        self.img: np.ndarray | None = None
        self.ok: np.ndarray | None = None

    def __call__(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.img is None or y0 < self.y0 or y1 > self.y1:
            self.y0, self.y1 = y0, min(self.height, max(y1, y0 + self.rows))
            self.img, self.ok = self.source(self.y0, self.y1)
        a, b = y0 - self.y0, y1 - self.y0
        return self.img[a:b], None if self.ok is None else self.ok[a:b]


def flow_rows(
    fixed_rows: RowSource, moving_rows: RowSource, shape: tuple[int, int], *, stride: int = 32,
    patch: int = 64, max_shift: float = 8.0, min_valid: float = 0.6, xp: ModuleType = np,
    source_scale: int = 1,
) -> Flow:
    """Flow of the moving image against the fixed one over an output of `shape`, one
    vector per grid node whose patch lies inside and is at least `min_valid` valid.

    The images are asked for one strip of rows at a time (`*_rows(y0, y1)` -> full-width
    strip and its valid mask or None), so a section of any size is measured with memory
    for one strip: the moving strip is typically rendered through the current transform
    on demand. Invalid pixels are set to the patch's valid mean in both images: the
    shared border this makes pulls toward zero shift, which is the current estimate in
    the later passes, so it slows convergence at the edge of the overlap but does not
    bias where it converges. `source_scale`: the sources reduce s x s blocks of their own
    (the strips they are asked for are sized in their pixels)."""
    h, w = shape
    gh, gw = -(-h // stride) + 1, -(-w // stride) + 1
    half = patch // 2
    # A source that reduces s x s blocks reads (and renders) s^2 pixels for each of ours.
    rows = max(patch, STRIP_PX // max(w * source_scale ** 2, 1))
    fixed_rows, moving_rows = _Strips(fixed_rows, h, rows), _Strips(moving_rows, h, rows)
    vec = np.zeros((gh, gw, 2), np.float32)
    qual = np.zeros((gh, gw), np.float32)
    pending: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def run() -> None:
        if not pending:
            return
        fa = np.stack([p[2] for p in pending])
        mb = np.stack([p[3] for p in pending])
        if pending[0][4] is not None:
            vb = np.stack([p[4] for p in pending])
            cnt = vb.sum(axis=(1, 2), keepdims=True)
            fa = np.where(vb, fa, (fa * vb).sum(axis=(1, 2), keepdims=True) / cnt)
            mb = np.where(vb, mb, (mb * vb).sum(axis=(1, 2), keepdims=True) / cnt)
        # fixed(p) ~= moving(p + s): correlate with moving as `a`.
        shifts, sharp = batched_phase_correlate(mb, fa, max_shift, xp=xp)
        for (i, j, *_), (dy, dx), q in zip(pending, shifts, sharp, strict=True):
            vec[i, j] = (dx, dy)
            qual[i, j] = q
        pending.clear()

    for i in range(gh):
        y = i * stride
        if y - half < 0 or y + half > h:
            continue
        f_strip, f_valid = fixed_rows(y - half, y + half)
        m_strip, m_valid = moving_rows(y - half, y + half)
        valid = f_valid if m_valid is None else (m_valid if f_valid is None else f_valid & m_valid)
        for j in range(gw):
            x = j * stride
            if x - half < 0 or x + half > w:
                continue
            v = None if valid is None else valid[:, x - half:x + half]
            if v is not None and v.mean() < min_valid:
                continue
            pending.append((i, j, np.asarray(f_strip[:, x - half:x + half], np.float32),
                            np.asarray(m_strip[:, x - half:x + half], np.float32), v))
            if len(pending) >= BATCH:
                run()
    run()
    return Flow(vec, qual, stride)


def patch_flow(
    fixed: np.ndarray, moving: np.ndarray, valid: np.ndarray | None, *, stride: int = 32,
    patch: int = 64, max_shift: float = 8.0, min_valid: float = 0.6, xp: ModuleType = np,
) -> Flow:
    """`flow_rows` over two equal-shaped images in RAM, `valid` where both hold data."""
    def fixed_rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        return fixed[y0:y1], None if valid is None else valid[y0:y1]

    def moving_rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        return moving[y0:y1], None

    return flow_rows(fixed_rows, moving_rows, fixed.shape, stride=stride, patch=patch, max_shift=max_shift,
                     min_valid=min_valid, xp=xp)


def clean_flow(flow: Flow, *, min_quality_frac: float = 0.4, max_dev_px: float = 3.0) -> np.ndarray:
    """Weights (gh, gw) in 0..1: 0 for unmeasured nodes, weak peaks (below `min_quality_frac`
    of the median sharpness) and vectors more than `max_dev_px` from their neighbours'
    median (the SOFIMA-style local consistency check)."""
    q = flow.quality
    measured = q > 0
    if not measured.any():
        return np.zeros_like(q)
    med_q = float(np.median(q[measured]))
    ok = measured & (q >= min_quality_frac * med_q)
    vec = flow.vectors
    keep = ok.copy()
    for i, j in zip(*np.nonzero(ok), strict=True):
        ys, xs = slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2)
        nb = ok[ys, xs].copy()
        nb[i - ys.start, j - xs.start] = False
        if nb.sum() < 2:
            continue
        med = np.median(vec[ys, xs][nb], axis=0)
        if np.hypot(*(vec[i, j] - med)) > max_dev_px:
            keep[i, j] = False
    return np.where(keep, np.clip(q / med_q, 0, 1), 0).astype(np.float32)


def second_differences(gh: int, gw: int) -> sp.csr_matrix:
    """Stacked operators u_xx, sqrt(2) u_xy, u_yy on a gh x gw grid (thin-plate energy)."""
    idx = np.arange(gh * gw).reshape(gh, gw)
    rows, cols, vals = [], [], []
    r = 0

    def add(terms: list[tuple[np.ndarray, float]]) -> None:
        nonlocal r
        m = terms[0][0].size
        for ids, c in terms:
            rows.append(np.arange(r, r + m))
            cols.append(ids.ravel())
            vals.append(np.full(m, c))
        r += m

    if gw >= 3:
        add([(idx[:, :-2], 1.0), (idx[:, 1:-1], -2.0), (idx[:, 2:], 1.0)])
    if gh >= 3:
        add([(idx[:-2, :], 1.0), (idx[1:-1, :], -2.0), (idx[2:, :], 1.0)])
    if gh >= 2 and gw >= 2:
        s2 = np.sqrt(2.0)
        add([(idx[:-1, :-1], s2), (idx[1:, 1:], s2), (idx[:-1, 1:], -s2), (idx[1:, :-1], -s2)])
    if not rows:
        return sp.csr_matrix((0, gh * gw))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(r, gh * gw))


def relax_mesh(flow: Flow, weight: np.ndarray, *, stiffness: float = 0.3, tension: float = 1e-3) -> np.ndarray:
    """Equilibrium of the elastic mesh, one node per grid point: node u_i is tied to its
    measured vector by a spring of strength weight_i, resists bending with `stiffness`
    (thin-plate energy: second differences, so a uniform stretch or turn costs nothing)
    and its neighbours with a weak `tension`. Minimises
    sum w_i |u_i - d_i|^2 + stiffness |D2 u|^2 + tension sum_edges |u_i - u_j|^2.
    Nodes without data (outliers, no overlap) follow the plate: linear, not constant,
    extrapolation toward the section's edges. Returns the field (gh, gw, 2)."""
    gh, gw = weight.shape
    n = gh * gw
    idx = np.arange(n).reshape(gh, gw)
    a = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    b = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    adj = sp.coo_matrix((np.ones(a.size), (a, b)), shape=(n, n))
    adj = adj + adj.T
    lap = sp.diags(np.asarray(adj.sum(axis=1)).ravel()) - adj
    d2 = second_differences(gh, gw)
    w = weight.ravel().astype(np.float64)
    # A tiny pull to zero keeps the system regular where no node has data.
    mat = (sp.diags(w + 1e-6) + stiffness * (d2.T @ d2) + tension * lap).tocsc()
    solve = spla.factorized(mat)
    d = flow.vectors.reshape(n, 2).astype(np.float64)
    u = np.stack([solve(w * d[:, 0]), solve(w * d[:, 1])], -1)
    return u.reshape(gh, gw, 2).astype(np.float32)
