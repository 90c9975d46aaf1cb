"""TLS for tapescope's MQTT clients (the engine's bridge, the remote GUI, any CLI): the CA
to trust and, optionally, a client certificate. A broker whose certificate does not verify
against the CA is refused, with a message that says why."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from tapescope.errors import TapescopeError


class TlsError(TapescopeError, ValueError):
    """TLS settings that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path                         # the facility's CA (`tapescope mqtt certs`: ca.crt)
    cert: Path | None = None         # a client certificate (its common name is the user)
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker against `ca` (and its host name) and
        presents the client certificate, if any. TLS 1.2 at least."""
        for what, path in (("CA", self.ca), ("client certificate", self.cert), ("client key", self.key)):
            if path is not None and not Path(path).is_file():
                raise TlsError(f"{what} file {path} does not exist")
        if (self.cert is None) != (self.key is None):
            raise TlsError("a client certificate needs its key, and a key its certificate")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"CA file {self.ca} is not a PEM certificate: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, OSError) as exc:
                raise TlsError(f"client certificate {self.cert} with key {self.key}: {exc}") from None
        return ctx


def explain(exc: BaseException) -> str:
    """What a failed TLS connection means for a person, or "" when it is not a TLS fault."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"the broker's certificate was refused ({seen.verify_message}): it is not signed by the CA "
                    "given, has expired, or does not name this host")
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen}): is this the broker's TLS port?"
        seen = seen.__cause__ or seen.__context__
    return ""
