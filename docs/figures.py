"""Render the pictures in docs/img from a demo run: python docs/figures.py [DEMO_OUT]."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr


def to8(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    vals = img[mask] if mask is not None else img
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return np.clip((img.astype(np.float32) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def main(out: Path) -> None:
    img_dir = Path(__file__).parent / "img"
    img_dir.mkdir(exist_ok=True)
    tile = tifffile.imread(out / "run" / "tiles" / "slot_00000" / "r000_c000.tif")
    cv2.imwrite(str(img_dir / "sim_tile.png"), to8(tile))
    group = zarr.open_group(str(out / "volume.zarr"), mode="r")
    level = group["1"][:]
    planes = [to8(p, p > 0) for p in level]
    cv2.imwrite(str(img_dir / "demo_volume_z.png"), np.hstack(planes))
    print(f"wrote {img_dir}/sim_tile.png and demo_volume_z.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
