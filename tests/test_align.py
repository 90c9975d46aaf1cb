"""Section alignment against stacks with known transforms (one specimen image, warped)."""

from __future__ import annotations

import numpy as np
import pytest

from tapescope.alignment.align import align_section, coarse_affine
from tapescope.alignment.flow import Flow, clean_flow, relax_mesh
from tapescope.montage.synthetic import make_stack
from tapescope.montage.transform import SectionTransform

SHAPE = (384, 384)


def rms(r: np.ndarray) -> float:
    return float(np.sqrt((r ** 2).mean()))


@pytest.fixture(scope="module")
def stack():
    return make_stack(4, SHAPE, seed=5, max_rotation_deg=5, max_shift_px=60, elastic_px=2.0, missing=(2,),
                      partial=(3,))


def test_coarse_recovers_rotation_of_several_degrees() -> None:
    st = make_stack(2, SHAPE, seed=1, max_rotation_deg=0.1, max_shift_px=40, elastic_px=0.0, missing=())
    # Section 1 again, turned by a known 6 degrees about the centre (beyond the generator's 5).
    import cv2
    rot = cv2.getRotationMatrix2D(((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2), 6.0, 1.0)
    turned = cv2.warpAffine(st.images[1], rot, SHAPE[::-1], borderValue=float(st.images[1].mean()))
    _, conf, angle = coarse_affine(st.images[0], turned)
    true_rel = -st.truth[1].angle_deg  # the generator turns raw -> base
    assert conf > 0.5
    assert angle == pytest.approx(true_rel - 6.0, abs=0.3)


def test_elastic_alignment_is_sub_pixel(stack) -> None:
    a = align_section(stack.images[0], stack.images[1])
    coarse = align_section(stack.images[0], stack.images[1], elastic=False)
    r_fine = stack.residual(1, a.transform)
    r_coarse = stack.residual(1, coarse.transform)
    assert r_fine.size > 1000
    assert rms(r_fine) < 0.5
    assert rms(r_fine) < rms(r_coarse)   # the elastic stage removes what an affine cannot
    assert a.flow_nodes > 20 and a.transform.field is not None


def test_elastic_alignment_on_block_means_is_sub_pixel_with_a_quarter_of_the_patches(stack) -> None:
    """The flow measured on 2 x 2 block means (patches of twice the tissue, a node every 64 px)
    still undoes the elastic field to below half a pixel, with a quarter of the nodes."""
    full = align_section(stack.images[0], stack.images[1])
    half = align_section(stack.images[0], stack.images[1], scale=2)
    r = stack.residual(1, half.transform)
    assert r.size > 1000
    assert rms(r) < 0.5
    assert rms(r) < rms(stack.residual(1, align_section(stack.images[0], stack.images[1], elastic=False).transform))
    assert half.stride == 2 * full.stride and half.transform.field is not None
    assert 0 < half.flow_nodes < 0.4 * full.flow_nodes


def test_partial_roi_overlap(stack) -> None:
    # Section 3 was imaged over only its left 60 %: its valid mask says so.
    a = align_section(stack.images[1], stack.images[3], stack.valid[1], stack.valid[3])
    t1 = align_section(stack.images[0], stack.images[1]).transform
    chained = t1.then(a.transform, SHAPE)
    r = stack.residual(3, chained, chain={1: t1})
    assert a.confidence > 0.5
    assert r.size > 300
    assert rms(r) < 0.6


def test_blank_neighbour_does_not_register(stack) -> None:
    a = align_section(stack.images[1], stack.images[2])
    assert a.confidence < 0.3    # a blank section must not look aligned


def test_mesh_fills_outliers_from_neighbours() -> None:
    gy, gx = np.mgrid[0:9, 0:9].astype(np.float32)
    vec = np.stack([0.1 * gx, -0.05 * gy], -1)   # a uniform stretch: costs the plate nothing
    noisy = vec.copy()
    noisy[4, 4] = (9.0, -7.0)                    # one wild vector
    flow = Flow(noisy, np.ones((9, 9), np.float32), 32)
    w = clean_flow(flow)
    assert w[4, 4] == 0 and (w > 0).sum() == 80
    u = relax_mesh(flow, w)
    assert np.abs(u - vec).max() < 0.05


def test_transform_compose_and_roundtrip(tmp_path) -> None:
    gy, gx = np.mgrid[0:8, 0:8].astype(np.float32)

    def smooth(ph: float) -> np.ndarray:   # a few px over hundreds of px, like real warps
        return np.stack([2 * np.sin(gx / 2.5 + ph), 1.5 * np.cos(gy / 3 - ph)], -1).astype(np.float32)

    a = SectionTransform(np.array([[0.99, -0.05, 3.0], [0.05, 0.99, -2.0]]), smooth(0.3), 32)
    b = SectionTransform(np.array([[1.0, 0.02, -5.0], [-0.02, 1.0, 7.0]]), smooth(1.7), 32)
    ab = a.then(b, (224, 224))
    y, x = np.mgrid[0:224:16, 0:224:16].astype(float)
    ix, iy = a.apply(x, y)
    ex, ey = b.apply(ix, iy)
    gx, gy = ab.apply(x, y)
    assert np.hypot(gx - ex, gy - ey).max() < 0.1   # fields of +-2 px, sampled on a grid
    a.save(tmp_path / "t.npz")
    back = SectionTransform.load(tmp_path / "t.npz")
    assert np.array_equal(back.matrix, a.matrix) and np.array_equal(back.field, a.field)
    # output_of undoes apply: a reference's matches carried into the volume's frame.
    ox, oy = a.output_of(ix, iy)
    assert np.hypot(ox - x, oy - y).max() < 1e-3
    assert np.hypot(*np.subtract(a.output_of(x, y), (x, y))).max() > 1.0     # not the identity


def test_batched_flow_matches_the_tile_registration() -> None:
    from tapescope.alignment.flow import batched_phase_correlate
    from tapescope.stitching.register import phase_correlate

    st = make_stack(1, (256, 256), seed=3, missing=(), elastic_px=0.0, max_shift_px=0.0)
    img = st.images[0]
    import cv2
    shifts = [(2.3, -1.6), (-4.75, 3.1), (0.4, 0.0)]
    a, b = [], []
    for dy, dx in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        moved = cv2.warpAffine(img, m, (256, 256), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP)
        a.append(moved[64:192, 64:192])   # moved(p) = img(p + s)
        b.append(img[64:192, 64:192])
    got, sharp = batched_phase_correlate(np.stack(a), np.stack(b), max_shift=16)
    for (dy, dx), g, ai, bi in zip(shifts, got, a, b, strict=True):
        # b(p) = a(p + s)  <=>  img(p) = img(p + shift + s): s = -shift
        assert g == pytest.approx((-dy, -dx), abs=0.08)
        ref = phase_correlate(ai, bi, max_shift=16)
        assert g == pytest.approx(ref[:2], abs=0.1)
    assert (sharp > 5).all()


def test_device_choice() -> None:
    from tapescope.montage.array_backend import array_module, gpu_available

    assert array_module("cpu") is np
    with pytest.raises(ValueError, match="device must be one of"):
        array_module("tpu")
    if gpu_available():
        assert array_module("gpu").__name__ == "cupy"
    else:
        assert array_module("auto") is np
        from tapescope.gpu import probe

        with pytest.raises(RuntimeError, match="device 'gpu' asked for, but CuPy") as err:
            array_module("gpu")
        assert probe()[1] in str(err.value)           # says why: not installed, no device, or no compiler


def test_flow_on_gpu_equals_cpu(stack) -> None:
    from tapescope.montage.array_backend import array_module, gpu_available

    if not gpu_available():
        pytest.skip("no CuPy or no CUDA device here")
    from tapescope.alignment.flow import patch_flow
    cpu = patch_flow(stack.images[0], stack.images[0], None, stride=64, patch=64, max_shift=8)
    gpu = patch_flow(stack.images[0], stack.images[0], None, stride=64, patch=64, max_shift=8,
                     xp=array_module("gpu"))
    assert np.allclose(cpu.vectors, gpu.vectors, atol=0.05)


class _Counting:
    """An image that records the size of every read (as a memory-mapped TIFF would serve)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, key: tuple[slice, slice] | slice) -> np.ndarray:
        out = self.data[key]
        self.reads.append(out.size)
        return out


def test_alignment_reads_sections_in_strips(stack, monkeypatch: pytest.MonkeyPatch) -> None:
    import tapescope.alignment.align as align_mod
    import tapescope.alignment.flow as flow_mod

    monkeypatch.setattr(align_mod, "STRIP_ROWS", 64)
    monkeypatch.setattr(flow_mod, "STRIP_PX", 96 * SHAPE[1])
    fixed, moving = _Counting(stack.images[0]), _Counting(stack.images[1])
    a = align_section(fixed, moving)
    whole = SHAPE[0] * SHAPE[1]
    for img in (fixed, moving):
        assert img.reads and max(img.reads) <= whole // 3      # never the whole section at once
    assert rms(stack.residual(1, a.transform)) < 0.5            # and the same accuracy
    # With the flow on 2 x 2 block means, a strip of reduced rows is 4x the pixels read.
    monkeypatch.setattr(flow_mod, "STRIP_PX", 48 * SHAPE[1])
    fixed, moving = _Counting(stack.images[0]), _Counting(stack.images[1])
    align_section(fixed, moving, scale=2, patch=32, stride=16)
    for img in (fixed, moving):
        assert img.reads and max(img.reads) <= whole // 3


def test_chance_confidence_separates_a_neighbour_from_the_wrong_tissue() -> None:
    """The same search on a mirrored section is what agreement by chance looks like: a
    neighbour agrees clearly better than that, another specimen does not."""
    from tapescope.alignment.align import CHANCE_FACTOR, CHANCE_MAX

    st = make_stack(2, (384, 384), seed=8, max_rotation_deg=3, max_shift_px=20, elastic_px=0.5, missing=())
    wrong = make_stack(1, (384, 384), seed=77, missing=()).images[0]
    good = align_section(st.images[0], st.images[1], elastic=False)
    bad = align_section(st.images[0], wrong, elastic=False)
    assert good.confidence >= CHANCE_FACTOR * good.chance > 0
    assert bad.chance <= CHANCE_MAX and bad.confidence < CHANCE_FACTOR * bad.chance


def test_an_affine_is_kept_only_within_what_neighbouring_sections_can_differ_by() -> None:
    """3 % more compression: the affine explains it and is kept. 12 %: no neighbour differs so
    much (an affine that large on real data fits noise), and the rigid fit stays."""
    import cv2

    img = make_stack(1, (512, 512), seed=3, missing=()).images[0]
    c = (255.5, 255.5)

    def stretched(k: float) -> np.ndarray:
        m = np.array([[k, 0, (1 - k) * c[0]], [0, 1.0, 0]])          # along x only, about the centre
        return cv2.warpAffine(img, m, (512, 512), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def strain(k: float) -> float:
        t, _, _ = coarse_affine(img, stretched(k))
        return float(np.abs(np.linalg.svd(np.asarray(t.matrix)[:2, :2], compute_uv=False) - 1).max())

    assert 0.02 < strain(1.03) < 0.04
    assert strain(1.12) < 0.01


def test_null_sigma_is_the_spread_of_chance_agreement() -> None:
    """The NCC of unrelated images spreads as their texture allows: fine texture, little;
    coarse texture (few independent samples), much. null_sigma predicts the spread measured
    over many unrelated pairs."""
    import cv2

    from tapescope.alignment.align import null_sigma

    rng = np.random.default_rng(5)
    ok = np.ones((96, 96), bool)
    for blur in (0.0, 4.0):
        def field(blur: float = blur) -> np.ndarray:
            f = rng.standard_normal((96, 96)).astype(np.float32)
            return cv2.GaussianBlur(f, (0, 0), blur) if blur else f
        pairs = [(field(), field()) for _ in range(300)]
        measured = np.std([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])
        predicted = np.median([null_sigma(a, ok, b, ok) for a, b in pairs[:20]])
        assert predicted == pytest.approx(measured, rel=0.2), (blur, predicted, measured)
    assert measured > 5 / 96          # coarse texture: several times the 1/sqrt(N) of white noise
