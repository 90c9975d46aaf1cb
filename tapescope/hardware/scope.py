"""One Scope object: the drivers of a microscope, connected and closed together."""

from __future__ import annotations

import contextlib
from types import TracebackType

from .camera import Camera
from .stage import Stage
from .tape import Tape


class Scope:
    def __init__(self, stage: Stage, tape: Tape, camera: Camera) -> None:
        self.stage = stage
        self.tape = tape
        self.camera = camera

    @classmethod
    def from_ports(
        cls, *, stage_url: str, tape_url: str, camera_host: str, camera_port: int,
        serial_timeout_s: float = 2.0, settle_timeout_s: float = 10.0,
        tape_move_timeout_s: float = 30.0, camera_timeout_s: float = 5.0, baudrate: int = 115200,
    ) -> Scope:
        return cls(
            Stage(stage_url, baudrate=baudrate, timeout_s=serial_timeout_s,
                  settle_timeout_s=settle_timeout_s),
            Tape(tape_url, baudrate=baudrate, timeout_s=serial_timeout_s,
                 move_timeout_s=tape_move_timeout_s),
            Camera(camera_host, camera_port, timeout_s=camera_timeout_s),
        )

    async def connect(self) -> None:
        try:
            for dev in (self.stage, self.tape, self.camera):
                await dev.connect()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for dev in (self.camera, self.tape, self.stage):
            with contextlib.suppress(Exception):  # closing must reach every device
                await dev.close()

    async def __aenter__(self) -> Scope:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
