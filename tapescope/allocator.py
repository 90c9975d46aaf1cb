"""Keep large NumPy temporaries in the process instead of handing them back to the kernel.

glibc serves allocations above its mmap threshold (128 KiB, raised on the fly up to the
size of a freed block) with fresh mappings and returns the free top of the heap beyond its
trim threshold. Rendering, flat-fielding and alignment make and drop arrays of 1-16 MiB
thousands of times a section: each came back as new zero pages, faulted in one by one.
Fixing the thresholds lets freed arrays be reused: rendering 4x4 tiles of 2048 px went
from 65 to 105 Mpx/s (`bench_montage.allocator_effect`, docs/montage.md). The cost is memory the process keeps: up to
TRIM_BYTES of free heap, on top of what it had at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20    # blocks up to a 2048^2 float32 write unit (16 MiB) come from the heap
TRIM_BYTES = 128 << 20   # free heap kept for reuse before it goes back to the kernel

_done: bool | None = None


def keep_large_blocks() -> bool:
    """Set glibc's thresholds once per process; False where there is no glibc (the speed-up
    is lost, nothing else)."""
    global _done
    if _done is None:
        _done = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            log.info("no glibc mallopt here: large arrays are allocated as the C library does by default")
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
        if not _done:
            log.warning("mallopt refused the thresholds: rendering runs at about half its speed")
    return _done
