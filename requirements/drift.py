"""Print where the running environment's packages differ from the lock: what `make test-latest`
tries that `make test` does not. Usage: python requirements/drift.py requirements/lock.txt"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def locked(lock: Path) -> dict[str, str]:
    """name -> pinned version, for the pins whose markers hold here."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def main(lock: Path) -> int:
    pins = locked(lock)
    here = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    moved = sorted((n, pins[n], v) for n, v in here.items() if n in pins and pins[n] != v)
    new = sorted((n, v) for n, v in here.items() if n not in pins and n != "tapescope")
    print(f"against {lock}: {len(moved)} packages at other versions, {len(new)} not in the lock")
    for n, was, now in moved:
        print(f"  {n:32} {was:>14} -> {now}")
    for n, v in new:
        print(f"  {n:32} {'(not locked)':>14}    {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("lock.txt")))
