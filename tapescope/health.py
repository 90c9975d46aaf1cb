"""What a long-running process holds: resident memory, open files, threads and asyncio
tasks. The engine publishes it over MQTT (`<root>/health`) so that whoever watches a run of
days sees a leak as it grows, not when the machine runs out (docs/mqtt.md)."""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from pathlib import Path
from typing import Any

_PROC = Path("/proc/self")


def rss_mb() -> float:
    """Resident memory now (Linux); elsewhere the peak, which is what the OS tells."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 1024


def open_fds() -> int:
    try:
        return len(os.listdir(_PROC / "fd"))
    except OSError:
        return -1


def process_health() -> dict[str, Any]:
    """rss_mb, fds, threads, and tasks of the running event loop (-1 outside one)."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = -1
    return {"rss_mb": round(rss_mb(), 1), "fds": open_fds(), "threads": threading.active_count(), "tasks": tasks}
