"""Render the simulator's pictures in docs/img: python docs/sim_figures.py

sim_tile.png      one 1024x1024 camera frame at imaging magnification (raw: vignetting, dust, noise)
sim_overview.png  one frame at overview magnification (16x larger pixels): the slot aperture in
                  the opaque tape, the section inside it
sim_slots.png     overview frames of slots with different truth (intact, fold, tear, resin, empty)
sim_focus.png     the same field in focus and defocused by 2 and 5 um
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tapescope.sim_hardware.world import SimWorld, WorldParams

IMG = Path(__file__).parent / "img"


def to8(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(np.percentile(img, 0.5)) if lo is None else lo
    hi = float(np.percentile(img, 99.5)) if hi is None else hi
    return np.clip((img.astype(np.float32) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img.copy()
    cv2.putText(out, text, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 200, 255), 2, cv2.LINE_AA)
    return out


def main() -> None:
    IMG.mkdir(exist_ok=True)
    w = SimWorld(WorldParams(seed=1, n_slots=20, tile_px=(1024, 1024), section_px=(2560, 2560),
                             slot_rotation_sigma_deg=3.0))
    w.column.focus_nm = w.true_focus_nm(0)
    tile = w.expose(20.0)
    cv2.imwrite(str(IMG / "sim_tile.png"), to8(tile))

    w.column.magnification = 300.0
    dark = w.p.dark_offset
    full = w.p.electrons_per_ms * 20 * w.p.counts_per_electron + dark
    overview = w.expose(20.0)
    cv2.imwrite(str(IMG / "sim_overview.png"), to8(overview, dark, full))

    panels = []
    wanted = {"intact": 0, "fold": None, "tear": None, "resin": None, "empty": None}
    for t in w.slot_truth:
        kind = "empty" if not t.tissue else (t.damage[0] if t.damage else "intact")
        if kind in wanted and wanted[kind] is None:
            wanted[kind] = t.slot
    for kind, slot in wanted.items():
        if slot is None:
            continue
        w.tape.slot = slot
        w.column.focus_nm = w.true_focus_nm(slot)
        img = to8(w.expose(20.0), dark, full)[320:704, 320:704]   # the aperture and its surround
        panels.append(label(img, f"slot {slot}: {kind} ({w.slot_rotation_deg[slot]:+.1f} deg)"))
    cv2.imwrite(str(IMG / "sim_slots.png"), np.hstack(panels))

    w.tape.slot, w.column.magnification = 0, w.p.imaging_mag
    crops = []
    for defocus in (0.0, 2000.0, 5000.0):
        w.column.focus_nm = w.true_focus_nm(0) + defocus
        crops.append(label(to8(w.expose(20.0)[256:768, 256:768]), f"defocus {defocus / 1000:g} um"))
    cv2.imwrite(str(IMG / "sim_focus.png"), np.hstack(crops))
    print(f"wrote {IMG}/sim_tile.png, sim_overview.png, sim_slots.png, sim_focus.png")


if __name__ == "__main__":
    main()
