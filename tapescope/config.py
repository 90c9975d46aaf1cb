"""Configuration: pydantic models for the scope, the run and processing, loaded from TOML.

A config file has up to three tables, ``[scope]``, ``[run]`` and ``[processing]``; every
field has a default, so an empty file is the embedded demo configuration. Errors name the
file, the field (as a dotted path) and what was expected.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tapescope.errors import TapescopeError


class ConfigError(TapescopeError):
    """A configuration file that cannot be used; the message is meant for a person."""


class _Model(BaseModel):
    # Unknown keys are almost always typos ("exposre_ms"): refuse them rather than ignore.
    # inf and nan are never a setting: they pass "> 0" and fail deep inside a run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Micrometres = Annotated[float, Field(gt=0, le=200_000)]   # a length on the tape or the stage


class SerialPortConfig(_Model):
    """A serial device: any pyserial URL (``/dev/ttyUSB0``, a pty path, ``socket://h:p``)."""

    url: str | None = Field(None, description="pyserial URL; None means 'start the simulator'")
    baudrate: Annotated[int, Field(gt=0)] = 115200
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0


class StageConfig(SerialPortConfig):
    """The XY stage: an ASI MS-2000 on a serial line, or the http://HOST:PORT of a temscript
    server, for a TEM's own goniometer (hardware/temscript_stage.py). ``driver`` says which
    the simulator serves when url is unset; a url names its driver by its scheme."""

    driver: Literal["asi", "temscript"] = "asi"

    settle_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    travel_um: tuple[Micrometres, Micrometres] = Field(
        (10_000.0, 10_000.0), description="stage travel (y, x) in um, centred on the beam axis: the "
        "driver's soft limits; a plan whose tiles lie outside it is refused before the run starts")


class TapeCameraConfig(_Model):
    """GridTape's tape camera (hardware/barcode_camera.py): where it is and its calibration."""

    driver: Literal["tcp", "genicam"] = "tcp"
    device: str | None = Field(None, description="genicam: Aravis device id or IP address")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        None, description="TCP port of its frame server; None means 'start the simulator'")
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    px_per_mm: Annotated[float, Field(gt=0, le=10_000)] = 40.0
    axis_px: Annotated[float, Field(ge=0)] | None = Field(
        None, description="the beam axis's column in the tape camera's frame; None: the centre")
    aperture_rows: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.6, 0.9)
    aperture_mm: Annotated[float, Field(gt=0, le=100)] = 2.0
    digits: Annotated[int, Field(ge=2, le=30, multiple_of=2)] = 6


class TapeConfig(SerialPortConfig):
    """The tape transport: tapescope's line protocol (``line``), or GridTape's reel controller
    (``gridtape``: comando over serial plus its tape camera; hardware/gridtape.py)."""

    move_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    driver: Literal["line", "gridtape"] = "line"
    slots: Annotated[int, Field(ge=1)] | None = Field(
        None, description="gridtape: slots on the tape (its controller does not know); "
        "None with the simulator: the simulated tape's")
    slot_pitch_mm: Annotated[float, Field(gt=0, le=100)] = 6.0
    speed_mm_s: Annotated[float, Field(gt=0, le=1000)] = 20.0
    centre_tolerance_mm: Annotated[float, Field(gt=0, le=5)] = 0.05
    tension_low_g: Annotated[float, Field(ge=0)] = 30.0
    tension_high_g: Annotated[float, Field(gt=0)] = 130.0
    tension_zero_counts: float = 8_457_000.0
    tension_counts_per_g: Annotated[float, Field(gt=0)] = 100.0
    camera: TapeCameraConfig = TapeCameraConfig()

    @model_validator(mode="after")
    def _gridtape(self) -> TapeConfig:
        if self.tension_low_g >= self.tension_high_g:
            raise ValueError(f"tension_low_g {self.tension_low_g} must be below tension_high_g {self.tension_high_g}")
        if self.driver == "gridtape" and self.url is not None and self.slots is None:
            raise ValueError("driver gridtape with a real controller needs slots (the tape's slot count)")
        if self.camera.driver == "genicam" and not self.camera.device:
            raise ValueError("tape camera driver genicam needs device (an Aravis device id or IP address)")
        return self


class CameraConfig(_Model):
    """The imaging camera: tapescope's frame protocol over TCP (``tcp``: host and port), or a
    GenICam camera through Aravis (``genicam``: its Aravis device id or IP address)."""

    driver: Literal["tcp", "genicam"] = "tcp"
    device: str | None = Field(None, description="genicam: Aravis device id (arv-tool-0.8 lists them) "
                               "or the camera's IP address")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        None, description="TCP port of the frame server; None means 'start the simulator'"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    width: Annotated[int, Field(ge=16, le=16384)] = 512
    height: Annotated[int, Field(ge=16, le=16384)] = 512
    pixel_size_nm: Annotated[float, Field(gt=0, le=10_000)] = 4.0
    bit_depth: Literal[8, 16] = Field(
        16, description="the camera's sample size: 8 keeps tiles, montages and the volume uint8 (TEMCA's "
        "cameras; half the bytes), 16 uint16; the simulator serves frames of this depth")

    @model_validator(mode="after")
    def _genicam(self) -> CameraConfig:
        if self.driver == "genicam" and not self.device:
            raise ValueError("camera driver genicam needs device (an Aravis device id or IP address)")
        return self


class ColumnConfig(SerialPortConfig):
    """The TEM column: a serial line (tapescope's column protocol), or the http://HOST:PORT
    of a temscript server on a Thermo Fisher / FEI TEM's PC (hardware/temscript_column.py).
    Unset on a real scope means 'no column driver'; with the simulator, its own column."""

    ramp_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    driver: Literal["line", "temscript"] = Field(
        "line", description="which interface the simulator serves when url is unset; a url names "
        "its driver by its scheme")


class ScopeConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "sim-scope"
    stage: StageConfig = StageConfig()
    tape: TapeConfig = TapeConfig()
    camera: CameraConfig = CameraConfig()
    column: ColumnConfig = ColumnConfig()

    @property
    def simulated(self) -> bool:
        return (self.stage.url is None or self.tape.url is None
                or (self.camera.driver == "tcp" and self.camera.port is None)
                or (self.tape.driver == "gridtape" and self.tape.camera.driver == "tcp"
                    and self.tape.camera.port is None))


class RunConfig(_Model):
    slots: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1, 2])
    grid: tuple[Annotated[int, Field(ge=1, le=1000)], Annotated[int, Field(ge=1, le=1000)]] = (3, 3)
    overlap: Annotated[float, Field(ge=0.02, le=0.5)] = 0.10
    exposure_ms: Annotated[float, Field(gt=0, le=10_000)] = 20.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 1
    # -- acquisition (docs/acquisition.md) --
    slot_range: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = Field(
        None, description="first and last slot, inclusive; instead of 'slots'")
    all_slots: bool = Field(False, description="image every slot on the tape; instead of 'slots'")
    barcodes: dict[str, str] = Field(default_factory=dict, description="expected barcode per slot number")
    roi: Literal["grid", "auto"] = Field(
        "grid", description="'grid': the fixed grid on every slot; 'auto': overview -> tissue outline")
    aperture_um: tuple[Micrometres, Micrometres] | None = Field(
        None, description="slot aperture (height, width) in um: the area the overview searches (roi = 'auto')")
    roi_polygons: dict[str, list[tuple[float, float]]] = Field(
        default_factory=dict, description="operator ROI per slot ('*' = every slot): (y, x) stage nm")
    max_retakes: Annotated[int, Field(ge=0, le=10)] = 2
    on_device_failure: Literal["fail", "pause"] = Field(
        "pause", description="a device that retries do not cure: 'pause' the run with an alarm (it resumes "
        "when the operator says so or the device answers again), or 'fail' it")
    device_retries: Annotated[int, Field(ge=0, le=20)] = 3
    retry_window_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        20.0, description="a failing device call is retried for at least this long (and device_retries times)")
    device_probe_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        15.0, description="paused for a device: how often its failing step is tried again")
    watchdog_stall_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    min_free_gb: Annotated[float, Field(ge=0, le=1_000_000)] = 1.0
    reimage_at_end: bool = True
    processing_wait_s: Annotated[float, Field(ge=0, le=86_400, description=(
        "before re-imaging at the end, wait up to this long for processing to judge the sections "
        "taken, so one that does not register is re-imaged while the tape is loaded"))] = 900.0
    calibrate: list[Literal["darkfield", "brightfield", "auto_exposure", "autofocus"]] = Field(
        default_factory=list, description="calibration routines to run (docs/acquisition.md)")

    @field_validator("slots")
    @classmethod
    def _unique_slots(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one tape slot is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"slots must be unique, got {v}")
        return v

    @model_validator(mode="after")
    def _one_slot_selection(self) -> RunConfig:
        chosen = [n for n, on in (("slots", "slots" in self.model_fields_set),
                                  ("slot_range", self.slot_range is not None), ("all_slots", self.all_slots)) if on]
        if len(chosen) > 1:
            raise ValueError(f"choose the slots one way, got {' and '.join(chosen)}")
        if self.slot_range is not None and self.slot_range[1] < self.slot_range[0]:
            raise ValueError(f"slot_range {list(self.slot_range)} is empty (last < first)")
        for key in (*self.barcodes, *self.roi_polygons):
            if not (key.isdigit() or (key == "*" and key in self.roi_polygons)):
                raise ValueError(f"slot key {key!r} must be a slot number" + (" or '*'" if key in self.roi_polygons
                                                                            else ""))
        for key, poly in self.roi_polygons.items():
            if len(poly) < 3:
                raise ValueError(f"roi_polygons[{key!r}] needs at least 3 (y, x) points, got {len(poly)}")
        return self


class ProcessingConfig(_Model):
    enabled: bool = Field(True, description="stitch, align and write the volume during the run")
    flatfield: Literal["auto", "none"] = "auto"
    section_thickness_nm: Annotated[float, Field(gt=0, le=100_000)] = 40.0
    pyramid_levels: Annotated[int, Field(ge=2, le=12)] = 3
    chunk: Annotated[int, Field(ge=32, le=4096)] = 256
    align: bool = True
    elastic: bool = Field(True, description="fine elastic alignment of each section during the run "
                          "(costs seconds per section on a CPU; off leaves rigid/affine)")
    align_neighbours: Annotated[int, Field(ge=1, le=8)] = Field(
        2, description="good sections below each section that it is aligned to together (the last good "
        "one and those under it); each costs one more alignment per section")
    align_flow: Literal["live", "stack"] = Field(
        "live", description="the pairs' elastic flow: 'live' (patches of 96 px every 48 px, 2 passes) or 'stack' "
        "(the offline stack's 64 px every 32 px, 3 passes: about 2x the CPU, undoes more of the warps on real "
        "tissue; docs/alignment.md)")
    align_look_ahead: Annotated[int, Field(ge=0, le=16)] = Field(
        4, description="good sections a good section stays open for after its verdict: each places the open "
        "ones again with its own matches (the stack solve, live), and a section is written when it leaves "
        "the window, this many good sections later; 0 writes each section as soon as it is placed")
    lens: Literal["estimate", "none"] = Field(
        "estimate", description="estimate the camera's radial distortion from the first sections' overlaps "
        "and take it out of every tile when stitching and rendering; 'none' renders tiles as taken")
    tile_model: Literal["translation", "affine"] = Field(
        "translation", description="'affine' for a camera array: each tile also turned and scaled against "
        "its neighbours, fitted from the overlaps and rendered through (docs/stitching.md)")
    scratch: Path | None = Field(
        None, description="folder for each section's scratch files while it is aligned (14 bytes a canvas "
        "pixel; a fast local disk); default: beside the volume")
    device: Literal["cpu", "gpu", "auto"] = Field(
        "cpu", description="where sections are warped and their flow fields computed: 'gpu' needs CuPy and "
        "a CUDA device (checked before the run starts), 'auto' uses one where present")
    scheduler: Annotated[str, Field(pattern=r"^(tcp|tls)://[^:/\s]+:\d+$")] | None = Field(
        None, description="dask scheduler tcp://HOST:PORT: sections are stitched and rendered on its workers, "
        "several at once (the run directory and the volume on a disk they all see); unset: in this process")
    max_backlog: Annotated[int, Field(ge=0, le=100_000)] = Field(
        8, description="sections acquired and not yet processed beyond which processing raises an alarm "
        "(0: never)")

    @model_validator(mode="after")
    def _chunk_power_of_two(self) -> ProcessingConfig:
        if self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be a power of two, got {self.chunk}")
        return self


class MqttConfig(_Model):
    """The MQTT bridge (docs/mqtt.md). The password never sits in the config file."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = Field(1883, description="1883 plain (this machine only); "
                                                        "8883 (the default with tls) TLS")
    username: str | None = "engine"
    password_env: str = Field("TAPESCOPE_MQTT_PASSWORD", description="environment variable holding the password")
    keepalive_s: Annotated[int, Field(ge=1, le=600)] = 10
    buffer: Annotated[int, Field(ge=10, le=1_000_000)] = 10_000
    tls: bool = Field(False, description="MQTT over TLS: needed for any broker not on this machine")
    ca_file: Path | None = Field(None, description="the facility's CA (tapescope mqtt certs: ca.crt)")
    cert_file: Path | None = Field(None, description="a client certificate (broker's certificate listener)")
    key_file: Path | None = Field(None, description="the client certificate's key")

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("tls") and "port" not in data:
            return {**data, "port": 8883}
        return data

    @model_validator(mode="after")
    def _tls_files(self) -> MqttConfig:
        if self.tls and self.ca_file is None:
            raise ValueError("tls = true needs ca_file, the CA that signed the broker's certificate")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file, cert_file and key_file are for tls = true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.enabled and not self.tls and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host {self.host!r} is another machine: set tls = true (a password must not "
                             "cross the network in clear text)")
        return self

    @property
    def tls_files(self):  # -> TlsFiles | None; imported lazily (the config does not need ssl)
        from tapescope.mqtt.tls import TlsFiles

        if not self.tls or self.ca_file is None:
            return None
        return TlsFiles(self.ca_file, self.cert_file, self.key_file)


class TapescopeConfig(_Model):
    scope: ScopeConfig = ScopeConfig()
    run: RunConfig = RunConfig()
    processing: ProcessingConfig = ProcessingConfig()
    mqtt: MqttConfig = MqttConfig()


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    got = err.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"  {loc}: {msg}{got_txt}"


def parse_config(data: dict, source: str = "<config>") -> TapescopeConfig:
    try:
        return TapescopeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> TapescopeConfig:
    """Read and validate a TOML config; raise ConfigError naming file, field and expectation."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, str(p))
