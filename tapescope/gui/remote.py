"""Attach the GUI to a headless run over MQTT (`tapescope gui --mqtt URL`).

An aiomqtt client runs in a worker thread with its own asyncio loop (as the local engine
does, `session.py`): it subscribes to the run's topic tree (docs/mqtt.md), turns each
message back into the engine event it came from, and emits it on an ``EventBus``; the
window folds those into its ``RunModel`` exactly as it folds a local engine's events.
Commands go out on ``<root>/cmd`` with a correlation id; the reply comes back as an event.

The broker's ACL decides who may command, and MQTT gives a client no way to ask it. So the
window starts read-only and probes: a ``status`` command with a fresh id. A reply proves
that the broker let the command through (operator); no reply leaves the window a viewer.
The probe is repeated whenever the engine comes online, until one is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt

from tapescope.acquisition.events import (
    Alarm,
    EventBus,
)
from tapescope.mqtt.tls import TlsError, TlsFiles, explain
from tapescope.mqtt.topics import EngineOnline, events_of

from .link_events import CommandReply, LinkChanged, RoleChanged
from .model import RunModel, allowed

log = logging.getLogger(__name__)

PASSWORD_ENV = "TAPESCOPE_MQTT_PASSWORD"
DEFAULT_PORT = 1883
TLS_PORT = 8883
CA_ENV, CERT_ENV, KEY_ENV = "TAPESCOPE_MQTT_CA", "TAPESCOPE_MQTT_CERT", "TAPESCOPE_MQTT_KEY"
REPLY_TIMEOUT_S = 5.0


# -- what the GUI attaches to -----------------------------------------------------------------

@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    scope: str
    username: str | None = None
    password: str | None = None
    tls: TlsFiles | None = None

    @property
    def root(self) -> str:
        return f"tapescope/{self.scope}"

    def describe(self) -> str:
        who = f"{self.username}@" if self.username else ""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{who}{self.host}:{self.port}/{self.scope}"     # never the password

    @classmethod
    def parse(cls, url: str, env: dict[str, str] | None = None) -> MqttTarget:
        """``mqtt[s]://[user[:password]@]HOST[:PORT]/SCOPE[?ca=FILE&cert=FILE&key=FILE]``.

        ``mqtts`` is MQTT over TLS (port 8883 by default), the only way to reach a broker on
        another machine: the broker's certificate is verified against the CA (``ca=``, or
        $TAPESCOPE_MQTT_CA); ``cert=`` and ``key=`` (or $TAPESCOPE_MQTT_CERT, _KEY) present a
        client certificate instead of a password. The password may come from
        $TAPESCOPE_MQTT_PASSWORD (better: a URL shows in the process list)."""
        env = os.environ if env is None else env
        form = "mqtt[s]://[user[:password]@]HOST[:PORT]/SCOPE"
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"--mqtt URL must start with mqtt:// or mqtts://, got {url!r} (form: {form})")
        if not parts.hostname:
            raise ValueError(f"--mqtt URL {url!r} names no host (form: {form})")
        secure = parts.scheme == "mqtts"
        try:
            port = parts.port or (TLS_PORT if secure else DEFAULT_PORT)
        except ValueError:
            raise ValueError(f"--mqtt URL {url!r}: the port is not a number from 1 to 65535") from None
        scope = parts.path.strip("/")
        if not scope or "/" in scope or "+" in scope or "#" in scope:
            raise ValueError(f"--mqtt URL {url!r} must end with the scope name, e.g. mqtts://viewer@host/sim-scope "
                             "(the [scope] name of the engine's config)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"ca", "cert", "key"}
        if unknown:
            raise ValueError(f"--mqtt URL {url!r}: unknown option(s) {', '.join(sorted(unknown))} "
                             "(known: ca, cert, key)")
        tls = None
        if secure:
            ca = query.get("ca") or env.get(CA_ENV)
            if not ca:
                raise ValueError(f"--mqtt {parts.scheme}:// needs the CA that signed the broker's certificate: "
                                 f"?ca=FILE in the URL or ${CA_ENV}")
            cert, key = query.get("cert") or env.get(CERT_ENV), query.get("key") or env.get(KEY_ENV)
            tls = TlsFiles(Path(ca), Path(cert) if cert else None, Path(key) if key else None)
            try:
                tls.context()
            except TlsError as exc:
                raise ValueError(f"--mqtt: {exc}") from None
        elif query:
            raise ValueError(f"--mqtt URL {url!r}: ca, cert and key are for mqtts://")
        elif parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"--mqtt URL {url!r}: {parts.hostname} is another machine; use mqtts:// (a password "
                             "must not cross the network in clear text)")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if user and password is None:
            password = env.get(PASSWORD_ENV)
        return cls(parts.hostname, port, scope, user, password, tls)


# -- events that only a remote link has ------------------------------------------------------

# -- the client thread ------------------------------------------------------------------------

class MqttLink:
    """One subscription to a scope's topic tree, in its own thread; reconnects forever with back-off."""

    def __init__(self, target: MqttTarget, bus: EventBus, *, reconnect_max_s: float = 5.0,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.target = target
        self.bus = bus
        self.reconnect_max_s = reconnect_max_s
        self.reply_timeout_s = reply_timeout_s
        self.connected = False
        self.role = "viewer"
        self.engine_online = False
        self._prefix = f"gui-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count(1)
        self._pending: dict[str, str] = {}            # id -> verb ("probe" for the role probe)
        self._client: aiomqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self._said_viewer = False

    # -- lifecycle (GUI thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="tapescope-mqtt", daemon=True)
        self._thread.start()
        self._started.wait(5)

    def stop(self, timeout_s: float = 5.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):     # the loop already closed
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- commands (GUI thread) ------------------------------------------------------------
    def send(self, verb: str, reason: str = "") -> str:
        """Publish a command; returns its id. The reply (or its absence) arrives as an event."""
        loop, client = self._loop, self._client
        if loop is None or client is None or not self.connected:
            raise ConnectionError(f"not connected to the broker at {self.target.describe()}")
        cid = f"{self._prefix}-{next(self._ids)}"
        payload = {"cmd": verb, "id": cid, **({"reason": reason} if reason else {})}
        self._pending[cid] = verb
        asyncio.run_coroutine_threadsafe(self._publish(client, cid, payload), loop)   # held by the loop until done
        return cid

    async def _publish(self, client: aiomqtt.Client, cid: str, payload: dict[str, Any]) -> None:
        try:
            await client.publish(f"{self.target.root}/cmd", json.dumps(payload), qos=1)
        except aiomqtt.MqttError as exc:
            self._pending.pop(cid, None)
            self.bus.emit(Alarm("mqtt", f"{payload['cmd']} (id {cid}) could not be sent: {exc}", "warning"))
            return
        asyncio.get_running_loop().call_later(self.reply_timeout_s, self._expire, cid)

    def _expire(self, cid: str) -> None:
        verb = self._pending.pop(cid, None)
        if verb is None:                 # answered
            return
        if verb == "probe":              # a viewer's probe goes unanswered: say so once
            if self.role != "operator" and not self._said_viewer:
                self._said_viewer = True
                self.bus.emit(RoleChanged("viewer", "no reply to a command probe: read-only"))
            return
        self.bus.emit(Alarm("mqtt", f"no reply to {verb.replace('_', ' ')} (id {cid}) within "
                            f"{self.reply_timeout_s:g} s: the broker refused it (read-only credentials?) "
                            "or the engine is not listening", "warning"))

    def _probe(self) -> None:
        if self.role != "operator" and self._client is not None:
            cid = f"{self._prefix}-{next(self._ids)}"
            self._pending[cid] = "probe"
            task = asyncio.ensure_future(self._publish(self._client, cid, {"cmd": "status", "id": cid}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the worker thread ----------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:   # the thread's last word must reach the operator
            log.exception("MQTT link failed")
            self.bus.emit(Alarm("mqtt", f"the MQTT link stopped: {type(exc).__name__}: {exc}"))
        finally:
            self._started.set()
            self.connected = False

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._run()

    async def _run(self) -> None:
        t = self.target
        delay, last_error = 0.2, ""
        while True:
            try:
                async with aiomqtt.Client(t.host, t.port, username=t.username, password=t.password, keepalive=5,
                                          timeout=5, protocol=aiomqtt.ProtocolVersion.V5,
                                          tls_context=t.tls.context() if t.tls is not None else None) as client:
                    await client.subscribe(f"{t.root}/#", qos=1)
                    self._client, self.connected, delay, last_error = client, True, 0.2, ""
                    self.bus.emit(LinkChanged(True, f"connected to {t.describe()}"))
                    self._probe()
                    async for message in client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError as exc:
                text = f"broker {t.host}:{t.port}: {explain(exc) or exc}"
                if self.connected or text != last_error:     # each new fault once, not every retry
                    self.bus.emit(LinkChanged(False, f"{text}; reconnecting"))
                    self.bus.emit(Alarm("mqtt", f"{text}; reconnecting (telemetry shown is from before)",
                                        "warning"))
                last_error = text
            finally:
                self._client, self.connected = None, False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        suffix = topic[len(self.target.root) + 1:]
        if suffix == "cmd":
            return                        # commands (ours and others'): their replies are what counts
        try:
            raw = message.payload
            payload = json.loads(raw.decode() if isinstance(raw, bytes | bytearray) else str(raw))
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not an object")
            if suffix == "reply":
                self._on_reply(payload)
                return
            events = events_of(suffix, payload, bool(message.retain))
        except (ValueError, KeyError, TypeError) as exc:
            self.bus.emit(Alarm("mqtt", f"unreadable message on {topic}: {type(exc).__name__}: {exc}", "warning"))
            return
        for ev in events:
            if isinstance(ev, EngineOnline):
                self.engine_online = ev.online
            self.bus.emit(ev)
            if isinstance(ev, EngineOnline) and ev.online:
                self._probe()

    def _on_reply(self, p: dict[str, Any]) -> None:
        cid = None if p.get("id") is None else str(p["id"])
        verb = self._pending.pop(cid, None) if cid is not None else None
        if verb == "probe":
            self.role = "operator"
            self.bus.emit(RoleChanged("operator", "the engine answered a command: run control enabled"))
            return
        text = str(p.get("message") or p.get("error") or "")
        self.bus.emit(CommandReply(cid, str(p.get("cmd") or verb or "?"), bool(p.get("ok")), text, verb is not None))


# -- run control over the link ----------------------------------------------------------------

class MqttController:
    """Run control of an attached run: read-only unless the broker lets this client command."""

    def __init__(self, link: MqttLink, model: RunModel) -> None:
        self.link = link
        self.model = model

    @property
    def mode(self) -> str:
        role = "operator" if self.link.role == "operator" else "viewer (read-only)"
        if not self.link.connected:
            where = f"broker unreachable, reconnecting to {self.link.target.describe()}"
        else:
            where = f"attached to {self.link.target.describe()}" + ("" if self.link.engine_online
                                                                     else ", engine offline")
        return f"{role}; {where}"

    def can(self, verb: str) -> bool:
        if verb == "start" or self.link.role != "operator" or not self.link.connected:
            return False          # a headless run is started where it runs (tapescope acquire)
        return allowed(verb, self.model.run_state, self.link.engine_online)

    def do(self, verb: str) -> None:
        if verb == "start":
            raise RuntimeError("a run attached over MQTT is started where it runs (tapescope acquire)")
        if self.link.role != "operator":
            raise PermissionError("viewer (read-only): these credentials cannot command this run")
        self.link.send(verb, "from the GUI")


def run_remote_gui(target: MqttTarget, *, screenshot: Path | None = None, after_s: float = 3.0) -> int:
    """Open the window attached to TARGET and run Qt's loop until it closes (or the screenshot is taken)."""
    from PySide6 import QtWidgets

    from .window import MainWindow, exec_window

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    bus = EventBus()
    model = RunModel()
    link = MqttLink(target, bus)
    win = MainWindow(bus, MqttController(link, model), model)
    link.start()
    win.show()
    code = exec_window(app, win, screenshot, after_s)
    link.stop()
    win.shutdown()
    return code
