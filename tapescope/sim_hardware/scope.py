"""Start every emulator over one shared world, in the running asyncio loop."""

from __future__ import annotations

from types import TracebackType

from tapescope.config import CameraConfig, ColumnConfig, ScopeConfig, StageConfig, TapeConfig

from .camera import CameraEmulator
from .column import ColumnEmulator
from .gridtape import GridTapeEmulator
from .stage import StageEmulator
from .tape import TapeEmulator
from .tape_camera import TapeCameraEmulator
from .temscript_tem import TemscriptTem
from .world import SimWorld, WorldParams


class SimulatedScope:
    """``async with SimulatedScope(params) as sim: sim.scope_config(...)``"""

    def __init__(self, params: WorldParams | None = None, *, tape_driver: str = "line",
                 stage_driver: str = "asi", column_driver: str = "line", camera_bits: int = 16) -> None:
        """``tape_driver``: the tape's protocol, ``line`` (tapescope's) or ``gridtape`` (GridTape's
        reel controller firmware, with its tape camera). ``stage_driver`` ``temscript`` and
        ``column_driver`` ``temscript``: the goniometer and the column served as a Thermo
        Fisher / FEI TEM through temscript's HTTP API (one server for both)."""
        self.world = SimWorld(params)
        self.tem = TemscriptTem(self.world) if "temscript" in (stage_driver, column_driver) else None
        self.stage_driver, self.column_driver = stage_driver, column_driver
        self.stage = StageEmulator(self.world)
        self.tape: TapeEmulator | GridTapeEmulator
        self.tape_camera: TapeCameraEmulator | None = None
        if tape_driver == "gridtape":
            self.tape = GridTapeEmulator(self.world)
            self.tape_camera = TapeCameraEmulator(self.tape.model)
        else:
            self.tape = TapeEmulator(self.world)
        self.camera = CameraEmulator(self.world, bit_depth=camera_bits)
        self.column = ColumnEmulator(self.world)

    async def start(self, camera_port: int = 0) -> None:
        if self.tem is not None:
            await self.tem.start()
        await self.stage.start()
        await self.tape.start()
        if self.tape_camera is not None:
            await self.tape_camera.start()
        await self.column.start()
        await self.camera.start(camera_port)

    async def stop(self) -> None:
        await self.camera.stop()
        if self.tape_camera is not None:
            await self.tape_camera.stop()
        await self.column.stop()
        await self.tape.stop()
        await self.stage.stop()
        if self.tem is not None:
            await self.tem.stop()
        self.world.close()

    def inject(self, name: str, count: int = 1, *, after: int = 0, **options: object) -> None:
        """Arm a fault, e.g. ``sim.inject("stage_timeout", count=1)`` (docs/simulator.md)."""
        self.world.inject(name, count, after=after, **options)

    async def __aenter__(self) -> SimulatedScope:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _url(self, device: str) -> str:
        """Where the simulator serves `device`: the TEM's URL, or the emulator's pty."""
        driver = self.stage_driver if device == "stage" else self.column_driver
        if driver == "temscript":
            assert self.tem is not None
            return self.tem.url
        return self.stage.port if device == "stage" else self.column.port

    def _tape_config(self, base: TapeConfig) -> TapeConfig:
        d = {**base.model_dump(), "url": self.tape.port}
        if self.tape_camera is not None:
            d |= {"driver": "gridtape", "slots": base.slots or self.world.p.n_slots,
                  "slot_pitch_mm": self.world.p.tape_slot_pitch_mm,
                  "camera": {**d["camera"], "port": self.tape_camera.port}}
        return TapeConfig(**d)

    def scope_config(self, base: ScopeConfig | None = None) -> ScopeConfig:
        """A scope config whose ports point at these emulators, other settings kept."""
        b = base or ScopeConfig()
        h, w = self.world.p.tile_px
        return b.model_copy(update={
            # A stage or column configured elsewhere (a temscript server) is kept: the
            # simulator's stands in only where none is given.
            "stage": StageConfig(**{**b.stage.model_dump(), "url": b.stage.url or self._url("stage")}),
            "tape": self._tape_config(b.tape),
            "column": ColumnConfig(**{**b.column.model_dump(), "url": b.column.url or self._url("column")}),
            # A camera of its own (GenICam) is kept, as a column configured elsewhere is.
            "camera": b.camera if b.camera.driver != "tcp" else
            CameraConfig(**{**b.camera.model_dump(), "port": self.camera.port,
                            "height": h, "width": w, "pixel_size_nm": self.world.p.pixel_nm}),
        })
