"""Serve a volume to a browser: the volume's files with CORS and HTTP Range (shards are read
a chunk at a time with Range requests), and Neuroglancer's own client and server from the
`neuroglancer` package (no internet needed), opened on a state that shows the volume.
Tornado's static file handler does the HTTP (ranges, 206, 416); this module only routes and
adds headers. The client of the `neuroglancer` package is built to talk to its Python
server (a viewer token in the URL, the state over a socket), so that server is started for
it, on another port of 127.0.0.1, and reads the volume from this one (hence CORS).

    /                 redirect to the Neuroglancer viewer
    /state.json       the state it was opened on
    /volume/...       the volume's files (zarr.json, shards)
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from .state import ViewError, neuroglancer_state, open_volume

VIEWER_TOKEN = "tapescope"


def neuroglancer_viewer(state: dict[str, Any]) -> str:
    """Start the `neuroglancer` package's server (once per process, a thread of its own, on
    127.0.0.1) with a viewer on `state`; returns the viewer's URL."""
    try:
        import neuroglancer
    except ImportError:
        raise ViewError("the neuroglancer package is not installed (pip install neuroglancer)") from None
    if not neuroglancer.server.is_server_running():
        neuroglancer.set_server_bind_address("127.0.0.1", 0)
    viewer = neuroglancer.Viewer(token=VIEWER_TOKEN)
    viewer.set_state(neuroglancer.ViewerState(state))
    _viewers.append(viewer)       # the server holds viewers weakly
    return str(viewer.get_viewer_url())


_viewers: list[Any] = []


class _Cors:
    """Any page may read the volume (a Neuroglancer elsewhere, a notebook): read-only data on
    127.0.0.1. Range must be allowed and Content-Range readable for shard reads."""

    def set_default_headers(self: Any) -> None:
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Range")
        self.set_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")

    def options(self: Any, *args: Any) -> None:
        self.set_status(204)
        self.finish()


class VolumeFiles(_Cors, tornado.web.StaticFileHandler):
    def set_extra_headers(self, path: str) -> None:
        # The volume grows while a run writes it: always revalidate.
        self.set_header("Cache-Control", "no-cache")

    def compute_etag(self) -> str | None:
        # Size and time instead of the default hash of the whole file, which reads every
        # shard end to end on each request.
        st = os.stat(self.absolute_path)
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


class StateHandler(_Cors, tornado.web.RequestHandler):
    def initialize(self, server: ViewServer) -> None:
        self.server = server

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-cache")
        self.write(json.dumps(self.server.state()))


class Home(tornado.web.RequestHandler):
    def initialize(self, server: ViewServer) -> None:
        self.server = server

    def get(self) -> None:
        self.redirect(self.server.viewer_url)


@dataclass
class ViewServer:
    volume_path: Path
    host: str
    port: int
    http: tornado.httpserver.HTTPServer | None = None
    viewer_url: str = ""                  # Neuroglancer on the volume
    opened_on: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def state(self) -> dict[str, Any]:
        # Read anew each time: a growing volume's window and sections change.
        return neuroglancer_state(open_volume(self.volume_path), f"{self.base}/volume", self.volume_path.stem)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()


def serve(volume_path: Path, port: int = 0, host: str = "127.0.0.1") -> ViewServer:
    """Start serving on the running asyncio loop (port 0 picks a free one), and the
    Neuroglancer viewer on it."""
    volume_path = volume_path.resolve()
    open_volume(volume_path)                      # refuse a wrong path before listening
    sockets = tornado.netutil.bind_sockets(port, host, family=socket.AF_INET)
    server = ViewServer(volume_path, host, sockets[0].getsockname()[1])
    app = tornado.web.Application([
        (r"/", Home, {"server": server}),
        (r"/state\.json", StateHandler, {"server": server}),
        (r"/volume/(.*)", VolumeFiles, {"path": str(volume_path)}),
    ])
    server.http = tornado.httpserver.HTTPServer(app)
    server.http.add_sockets(sockets)
    try:
        server.opened_on = server.state()
        server.viewer_url = neuroglancer_viewer(server.opened_on)
    except BaseException:
        server.stop()              # a failed start leaves no socket listening
        for sock in sockets:
            sock.close()
        raise
    return server
