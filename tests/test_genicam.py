"""The GenICam camera driver against Aravis's own fake GigE Vision camera on 127.0.0.1.

Skips where Aravis (python3-gi, gir1.2-aravis-0.8) or its fake camera (aravis-tools) is not
installed; CI installs them."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tapescope.hardware.errors import DeviceError
from tapescope.hardware.genicam_camera import GenicamCamera, aravis, frames_between

FAKE = shutil.which("arv-fake-gv-camera-0.8")
try:
    aravis()
    HAVE_ARAVIS = True
except ImportError:
    HAVE_ARAVIS = False

pytestmark = pytest.mark.skipif(not (FAKE and HAVE_ARAVIS), reason="Aravis or its fake camera not installed")
ADDRESS = "127.0.0.1"


class FakeCamera:
    """arv-fake-gv-camera-0.8 on the loopback interface; start() waits until it answers."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert FAKE is not None
        self.proc = subprocess.Popen([FAKE, "-i", ADDRESS, "-s", "TS01"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            # Discovery only: opening the camera here would take its control channel.
            arv = aravis()
            arv.update_device_list()
            if any(arv.get_device_address(i) == ADDRESS for i in range(arv.get_n_devices())):
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Aravis's fake camera did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def fake() -> Iterator[FakeCamera]:
    cam = FakeCamera()
    cam.start()
    try:
        yield cam
    finally:
        cam.stop()


def test_frame_ids_wrap_as_gige_vision_block_ids_do() -> None:
    assert frames_between(10, 11) == 0
    assert frames_between(10, 13) == 2
    assert frames_between(65535, 1) == 0          # ids skip 0 when they wrap
    assert frames_between(65534, 2) == 2


async def test_the_driver_sets_up_and_triggers_the_fake_camera(fake: FakeCamera) -> None:
    cam = GenicamCamera(ADDRESS, roi=(0, 0, 256, 128), timeout_s=3.0)
    await cam.connect()
    try:
        assert "Fake" in cam.model and cam.shape[0] > 0
        await cam.set_exposure(2.0)
        assert cam.exposure_ms == pytest.approx(2.0)
        frames = [await cam.trigger() for _ in range(4)]
        t0 = await cam.expose()
        frames.append(await cam.read())
        assert all(f.data.shape == (128, 256) and f.data.dtype == np.uint16 for f in frames)
        assert frames[-1].timestamp > 0 and t0 > 0
        assert np.ptp(frames[0].data) > 0                         # the fake camera's pattern, not zeros
        ids = [f.frame_id for f in frames]
        assert all(frames_between(a, b) == 0 for a, b in itertools.pairwise(ids)), ids
        assert cam.frames_lost == 0
        await cam.set_roi((64, 32, 128, 64))
        f = await cam.trigger()
        assert f.data.shape == (64, 128)
        st = await cam.status()
        assert st["roi"] == [64, 32, 128, 64] and st["pixel_format"] == "Mono16"
        with pytest.raises(DeviceError, match=r"exposure .* outside"):
            await cam.set_exposure(1e9)
        with pytest.raises(DeviceError, match="no exposure to read"):
            await cam.read()
    finally:
        await cam.close()


async def test_a_camera_that_disappears_is_reopened_with_its_settings(fake: FakeCamera) -> None:
    cam = GenicamCamera(ADDRESS, roi=(0, 0, 256, 128), timeout_s=2.0, reconnect_timeout_s=20.0)
    notices: list[str] = []
    cam.on_notice = lambda _dev, msg: notices.append(msg)
    await cam.connect()
    try:
        await cam.set_exposure(3.0)
        await cam.trigger()
        fake.stop()
        fake.start()                                   # power-cycled: a new camera, same address
        # The first call after the drop may fail (its frame is gone) or find the camera back.
        for _ in range(3):
            try:
                frame = await cam.trigger()
                break
            except DeviceError as exc:
                assert exc.retryable, exc
        else:
            pytest.fail("the camera was not reopened")
        assert frame.data.shape == (128, 256)
        assert cam.reconnects == 1 and any("reopened" in n for n in notices)
        assert (await cam.status())["exposure_ms"] == pytest.approx(3.0)
    finally:
        await cam.close()


def test_a_missing_camera_is_named(tmp_path: Path) -> None:
    import asyncio

    cam = GenicamCamera("TS-no-such-camera", timeout_s=1.0)
    with pytest.raises(DeviceError, match="TS-no-such-camera"):
        asyncio.run(cam.connect())


async def test_a_run_on_temscript_aravis_and_gridtape_writes_its_volume(
        fake: FakeCamera, temscript_url: str, tmp_path: Path) -> None:
    """Every device on an interface nobody here wrote, or on GridTape's firmware: column and
    goniometer on temscript's null microscope, the camera on Aravis's fake GigE Vision camera,
    the tape on the emulated GridTape controller. The fake camera's test pattern is the same
    at every stage position, so tiles are placed by the stage; the volume is written."""
    from tapescope.acquisition.events import EventBus
    from tapescope.config import parse_config
    from tapescope.hardware.gridtape import GridTape
    from tapescope.hardware.temscript_column import TemscriptColumn
    from tapescope.hardware.temscript_stage import TemscriptStage
    from tapescope.runner import run_acquisition

    cfg = parse_config({
        "run": {"slots": [0, 1], "grid": [2, 2], "overlap": 0.1, "exposure_ms": 5.0},
        "scope": {
            "stage": {"url": temscript_url, "travel_um": [1500.0, 1500.0]},
            "column": {"url": temscript_url},
            "camera": {"driver": "genicam", "device": ADDRESS, "width": 256, "height": 256,
                       "pixel_size_nm": 4.0},
            "tape": {"driver": "gridtape"},
        },
    })
    scopes = []
    result = await run_acquisition(cfg, tmp_path / "run", EventBus(), volume=tmp_path / "volume.zarr",
                                   on_engine=lambda e: scopes.append(e.scope))
    scope = scopes[0]
    assert isinstance(scope.stage, TemscriptStage) and isinstance(scope.column, TemscriptColumn)
    assert isinstance(scope.camera, GenicamCamera) and isinstance(scope.tape, GridTape)
    assert result.summary.state.value == "done", result.summary.reason
    import zarr
    vol = zarr.open_group(str(tmp_path / "volume.zarr"), mode="r")["0"]
    assert vol.shape[0] == 2 and np.ptp(vol[0][:]) > 0


async def test_a_genicam_tape_camera_feeds_the_barcode_reader(fake: FakeCamera) -> None:
    """GridTape's tape camera on a GenICam camera: its frames reach the barcode reader
    through Aravis. The fake camera shows a test pattern, no tape: the reader says so."""
    from tapescope.hardware.barcode_camera import BarcodeCamera
    from tapescope.hardware.errors import DeviceError as Err

    cam = BarcodeCamera(GenicamCamera(ADDRESS, roi=(0, 0, 640, 200), timeout_s=3.0))
    await cam.connect()
    try:
        frame = await cam.frame()
        assert frame.shape == (200, 640) and np.ptp(frame) > 0
        with pytest.raises(Err, match="tape camera: no"):
            await cam.sight()
    finally:
        await cam.close()
