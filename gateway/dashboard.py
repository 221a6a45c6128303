"""The web dashboard at /dashboard: a static page (gateway/dashboard_static/, charts by the bundled uPlot; nothing
is fetched from outside at run time) that logs in with an API key and reads the gateway's own JSON API.

    GET /dashboard                    the page (no data in it: everything below needs the API key)
    GET /dashboard/assets/{file}      its script, stylesheet and the vendored chart library (a fixed list)
    GET /dashboard/api/series         calls, errors, p50/p99 over time for the caller's functions

The page polls (every 2 s) `/v1/functions`, `/v1/functions/{name}` (versions, replicas), `/v1/functions/{name}/logs`,
`POST /v1/functions/{name}/rollback`, `/v1/providers` and, for the operator's key, `/v1/ledger?verify=1` and
`/v1/ledger/providers`. The series are sampled from the controller's counters when the page asks (at most once a
second, the last `SERIES_POINTS` samples kept per function), so a gateway nobody watches does no work for them.
A provider logs in with its wallet key instead and sees its own nodes and books: gateway/dashboard_provider.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from cocoon_faas.errors import CocoonError, NotFoundError
from cocoon_faas.gateway.http import developer_of, error_response, json_response
from cocoon_faas.gateway.routes_control import summary

STATIC = Path(__file__).resolve().parent / "dashboard_static"
ASSETS = {  # name -> media type; nothing else under STATIC is served
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "ton-login.js": "text/javascript",  # "Log in with a TON wallet" (TON Connect's JS bridge, ton_proof)
    "tonconnect-icon.png": "image/png",  # the icon a wallet shows for the dashboard (tonconnect-manifest.json)
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
}
SERIES_POINTS = 600
SAMPLE_EVERY_S = 1.0
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            # the page runs only its own scripts and talks only to this gateway
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"}


@dataclass
class Sample:
    t: float
    calls: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class Series:
    """Samples of every function's counters, taken when the dashboard asks."""

    last: float = 0.0
    points: dict[str, deque[Sample]] = field(default_factory=dict)

    def sample(self, request: Request) -> None:
        now = time.time()
        if now - self.last < SAMPLE_EVERY_S:
            return
        self.last = now
        for fr in request.app.state.gw.controller.functions.values():
            s = summary(request, fr)
            self.points.setdefault(fr.name, deque(maxlen=SERIES_POINTS)).append(
                Sample(now, int(s["calls"]), int(s["errors"]), s["p50_ms"], s["p99_ms"]))


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["file"]
    media = ASSETS.get(name)
    if media is None:
        return error_response(NotFoundError(f"no dashboard asset {name!r}"))
    path = STATIC / name if (STATIC / name).exists() else STATIC / "vendor" / name
    return FileResponse(path, media_type=media, headers=_HEADERS)


async def series(request: Request) -> Response:
    try:
        dev = developer_of(request)
    except CocoonError as exc:
        return error_response(exc)
    state: Series | None = getattr(request.app.state, "dashboard_series", None)
    if state is None:
        state = request.app.state.dashboard_series = Series()
    state.sample(request)
    owned = {name for name, fr in request.app.state.gw.controller.functions.items() if fr.owner == dev}
    out = {name: {"t": [p.t for p in pts], "calls": [p.calls for p in pts], "errors": [p.errors for p in pts],
                  "p50_ms": [p.p50_ms for p in pts], "p99_ms": [p.p99_ms for p in pts]}
           for name, pts in state.points.items() if name in owned}
    return json_response({"functions": out, "interval_s": SAMPLE_EVERY_S})


routes = [
    Route("/dashboard", page, methods=["GET"]),
    Route("/dashboard/", page, methods=["GET"]),
    Route("/dashboard/assets/{file}", asset, methods=["GET"]),
    Route("/dashboard/api/series", series, methods=["GET"]),
]
