"""Every error tapescope raises on purpose derives from TapescopeError (commands report those
as bad input, and only those), and keeps the built-in base callers may catch."""

from __future__ import annotations

from tapescope.acquisition.calibration import CalibrationFailed
from tapescope.acquisition.state import IllegalTransition
from tapescope.acquisition.store import JournalError
from tapescope.alignment.stack import StackError
from tapescope.config import ConfigError
from tapescope.errors import TapescopeError
from tapescope.hardware.errors import DeviceError, DeviceTimeout, ProtocolError
from tapescope.mqtt.certs import CertError
from tapescope.mqtt.commands import CommandError
from tapescope.mqtt.tls import TlsError
from tapescope.runner import ResumeError
from tapescope.sim_hardware.faults import FaultError
from tapescope.stitching.backend import BackendUnavailable
from tapescope.stitching.tileset import TileSetError
from tapescope.view.state import ViewError


def test_one_root_for_the_package_errors() -> None:
    errors = [CalibrationFailed, IllegalTransition, JournalError, ConfigError, DeviceError, DeviceTimeout,
              ProtocolError, StackError, CertError, CommandError, TlsError, ResumeError, FaultError,
              BackendUnavailable, TileSetError, ViewError]
    assert all(issubclass(e, TapescopeError) for e in errors)
    for e in (JournalError, StackError, CertError, CommandError, TlsError, FaultError, TileSetError, ViewError):
        assert issubclass(e, ValueError), e
    assert issubclass(BackendUnavailable, RuntimeError) and issubclass(IllegalTransition, RuntimeError)
