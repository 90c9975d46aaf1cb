"""The simulated TEM behind temscript's HTTP API: the column and the goniometer of the shared
world, served as temscript's server serves a Thermo Fisher / FEI microscope.

The drivers of hardware/temscript_column.py and hardware/temscript_stage.py, tested
against temscript's own ``--null`` server, reach the simulator's physics through this one:
focus drift, a tripped gun (the voltage reads 0, and temscript cannot switch high tension:
the operator must), blanking, magnification by index, and a stage that takes time to move.
Only the endpoints those drivers use are served; others answer 404 as temscript's server
does for an unknown endpoint.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from .world import SimWorld

FAMILY = "TAPESCOPE_SIM"
STAGE_AXES = ("x", "y", "z", "a", "b")


class TemscriptTem:
    """Serves ``/v1/<endpoint>`` on 127.0.0.1; ``url`` once started."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.url = ""
        self.requests: list[str] = []          # "GET voltage", ... for tests and people
        self._server: HTTPServer | None = None

    async def start(self) -> str:
        app = Application([(r"/v1/(.+)", _Handler, {"tem": self})])
        sockets = bind_sockets(0, "127.0.0.1")
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

    # -- the microscope, as temscript reports it ----------------------------------------------
    def get(self, endpoint: str) -> Any:
        w = self.world
        match endpoint:
            case "family":
                return FAMILY
            case "voltage":
                return w.p.ht_kv if w.column.ht_state() == "ON" else 0.0
            case "column_valves_open":
                return w.column.valves_open
            case "beam_blanked":
                return w.column.blanked
            case "magnification_index":
                return w.p.magnifications.index(w.column.magnification) + 1
            case "indicated_magnification":
                return w.column.magnification
            case "defocus":
                return w.column.focus_nm * 1e-9
            case "stage_holder":
                return "SINGLE_TILT"
            case "stage_status":
                return "MOVING" if w.stage.busy() else "READY"
            case "stage_position":
                y, x = w.stage.readback()
                return {"x": x * 1e-9, "y": y * 1e-9, "z": 0.0, "a": 0.0, "b": 0.0}
            case "stage_limits":
                lim = w.p.stage_limits_nm * 1e-9
                return {"x": (-lim, lim), "y": (-lim, lim), "z": (-3.75e-4, 3.75e-4),
                        "a": (-1.22, 1.22), "b": (-1.22, 1.22)}
        raise HTTPError(404, f"unknown endpoint {endpoint}")

    def put(self, endpoint: str, value: Any, query: dict[str, list[str]]) -> None:
        w = self.world
        match endpoint:
            case "beam_blanked":
                w.column.blanked = bool(value)
            case "column_valves_open":
                w.column.valves_open = bool(value)
            case "magnification_index":
                mags = w.p.magnifications
                if not isinstance(value, int) or not 1 <= value <= len(mags):
                    raise HTTPError(400, f"magnification index must be 1..{len(mags)}")
                w.column.magnification = mags[value - 1]
            case "defocus":
                w.column.focus_nm = float(value) * 1e9
            case "stage_position":
                if query.get("method", ["GO"])[0] not in ("GO", "MOVE"):
                    raise HTTPError(400, "Unknown movement methods.")
                y, x = w.stage.readback()
                pos = {"x": x * 1e-9, "y": y * 1e-9, **{k: float(v) for k, v in value.items() if k in STAGE_AXES}}
                if w.stage.busy():
                    w.stage.halt()
                w.stage.move(np.array([pos["y"] * 1e9, pos["x"] * 1e9]))
            case _:
                raise HTTPError(404, f"unknown endpoint {endpoint}")


class _Handler(RequestHandler):
    def initialize(self, tem: TemscriptTem) -> None:
        self.tem = tem

    def get(self, endpoint: str) -> None:
        self.tem.requests.append(f"GET {endpoint}")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.tem.get(endpoint)))

    def put(self, endpoint: str) -> None:
        self.tem.requests.append(f"PUT {endpoint}")
        try:
            value = json.loads(self.request.body or b"null")
        except ValueError:
            raise HTTPError(400, "body is not JSON") from None
        self.tem.put(endpoint, value, parse_qs(self.request.query))
        self.set_status(204)
        self.finish()
