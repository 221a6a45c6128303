"""Attestation endpoints and code-key release for confidential deployments (docs/confidential.md).

`GET /v1/functions/{name}/attestation` lists the attestation documents of the function's live replicas: public
facts (keys, measurement, evidence) that callers verify themselves; the gateway vouches for nothing.
`POST /v1/functions/{name}/grants` forwards code-key grants from the developer's release agent to the replicas
they name; the gateway cannot open them. `peer_release` lets a replica that holds the code key grant it to a new
replica of the same function (each checks the other's document against the sealed code's own policy inside the
worker), so autoscaling works while the developer is offline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cocoon_faas import protocol as P
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.keyrelease import peek_sealed_code
from cocoon_faas.errors import CocoonError, InvalidRequestError, PermissionDeniedError
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.http import developer_of, error_response, json_response, read_json
from cocoon_faas.gateway.replica_client import ReplicaHandle

log = logging.getLogger("cocoon.attest")
UNLOCK_TIMEOUT_S = 60.0


def check_sealed_bundle(code: bytes, name: str, measurement: str) -> None:
    """A confidential deployment's code must be a sealed bundle for this function and measurement (the
    measurement itself is checked by the replica after it opens the code)."""
    try:
        hdr = peek_sealed_code(code)
    except EnvelopeError as exc:
        raise InvalidRequestError(f"confidential deployment of {name!r}: {exc.message}; deploy with "
                                  "`cocoon deploy --confidential`") from None
    if hdr.function != name or hdr.measurement != str(measurement).lower():
        raise InvalidRequestError(f"sealed code header names {hdr.function!r} / {hdr.measurement[:16]}..., the "
                                  f"deployment item {name!r} / {str(measurement)[:16]}...; reseal the bundle")


def documents(fr: FunctionRuntime) -> list[dict[str, Any]]:
    return [r.extra["document"] for r in fr.ready if r.extra.get("document")]


async def attestation(request: Request) -> Response:
    try:
        fr = request.app.state.gw.controller.get(request.path_params["name"])
    except CocoonError as exc:
        return error_response(exc)
    if not fr.ready:  # scaled to zero: start a replica so the caller has a key to seal to
        ctl = request.app.state.gw.controller
        try:
            ctl.release(fr, await ctl.acquire(fr, time.monotonic() + min(fr.spec.timeout, 60.0)))
        except CocoonError as exc:
            return error_response(exc)
    if any(r.extra.get("code_locked") for r in fr.ready):
        _spawn(peer_release(fr))
    return json_response({
        "function": fr.name, "version": fr.version, "measurement": fr.measurement,
        "confidential": fr.flags.confidential, "documents": documents(fr),
        "signature": fr.signature.to_json(),  # so a sealing client checks its arguments before it seals them
        "replicas": [{"key_id": r.extra.get("key_id"), "code_locked": bool(r.extra.get("code_locked"))}
                     for r in fr.ready]})


async def unlock(r: ReplicaHandle, grant: bytes) -> dict[str, Any]:
    """Deliver a code-key grant over the replica's data connection (an UNLOCK frame; the answer's meta is
    decoded strictly: nothing a replica sends is unpickled here)."""
    try:
        frame = await r.control(P.UNLOCK, None, grant, UNLOCK_TIMEOUT_S)
    except CocoonError as exc:
        return {"ok": False, "check": "unreachable", "message": f"replica {r.id} did not answer: {exc.message}"}
    res = {"ok": frame.type == P.RESULT and frame.meta.get("ok") is True,
           "check": frame.meta.get("check", "refused"), "message": frame.meta.get("message", "")}
    if res["ok"]:
        r.extra["code_locked"] = False
    return res


async def grants(request: Request) -> Response:
    """Body: {"grants": {key_id: base64 grant}}; answers {"unlocked": [...], "failed": {key_id: reason}}."""
    gw = request.app.state.gw
    try:
        dev = developer_of(request)
        fr = gw.controller.get(request.path_params["name"])
        if fr.owner != dev:
            raise PermissionDeniedError(f"function {fr.name!r} belongs to another developer")
        body = await read_json(request, gw.settings.max_body_bytes)
        raw = body.get("grants") if isinstance(body, dict) else None
        if not isinstance(raw, dict):
            raise InvalidRequestError('send {"grants": {"<key_id>": "<base64 grant>"}}')
        try:
            wanted = {str(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
        except (binascii.Error, ValueError, TypeError):
            raise InvalidRequestError("every grant must be base64") from None
    except CocoonError as exc:
        return error_response(exc)
    by_kid = {r.extra.get("key_id"): r for r in fr.all if r.state != "dead"}
    unlocked: list[str] = []
    failed: dict[str, str] = {}
    for kid, grant in wanted.items():
        r = by_kid.get(kid)
        if r is None:
            failed[kid] = "no live replica holds this key (stale document); refetch and grant again"
            continue
        res = await unlock(r, grant)
        if res.get("ok"):
            unlocked.append(kid)
        else:
            failed[kid] = f"{res.get('check')}: {res.get('message')}"
    if unlocked:
        _spawn(peer_release(fr))
    return json_response({"unlocked": unlocked, "failed": failed})


_locks: dict[str, asyncio.Lock] = {}
_tasks: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    t = asyncio.get_running_loop().create_task(coro)
    _tasks.add(t)
    t.add_done_callback(_tasks.discard)


def release_to_locked(fr: FunctionRuntime) -> None:
    """In the background, have an unlocked replica of `fr` grant the code key to its locked peers."""
    _spawn(peer_release(fr))


async def peer_release(fr: FunctionRuntime) -> int:
    """Ask an unlocked replica to grant the code key to each locked one; returns how many were unlocked."""
    lock = _locks.setdefault(fr.name, asyncio.Lock())
    done = 0
    async with lock:
        holders = [r for r in fr.all if r.state == "ready" and not r.extra.get("code_locked")]
        if not holders:
            return 0
        for r in [r for r in fr.all if r.state != "dead" and r.extra.get("code_locked")]:
            doc = r.extra.get("document")
            if not doc:
                continue
            try:
                frame = await holders[0].control(P.GRANT, None, json.dumps(doc).encode(), UNLOCK_TIMEOUT_S)
            except CocoonError as exc:  # gone: leave it locked
                log.warning("peer key release to %s of %s failed: %s", r.id, fr.name, exc.message[:200])
                continue
            if frame.type != P.RESULT:  # a peer refusing (policy): leave it locked
                log.warning("peer key release to %s of %s refused: %s", r.id, fr.name,
                            str(frame.meta.get("message", ""))[:200])
                continue
            grant = frame.body
            if (await unlock(r, grant)).get("ok"):
                done += 1
    return done


routes = [
    Route("/v1/functions/{name}/attestation", attestation, methods=["GET"]),
    Route("/v1/functions/{name}/grants", grants, methods=["POST"]),
]
