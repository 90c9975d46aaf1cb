"""`tapescope view`'s server in a thread of its own, for programs that have their own event
loop (the GUI's Qt loop): started on demand, stopped with the program."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from .server import ViewServer, serve


class BackgroundViewer:
    def __init__(self, volume: Path, port: int = 0) -> None:
        self.volume = volume
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ViewServer | None = None
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, args=(port,), name="tapescope-view", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if self._server is None:
            self.stop(0)           # whatever starts later is stopped with it
            raise TimeoutError(f"the view server for {volume} did not start")

    @property
    def base(self) -> str:
        assert self._server is not None
        return self._server.base

    def _main(self, port: int) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self._server = serve(self.volume, port)
            except BaseException as exc:   # handed to the thread that asked for the server
                self._error = exc
                return
            finally:
                self._ready.set()
            await self._stop.wait()
            self._server.stop()

        asyncio.run(run())

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
