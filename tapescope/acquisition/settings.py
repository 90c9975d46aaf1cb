"""The acquisition engine's settings (built from a run's config by runner.engine_settings)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .qc import QCLimits


@dataclass(frozen=True)
class EngineSettings:
    qc: QCLimits = field(default_factory=QCLimits)
    device_retries: int = 3                 # per failing call, each after a reconnect
    retry_backoff_s: float = 0.2            # doubles each retry, up to RETRY_BACKOFF_MAX_S
    # ...and retries go on until this long after the first failure: a device down for a few
    # seconds (a camera server restarting) is ridden out, not declared dead after 1.4 s.
    retry_window_s: float = 20.0
    on_device_failure: str = "pause"        # "pause": PAUSED with an alarm; "fail": end the run FAILED
    device_probe_s: float = 15.0            # paused for a device: try it this often; resume when it answers
    step_timeout_s: float = 120.0           # ceiling on any one device step (drivers time out sooner)
    watchdog_stall_s: float = 60.0          # no tile for this long while acquiring: alarm + pause
    min_free_bytes: int = 1 << 30           # besides the next section's tiles
    reimage_at_end: bool = True
    # Before the re-image pass, wait this long for processing to judge the sections already
    # taken, so one that fails to register is re-imaged while the tape is loaded.
    processing_wait_s: float = 900.0
    barcodes: dict[int, str] = field(default_factory=dict)   # expected barcode per slot, if known
    refocus: Callable[[], Awaitable[Any]] | None = None       # autofocus routine for focus retakes
    # Read tile n out while the stage moves to n+1 (camera expose()/read()); False: one
    # trigger per tile, the stage still while the frame comes (the bench's "before").
    overlap_readout: bool = True
