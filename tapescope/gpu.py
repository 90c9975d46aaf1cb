"""Whether this host has a GPU that tapescope can use, asked once per process.

Stitching (`stitching/backend.py`) and montage/alignment (`montage/array_backend.py`) both run on
CuPy where it works. "Works" means more than a device count: CuPy must import, see a CUDA
device, and compile and run what this package runs there (an FFT and a map_coordinates);
a card without a working compiler (no NVRTC, a driver too old for it) would otherwise
pass the count and fail halfway through a run.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def probe() -> tuple[ModuleType | None, str]:
    """(cupy, "") where it works, else (None, why not, in words for an error message)."""
    try:
        cupy = importlib.import_module("cupy")
        ndimage = importlib.import_module("cupyx.scipy.ndimage")
    except ImportError:
        return None, "CuPy is not installed (pip install 'tapescope[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy is installed but sees no GPU"
        a = cupy.arange(16, dtype=cupy.float32).reshape(4, 4)
        ndimage.map_coordinates(a, cupy.ones((2, 1), cupy.float32), order=1, mode="grid-constant",
                                output=cupy.float32)
        cupy.fft.fft2(a).get()
    except Exception as exc:  # CUDA runtime, driver, compiler: all mean "no usable GPU here"
        return None, f"CuPy is installed but cannot run on the GPU: {type(exc).__name__}: {exc}"
    return cupy, ""
