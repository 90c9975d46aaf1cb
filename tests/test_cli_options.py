"""Options every command has: --version, --verbose, --quiet."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tapescope import __version__
from tapescope.cli import app

runner = CliRunner()


def test_version_and_log_levels(tmp_path: Path) -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tapescope {__version__}"
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    for flags in (["--verbose"], ["-q"]):
        res = runner.invoke(app, [*flags, "config", "check", str(cfg)])
        assert res.exit_code == 0 and "ok" in res.output, res.output
    res = runner.invoke(app, ["--verbose", "--quiet", "config", "check", str(cfg)])
    assert res.exit_code == 2 and "exclude each other" in res.output
