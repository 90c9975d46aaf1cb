"""The MQTT bridge: engine events out as telemetry, operator commands in.

Telemetry never waits on the broker: a broker that is down or restarts never stops or slows
acquisition. Events become messages in a bounded buffer; one publisher task
drains it while connected. When the buffer is full the oldest ordinary telemetry is
dropped (and counted); state changes and alarms sit in a separate buffer, and the latest
value of every retained topic is kept apart and re-published on each reconnect, so a
dashboard always converges to the truth. The connection is retried with back-off forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tapescope.acquisition.events import (
    Alarm,
    DeviceStatus,
    Event,
    EventBus,
    Progress,
    RunFinished,
    SectionFinished,
    SectionPlanned,
)
from tapescope.health import process_health

from . import commands
from .tls import TlsFiles, explain
from .topics import Message, messages_for, root

log = logging.getLogger(__name__)

MOVING_HZ = 20.0        # device status while a device moves (the Allen stage service's rate class)
IDLE_HZ = 1.0
HEALTH_S = 5.0          # the engine process's memory, files, threads and tasks (tapescope/health.py)
PROGRESS_MIN_S = 0.1    # progress is retained state: 10 Hz is plenty for a dashboard


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 10
    buffer: int = 10_000
    reconnect_max_s: float = 5.0
    tls: TlsFiles | None = None        # MQTT over TLS (port 8883): the CA to trust, a client certificate

    @property
    def url(self) -> str:
        """Where, for messages (never the password)."""
        who = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{who}{self.host}:{self.port}"


class MqttBridge:
    def __init__(self, settings: BrokerSettings, bus: EventBus, scope: str, *, engine: Any = None,
                 run_dir: str = "") -> None:
        self.settings = settings
        self.scope = scope
        self.root = root(scope)
        self.engine = engine
        self.run_dir = run_dir
        self.connected = asyncio.Event()
        self.dropped = 0
        self.published = 0
        self._queue: deque[Message] = deque(maxlen=settings.buffer)
        self._essential: deque[Message] = deque(maxlen=max(100, settings.buffer // 10))
        self._retained: dict[str, Message] = {}
        self._devices: dict[str, tuple[dict[str, Any], bool, float]] = {}
        self._device_sent: dict[str, float] = {}
        self._status: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._last_progress = 0.0
        self._held_progress: Message | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._unsubscribe = bus.subscribe(self._on_event)

    # -- events in (engine loop, or the processing thread) ---------------------------------
    def _on_event(self, event: Event) -> None:
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._on_event, event)
            return
        if isinstance(event, DeviceStatus):
            now = time.time()
            self._devices[event.device] = (dict(event.status), event.moving, now)
            # Publish a change at once, at most MOVING_HZ per device; the heartbeat repeats it.
            if now - self._device_sent.get(event.device, 0.0) >= 1 / MOVING_HZ:
                self._publish_device(event.device, now)
            return
        if isinstance(event, Progress):
            self._status["progress"] = {"sections_done": event.sections_done, "sections_total": event.sections_total,
                                        "tiles_done": event.tiles_done, "tiles_total": event.tiles_total}
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_MIN_S:
                # Rate-limited: keep it as the retained value; it is sent with the next section
                # or run event, or on reconnect, so the last progress always arrives.
                for m in messages_for(event, self.scope):
                    self._retained[m.topic] = self._held_progress = m
                return
            self._last_progress = now
            self._held_progress = None
        elif isinstance(event, SectionFinished | RunFinished) and self._held_progress is not None:
            self._enqueue(self._held_progress)
            self._held_progress = None
        if isinstance(event, SectionPlanned):
            self._status["section"] = {"slot": event.slot, "barcode": event.barcode, "n_tiles": len(event.tiles)}
        for m in messages_for(event, self.scope):
            self._enqueue(m)

    def _enqueue(self, m: Message) -> None:
        if m.retain:
            self._retained[m.topic] = m
        q = self._essential if m.essential else self._queue
        if len(q) == q.maxlen:
            self.dropped += 1
        q.append(m)
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="mqtt-bridge")
        return self._task

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush what is buffered (briefly), mark the engine offline, disconnect."""
        self._unsubscribe()
        if self._client is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain(self._client), timeout_s)
                await asyncio.wait_for(self._publish(self._client, Message(
                    f"{self.root}/online", {"online": False, "reason": "exit", "time": time.time()}, 1, True)),
                    timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _client_for(self) -> aiomqtt.Client:
        s = self.settings
        will = aiomqtt.Will(f"{self.root}/online",
                            json.dumps({"online": False, "reason": "connection lost"}), qos=1, retain=True)
        return aiomqtt.Client(s.host, s.port, username=s.username, password=s.password, will=will,
                              keepalive=s.keepalive_s, protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
                              tls_context=s.tls.context() if s.tls is not None else None)

    async def _run(self) -> None:
        delay = 0.2
        said = ""
        while True:
            try:
                async with self._client_for() as client:
                    self._client = client
                    await client.subscribe(f"{self.root}/cmd", qos=1)
                    await self._publish(client, Message(f"{self.root}/online", {
                        "online": True, "run_dir": self.run_dir, "time": time.time()}, 1, True))
                    for m in list(self._retained.values()):     # late joiners and a restarted broker
                        await self._publish(client, m)
                    self.connected.set()
                    delay = 0.2
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._publisher(client))
                        tg.create_task(self._receiver(client))
                        tg.create_task(self._heartbeat())
                        tg.create_task(self._health())
            except* aiomqtt.MqttError as eg:
                exc = eg.exceptions[0]
                log.warning("MQTT broker %s: %s; reconnecting in %.1f s", self.settings.url, exc, delay)
                # A refused certificate does not cure itself: a person must hear of it (once).
                if (why := explain(exc)) and why != said:
                    said = why
                    self.bus.emit(Alarm("mqtt", f"broker {self.settings.url}: {why}; telemetry is held "
                                        "until it connects"))
            finally:
                self.connected.clear()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _publish(self, client: aiomqtt.Client, m: Message, properties: Properties | None = None) -> None:
        await client.publish(m.topic, json.dumps(m.payload, separators=(",", ":")), qos=m.qos, retain=m.retain,
                             properties=properties)
        self.published += 1

    async def _drain(self, client: aiomqtt.Client) -> None:
        async with self._drain_lock:      # the publisher task and stop() may both drain
            while self._essential or self._queue:
                q = self._essential if self._essential else self._queue
                m = q[0]
                await self._publish(client, m)
                if q and q[0] is m:
                    q.popleft()     # only once sent: a dropped connection keeps it for the next one

    async def _publisher(self, client: aiomqtt.Client) -> None:
        while True:
            await self._drain(client)
            self._wake.clear()
            if not (self._essential or self._queue):
                await self._wake.wait()

    def _publish_device(self, name: str, now: float) -> None:
        status, mv, t = self._devices[name]
        self._device_sent[name] = now
        self._enqueue(Message(f"{self.root}/device/{name}", {
            **status, "moving": mv, "age_s": round(now - t, 3), "time": now}, 0, True))

    async def _heartbeat(self) -> None:
        """Device status: IDLE_HZ always, MOVING_HZ while a device reports that it moves."""
        # Ticks at 1.25 x MOVING_HZ, so that a loop late by a few ms still keeps >= MOVING_HZ.
        tick = 1 / (1.25 * MOVING_HZ)
        while True:
            moving = any(mv for _, mv, _ in self._devices.values())
            now = time.time()
            for name in list(self._devices):
                if now - self._device_sent.get(name, 0.0) >= (tick if moving else 1 / IDLE_HZ) - 0.005:
                    self._publish_device(name, now)
            await asyncio.sleep(tick)

    async def _health(self) -> None:
        """`<root>/health` every HEALTH_S (retained: a viewer that joins sees the last)."""
        while True:
            self._enqueue(Message(f"{self.root}/health", {**process_health(), "time": time.time()}, 0, True))
            await asyncio.sleep(HEALTH_S)

    async def _receiver(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            reply_topic = f"{self.root}/reply"
            props = None
            p = getattr(message, "properties", None)
            if p is not None and getattr(p, "ResponseTopic", None):
                reply_topic = p.ResponseTopic
            if p is not None and getattr(p, "CorrelationData", None):
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = p.CorrelationData
            try:
                cmd = commands.parse(message.payload if isinstance(message.payload, bytes | bytearray | str)
                                     else str(message.payload))
            except commands.CommandError as exc:
                reply = {"id": exc.id, "ok": False, "error": str(exc)}
                log.warning("rejected MQTT command: %s", exc)
            else:
                reply = commands.apply(self.engine, cmd, "operator", dict(self._status))
            reply["time"] = time.time()
            await self._publish(client, Message(reply_topic, reply, 1, False), props)
