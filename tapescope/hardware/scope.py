"""One Scope object: the drivers of a microscope, connected and closed together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .camera import Camera, Frame
from .column import Column
from .device import Device
from .errors import DeviceError
from .genicam_camera import GenicamCamera
from .gridtape import GridTape
from .stage import Stage, StageLimits
from .tape import Tape
from .temscript_column import TemscriptColumn
from .temscript_http import is_temscript
from .temscript_stage import TemscriptStage

log = logging.getLogger(__name__)
CONNECT_TRIES = 3
CONNECT_BACKOFF_S = 0.5
MIN_HTTP_TIMEOUT_S = 5.0   # a request to temscript's server waits at least this long


class Scope(Device):
    """Stage, tape, camera and (optionally: not every set-up drives its column) the column."""

    def __init__(self, stage: Stage | TemscriptStage, tape: Tape | GridTape, camera: Camera | GenicamCamera,
                 column: Column | TemscriptColumn | None = None) -> None:
        self.stage = stage
        self.tape = tape
        self.camera = camera
        self.column = column

    @property
    def devices(self) -> tuple[Stage | TemscriptStage | Tape | GridTape | Camera | GenicamCamera | Column, ...]:
        """Every driver, in connect order."""
        devs: tuple = (self.stage, self.tape, self.camera)
        return devs if self.column is None else (*devs, self.column)

    @classmethod
    def from_ports(
        cls, *, stage_url: str, tape_url: str, camera_host: str, camera_port: int,
        serial_timeout_s: float = 2.0, settle_timeout_s: float = 10.0,
        tape_move_timeout_s: float = 30.0, camera_timeout_s: float = 5.0, baudrate: int = 115200,
        column_url: str | None = None, column_ramp_timeout_s: float = 60.0,
        stage_travel_nm: tuple[float, float] | None = None, tape: GridTape | None = None,
        camera: GenicamCamera | None = None,
    ) -> Scope:
        """The drivers at these ports; ``tape``, ``camera``: drivers built by the caller
        (GridTape's, a GenICam camera: each with its own settings), else the line-protocol
        tape at ``tape_url`` and the frame-protocol camera at ``camera_host:camera_port``."""
        # temscript answers over HTTP from the microscope's PC, slower than a serial line.
        http_timeout_s = max(serial_timeout_s, MIN_HTTP_TIMEOUT_S)
        column: Column | TemscriptColumn | None = None
        if is_temscript(column_url):
            assert column_url is not None
            column = TemscriptColumn(column_url, timeout_s=http_timeout_s)
        elif column_url is not None:
            column = Column(column_url, baudrate=baudrate, timeout_s=serial_timeout_s,
                            ramp_timeout_s=column_ramp_timeout_s)
        limits = StageLimits.centred(stage_travel_nm) if stage_travel_nm is not None else None
        stage: Stage | TemscriptStage
        if is_temscript(stage_url):
            stage = TemscriptStage(stage_url, timeout_s=http_timeout_s,
                                   settle_timeout_s=settle_timeout_s, limits=limits)
        else:
            stage = Stage(stage_url, baudrate=baudrate, timeout_s=serial_timeout_s,
                          settle_timeout_s=settle_timeout_s, limits=limits)
        return cls(
            stage,
            tape or Tape(tape_url, baudrate=baudrate, timeout_s=serial_timeout_s,
                         move_timeout_s=tape_move_timeout_s),
            camera or Camera(camera_host, camera_port, timeout_s=camera_timeout_s),
            column,
        )

    async def snap(self) -> Frame:
        """Read the stage encoder, expose, and return the frame with the position it was taken at.

        The stage must be settled (the camera sees where the stage *is*; the encoder read
        just before the exposure is what the frame is filed under).
        """
        x, y = await self.stage.position()
        frame = await self.camera.trigger()
        frame.stage_nm = (x, y)
        return frame

    async def connect(self) -> None:
        """Every device, each tried CONNECT_TRIES times: a garbled or lost reply to the first
        query is as transient at start-up as it is during a run (and a run resumed after a
        crash starts up in the middle of whatever the devices were doing)."""
        try:
            for dev in self.devices:
                for attempt in range(1, CONNECT_TRIES + 1):
                    try:
                        await dev.connect()
                        break
                    except DeviceError as exc:
                        if attempt == CONNECT_TRIES:
                            raise
                        log.warning("%s: connecting failed (%s); try %d of %d", dev.name, exc, attempt + 1,
                                    CONNECT_TRIES)
                        with contextlib.suppress(Exception):
                            await dev.close()
                        await asyncio.sleep(CONNECT_BACKOFF_S * attempt)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for dev in reversed(self.devices):
            with contextlib.suppress(Exception):  # closing must reach every device
                await dev.close()
