"""`tapescope view` serves a volume as Neuroglancer needs it, checked over HTTP from Python
against the real command in a subprocess: the viewer page (Neuroglancer's own client), the
state (x-y-z display, the contrast window inside the data's range), the volume's zarr.json,
and a ranged read of a shard (206, the right bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tapescope.montage.omezarr import Volume
from tapescope.mqtt.broker import free_port


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path / "volume.zarr"
    vol = Volume.create(path, (3, 300, 420), pixel_nm=4.0, thickness_nm=40.0, levels=2, chunk=64)
    for z in range(3):
        img = np.zeros((300, 420), np.float32)
        img[20:280, 30:400] = 3000 + 1500 * rng.standard_normal((260, 370))   # tissue where imaged, 0 elsewhere
        vol.write_section(z, np.clip(img, 1, 65535), {"status": "ok"})
    vol.flush()
    return path


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


@pytest.fixture
def served(volume: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tapescope.cli", "view", str(volume), "--port", str(port),
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""      # "serving ... on URL": it listens now
        assert "serving" in line, line + (proc.stdout.read() if proc.poll() is not None and proc.stdout else "")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_view_serves_the_client_the_state_and_ranged_shards(served: str, volume: Path) -> None:
    status, headers, page = get(f"{served}/")
    assert status == 200 and b"main." in page and b"<title>neuroglancer</title>" in page   # redirected to the client
    _, _, raw = get(f"{served}/state.json")
    state = json.loads(raw)
    assert list(state["dimensions"]) == ["x", "y", "z"] and state["layout"] == "xy"
    assert state["dimensions"]["z"] == [40e-9, "m"] and state["dimensions"]["x"] == [4e-9, "m"]
    lo, hi = state["layers"][0]["shaderControls"]["normalized"]["range"]
    data = Volume.open(volume).levels[0][:]
    imaged = data[data > 0]
    assert imaged.min() <= lo < hi <= imaged.max()                 # inside the data, not 0-65535
    assert hi - lo > 0.5 * (np.percentile(imaged, 99) - np.percentile(imaged, 1))
    assert state["layers"][0]["source"] == f"zarr3://{served}/volume/"
    # The same window is stored in the volume's OME metadata, for every viewer.
    _, headers, meta = get(f"{served}/volume/zarr.json")
    assert headers["Access-Control-Allow-Origin"] == "*"
    window = json.loads(meta)["attributes"]["ome"]["omero"]["channels"][0]["window"]
    assert (window["start"], window["end"]) == pytest.approx((lo, hi))
    shard = next(p for p in sorted((volume / "0").rglob("*")) if p.is_file() and p.name != "zarr.json")
    rel = shard.relative_to(volume).as_posix()
    whole = shard.read_bytes()
    status, headers, part = get(f"{served}/volume/{rel}", {"Range": "bytes=10-49"})
    assert status == 206 and part == whole[10:50]
    assert headers["Content-Range"] == f"bytes 10-49/{len(whole)}"
    # The home leads to the viewer of the neuroglancer package's own server, on this machine.
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(urllib.request.Request(f"{served}/"), timeout=10)
    location = info.value.headers["Location"]
    assert location.startswith("http://127.0.0.1:") and "/v/tapescope/" in location


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def test_view_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tapescope.cli", "view", str(tmp_path), "--no-browser"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a volume" in r.stderr and "Traceback" not in r.stderr
