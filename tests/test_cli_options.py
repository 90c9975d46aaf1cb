"""Options every command has: --version, --verbose, --quiet."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tapescope import __version__
from tapescope.cli import app

runner = CliRunner()


@pytest.fixture
def restore_log_levels() -> Iterator[None]:
    """The options set the process's log levels (a command is its own process); here the
    tests share one, so put them back."""
    loggers = [logging.getLogger(), logging.getLogger("tapescope")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_version_and_log_levels(tmp_path: Path, restore_log_levels: None) -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tapescope {__version__}"
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    for flags in (["--verbose"], ["-q"]):
        res = runner.invoke(app, [*flags, "config", "check", str(cfg)])
        assert res.exit_code == 0 and "ok" in res.output, res.output
    res = runner.invoke(app, ["--verbose", "--quiet", "config", "check", str(cfg)])
    assert res.exit_code == 2 and "exclude each other" in res.output
    res = runner.invoke(app, ["-q", "config", "check", str(cfg)])
    assert logging.getLogger("tapescope").level == logging.ERROR
