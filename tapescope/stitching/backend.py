"""Array backends: NumPy/OpenCV on a CPU, CuPy on a GPU, behind the same few primitives.

Registration code is written once against `Backend.xp` (numpy or cupy) plus the
image primitives below; the two implementations agree to float32 rounding, so positions
from either device agree far inside the 0.01 px the issue asks for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Literal

import cv2
import numpy as np
from scipy import fft as scipy_fft

from tapescope.errors import TapescopeError
from tapescope.gpu import probe

Device = Literal["auto", "cpu", "gpu"]
SINC_TAPS = 4      # half-width of the windowed-sinc kernel used for sub-pixel shifts


class BackendUnavailable(TapescopeError, RuntimeError):
    """The requested device cannot be used here (no CuPy, or no GPU)."""


def sinc_kernel(fraction: float) -> np.ndarray:
    """Lanczos taps that sample a signal at offset `fraction` (0..1) from taps -3..4.

    The fraction enters exactly: OpenCV's remap and warpAffine round it to 1/32 px
    (OpenCV 4, and OpenCV 5 on integer or multi-channel images), a bias of up to
    0.016 px, which is a third of our accuracy target.
    """
    k = np.arange(-SINC_TAPS + 1, SINC_TAPS + 1) - fraction
    w = np.sinc(k) * np.sinc(k / SINC_TAPS)
    return (w / w.sum()).astype(np.float32)


def linear_kernel(fraction: float) -> np.ndarray:
    """Linear interpolation at offset `fraction` (0..1), laid out like `sinc_kernel` (taps
    -3..4): it reaches one pixel instead of four, for strips too narrow for the sinc."""
    k = np.zeros(2 * SINC_TAPS, np.float32)
    k[SINC_TAPS - 1], k[SINC_TAPS] = 1.0 - fraction, fraction
    return k


@dataclass(frozen=True)
class Backend:
    name: str
    xp: ModuleType
    fft: ModuleType                     # rfft2 / irfft2 (scipy.fft: faster than numpy's on a CPU)
    ndimage: ModuleType | None = None   # None: OpenCV does the filtering (the CPU path)

    def asarray(self, a: Any) -> Any:
        return self.xp.asarray(a, dtype=self.xp.float32)

    def to_host(self, a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def blur(self, img: Any, sigma: float, along: int | None = None) -> Any:
        """Gaussian blur; `along` = 0 or 1 blurs along that axis only."""
        if self.ndimage is None:
            if along is None:
                return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            k = cv2.getGaussianKernel(2 * int(np.ceil(4 * sigma)) + 1, sigma, cv2.CV_32F)
            one = np.ones(1, np.float32)
            kx, ky = (one, k) if along == 0 else (k, one)
            return cv2.sepFilter2D(img, -1, kx, ky, borderType=cv2.BORDER_REFLECT)
        sig = sigma if along is None else tuple(sigma if a == along else 0.0 for a in (0, 1))
        return self.ndimage.gaussian_filter(img, sig, mode="reflect", truncate=4.0)

    def lowpass(self, img: Any, size: int, along: int | None = None) -> Any:
        """Two passes of a size x size box filter (size odd): a cheap, wide, smooth low-pass;
        `along` = 0 or 1 filters along that axis only."""
        box = (size, size) if along is None else ((1, size) if along == 0 else (size, 1))   # (w, h) for OpenCV
        if self.ndimage is None:
            once = cv2.blur(img, box, borderType=cv2.BORDER_REFLECT)
            return cv2.blur(once, box, borderType=cv2.BORDER_REFLECT)
        sizes = (box[1], box[0])
        return self.ndimage.uniform_filter(self.ndimage.uniform_filter(img, sizes, mode="reflect"), sizes,
                                           mode="reflect")

    def bin(self, img: Any, factor: int) -> Any:
        """Mean of factor x factor blocks (edges that do not fill a block are dropped)."""
        f = self.asarray(img)
        if factor == 1:
            return f
        h, w = (n // factor * factor for n in f.shape)
        if self.ndimage is None:
            # OpenCV's area resize at an integer factor is the block mean, 10x faster than NumPy's.
            return cv2.resize(f[:h, :w], (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        return f[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))

    def sample_shifted(self, img: Any, shift: tuple[float, float],
                       linear: tuple[bool, bool] = (False, False)) -> Any:
        """img sampled at p + shift, same shape; the outer SINC_TAPS + |shift| px are not valid
        (1 + |shift| along an axis sampled `linear`ly)."""
        iy, ix = int(np.floor(shift[0])), int(np.floor(shift[1]))
        ky = (linear_kernel if linear[0] else sinc_kernel)(shift[0] - iy)
        kx = (linear_kernel if linear[1] else sinc_kernel)(shift[1] - ix)
        if self.ndimage is None:
            out = cv2.sepFilter2D(img, -1, kx, ky, anchor=(SINC_TAPS - 1, SINC_TAPS - 1),
                                  borderType=cv2.BORDER_REFLECT)
        else:
            correlate1d = self.ndimage.correlate1d
            # scipy centres a length-8 kernel at index 4; the taps here start at -3, so
            # shift the origin by one to sample at -3..4 like the OpenCV path.
            out = correlate1d(img, self.xp.asarray(ky), axis=0, mode="reflect", origin=-1)
            out = correlate1d(out, self.xp.asarray(kx), axis=1, mode="reflect", origin=-1)
        return self.xp.roll(out, (-iy, -ix), axis=(0, 1))


CPU = Backend("cpu", np, scipy_fft)


@cache
def _gpu() -> Backend:
    cupy, why = probe()
    if cupy is None:
        raise BackendUnavailable(f"the GPU backend: {why}")
    return Backend("gpu", cupy, cupy.fft, importlib.import_module("cupyx.scipy.ndimage"))


def get_backend(device: Device = "cpu") -> Backend:
    """`cpu`, `gpu` (raises BackendUnavailable where there is none) or `auto` (gpu if usable)."""
    if device == "cpu":
        return CPU
    if device == "gpu":
        return _gpu()
    if device == "auto":
        try:
            return _gpu()
        except BackendUnavailable:
            return CPU
    raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
