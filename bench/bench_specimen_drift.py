"""How the tissue moves between sections: real FIB-SEM against the simulator's specimen.

The same measurements on real sections and on ours, printed side by side:

- patch movement: each section pair cut into 130 px patches (a quarter section) on a
  half-overlapping grid, each found in the other section by normalised cross-correlation
  with a parabolic sub-pixel peak, the pair's global affine removed (what a
  section-to-section aligner takes out anyway); the median of what is left, at z distance
  1, 2 and 3;
- persistence along z: the correlation of a patch's step k -> k+1 movement with its step
  k+1 -> k+2 movement (1: tissue that keeps going the same way; 0: jitter);
- whole-image NCC of neighbours, and of sections 2, 4 and 10 apart, as the sections are (in
  register): how fast the tissue becomes other tissue;
- drift of a content-defined rigid chain: each section fitted rigidly to the one before
  from its patches, the fits composed over 23 sections, the mean displacement of the
  section's pixels at the end (the truth is the identity on both).

The FIB-SEM (`fibsem_medulla`, 10 nm isotropic, physically in register) is cut as every
5th slice, a 50 nm section; ours is rendered at the same pixel size and thickness. The
real ssTEM stacks are registered, not in register, so only their NCC is compared.

    python bench/bench_specimen_drift.py [--seeds 3] [--plot docs/img/specimen_vs_fibsem.png]

Reads ../shared/data/ (skips what is absent); never copies it.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tapescope.neurites import NeuriteParams as SpecimenParams
from tapescope.neurites import NeuriteSpecimen as Specimen

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAIN = 23
FAR = (4, 10)


@dataclass
class Stats:
    moves: dict[int, float]            # z distance -> median residual patch movement, px
    persistence: float
    ncc1: list[float]
    ncc2: list[float]
    chain_px: float
    far: dict[int, float]              # z distance -> mean NCC, how fast the tissue becomes another


def load_stack(name: str, step: int = 1, limit: int | None = None) -> list[np.ndarray] | None:
    folder = DATA / name
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.png"), key=lambda f: int(f.stem))[::step][:limit]
    return [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for f in files]


def fine_contrast(images: list[np.ndarray]) -> list[float]:
    """Mean over `images` of the RMS of three difference-of-Gaussian bands (0.7-1.5, 1.5-3,
    3-6 px) and of the gradient after a 1 px blur, each over the image's mean."""
    out = []
    for img in images:
        img = img.astype(np.float32) / float(img.mean())
        g = {sig: cv2.GaussianBlur(img, (0, 0), sig) for sig in (0.7, 1.0, 1.5, 3.0, 6.0)}
        gy, gx = np.gradient(g[1.0])
        out.append([float((g[a] - g[b]).std()) for a, b in ((0.7, 1.5), (1.5, 3.0), (3.0, 6.0))]
                   + [float(np.sqrt((gx**2 + gy**2).mean()))])
    return list(np.mean(out, 0))


def ours(size: int, pixel_nm: float, thickness_nm: float, n: int, seed: int,
         projected_texture: float = 0.0) -> tuple[list[np.ndarray], float]:
    """Our sections; against the FIB-SEM without the fine texture a TEM projects through a
    section (a block face shows none of it), against ssTEM with it."""
    spec = Specimen(SpecimenParams(height_px=size, width_px=size, pixel_nm=pixel_nm, thickness_nm=thickness_nm,
                                   n_sections=n, seed=seed, projected_texture=projected_texture))
    t = time.process_time()
    stack = [spec.section(i) for i in range(n)]
    return stack, (time.process_time() - t) / n


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def patch_moves(a: np.ndarray, b: np.ndarray, patch: int, search: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres (y, x) and where a's content at each moved to in b, px: each patch of a
    found in b by normalised cross-correlation within +-search px, the peak refined by a
    parabola through its neighbours on each axis."""
    h, w = a.shape
    centres, moves = [], []
    for y in range(search, h - patch - search + 1, patch // 2):      # half-overlapping patches
        for x in range(search, w - patch - search + 1, patch // 2):
            corr = cv2.matchTemplate(b[y - search:y + patch + search, x - search:x + patch + search],
                                     a[y:y + patch, x:x + patch], cv2.TM_CCOEFF_NORMED)
            _, _, _, (px, py) = cv2.minMaxLoc(corr)
            centres.append((y + patch / 2, x + patch / 2))
            moves.append((py + _vertex(corr[py - 1:py + 2, px]) - search,
                           px + _vertex(corr[py, px - 1:px + 2]) - search))
    return np.array(centres), np.array(moves)


def _vertex(v: np.ndarray) -> float:
    """Sub-pixel offset of the peak of three samples around the middle one (0 at an edge)."""
    if len(v) < 3:
        return 0.0
    d = v[0] - 2 * v[1] + v[2]
    return float(0.5 * (v[0] - v[2]) / d) if d < 0 else 0.0


def procrustes(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The rigid transform (3x3, homogeneous, y x) that takes points p nearest to q."""
    pc, qc = p.mean(0), q.mean(0)
    u, _, vt = np.linalg.svd((p - pc).T @ (q - qc))
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] *= -1
    r = (u @ vt).T
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = r, qc - r @ pc
    return m


def fit(centres: np.ndarray, moves: np.ndarray, rigid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The global part of a pair's movement at each centre, and its 3x3 transform: affine,
    or rigid, fitted twice, the second time without the patches far off the first fit (a
    patch that matched something else)."""
    keep = np.ones(len(moves), bool)
    design = np.column_stack([centres, np.ones(len(centres))])
    for _ in range(2):
        if rigid:
            m = procrustes(centres[keep], centres[keep] + moves[keep])
        else:
            coef, *_ = np.linalg.lstsq(design[keep], centres[keep] + moves[keep], rcond=None)
            m = np.vstack([coef.T, [0, 0, 1]])
        model = design @ m[:2].T - centres
        err = np.linalg.norm(moves - model, axis=1)
        keep = err < max(4 * np.median(err), 1.0)
    return model, m


def measure(stack: list[np.ndarray], patch: int) -> Stats:
    n = len(stack)
    moves: dict[int, list[float]] = {1: [], 2: [], 3: []}
    steps: list[np.ndarray] = []          # residual movement of each neighbour pair
    rigid: list[np.ndarray] = []
    for k in range(n - 1):
        for dz in (1, 2, 3):
            if k + dz >= n:
                continue
            c, m = patch_moves(stack[k], stack[k + dz], patch)
            res = m - fit(c, m)[0]
            moves[dz].extend(np.linalg.norm(res, axis=1))
            if dz == 1:
                steps.append(res)
                rigid.append(fit(c, m, rigid=True)[1])
    a = np.concatenate([s.ravel() for s in steps[:-1]])
    b = np.concatenate([s.ravel() for s in steps[1:]])
    persistence = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    h, w = stack[0].shape
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    pts = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    drifts = []
    for s in range(0, n - CHAIN):
        t = np.eye(3)
        for k in range(s, s + CHAIN):
            t = rigid[k] @ t
        drifts.append(float(np.linalg.norm((t @ pts - pts)[:2], axis=0).mean()))
    return Stats(
        moves={dz: float(np.median(v)) for dz, v in moves.items()},
        persistence=persistence,
        ncc1=[ncc(stack[k], stack[k + 1]) for k in range(n - 1)],
        ncc2=[ncc(stack[k], stack[k + 2]) for k in range(n - 2)],
        chain_px=float(np.mean(drifts)) if drifts else float("nan"),
        far={dz: float(np.mean([ncc(stack[k], stack[k + dz]) for k in range(0, n - dz, 3)])) for dz in FAR},
    )


def span(v: list[float]) -> str:
    q = np.percentile(v, [10, 50, 90])
    return f"{q[0]:.2f}-{q[2]:.2f} (median {q[1]:.2f})"


def plot(real: list[np.ndarray], sim: list[np.ndarray], out: Path) -> None:
    """Four consecutive sections of each, real above ours, with a line of text over each row."""
    rows = []
    for stack, text in ((real, "real FIB-SEM (fibsem_medulla), every 5th slice: 50 nm sections, 10 nm px"),
                        (sim, "tapescope.neurites at the same pixel size and thickness, sections 0-3")):
        row = np.hstack([np.pad(s, 4, constant_values=1.0) for s in stack[:4]])
        row = np.clip(row * 255, 0, 255).astype(np.uint8)
        label = np.full((36, row.shape[1]), 255, np.uint8)
        cv2.putText(label, text, (8, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 0, 1, cv2.LINE_AA)
        rows += [label, row]
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="our specimens to average (seeds 1..N)")
    ap.add_argument("--sections", type=int, default=40, help="sections of each stack (50 nm)")
    ap.add_argument("--plot", type=Path, help="write real and ours side by side to this PNG")
    a = ap.parse_args()
    patch = 130
    rows: list[tuple[str, Stats]] = []
    real = load_stack("fibsem_medulla", step=5, limit=a.sections)
    if real is not None:
        rows.append(("real FIB-SEM", measure(real, patch)))
    sims, per_section = [], []
    for seed in range(1, a.seeds + 1):
        stack, dt = ours(520, 10.0, 50.0, a.sections, seed)
        sims.append(stack)
        per_section.append(dt)
        rows.append((f"ours seed {seed}", measure(stack, patch)))
    if a.seeds > 1:
        mine = [s for name, s in rows if name.startswith("ours")]
        rows.append(("ours, mean", Stats(
            moves={dz: float(np.mean([s.moves[dz] for s in mine])) for dz in (1, 2, 3)},
            persistence=float(np.mean([s.persistence for s in mine])),
            ncc1=[v for s in mine for v in s.ncc1], ncc2=[v for s in mine for v in s.ncc2],
            chain_px=float(np.mean([s.chain_px for s in mine])),
            far={dz: float(np.mean([s.far[dz] for s in mine])) for dz in FAR})))
    print(f"patch movement, 520 px sections, 10 nm px, 50 nm apart, {patch} px patches, "
          f"global affine removed; chain over {CHAIN} sections\n")
    print(f"{'':16s} {'z-1 px':>7s} {'z-2 px':>7s} {'z-3 px':>7s} {'persist':>7s} {'chain px':>8s}"
          f"  {'NCC z-1 (10-90 %)':28s} {'NCC z-2':28s} z-4   z-10")
    for name, s in rows:
        print(f"{name:16s} {s.moves[1]:7.2f} {s.moves[2]:7.2f} {s.moves[3]:7.2f} {s.persistence:7.2f} "
              f"{s.chain_px:8.1f}  {span(s.ncc1):28s} {span(s.ncc2):28s} {s.far[4]:.2f}  {s.far[10]:.2f}")
    print("\nwhole-image NCC on the real ssTEM stacks (registered) and ours at their pixel size:")
    for name, px, thick, size in (("sstem_vnc", 4.6, 45.0, 1024), ("sstem_cardona2010", 4.0, 50.0, 512)):
        stack = load_stack(name, limit=12)
        if stack is not None:
            print(f"  {name:18s} z-1 {span([ncc(x, y) for x, y in itertools.pairwise(stack)])}")
        sim, _ = ours(size, px, thick, 12, 1, SpecimenParams.projected_texture)
        print(f"  {'ours ' + f'{px} nm px':18s} z-1 {span([ncc(x, y) for x, y in itertools.pairwise(sim)])}")
    print("\nfine contrast (RMS of a difference of Gaussians over the mean; px bands) on ssTEM and ours:")
    print(f"  {'':26s} {'0.7-1.5':>8s} {'1.5-3':>8s} {'3-6':>8s} {'gradient':>9s}")
    for name in ("sstem_cardona2010 (4 nm)", "sstem_vnc (4.6 nm)"):
        stack = load_stack(name.split()[0], limit=11)
        if stack is not None:
            print(f"  {name:26s} " + " ".join(f"{v:8.3f}" for v in fine_contrast(stack[::5])))
    for tex in (0.0, SpecimenParams.projected_texture):
        sim = [Specimen(SpecimenParams(height_px=1024, width_px=1024, n_sections=2, seed=seed,
                                       projected_texture=tex)).section(1) for seed in (3, 4)]
        print(f"  {f'ours 4 nm, projected {tex:g}':26s} " + " ".join(f"{v:8.3f}" for v in fine_contrast(sim)))
    spec = Specimen(SpecimenParams(n_sections=4))
    t = time.process_time()
    for i in range(3):
        spec.section(i)
    # CPU time of this process: on a shared machine the wall clock measures the neighbours.
    print(f"\nsection() CPU time: {1e3 * (time.process_time() - t) / 3:.0f} ms at 2048 x 2048 (defaults), "
          f"{1e3 * np.mean(per_section):.0f} ms at 520 x 520")
    if a.plot and real is not None:
        plot(real, sims[0], a.plot)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
