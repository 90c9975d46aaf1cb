"""The synthetic specimen: deterministic by seed, continuous along z, and moving between
sections in patches as real tissue does (measured in bench/bench_specimen_drift.py)."""

from __future__ import annotations

import cv2
import numpy as np

from tapescope.neurites import NeuriteParams as SpecimenParams
from tapescope.neurites import NeuriteSpecimen as Specimen

# As the FIB-SEM stack: a block face, without the fine texture a TEM projects through a section.
FIB_LIKE = SpecimenParams(height_px=260, width_px=260, pixel_nm=10.0, thickness_nm=50.0, n_sections=8, seed=5,
                          projected_texture=0.0)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_same_seed_same_sections_and_another_seed_other_ones() -> None:
    a, b = Specimen(FIB_LIKE), Specimen(FIB_LIKE)
    other = Specimen(SpecimenParams(**{**FIB_LIKE.__dict__, "seed": 6}))
    s = a.section(3)
    assert s.dtype == np.float32 and s.shape == (260, 260)
    assert 0.0 < s.min() and s.max() <= 1.0
    assert np.array_equal(s, b.section(3))
    assert ncc(s, other.section(3)) < 0.2


def test_neighbours_alike_and_alikeness_falls_with_distance() -> None:
    spec = Specimen(FIB_LIKE)
    s = [spec.section(i) for i in range(7)]
    near = ncc(s[2], s[3])
    assert 0.5 < near < 0.95                     # real FIB-SEM at 50 nm: 0.62-0.75
    assert ncc(s[2], s[4]) < near
    assert ncc(s[0], s[6]) < ncc(s[2], s[4])


def test_patches_move_between_sections_and_keep_moving() -> None:
    """A patch's content is found a little way off in the next section, and further in
    the one after: the tissue's own movement, not jitter."""
    spec = Specimen(FIB_LIKE)
    s = [spec.section(i) for i in range(3)]
    moves = []
    for k in (1, 2):
        corr = cv2.matchTemplate(s[k][40:220, 40:220], s[0][60:200, 60:200], cv2.TM_CCOEFF_NORMED)
        _, _, _, (x, y) = cv2.minMaxLoc(corr)
        moves.append(np.hypot(y - 20, x - 20))
    assert moves[1] >= moves[0]


def test_a_section_is_rendered_in_reasonable_time() -> None:
    import time

    spec = Specimen(SpecimenParams(height_px=1024, width_px=1024, n_sections=2))
    t = time.perf_counter()
    spec.section(1)
    assert time.perf_counter() - t < 2.0       # ~0.25 s on one idle core
