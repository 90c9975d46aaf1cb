"""One writer per volume, across processes: a live run and a `tapescope process` (or two of
either) writing the same volume would interleave sections' records and shards.

The writer holds an exclusive `flock` on `<volume>.lock` beside the volume while it runs.
The kernel drops the lock when the holder's process ends, killed or not, so a crash never
leaves a stale lock behind; the file's text only names the holder for the message a second
writer gets. Cluster workers write shards for the holder and take no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from tapescope.errors import TapescopeError


class VolumeBusy(TapescopeError):
    """Another process is writing the volume; the message names it."""


def lock_path(volume: Path) -> Path:
    return volume.with_name(volume.name + ".lock")


class WriterLock:
    """The lock on `volume`, held from `acquire` until `release` (or the process ends)."""

    def __init__(self, volume: Path, holder: str) -> None:
        self.path = lock_path(Path(volume))
        self.holder = holder
        self._file: IO[str] | None = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)     # where the volume is about to be made
        f = open(self.path, "a+")       # "a+": the holder's text stays until the lock is ours
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            f.close()
            raise VolumeBusy(f"{self.path.with_name(self.path.name[:-5])} is being written by {who}: one writer "
                             "per volume; wait for it to end, or write elsewhere (--out)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.holder} (pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
