"""`tapescope align STACK_DIR --out OUT_DIR [--scheduler ADDRESS]`: the body of the command.

Runs `stack.align_stack` on a dask.distributed cluster: a LocalCluster on this machine
by default, or the cluster behind `--scheduler tcp://HOST:PORT`. Bad input (the stack,
the options, an unreachable scheduler) is reported in one line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tapescope.acquisition.cluster import ClusterError, check_scheduler
from tapescope.alignment.stack import AlignParams, StackError, align_stack, dask_map, read_sections
from tapescope.errors import TapescopeError
from tapescope.montage.array_backend import array_module


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, where the Client would retry until its timeout."""
    try:
        check_scheduler(address)
    except ClusterError as exc:
        raise StackError(f"--{exc}") from None


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A Client on the given scheduler, or on a LocalCluster of `workers` processes."""
    from distributed import Client, LocalCluster

    # distributed logs every connection at INFO; a person running the command wants ours.
    for name in ("distributed", "distributed.batched", "distributed.comm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if scheduler:
        _check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise StackError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        yield client


def run_align(
    stack_dir: Path | list[Path], out: Path, *, scheduler: str | None, workers: int, device: str,
    pixel_nm: float | None, thickness_nm: float, console: Console, err_console: Console,
) -> int:
    """Exit code: 0 all sections aligned, 1 some did not register, 2 bad input."""
    try:
        if workers < 1:
            raise StackError(f"--workers must be at least 1, got {workers}")
        if (pixel_nm is not None and not 0 < pixel_nm < float("inf")) or not 0 < thickness_nm < float("inf"):
            raise StackError("--pixel-nm and --thickness-nm must be positive")
        try:
            array_module(device)   # 'gpu' without one is an error now, not in a worker later
        except (ValueError, RuntimeError) as exc:
            raise StackError(f"--device {device}: {exc}") from None
        read_sections([stack_dir] if isinstance(stack_dir, Path) else stack_dir)  # before any cluster starts
        t0 = time.monotonic()
        with dask_client(scheduler, workers) as client:
            where = scheduler or f"LocalCluster ({workers} workers)"
            console.print(f"dask: {where}, dashboard {client.dashboard_link or '-'}")
            result = align_stack(stack_dir, out, map_fn=dask_map(client), params=AlignParams(device=device),
                                 pixel_nm=pixel_nm, thickness_nm=thickness_nm,
                                 progress=lambda m: console.print(f"  {m}"))
    except TapescopeError as exc:
        # Only the package's own errors are bad input; anything else is a bug and shows as one.
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    table = Table(title="tapescope align", show_header=True)
    for col in ("z", "status", "ref z", "NCC", "rot deg", "flow nodes", "flow rms px", "pairs", "solve rms px"):
        table.add_column(col)
    for o in result.sections:
        table.add_row(str(o.z), o.status, "" if o.reference_z is None else str(o.reference_z),
                      f"{o.confidence:.2f}", f"{o.rotation_deg:+.2f}", str(o.flow_nodes), f"{o.flow_rms_px:.3f}",
                      str(o.pairs), f"{o.solve_rms_px:.3f}")
    console.print(table)
    for o in result.sections:
        if o.message:
            console.print(f"[yellow]z={o.z}[/] {o.file}: {o.status}: {o.message}", highlight=False)
    bad = [o for o in result.sections if o.status == "unaligned"]
    again = [str(o.z) for o in result.sections if o.needs_reimaging]
    if again:
        console.print(f"[yellow]to re-image:[/] z = {', '.join(again)}", highlight=False)
    console.print(f"sections {len(result.sections)}, unaligned {len(bad)}, "
                  f"missing {sum(o.status == 'missing' for o in result.sections)}, "
                  f"time {time.monotonic() - t0:.1f} s")
    console.print(f"volume: {result.volume}")
    console.print(f"transforms: {result.volume.with_suffix('.transforms')}")
    console.print(f"summary: {result.summary_csv}")
    console.print(f"look at it: tapescope view {os.fspath(result.volume)}", soft_wrap=True, highlight=False)
    return 1 if bad else 0
