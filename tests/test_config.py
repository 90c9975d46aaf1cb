from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tapescope.config import ConfigError, TapescopeConfig, load_config, parse_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "scope.toml"
    p.write_text(text)
    return p


def test_empty_file_is_the_embedded_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == TapescopeConfig()


def test_values_are_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[scope]
name = "temca-3"
[scope.stage]
url = "/dev/ttyUSB0"
timeout_s = 1.5
[run]
slots = [4, 5, 9]
grid = [2, 5]
overlap = 0.12
exposure_ms = 35
"""))
    assert cfg.scope.name == "temca-3"
    assert cfg.scope.stage.url == "/dev/ttyUSB0"
    assert cfg.scope.stage.timeout_s == 1.5
    assert cfg.run.slots == [4, 5, 9]
    assert cfg.run.grid == (2, 5)
    assert cfg.run.exposure_ms == 35


@pytest.mark.parametrize(("text", "field", "expected"), [
    ("[run]\nexposure_ms = -3\n", "run.exposure_ms", "greater than 0"),
    ("[run]\noverlap = 'lots'\n", "run.overlap", "valid number"),
    ("[run]\nslots = [1, 1]\n", "run.slots", "unique"),
    ("[run]\nexposre_ms = 3\n", "run.exposre_ms", "unknown field"),
    ("[scope.camera]\nport = 70000\n", "scope.camera.port", "less than or equal to 65535"),
    ("[processing]\nchunk = 300\n", "processing", "power of two"),
])
def test_bad_value_names_file_field_and_expectation(tmp_path: Path, text: str, field: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert field in msg
    assert expected in msg


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[run\nslots = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tapescope.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "[run]\nslots = [0, 2]\n")
    r = run_cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\ngrid = [0, 3]\n")
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2
    assert "bad.toml" in r.stderr and "run.grid.0" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_resumed_run_may_keep_its_scratch_elsewhere(tmp_path: Path) -> None:
    """Where this host keeps scratch is not what the run images: no refusal, the new folder used."""
    from tapescope.runner import config_differences, processing_problem

    a = parse_config({"processing": {"scratch": str(tmp_path)}})
    b = parse_config({"processing": {"scratch": str(tmp_path / "moved")}})
    assert config_differences(a, b) == []
    assert processing_problem(a) is None
    assert "moved is not a folder" in (processing_problem(b) or "")


def test_a_gpu_asked_for_where_there_is_none_is_refused_before_the_run() -> None:
    from tapescope.montage.array_backend import gpu_available
    from tapescope.runner import config_differences, processing_problem

    gpu = parse_config({"processing": {"device": "gpu"}})
    cpu = parse_config({"processing": {"device": "cpu"}})
    assert config_differences(gpu, cpu) == []          # a resumed run may move to another host's device
    assert processing_problem(cpu) is None
    if gpu_available():
        assert processing_problem(gpu) is None
    else:
        assert "processing.device: 'gpu'" in (processing_problem(gpu) or "")
    with pytest.raises(ConfigError, match=r"processing\.device"):
        parse_config({"processing": {"device": "tpu"}})
