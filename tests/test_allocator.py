"""Large temporaries are reused by the process instead of faulted in afresh each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tapescope.allocator import keep_large_blocks

# Renders a 2x2 montage of 2048 px tiles block by block and counts the page faults it took.
CHILD = r"""
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from tapescope.allocator import keep_large_blocks
    assert keep_large_blocks()
from tapescope.montage.render import render_block
from tapescope.montage.transform import SectionTransform
rng = np.random.default_rng(0)
n = 2048
tiles = [rng.uniform(0, 1000, (n, n)).astype(np.float32) for _ in range(4)]
pos = np.array([[0.0, 0.0], [0.0, 0.9 * n], [0.9 * n, 0.0], [0.9 * n, 0.9 * n]])
t = SectionTransform(np.array([[1.0, -0.02, 3.0], [0.02, 1.0, -2.0]]))
render_block(tiles, pos, t, (0, 0, 1024, 1024))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
side = int(1.9 * n)
for y in range(0, side, 1024):
    for x in range(0, side, 1024):
        render_block(tiles, pos, t, (y, x, min(1024, side - y), min(1024, side - x)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, side * side * 4 // 4096)
"""


def _faults(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    faults, pages = out.stdout.split()[-2:]
    return int(faults), int(pages)


def test_render_temporaries_are_reused_without_new_page_faults() -> None:
    if not keep_large_blocks():
        pytest.skip("no glibc mallopt on this platform")
    (default, pages), (kept, _) = _faults("default"), _faults("keep")
    # By default glibc hands the render's multi-MiB temporaries back and faults them in again
    # (20,000-50,000 faults here, for 14,785 pages of output); kept, the first block's memory
    # serves the rest (~450).
    assert kept < pages // 5, (kept, pages)
    assert default > 10 * kept, (default, kept)
