"""Array module for the heavy maths: NumPy, or CuPy where a GPU is present.

`--device cpu|gpu|auto` picks it. `auto` uses CuPy only where it imports, sees a device
and runs kernels on it (`tapescope/gpu.py`, shared with stitching), so the same code runs
on a laptop, in CI (no GPU) and on a GPU node.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from tapescope.gpu import probe

DEVICES = ("auto", "cpu", "gpu")


def gpu_available() -> bool:
    return probe()[0] is not None


def array_module(device: str = "auto") -> ModuleType:
    """numpy or cupy for `device`; 'gpu' without a usable GPU is an error, not a fallback."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return np
    cp = probe()[0]
    if cp is None:
        if device == "gpu":
            raise RuntimeError(f"device 'gpu' asked for, but {probe()[1]}")
        return np
    return cp


def to_numpy(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
