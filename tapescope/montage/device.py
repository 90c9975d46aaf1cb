"""Array module for the heavy maths: NumPy, or CuPy where a GPU is present.

`--device cpu|gpu|auto` picks it. `auto` uses CuPy only when it imports *and* sees a
device, so the same code runs on a laptop, in CI (no GPU) and on a GPU node.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "gpu")


@functools.cache
def _cupy() -> ModuleType | None:
    """CuPy if it imports, sees a device and can run what this package runs there: a GPU
    whose kernels cannot be compiled (no NVRTC, a driver too old for the card) would pass a
    device count and fail mid-run instead."""
    try:
        import cupy  # type: ignore[import-not-found]
        import cupyx.scipy.ndimage  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        probe = cupy.arange(16, dtype=cupy.float32).reshape(4, 4)
        cupyx.scipy.ndimage.map_coordinates(probe, cupy.ones((2, 1), cupy.float32), order=1,
                                            mode="grid-constant", output=cupy.float32)
        cupy.fft.fft2(probe).get()
        return cupy
    except Exception:  # no cupy, no driver, no device, no compiler: all mean "no GPU here"
        return None


def gpu_available() -> bool:
    return _cupy() is not None


def array_module(device: str = "auto") -> ModuleType:
    """numpy or cupy for `device`; 'gpu' without a usable GPU is an error, not a fallback."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return np
    cp = _cupy()
    if cp is None:
        if device == "gpu":
            raise RuntimeError("device 'gpu' asked for, but CuPy or a CUDA device is not available "
                               "(install the 'gpu' extra: pip install 'tapescope[gpu]')")
        return np
    return cp


def to_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
