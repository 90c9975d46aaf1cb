"""MQTT over TLS against a real Mosquitto started with the shipped configuration: its TLS
listener (passwords) and its certificate listener (client certificates as roles), with the
facility CA that `tapescope mqtt certs` makes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tapescope.acquisition.events import Alarm, Event, EventBus, TileAcquired
from tapescope.config import ConfigError, parse_config
from tapescope.gui.link_events import LinkChanged
from tapescope.gui.remote import MqttLink, MqttTarget
from tapescope.hardware.scope import Scope
from tapescope.mqtt import certs
from tapescope.mqtt.bridge import BrokerSettings, MqttBridge
from tapescope.mqtt.broker import MosquittoBroker, mosquitto_binary
from tapescope.mqtt.tls import TlsFiles, explain

from .support import ROOT, USERS, Watcher, make_engine

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None, reason="no mosquitto binary here (Debian: apt-get install mosquitto)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.make_all(d, ["scope-pc.example"], ["operator", "viewer"])
    return d


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker", USERS, tls=pki) as b:
        yield b


class Heard:
    """Events from a bus that other threads emit on (the GUI link's), and a wait for one."""

    def __init__(self, bus: EventBus) -> None:
        self.seen: list[Event] = []
        self._loop = asyncio.get_running_loop()
        self._new = asyncio.Event()
        bus.subscribe(self._on)

    def _on(self, ev: Event) -> None:
        self.seen.append(ev)
        self._loop.call_soon_threadsafe(self._new.set)

    async def until(self, pred, within_s: float = 20) -> None:
        async def wait() -> None:
            while not pred(self.seen):
                self._new.clear()
                await self._new.wait()
        await asyncio.wait_for(wait(), within_s)


def tls_client(port: int, files: TlsFiles | None, user: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=USERS.get(user or ""), timeout=5,
                          protocol=aiomqtt.ProtocolVersion.V5, tls_context=files.context() if files else None)


def test_certs_command_makes_owner_only_keys_and_keeps_the_ca_on_renewal(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = subprocess.run([sys.executable, "-m", "tapescope.cli", "mqtt", "certs", str(d), "--host", "scope-pc",
                        "--host", "192.0.2.7", "--client", "viewer"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for key in ("ca.key", "broker.key", "viewer.key"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    from cryptography import x509

    broker = x509.load_pem_x509_certificate((d / "broker.crt").read_bytes())
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"scope-pc", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"192.0.2.7", "127.0.0.1"}
    ca_before, broker_before = (d / "ca.crt").read_bytes(), (d / "broker.crt").read_bytes()
    r = subprocess.run([sys.executable, "-m", "tapescope.cli", "mqtt", "certs", str(d), "--host", "scope-pc"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (d / "ca.crt").read_bytes() == ca_before       # renewal keeps the CA
    assert (d / "broker.crt").read_bytes() != broker_before                     # and makes the rest anew
    key = (d / "ca.key").read_bytes()
    (d / "ca.key").unlink()                        # kept offline, as it should be: no silent new CA
    half = subprocess.run([sys.executable, "-m", "tapescope.cli", "mqtt", "certs", str(d)],
                          capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "ca.key is not" in half.stderr and (d / "ca.crt").read_bytes() == ca_before
    (d / "ca.key").write_bytes(key)
    bad = subprocess.run([sys.executable, "-m", "tapescope.cli", "mqtt", "certs", str(d), "--client", "admin"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "admin" in bad.stderr and "Traceback" not in bad.stderr


def test_certs_without_a_host_name_the_broker_localhost_only(tmp_path: Path) -> None:
    """No --host: a broker certificate for localhost and 127.0.0.1, on every cryptography release
    (51 and newer refuse an empty SubjectAlternativeName, which the client-certificate path must
    not build either)."""
    d = tmp_path / "pki"
    r = subprocess.run([sys.executable, "-m", "tapescope.cli", "mqtt", "certs", str(d), "--client", "operator"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    from cryptography import x509

    broker = x509.load_pem_x509_certificate((d / "broker.crt").read_bytes())
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate((d / "operator.crt").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):                      # a role, not a host: no names at all
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert {p.name for p in d.iterdir()} == {"ca.crt", "ca.key", "broker.crt", "broker.key",
                                             "operator.crt", "operator.key"}
    with pytest.raises(certs.CertError, match="neither a host name"):
        certs.make_all(tmp_path / "other", ["scope pc"], [])
    assert not (tmp_path / "other").exists()                         # refused before anything is written


def test_remote_brokers_need_tls_and_tls_needs_a_ca(pki: Path) -> None:
    with pytest.raises(ConfigError, match="tls = true"):
        parse_config({"mqtt": {"enabled": True, "host": "broker.example"}})
    with pytest.raises(ConfigError, match="needs ca_file"):
        parse_config({"mqtt": {"enabled": True, "host": "broker.example", "tls": True}})
    cfg = parse_config({"mqtt": {"enabled": True, "host": "broker.example", "tls": True,
                                 "ca_file": str(pki / "ca.crt")}})
    assert cfg.mqtt.port == 8883
    t = MqttTarget.parse(f"mqtts://viewer@scope-pc/sim-scope?ca={pki / 'ca.crt'}", env={})
    assert t.port == 8883 and t.tls is not None and t.describe() == "mqtts://viewer@scope-pc:8883/sim-scope"
    with pytest.raises(ValueError, match="another machine; use mqtts://"):
        MqttTarget.parse("mqtt://viewer@scope-pc/sim-scope", env={})
    with pytest.raises(ValueError, match="needs the CA"):
        MqttTarget.parse("mqtts://viewer@scope-pc/sim-scope", env={})
    with pytest.raises(ValueError, match="does not exist"):
        MqttTarget.parse("mqtts://viewer@scope-pc/sim-scope?ca=/nonexistent/ca.crt", env={})


@needs_mosquitto
async def test_a_viewer_over_mqtts_watches_a_run_bridged_over_tls(tls_broker: MosquittoBroker, pki: Path,
                                                                  scope: Scope, tmp_path: Path) -> None:
    eng, _ = make_engine(scope, tmp_path, [0, 1])
    bridge = MqttBridge(BrokerSettings("127.0.0.1", tls_broker.tls_port, "engine", USERS["engine"],
                                       tls=TlsFiles(pki / "ca.crt")), eng.bus, "sim-scope", engine=eng, run_dir="run")
    bus = EventBus()
    heard = Heard(bus)
    link = MqttLink(MqttTarget.parse(f"mqtts://viewer:{USERS['viewer']}@127.0.0.1:{tls_broker.tls_port}/sim-scope"
                                     f"?ca={pki / 'ca.crt'}", env={}), bus)
    bridge.start()
    link.start()
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        await heard.until(lambda seen: any(isinstance(e, LinkChanged) and e.up for e in seen))
        summary = await asyncio.wait_for(eng.run(), 60)
        assert summary.state.value == "done"
        want = {(s, r, c) for s in (0, 1) for r in (0, 1) for c in (0, 1)}
        await heard.until(lambda seen: {(e.slot, e.row, e.col) for e in seen if isinstance(e, TileAcquired)} == want)
    finally:
        link.stop()
        await bridge.stop()
    assert "mqtts://viewer@" in next(e.detail for e in heard.seen if isinstance(e, LinkChanged) and e.up)


@needs_mosquitto
async def test_a_broker_certificate_that_does_not_verify_is_refused_with_a_clear_message(
        tls_broker: MosquittoBroker, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    certs.make_all(other, [], [])
    with pytest.raises(aiomqtt.MqttError) as info:
        async with tls_client(tls_broker.tls_port, TlsFiles(other / "ca.crt"), "viewer"):
            pass
    assert "certificate was refused" in explain(info.value)
    # The GUI's link says so too, as an alarm a person reads.
    bus = EventBus()
    heard = Heard(bus)
    link = MqttLink(MqttTarget.parse(f"mqtts://viewer:{USERS['viewer']}@127.0.0.1:{tls_broker.tls_port}/sim-scope"
                                     f"?ca={other / 'ca.crt'}", env={}), bus)
    link.start()
    try:
        await heard.until(lambda seen: any(isinstance(e, Alarm) and "certificate was refused" in e.message
                                           for e in seen))
    finally:
        link.stop()
    assert not any(isinstance(e, LinkChanged) and e.up for e in heard.seen)


@needs_mosquitto
async def test_an_expired_broker_certificate_and_a_plain_connection_are_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = certs.make_ca(pki)
    certs.broker_cert(ca, [], pki, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    with MosquittoBroker(tmp_path / "broker", USERS, tls=pki) as b:
        with pytest.raises(aiomqtt.MqttError) as info:
            async with tls_client(b.tls_port, TlsFiles(ca.cert), "viewer"):
                pass
        assert "expired" in explain(info.value)
        # Plain MQTT to the TLS port: no session (the broker waits for a TLS handshake).
        with pytest.raises(aiomqtt.MqttError):
            async with tls_client(b.tls_port, None, "viewer"):
                pass


@needs_mosquitto
async def test_the_acl_holds_over_tls_for_passwords_and_client_certificates(tls_broker: MosquittoBroker,
                                                                            pki: Path) -> None:
    ca = TlsFiles(pki / "ca.crt")
    as_viewer = TlsFiles(pki / "ca.crt", pki / "viewer.crt", pki / "viewer.key")
    as_operator = TlsFiles(pki / "ca.crt", pki / "operator.crt", pki / "operator.key")
    async with tls_client(tls_broker.tls_port, ca, "engine") as engine:
        await engine.subscribe(f"{ROOT}/cmd", qos=1)
        w = Watcher(engine)
        task = asyncio.create_task(w.run())
        try:
            # The broker has handled each denied publish once its QoS 1 handshake ends; the
            # operator's marker, sent after, arrives after anything that got through.
            async with tls_client(tls_broker.tls_port, ca, "viewer") as viewer:
                await viewer.publish(f"{ROOT}/cmd", json.dumps({"cmd": "abort", "id": "v-pw"}), qos=1)
            async with tls_client(tls_broker.cert_port, as_viewer) as viewer:
                await viewer.publish(f"{ROOT}/cmd", json.dumps({"cmd": "abort", "id": "v-cert"}), qos=1)
            async with tls_client(tls_broker.cert_port, as_operator) as op:
                await op.publish(f"{ROOT}/cmd", json.dumps({"cmd": "status", "id": "op-cert"}), qos=1)
            await w.wait_for(f"{ROOT}/cmd", lambda p: p.get("id") == "op-cert")
        finally:
            task.cancel()
    ids = [p.get("id") for t, p in w.seen if t == f"{ROOT}/cmd"]
    assert ids == ["op-cert"]
    # The certificate listener takes no client without a certificate of the CA.
    with pytest.raises(aiomqtt.MqttError):
        async with tls_client(tls_broker.cert_port, ca, "operator"):
            pass
