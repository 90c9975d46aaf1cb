"""A facility's own certificate authority for the MQTT broker: `tapescope mqtt certs DIR`.

Makes (or reuses) a private CA, signs the broker's certificate for the names and addresses
clients use to reach it, and, optionally, client certificates whose common name is an ACL
role (``operator``, ``viewer``): a client that presents one on the certificate listener is
that user. Private keys are written readable by their owner only. Renewal is running the
command again: the CA is kept (clients keep trusting it), the broker's and clients'
certificates are made anew. Docs: docs/mqtt.md.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tapescope.errors import TapescopeError

CA_DAYS = 3650
LEAF_DAYS = 825           # the longest validity clients commonly accept for a server certificate
ROLES = ("engine", "operator", "viewer")


class CertError(TapescopeError, ValueError):
    """A certificate request that cannot be made; the message names what is wrong."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    tmp = path.with_name(path.name + ".part")
    # Created owner-only: the key is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tapescope"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)   # clocks differ a little
    return start, start + dt.timedelta(days=days)


def make_ca(directory: Path, *, days: int = CA_DAYS) -> Issued:
    """The CA in DIR (ca.crt, ca.key): made once, then reused."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return Issued(cert_path, key_path)
    if cert_path.exists() or key_path.exists():
        # Half a CA (its key kept offline, as it should be): making a new one would silently
        # break every client that trusts the old.
        have, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise CertError(f"{have} is here but {missing} is not: put the CA's other half back to sign with it, "
                        "or remove both to make a new CA (every client then needs the new ca.crt)")
    directory.mkdir(parents=True, exist_ok=True)
    key = _key()
    start, end = _validity(days, None)
    cert = (x509.CertificateBuilder().subject_name(_name("tapescope MQTT CA")).issuer_name(_name("tapescope MQTT CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path)


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca.key}: not the elliptic-curve key this command makes")
    return cert, key


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    """Each --host as an IP address or a DNS name; an empty list is fine (no extra names)."""
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not n or any(c.isspace() for c in n):
                raise CertError(f"--host {n!r} is neither a host name nor an IP address") from None
            entries.append(x509.DNSName(n))
    return entries


def _leaf(ca: Issued, cn: str, usage: x509.ObjectIdentifier, san: list[str] | None, days: int,
          not_before: dt.datetime | None, out: Path, stem: str) -> Issued:
    ca_cert, ca_key = _load_ca(ca)
    key = _key()
    start, end = _validity(days, not_before)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san:
        # Only when there are names: cryptography >= 51 refuses an empty SubjectAlternativeName.
        b = b.add_extension(x509.SubjectAlternativeName(_general_names(san)), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    issued = Issued(out / f"{stem}.crt", out / f"{stem}.key")
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


def broker_cert(ca: Issued, hosts: list[str], out: Path, *, days: int = LEAF_DAYS,
                not_before: dt.datetime | None = None) -> Issued:
    """broker.crt/.key for the names and addresses clients connect to (localhost always)."""
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    return _leaf(ca, names[0], ExtendedKeyUsageOID.SERVER_AUTH, names, days, not_before, out, "broker")


def client_cert(ca: Issued, role: str, out: Path, *, days: int = LEAF_DAYS,
                not_before: dt.datetime | None = None) -> Issued:
    """ROLE.crt/.key: on the certificate listener the client is the user ROLE (its ACL applies)."""
    if role not in ROLES:
        raise CertError(f"--client {role!r}: a client certificate is for one of the roles {', '.join(ROLES)}")
    return _leaf(ca, role, ExtendedKeyUsageOID.CLIENT_AUTH, None, days, not_before, out, role)


def make_all(directory: Path, hosts: list[str], clients: list[str], *, days: int = LEAF_DAYS) -> list[Issued]:
    """What `tapescope mqtt certs` makes: the CA (kept if there), the broker's, the clients'."""
    if directory.exists() and not directory.is_dir():
        raise CertError(f"{directory} is a file, not a folder")
    for role in clients:
        if role not in ROLES:
            raise CertError(f"--client {role!r}: a client certificate is for one of the roles {', '.join(ROLES)}")
    _general_names(hosts)             # refuse a bad name before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    made = [ca, broker_cert(ca, hosts, directory, days=days)]
    made += [client_cert(ca, role, directory, days=days) for role in clients]
    return made
