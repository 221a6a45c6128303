"""Control plane: deployments, functions, rollback, delete, logs, keys. A developer changes only its own functions."""

from __future__ import annotations

import statistics
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cocoon_faas.errors import CocoonError, InvalidRequestError, PermissionDeniedError
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.http import developer_of, error_response, json_response, read_json


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


# replica facts that never leave the gateway: the receipt-MAC key it sealed to the replica (gateway/sealed.py)
PRIVATE_EXTRA = frozenset({"receipt_mac"})


def summary(request: Request, fr: FunctionRuntime, full: bool = False) -> dict[str, Any]:
    lat = list(fr.latencies)
    d: dict[str, Any] = {
        "name": fr.name,
        "version": fr.version,
        "url": f"{str(request.base_url).rstrip('/')}/fn/{fr.name}",
        "measurement": fr.measurement,
        "kind": fr.spec.kind,
        "replicas": len(fr.ready),
        "starting": fr.starting,
        "in_flight": fr.inflight,
        "queued": fr.queued,
        "calls": fr.calls,
        "errors": fr.errors,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "status": "waiting_for_capacity" if fr.problem and not fr.ready else ("ready" if fr.ready else "idle"),
        "confidential": fr.flags.confidential,
    }
    if fr.problem is not None:
        d["problem"] = fr.problem.message
    if full:
        d["pricing"] = request.app.state.gw.billing.quote(fr.spec)
        d["spec"] = fr.spec.to_json()
        d["signature"] = fr.signature.to_json()
        d["versions"] = [{"version": v, "measurement": m, "created": c}
                         for v, m, c in request.app.state.gw.store.versions(fr.name)]
        d["replica_list"] = [{"id": r.id, "state": r.state, "in_flight": r.inflight, "calls": r.calls,
                              "version": r.version, **{k: v for k, v in r.extra.items() if k not in PRIVATE_EXTRA},
                              **({"engine": r.load.to_json()} if r.load is not None else {})}
                             for r in fr.all]
    return d


def _owned(request: Request, name: str) -> FunctionRuntime:
    dev = developer_of(request)
    fr = request.app.state.gw.controller.get(name)
    if fr.owner != dev:
        raise PermissionDeniedError(f"function {name!r} belongs to another developer; you can change only your own")
    return fr


async def deploy(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        dev = developer_of(request)
        body = await read_json(request, gw.settings.max_body_bytes * 10)
        items = body.get("functions") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise InvalidRequestError('body must be {"functions": [bundle, ...]}; deploy with `cocoon deploy app.py`')
        out = []
        for item in items:
            rec = await gw.controller.deploy(dev, item)
            rec["url"] = f"{str(request.base_url).rstrip('/')}/fn/{rec['name']}"
            out.append(rec)
        return json_response({"functions": out}, 201)
    except CocoonError as exc:
        return error_response(exc)


async def list_functions(request: Request) -> Response:
    try:
        dev = developer_of(request)
    except CocoonError as exc:
        return error_response(exc)
    frs = [fr for fr in request.app.state.gw.controller.functions.values() if fr.owner == dev]
    return json_response({"functions": [summary(request, fr) for fr in sorted(frs, key=lambda f: f.name)]})


async def get_function(request: Request) -> Response:
    try:
        fr = request.app.state.gw.controller.get(request.path_params["name"])
    except CocoonError as exc:
        return error_response(exc)
    return json_response(summary(request, fr, full=True))


async def rollback(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        fr = _owned(request, request.path_params["name"])
        body = await read_json(request, 4096)
        version = body.get("version") if isinstance(body, dict) else None
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InvalidRequestError(f"version must be a positive integer, got {version!r}")
        return json_response(await gw.controller.rollback(fr.name, version))
    except CocoonError as exc:
        return error_response(exc)


async def delete_function(request: Request) -> Response:
    try:
        fr = _owned(request, request.path_params["name"])
        gw = request.app.state.gw
        await gw.controller.delete(fr.name)
        calls = gw.pipeline.calls  # finished async results still in memory go with the function's records
        for cid in [cid for cid, rec in calls.items() if rec.function == fr.name and rec.finished is not None]:
            del calls[cid]
        return json_response({"name": fr.name, "deleted": True})
    except CocoonError as exc:
        return error_response(exc)


async def function_logs(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        fr = _owned(request, request.path_params["name"])
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
            raise InvalidRequestError(f"limit must be an integer between 1 and 10000, got {raw!r}")
        return json_response({"logs": gw.store.logs(fr.name, int(raw))})
    except CocoonError as exc:
        return error_response(exc)


async def create_key(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        dev = developer_of(request)
        body = await read_json(request, 4096)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise InvalidRequestError('body must be {"name": "<developer name, 1-64 characters>"}')
        owner_of_name = gw.store.developer_id(name.strip())
        key, new_dev = gw.store.create_key(name.strip(), for_developer=dev if owner_of_name else None)
        gw.keys = gw.store.keys()
        return json_response({"key": key, "developer": new_dev, "name": name.strip()}, 201)
    except CocoonError as exc:
        return error_response(exc)


routes = [
    Route("/v1/deployments", deploy, methods=["POST"]),
    Route("/v1/functions", list_functions, methods=["GET"]),
    Route("/v1/functions/{name}", get_function, methods=["GET"]),
    Route("/v1/functions/{name}", delete_function, methods=["DELETE"]),
    Route("/v1/functions/{name}/rollback", rollback, methods=["POST"]),
    Route("/v1/functions/{name}/logs", function_logs, methods=["GET"]),
    Route("/v1/keys", create_key, methods=["POST"]),
]
