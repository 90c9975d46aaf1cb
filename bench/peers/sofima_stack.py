"""Peer harness: aligns a stack of section images with Google's SOFIMA and writes coordinate maps.

This is a *peer* run side by side with tapescope's own alignment, never part of it. SOFIMA
(google-research/sofima, Apache-2.0; source at ``shared/peers/sofima``) runs from its own
virtual environment and is never a dependency of the project. Nothing of SOFIMA's code is
copied here: the script only imports and calls it, following its EM alignment notebook
(``em_alignment.ipynb``).

usage (venv set up as in ``shared/peers/README.md``)::

    PYTHONPATH=../shared/peers SOFIMA_VENV/bin/python bench/peers/sofima_stack.py \\
        IN_DIR OUT_DIR [--patch 64 --stride 16 --step 8 --min-patch-size N]

IN_DIR holds ``sections.csv`` (header ``file,z``) and 2-D greyscale TIFFs (uint8 or uint16, one
shape). Present sections are aligned in z order, each to the previous *present* one (gaps in z
are skipped over); the first present section is the reference frame and stays fixed.

Output
    ``OUT_DIR/maps.npz``: one float32 array per present section, key ``z_<z>``, of shape
    ``(ceil(H/step), ceil(W/step), 2)``. Entry ``[i, j]`` is, for the aligned-frame pixel
    ``(y, x) = (i*step, j*step)``, the ``(x, y)`` coordinate (x first) in that section's own raw
    input image whose content SOFIMA draws there (pixel-index coordinates: pixel ``k`` has
    coordinate ``k``, as in ``cv2.remap``). NaN where SOFIMA's inverse map is undefined (outside
    the convex hull of the section's mesh nodes as placed in the aligned frame, or next to a NaN
    node). The reference section gets the identity ``(j*step, i*step)``.
    ``OUT_DIR/timing.json``: seconds_total, seconds_per_section (total / present sections,
    JAX compilation included), patch, stride, min_patch_size, notes, and a per-stage breakdown.

Direction of the maps (checked, not assumed)
    ``flow_field.JAXMaskedXCorrWithStatsCalculator.flow_field(prev, curr)`` returns, at grid node
    ``p`` of ``curr``, the vector ``f`` with ``prev(p + f) == curr(p)``: a relative map from
    ``curr``'s raw coordinates into ``prev``'s (shifting ``curr`` by ``+(5, -3)`` px with
    ``cv2.warpAffine`` gives ``f = (-5, +3)``). Composing it with the previous section's solved map
    (``map_utils.compose_maps_fast(flow, solved_prev)`` = ``solved_prev(flow(p))``) and relaxing
    the mesh gives ``solved``, a *forward* map: raw section coordinates -> aligned frame.
    ``map_utils.invert_map`` turns it into the *inverse* map the notebook renders with
    (``warp.warp_subvolume`` reads, for each output point, the source coordinate in the image):
    aligned frame -> raw section coordinates. That inverse map is what is written.

Recipe (the notebook's), and exactly what differs
    1. Flow fields between consecutive present sections at 1x and 2x with
       ``JAXMaskedXCorrWithStatsCalculator`` (batch 256), padded with NaN by
       ``patch // 2 // stride`` nodes on each side, as the notebook does.
       Changed: the 2x images are made here with ``cv2.resize(INTER_AREA)`` (2x2 area mean, after
       cropping an odd last row/column) where the notebook reads a precomputed area-averaged 2x
       volume; images come from TIFFs in memory, not tensorstore; JAX runs on the CPU (the
       notebook asserts a GPU).
       Changed: ``patch // 2`` must be a multiple of ``stride`` (else the script stops). The
       notebook's padding puts flow node ``i`` at pixel ``i*stride`` only then (160/40 does);
       otherwise every node would sit ``patch//2 mod stride`` px off.
    2. ``flow_utils.clean_flow`` on both (min_peak_ratio 1.6, min_peak_sharpness 1.6,
       max_magnitude 80, max_deviation 20: the notebook's values, unchanged); the 2x flow is
       upsampled with ``map_utils.resample_map`` and doubled, as in the notebook.
    3. ``flow_utils.reconcile_flows(max_gradient=0, max_deviation=20, min_patch_size=M)``.
       Changed: M. The notebook's 400 is an area in flow-grid cells on a 126 x 126 grid (5000 px
       at stride 40), i.e. 2.5 % of the grid; on a 512 px section (33 x 33 grid at stride 16) 400
       would remove every vector. M is scaled to the same fraction of this grid:
       ``M = max(1, round(400 * gy * gx / 126**2))`` (27 for 33 x 33), unless given.
    4. Mesh relaxation, sections one after another, the first fixed (zero map), with the
       notebook's ``mesh.IntegrationConfig`` (dt 0.001, gamma 0, k0 0.01, k 0.1, 1000 iterations
       per step up to 100000, stop_v_max 0.005, dt_max 1000, cap 0.01 -> 10,
       prefer_orig_order), unchanged.
    5. ``map_utils.invert_map`` over the flow grid, as in the notebook.
    6. Added (the notebook renders instead): the inverse map, in absolute form
       (``map_utils.to_absolute``), is sampled at every ``step``-th pixel by bilinear
       interpolation over the node grid, extrapolating past the last node, the way
       ``warp.warp_subvolume`` densifies it before ``cv2.remap``.

Parameters
    The notebook's 160 px patch / 40 px stride are for ~10 nm/px and 5000 px sections. At
    ~4 nm/px on 512 px sections the same physical patch (~400 px) would be nearly the whole
    section and leave a 3 x 3 grid, so the defaults are patch 64, stride 16: the notebook's
    patch/stride ratio of 4 and its padding of 2 nodes, a 33 x 33 node grid (node 32 at pixel
    512, so the grid covers the whole section), and 64 px (~0.25-0.3 um) of context, which on
    ssTEM at ~4-5 nm/px holds several membranes/organelles to correlate. The 2x pass then
    correlates 128 px of 1x context and fills nodes where the 1x peak is ambiguous, which is the
    notebook's reason for it. Measured on the 16 real 512 px Cardona 2010 sections (CPU, 2 cores):
    64/16 keeps 84 % of the computed flow nodes after reconciling, 2.6 s/section; 96/24 74 %,
    3.0 s; 128/32 80 %, 6.4 s. Shift-equivariance (a stack of real sections shifted by
    (3i, -2i) px vs the same stack unshifted, centre 128 px) was within 2.2 / 1.8 / 1.1 px at
    section 5: the shifted stack's maps fall short of the known shift by ~0.3 px per 3.6 px step
    with 64 px patches, less with larger ones (consistent with the unmasked cross-correlation of
    differing sections favouring small shifts; on identical sections the shift is exact).

Checks (run on stacks built in /tmp, not part of the project)
    Same section shifted by (3i, -2i), z with gaps, uint16: every finite map entry exact (0.000 px).
    Section rotated 2 deg, scaled 1.01 and shifted: median 0.54 px from the expected ``M p``
    (95 % within 1.23 px) against 16.7 px from the reverse direction ``M^-1 p``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import time
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import tifffile
from connectomics.common import bounding_box
from scipy import interpolate
from sofima import flow_field, flow_utils, map_utils, mesh

# The notebook's settings (em_alignment.ipynb), kept as they are.
CLEAN = {"min_peak_ratio": 1.6, "min_peak_sharpness": 1.6, "max_magnitude": 80, "max_deviation": 20}
RECONCILE_MAX_DEVIATION = 20
NOTEBOOK_MIN_PATCH_SIZE = 400
NOTEBOOK_GRID_CELLS = 126 * 126  # 5000 px at patch 160, stride 40: (5000 - 120) // 40 + 2 * 2 nodes a side
BATCH_SIZE = 256


def read_stack(in_dir: Path) -> tuple[list[int], list[np.ndarray]]:
    """The present sections in z order: their z values and images as float32."""
    with open(in_dir / "sections.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["z"]))
    zs = [int(r["z"]) for r in rows]
    if len(set(zs)) != len(zs):
        raise SystemExit("sections.csv repeats a z value")
    images = [np.asarray(tifffile.imread(in_dir / r["file"]), dtype=np.float32) for r in rows]
    shapes = {im.shape for im in images}
    if len(shapes) != 1 or images[0].ndim != 2:
        raise SystemExit(f"sections must be 2-D images of one shape, got {sorted(shapes)}")
    return zs, images


def downsample_2x(image: np.ndarray) -> np.ndarray:
    """2x2 area mean (the notebook's 2x volume was made by area averaging)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return cv2.resize(image[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def pair_flows(images: list[np.ndarray], patch: int, stride: int) -> np.ndarray:
    """Flow of each section against the previous one, as [4, n - 1, gy, gx] (x, y, sharpness, ratio)."""
    mfc = flow_field.JAXMaskedXCorrWithStatsCalculator()
    flows = [
        mfc.flow_field(prev, curr, (patch, patch), (stride, stride), batch_size=BATCH_SIZE)
        for prev, curr in itertools.pairwise(images)
    ]
    flows_czyx = np.transpose(np.array(flows), [1, 0, 2, 3])
    pad = patch // 2 // stride
    return np.pad(flows_czyx, [[0, 0], [0, 0], [pad, pad], [pad, pad]], constant_values=np.nan)


def reconciled_flow(
    images: list[np.ndarray], patch: int, stride: int, min_patch_size: int | None
) -> tuple[np.ndarray, int, dict[str, float]]:
    """The notebook's 1x + 2x flow, cleaned and reconciled; returns (flow, min_patch_size, stats)."""
    flows1x = pair_flows(images, patch, stride)
    flows2x = pair_flows([downsample_2x(im) for im in images], patch, stride)
    f1 = flow_utils.clean_flow(flows1x, **CLEAN)
    f2 = flow_utils.clean_flow(flows2x, **CLEAN)

    box1x = bounding_box.BoundingBox(start=(0, 0, 0), size=(f1.shape[-1], f1.shape[-2], 1))
    box2x = bounding_box.BoundingBox(start=(0, 0, 0), size=(f2.shape[-1], f2.shape[-2], 1))
    scale = 0.5
    f2_hires = np.zeros_like(f1)
    for k in range(f2.shape[1]):
        f2_hires[:, k : k + 1] = map_utils.resample_map(f2[:, k : k + 1], box2x, box1x, 1 / scale, 1) / scale

    gy, gx = f1.shape[-2:]
    if min_patch_size is None:
        min_patch_size = max(1, round(NOTEBOOK_MIN_PATCH_SIZE * gy * gx / NOTEBOOK_GRID_CELLS))
    final = flow_utils.reconcile_flows(
        (f1, f2_hires), max_gradient=0, max_deviation=RECONCILE_MAX_DEVIATION, min_patch_size=min_patch_size
    )
    cells = float(gy * gx * f1.shape[1])
    stats = {
        "valid_raw_1x": float(np.isfinite(flows1x[0]).sum()) / cells,
        "valid_clean_1x": float(np.isfinite(f1[0]).sum()) / cells,
        "valid_clean_2x_upsampled": float(np.isfinite(f2_hires[0]).sum()) / cells,
        "valid_reconciled": float(np.isfinite(final[0]).sum()) / cells,
    }
    return final, min_patch_size, stats


def relax(final_flow: np.ndarray, stride: int) -> np.ndarray:
    """The notebook's sequential mesh relaxation: [2, n, gy, gx] forward maps, section 0 the zero map."""
    config = mesh.IntegrationConfig(
        dt=0.001,
        gamma=0.0,
        k0=0.01,
        k=0.1,
        stride=(stride, stride),
        num_iters=1000,
        max_iters=100000,
        stop_v_max=0.005,
        dt_max=1000,
        start_cap=0.01,
        final_cap=10,
        prefer_orig_order=True,
    )
    solved = [np.zeros_like(final_flow[:, 0:1])]
    origin = jnp.array([0.0, 0.0])
    for k in range(final_flow.shape[1]):
        prev = map_utils.compose_maps_fast(final_flow[:, k : k + 1], origin, stride, solved[-1], origin, stride)
        x, _, _ = mesh.relax_mesh(np.zeros_like(solved[0]), prev, config)
        solved.append(np.array(x))
    return np.concatenate(solved, axis=1)


def dense_map(inv_abs: np.ndarray, stride: int, shape: tuple[int, int], step: int) -> np.ndarray:
    """Samples one section's absolute inverse map [2, gy, gx] at every step-th pixel -> (ny, nx, 2) (x, y)."""
    gy, gx = inv_abs.shape[-2:]
    nodes = (np.arange(gy) * float(stride), np.arange(gx) * float(stride))
    qy, qx = np.mgrid[0 : math.ceil(shape[0] / step), 0 : math.ceil(shape[1] / step)] * float(step)
    out = np.empty((*qy.shape, 2), np.float32)
    for c in range(2):
        ip = interpolate.RegularGridInterpolator(nodes, inv_abs[c], bounds_error=False, fill_value=None)
        out[..., c] = ip((qy, qx))
    return out


def identity_map(shape: tuple[int, int], step: int) -> np.ndarray:
    """The reference section's map: (x, y) = (j*step, i*step)."""
    qy, qx = np.mgrid[0 : math.ceil(shape[0] / step), 0 : math.ceil(shape[1] / step)] * float(step)
    return np.stack([qx, qy], axis=-1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("in_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--patch", type=int, default=64, help="flow patch size, px (notebook: 160 at ~10 nm/px)")
    ap.add_argument("--stride", type=int, default=16, help="flow grid stride, px (notebook: 40)")
    ap.add_argument("--step", type=int, default=8, help="pixel step of the written maps")
    ap.add_argument("--min-patch-size", type=int, default=None, help="reconcile area in grid cells (default: scaled)")
    args = ap.parse_args()
    if args.step < 1 or args.stride < 1 or args.patch <= args.stride:
        ap.error("need step >= 1, stride >= 1 and patch > stride")
    if (args.patch // 2) % args.stride:
        ap.error("patch // 2 must be a multiple of stride (the notebook's padding puts node i at pixel i*stride)")

    t0 = time.perf_counter()
    zs, images = read_stack(args.in_dir)
    shape = (images[0].shape[0], images[0].shape[1])
    t_read = time.perf_counter()
    maps = {f"z_{zs[0]}": identity_map(shape, args.step)}
    stats: dict[str, float] = {}
    min_patch_size = args.min_patch_size
    t_flow = t_mesh = t_read
    if len(images) > 1:
        final_flow, min_patch_size, stats = reconciled_flow(images, args.patch, args.stride, args.min_patch_size)
        gy, gx = final_flow.shape[-2:]
        print(f"flow grid {gy} x {gx} nodes at stride {args.stride}; reconcile min_patch_size = {min_patch_size}")
        print("fraction of flow nodes valid: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
        t_flow = time.perf_counter()
        solved = relax(final_flow, args.stride)
        t_mesh = time.perf_counter()
        box = bounding_box.BoundingBox(start=(0, 0, 0), size=(gx, gy, 1))
        inv_abs = map_utils.to_absolute(map_utils.invert_map(solved, box, box, args.stride), args.stride)
        for k in range(1, len(zs)):
            maps[f"z_{zs[k]}"] = dense_map(inv_abs[:, k], args.stride, shape, args.step)
    t_end = time.perf_counter()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(args.out_dir / "maps.npz", **maps)
    total = t_end - t0
    timing = {
        "seconds_total": total,
        "seconds_per_section": total / len(zs),
        "patch": args.patch,
        "stride": args.stride,
        "min_patch_size": min_patch_size,
        "step": args.step,
        "sections": len(zs),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "seconds_read": t_read - t0,
        "seconds_flow": t_flow - t_read,
        "seconds_mesh": t_mesh - t_flow,
        "seconds_invert_and_sample": t_end - t_mesh,
        "flow_valid_fraction": stats,
        "notes": (
            "SOFIMA em_alignment.ipynb recipe on CPU JAX (compilation included in the times): 1x+2x flows, "
            "clean_flow 1.6/1.6/80/20, reconcile_flows max_deviation 20 with min_patch_size scaled to the notebook's "
            "fraction of the flow grid, sequential mesh relaxation (first present section fixed), invert_map; "
            "maps give (x, y) in each section's raw image for aligned pixel (i*step, j*step), NaN where undefined."
        ),
    }
    (args.out_dir / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(f"{len(zs)} sections in {total:.1f} s ({total / len(zs):.2f} s/section) -> {args.out_dir}")


if __name__ == "__main__":
    main()
