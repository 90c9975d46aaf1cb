"""What a long-running process holds: resident memory, open files, threads and asyncio
tasks. The engine publishes its own over MQTT (`<root>/health`) so that whoever watches a
run of days sees a leak as it grows, not when the machine runs out (docs/mqtt.md); the soak
bench reads the engine's and the GUI's from outside with the same function."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import threading
from pathlib import Path
from typing import Any


def process_stats(pid: int | str = "self") -> dict[str, float]:
    """rss_mb, fds and threads of a process, from /proc (Linux); NaN for a process that is
    gone. Elsewhere, for this process: the peak memory and the Python threads, which is what
    the OS tells."""
    nan = float("nan")
    proc = Path("/proc") / str(pid)
    try:
        status = (proc / "status").read_text()
        fds = len(os.listdir(proc / "fd"))
    except OSError:
        if pid != "self":
            return {"rss_mb": nan, "fds": nan, "threads": nan}
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss_mb": peak_kb / 1024, "fds": nan, "threads": float(threading.active_count())}
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    threads = re.search(r"Threads:\s+(\d+)", status)
    return {"rss_mb": int(rss.group(1)) / 1024 if rss else nan, "fds": float(fds),
            "threads": float(threads.group(1)) if threads else nan}


def process_health() -> dict[str, Any]:
    """This process's rss_mb, fds, threads, and the tasks of the running event loop (-1
    outside one)."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = -1
    stats = process_stats()
    return {"rss_mb": round(stats["rss_mb"], 1), "fds": int(stats["fds"]), "threads": int(stats["threads"]),
            "tasks": tasks}
