"""`tapescope align` on real tissue whose true alignment is physical: consecutive FIB-SEM
slices (../shared/data next to the repository; skipped without it), each turned and shifted
by a known amount. The aligned sections must land where the slices lie, up to the one map
common to all sections and the tissue's own pull (docs/alignment.md, "On real stacks")."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from tapescope.alignment.stack import align_stack, write_stack
from tapescope.montage.omezarr import Volume

FIBSEM = Path(__file__).resolve().parents[2] / "shared" / "data" / "fibsem_medulla"
SLICES = list(range(0, 40, 5))       # every 5th 10 nm slice: 50 nm sections


def _known_moves(n: int, shape: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Per section the 2x3 map output px -> slice px: a turn of up to 3 deg about the
    centre and a shift of up to 25 px."""
    rng = np.random.default_rng(seed)
    h, w = shape
    return [cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(rng.uniform(-3, 3)), 1.0)
            + np.array([[0, 0, rng.uniform(-25, 25)], [0, 0, rng.uniform(-25, 25)]]) for _ in range(n)]


@pytest.mark.skipif(not (FIBSEM / "0.png").is_file(), reason="real FIB-SEM data not next to the repository")
def test_real_sections_land_where_the_slices_lie(tmp_path: Path) -> None:
    slices = [cv2.imread(str(FIBSEM / f"{i}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) for i in SLICES]
    shape = slices[0].shape
    moves = _known_moves(len(slices), shape, seed=4)
    images = []
    for img, m in zip(slices, moves, strict=True):
        moved = cv2.warpAffine(img, m, shape[::-1], flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        images.append(np.maximum(moved, 1.0) * 256)     # 0 is "not imaged"
        images[-1][cv2.warpAffine(np.ones(shape, np.float32), m, shape[::-1],
                                  flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) == 0] = 0
    zs = list(range(len(slices)))
    write_stack(tmp_path / "stack", images, zs)
    res = align_stack(tmp_path / "stack", tmp_path / "out")
    assert [o.status for o in res.sections] == ["ok"] * len(zs)

    vol = Volume.open(res.volume)
    h, w = shape
    gy, gx = np.mgrid[64:h - 64:8, 64:w - 64:8].astype(np.float64)
    out = np.stack([gx.ravel(), gy.ravel()], 1)
    found = []
    for z, m in zip(zs, moves, strict=True):
        sx, sy = vol.load_transform(z).apply(out[:, 0], out[:, 1])      # output -> this section's px
        found.append(np.stack([sx, sy, np.ones_like(sx)], 1) @ m.T)     # ...-> its slice's px
    # The one map common to all sections is no error (nothing in the data fixes it).
    design = np.column_stack([np.tile(out, (len(zs), 1)), np.ones(len(zs) * len(out))])
    g, *_ = np.linalg.lstsq(design, np.concatenate(found), rcond=None)
    err = [f - np.column_stack([out, np.ones(len(out))]) @ g for f in found]
    rms = float(np.sqrt(np.mean([(e ** 2).sum(1).mean() for e in err])))
    local = float(np.sqrt(np.mean([((b - a) ** 2).sum(1).mean() for a, b in pairwise(err)])))
    # Measured: 1.96 px RMS, 1.27 px between neighbours (the tissue's own pull, as in the
    # bench). The known moves are up to 25 px and 3 deg (13 px at the corners), so an aligner
    # that did nothing is 20 px off here (30 px between neighbours).
    assert rms < 3.0, rms
    assert local < 2.0, local
