"""`tapescope stitch TILESET_DIR --out OUT_DIR`: the command's body (registered in cli/main.py)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console

EXIT_STAGE_PLACED = 3    # positions written, but tiles with tissue were placed by the stage alone


def stitch(
    tileset_dir: Path = typer.Argument(..., help="folder with tiles.csv (file,row,col,y,x) and the TIFF tiles"),
    out: Path = typer.Option(..., "--out", help="output folder for positions.csv and pairs.csv"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | gpu (gpu needs tapescope\\[gpu] and a GPU)"),
    flatfield: str = typer.Option("auto", "--flatfield",
                                  help="auto (estimate from the tiles) | none | a bright-reference TIFF"),
    dark: Path | None = typer.Option(None, "--dark", help="dark-reference TIFF, subtracted before the flat-field"),
    lens: str = typer.Option("estimate", "--lens",
                             help="estimate (a radial lens model from the overlaps, applied if it fits) | none"),
    tile_model: str = typer.Option("translation", "--tile-model",
                                   help="translation (one camera) | affine (each tile also turned and scaled: "
                                   "a camera array)"),
    pixel_nm: float | None = typer.Option(None, "--pixel-nm", help="the tiles' pixel size in nm: also render the "
                                          "montage into OUT/montage.zarr (OME-Zarr 0.5, the tiles' bit depth), "
                                          "a section `tapescope align` takes"),
) -> None:
    """Stitch a tile set from any scope: register every neighbouring pair and solve tile positions
    (exit codes: 0 ok, 3 tiles with tissue placed by the stage alone, 2 bad input)."""
    # Imported here, not at the top: `tapescope --version` and the other commands do not pay for them.
    import numpy as np

    from tapescope.stitching.backend import BackendUnavailable, get_backend
    from tapescope.stitching.solve import SEAM_PX
    from tapescope.stitching.tileset import TileSetError, run_stitch, tile_status

    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)

    def fail(message: str) -> typer.Exit:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
        return typer.Exit(2)

    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file, not a folder")
    if pixel_nm is not None and not (math.isfinite(pixel_nm) and 0 < pixel_nm <= 10_000):
        raise fail(f"--pixel-nm must be a pixel size in nm, above 0 and at most 10000, got {pixel_nm}")
    if lens not in ("estimate", "none"):
        raise fail(f"--lens must be estimate or none, not {lens!r}")
    if tile_model not in ("translation", "affine"):
        raise fail(f"--tile-model must be translation or affine, not {tile_model!r}")
    if device not in ("auto", "cpu", "gpu"):
        raise fail(f"--device must be auto, cpu or gpu, not {device!r}")
    try:
        backend = get_backend(device)  # type: ignore[arg-type]
    except BackendUnavailable as exc:
        raise fail(f"--device gpu: {exc}") from None
    render = None
    if pixel_nm is not None:
        # The volume writer (tensorstore, zarr) costs a second of start-up: only when asked.
        from tapescope.montage.stitched import montage_writer

        render = montage_writer(pixel_nm)
    try:
        run = run_stitch(tileset_dir, out, backend, flatfield, dark,
                         warn=lambda m: err.print(f"[yellow]warning:[/] {m}", highlight=False), lens=lens,
                         render=render, tile_model=tile_model)
    except TileSetError as exc:
        raise fail(str(exc)) from None
    sol = run.result.solution
    status = tile_status(run.result)
    used = sol.pair_residual[sol.pair_used]
    counts = {s: status.count(s) for s in ("ok", "stage", "failed")}
    refusals = Counter(r.split(":")[0] for r in sol.pair_reason if r)
    refused = "; refused: " + ", ".join(f"{n} {why}" for why, n in refusals.most_common()) if refusals else ""
    console.print(f"tiles {len(status)} (ok {counts['ok']}, stage {counts['stage']}, failed {counts['failed']}), "
                  f"pairs {len(run.result.pairs)} (used {int(sol.pair_used.sum())}{refused})", highlight=False)
    confidence = np.array([p.confidence for p, u in zip(run.result.pairs, sol.pair_used, strict=True) if u])
    if used.size and sol.loops:
        console.print(f"pair residual after the solve ({sol.loops} closed loop(s) check it): median "
                      f"{np.median(used):.3f} px, max {used.max():.3f} px; seams over {SEAM_PX:g} px: "
                      f"{len(sol.seams)}", highlight=False)
    elif used.size:
        console.print("no loop closes among the pairs used: each pair decides its tiles alone and the residual "
                      "after the solve cannot be measured (it is 0 by construction); what can be said: the pairs' "
                      f"own agreement (band-passed NCC) median {np.median(confidence):.2f}, lowest "
                      f"{confidence.min():.2f}", highlight=False)
    changing = sum(1 for p, u in zip(run.result.pairs, sol.pair_used, strict=True) if u and p.note)
    if changing:
        how = "fitted by the tiles' affines" if tile_model == "affine" else \
            "used at the overlap's middle (a camera array? --tile-model affine fits each tile's turn and scale)"
        console.print(f"{changing} pair(s) whose offset changes along their overlap (tiles rotated or scaled "
                      f"against each other): {how}; see pairs.csv", highlight=False)
    aff = run.result.affine
    if aff is not None and sol.linear is not None:
        lin = sol.linear[[s == "ok" for s in sol.status]]
        scale = np.sqrt(np.abs(np.linalg.det(lin))) if len(lin) else np.ones(1)
        turn = np.arctan2(lin[:, 1, 0] - lin[:, 0, 1], lin[:, 0, 0] + lin[:, 1, 1]) if len(lin) else np.zeros(1)
        console.print(f"tile model: affine from {int(aff.patch_used.sum())} patches: patch residual RMS "
                      f"{aff.rms:.3f} px ({aff.rms_translation:.3f} px with a translation per tile); tiles' scale "
                      f"{(scale.min() - 1) * 100:+.2f} to {(scale.max() - 1) * 100:+.2f} %, turn "
                      f"{turn.min() * 1e3:+.1f} to {turn.max() * 1e3:+.1f} mrad", highlight=False)
    fit = run.result.lens
    if fit is not None:
        console.print(f"lens: k1 {fit.model.k1:.3e} from {fit.n_patches} patches, patch residual RMS "
                      f"{fit.rms_before:.3f} px without, {fit.rms_after:.3f} px with: "
                      f"{'applied' if fit.accepted else 'not applied (does not explain the residuals)'}")
    elif lens == "estimate":
        console.print("lens: too few overlap patches to estimate; not applied")
    console.print(f"flat-field: {run.flatfield}; device: {backend.name}; "
                  f"{run.seconds:.2f} s, {run.megapixels / max(run.seconds, 1e-9):.1f} Mpx/s")
    console.print(f"wrote {out / 'positions.csv'} and {out / 'pairs.csv'} (positions in pixels of the tiles)",
                  highlight=False)
    if run.montage is not None:
        from tapescope.montage.omezarr import Volume

        shape = Volume.open(run.montage).shape[1:]
        console.print(f"montage: {run.montage} ({shape[0]} x {shape[1]} px at {pixel_nm:g} nm, "
                      f"{run.tileset_dtype}); align sections with: tapescope align OUT1 OUT2 ... --out VOLUME_DIR",
                      highlight=False)
    else:
        console.print("montage not rendered: give --pixel-nm to render it (OME-Zarr) for viewing and alignment",
                      highlight=False)
    by_stage = [k for k, s in enumerate(status) if s == "stage"]
    lost = [run.tileset.files[k] for k in by_stage if run.textured[k]]
    if counts["failed"]:
        err.print(f"[yellow]warning:[/] {counts['failed']} tile(s) with disagreeing pairs: see positions.csv",
                  highlight=False)
    if lost:
        # Blank tiles placed by the stage are normal; a tile with tissue that no pair placed
        # is a hole in the montage's accuracy, and a script must not take it for success.
        err.print(f"[bold red]error:[/] {len(lost)} tile(s) with texture placed by the stage alone (no pair "
                  f"registered them): {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; see pairs.csv "
                  f"for why; exit code {EXIT_STAGE_PLACED}", highlight=False)
        raise typer.Exit(EXIT_STAGE_PLACED)
    if by_stage:
        console.print(f"{len(by_stage)} blank tile(s) placed by the stage (no texture to register)", highlight=False)
