"""A headless run whose processing falls behind acquisition still finishes and exits.

Regression: the processing queue is bounded; when it was full at the end of acquisition
the end marker was dropped, the worker waited on the queue forever and `tapescope acquire`
never exited (no call may wait forever).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIG = """
[scope.camera]
width = 256
height = 256
[run]
slot_range = [0, 7]
grid = [2, 2]
exposure_ms = 2.0
seed = 1
[processing]
elastic = false
"""


def test_run_exits_when_processing_is_behind(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tapescope.cli", "acquire", str(cfg), "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    processed = sorted(e["slot"] for e in events if e["event"] == "section_processed")
    assert processed == list(range(8))     # every section processed once, none lost to the full queue
