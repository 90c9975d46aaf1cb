"""A local run for the GUI: the engine and the simulator in a worker thread with its own loop.

Why a thread and not qasync: the engine does per-tile CPU work on its loop (the mean of
each frame, TIFF encoding before the fsync goes to a thread), and processing runs in yet
another thread. With the engine on its own loop, nothing the engine does can stall the
Qt event loop, and nothing the GUI draws can delay a tile. Commands cross into the engine
loop with ``call_soon_threadsafe``; events come back through the bus, which the GUI
hands to the Qt thread through the window's ``Inbox`` (``window.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tapescope.acquisition.events import Alarm, Event, EventBus, RunFinished, TileAcquired
from tapescope.config import TapescopeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimFault:
    """A fault injected through the simulator's backdoor, to see how a run reacts."""

    device: str          # "camera": the camera emulator stops answering
    after_tiles: int

    @classmethod
    def parse(cls, text: str) -> SimFault:
        device, _, n = text.partition("@")
        if device != "camera" or not n.isdigit():
            raise ValueError(f"--sim-fault must look like 'camera@N' (N tiles before the fault), got {text!r}")
        return cls(device, int(n))


class LocalSession:
    """Start, pause, resume, skip and abort one run at a time against the configured scope.

    Every method returns at once; what happens shows up as events on ``bus``.
    """

    def __init__(self, cfg: TapescopeConfig, out_root: Path, bus: EventBus, *,
                 fault: SimFault | None = None) -> None:
        self.cfg = cfg
        self.out_root = out_root
        self.bus = bus
        self.fault = fault
        self.out_dir: Path | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._engine: object | None = None
        self._pending: set[asyncio.Future] = set()   # commands in flight on the engine loop

    # -- what the controls may do ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def can(self, verb: str) -> bool:
        """Whether the engine of this run offers VERB (pause, resume, skip_section, abort)."""
        if verb == "start":
            return not self.running
        if not self.running:
            return False
        if verb == "abort":
            return True
        return callable(getattr(self._engine, verb, None))

    # -- commands -------------------------------------------------------------------------
    def start(self) -> Path:
        if self.running:
            raise RuntimeError("a run is already in progress")
        self.out_dir = self.out_root / time.strftime("run-%Y%m%d-%H%M%S")
        n = 1
        while self.out_dir.exists():
            n += 1
            self.out_dir = self.out_root / time.strftime(f"run-%Y%m%d-%H%M%S-{n}")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="tapescope-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.out_dir

    def abort(self) -> None:
        """Abort at the next tile boundary (the engine's abort), or cancel an engine without one."""
        loop, task = self._loop, self._task
        if callable(getattr(self._engine, "abort", None)):
            self.command("abort")
        elif loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    def command(self, verb: str) -> None:
        """Call the engine's VERB (pause, resume, skip_section) on the engine's own loop."""
        loop, engine = self._loop, self._engine
        fn = getattr(engine, verb, None)
        if loop is None or not callable(fn):
            raise RuntimeError(f"this engine cannot {verb.replace('_', ' ')}")

        def call() -> None:
            result = fn()
            if asyncio.iscoroutine(result):
                self._keep(asyncio.ensure_future(result))

        loop.call_soon_threadsafe(call)

    def _set_engine(self, engine: object) -> None:
        self._engine = engine

    def _keep(self, fut: asyncio.Future) -> None:
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    def join(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.running

    # -- the worker thread ----------------------------------------------------------------
    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # the thread's last word must reach the operator
            log.exception("local run failed")
            self.bus.emit(Alarm("gui", f"run could not complete: {type(exc).__name__}: {exc}"))
        finally:
            ready.set()
            self._loop = self._task = self._engine = None

    async def _main(self, ready: threading.Event) -> None:
        from tapescope.runner import acquire_and_process

        self._loop = asyncio.get_running_loop()
        unsubscribe: Callable[[], None] | None = None

        def on_sim(sim: object) -> None:
            # The run starts the simulator (as every run does); faults go in through its backdoor.
            nonlocal unsubscribe
            if self.fault is not None:
                unsubscribe = self.bus.subscribe(self._fault_trigger(sim))

        try:
            assert self.out_dir is not None
            self._task = asyncio.create_task(acquire_and_process(self.cfg, self.out_dir, self.bus,
                                                                 on_engine=self._set_engine, on_sim=on_sim))
            ready.set()
            try:
                await self._task
            except asyncio.CancelledError:
                if not self._task.cancelled():
                    raise
        except Exception as exc:
            self.bus.emit(Alarm("gui", f"run could not start or finish: {type(exc).__name__}: {exc}"))
            self.bus.emit(RunFinished("failed", 0, 0, 0.0))
        finally:
            if unsubscribe is not None:
                unsubscribe()

    def _fault_trigger(self, sim: object) -> Callable[[Event], None]:
        fault = self.fault
        assert fault is not None
        count = 0

        def on_event(ev: Event) -> None:
            nonlocal count
            if isinstance(ev, TileAcquired):
                count += 1
                if count == fault.after_tiles:
                    self.bus.emit(Alarm("simulator", f"injecting fault: {fault.device} stops answering "
                                        f"after {count} tiles", "warning"))
                    self._keep(asyncio.ensure_future(sim.camera.stop()))  # type: ignore[attr-defined]

        return on_event
