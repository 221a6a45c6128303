"""HTTP edges shared by the routes: one JSON error shape, API-key auth, body limits, the answer's shape."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cocoon_faas.errors import AuthenticationError, CocoonError, InvalidRequestError
from cocoon_faas.gateway.limits import loads_bounded, too_large
from cocoon_faas.gateway.store import hash_key


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, headers, media_type="application/json")


def error_response(exc: CocoonError, headers: dict[str, str] | None = None) -> Response:
    h = dict(headers or {})
    retry = exc.details.get("retry_after")
    if retry is not None:
        h["Retry-After"] = str(retry)
    return json_response(exc.to_dict(), exc.status, h)


def developer_of(request: Request) -> str:
    """The developer id behind the request's `Authorization: Bearer <key>`; 401 otherwise."""
    auth = request.headers.get("authorization")
    gw = request.app.state.gw
    dev = gw.auth_cache.get(auth)
    if dev is not None:  # keys are never revoked, so a header once resolved stays valid
        return dev
    if not auth:
        raise AuthenticationError(
            "missing API key; send `Authorization: Bearer <key>` (the key is in $COCOON_HOME/api_key on the "
            "gateway machine, or create one with `cocoon keys create --name NAME`)"
        )
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("malformed Authorization header; use `Authorization: Bearer <key>`")
    h = hash_key(key.strip())
    dev = gw.keys.get(h)
    if dev is None and getattr(gw, "shared", False):  # a key created on another gateway since this one started
        dev = gw.store.key_developer(h)
        if dev is not None:
            gw.keys[h] = dev
    if dev is None:
        raise AuthenticationError("unknown API key; create one with `cocoon keys create --name NAME`")
    if len(gw.auth_cache) < 10_000:
        gw.auth_cache[auth] = dev
    return dev


async def read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise InvalidRequestError("Content-Length is not a number") from None
        if n > limit:
            raise too_large(limit, n)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    """The body as bounded JSON (:func:`~cocoon_faas.gateway.limits.loads_bounded`); ``{}`` when empty."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    return loads_bounded(body)


def refuse_unreadable_answer(request: Request, name: str, streams: bool) -> None:
    """Refuse, before anything runs or is held, a call whose answer the client could not read: a generator's
    event stream to a client that does not accept text/event-stream, or one result (JSON or a sealed frame) to a
    client that accepts only a stream (it would read no events: the result lost, a paid one charged)."""
    accept = request.headers.get("accept", "").lower()
    if streams and accept and not any(t in accept for t in ("*/*", "text/*", "text/event-stream")):
        raise InvalidRequestError(
            f"function {name!r} is a generator: it answers with a stream of events (text/event-stream), but this "
            "request does not accept one; stream it (SDK: fn.stream(...), Client.stream or stream_confidential, "
            "CLI: `cocoon call --stream`, HTTP: Accept: text/event-stream)")
    if not streams and "text/event-stream" in accept and not any(t in accept for t in ("json", "*/*",
                                                                                       "application/*")):
        raise InvalidRequestError(
            f"function {name!r} is not a generator: it answers with one result, but this request accepts only a "
            "stream (text/event-stream); call it without streaming (SDK: fn.remote(...), Client.call or "
            "call_confidential, CLI: `cocoon call` without --stream, HTTP: Accept: application/json)")
