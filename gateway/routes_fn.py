"""Per-function endpoints: `POST /fn/{name}` (sync, async with `Prefer: respond-async`, SSE streams) and
`/v1/calls/{id}` (poll, cancel). The gateway checks JSON arguments against the deployed signature and forwards
the raw bytes; it never unpickles anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cocoon_faas import protocol as P
from cocoon_faas.errors import (
    CallCancelledError,
    CocoonError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from cocoon_faas.gateway.billing import PAYMENT_HEADER
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.http import developer_of, error_response, json_response, read_body
from cocoon_faas.gateway.invoke import Outcome
from cocoon_faas.gateway.limits import check_args
from cocoon_faas.gateway.sealed import call_sealed, is_sealed


@dataclass
class CallRecord:
    """An async call while the gateway holds it in memory."""

    id: str
    function: str
    version: int
    status: str = "queued"
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    charge: int | None = None
    task: asyncio.Task[None] | None = None

    def view(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "function": self.function, "version": self.version,
                             "status": self.status, "created": self.created, "finished": self.finished}
        if self.status == "succeeded" and self.result is not None:
            d["result"] = json.loads(self.result)
        if self.error is not None:
            d["error"] = self.error
        if self.charge is not None:
            d["charge"] = self.charge
        return d


def _gw(request: Request) -> Any:
    return request.app.state.gw


async def _prepare(request: Request, call_id: str) -> tuple[Any, FunctionRuntime, bytes, str, Any]:
    """Authenticate (API key or payment state), check the arguments, then hold the payment (last: bad input
    changes no state and charges nothing)."""
    gw = _gw(request)
    paid = PAYMENT_HEADER in request.headers
    caller = None if paid else developer_of(request)
    fr = gw.controller.get(request.path_params["name"])
    if fr.meta.get("confidential"):
        raise InvalidRequestError(f"function {fr.name!r} is a confidential deployment: it accepts only sealed "
                                  "calls (`cocoon call --confidential`, Client.call_confidential)")
    body = await read_body(request, gw.settings.max_body_bytes)
    try:
        args = json.loads(body) if body.strip() else {}
    except RecursionError:
        raise InvalidRequestError("the arguments are nested too deeply; flatten them") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON ({exc}); send a JSON object of arguments, "
                                  f"e.g. {fr.signature.example()}") from None
    check_args(body, args)
    fr.signature.check(fr.name, args)
    hold = gw.billing.begin(request.headers, fr.name, fr.spec, call_id)
    return gw, fr, body, caller or f"channel:{hold.channel_id}", hold


async def call_function(request: Request) -> Response:
    if is_sealed(request):  # confidential: routed on the envelope's clear header only (gateway/sealed.py)
        return await call_sealed(request)
    call_id = os.urandom(16).hex()
    try:
        gw, fr, body, caller, hold = await _prepare(request, call_id)
    except CocoonError as exc:
        return error_response(exc, {"X-Cocoon-Call-Id": call_id})
    headers = {"X-Cocoon-Call-Id": call_id}
    if "respond-async" in request.headers.get("prefer", "").lower():
        rec = gw.submit_async(fr, body, call_id, caller, hold)
        url = f"{str(request.base_url).rstrip('/')}/v1/calls/{rec.id}"
        return json_response({"id": rec.id, "status": rec.status, "status_url": url}, 202,
                             {**headers, "Location": url})
    if fr.spec.streams:
        return await _stream(gw, fr, body, call_id, caller, headers, hold)
    t0 = time.monotonic()
    outcome, err, meta = await gw.invoker.call(fr, body, {"id": call_id})
    headers.update(gw.finish_call(fr, call_id, caller, t0, outcome, err, meta, hold=hold))
    if err is not None:
        return error_response(err, headers)
    assert outcome is not None
    headers["X-Cocoon-Exec-Ms"] = f"{outcome.exec_ms:.3f}"
    return Response(outcome.body, 200, headers, media_type="application/json")


async def _stream(gw: Any, fr: FunctionRuntime, body: bytes, call_id: str, caller: str,
                  headers: dict[str, str], hold: Any) -> Response:
    t0 = time.monotonic()
    agen = gw.invoker.stream(fr, body, {"id": call_id})
    try:
        first = await agen.__anext__()
    except CocoonError as exc:
        headers.update(gw.finish_call(fr, call_id, caller, t0, None, exc, {}, hold=hold))
        return error_response(exc, headers)

    async def events() -> AsyncIterator[bytes]:
        frame = first
        settled = False
        sent = 0
        try:
            while True:
                if frame.type == P.CHUNK:
                    yield b"data: " + frame.body + b"\n\n"
                    sent += 1
                else:
                    end: dict[str, Any] = {"call_id": call_id, "items": frame.meta.get("seq", 0),
                                           "exec_ms": frame.meta.get("ms")}
                    settled = True
                    paid = gw.finish_call(fr, call_id, caller, t0, Outcome(b"", float(frame.meta.get("ms", 0)), "", 1,
                                          frame.meta.get("provider", "local")), None, frame.meta, hold=hold)
                    if paid:
                        end["charge"] = int(paid["X-Cocoon-Charge"])
                        end["receipt"] = paid.get("X-Cocoon-Receipt")
                    yield b"event: end\ndata: " + json.dumps(end).encode() + b"\n\n"
                    return
                frame = await agen.__anext__()
        except CocoonError as exc:
            settled = True
            gw.finish_call(fr, call_id, caller, t0, None, exc, {}, hold=hold)
            yield b"event: error\ndata: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
        finally:
            # the client went away mid-stream (the server cancels this generator) or the gateway failed: the
            # call ends here and its hold is released, never left held (the channel could not close)
            if not settled:
                gw.finish_call(fr, call_id, caller, t0, None, CallCancelledError(
                    f"call {call_id} ended after {sent} streamed items: the client disconnected"), {}, hold=hold)
            await agen.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def get_call(request: Request) -> Response:
    gw = _gw(request)
    cid = request.path_params["id"]
    rec = gw.calls.get(cid)
    if rec is not None:
        return json_response(rec.view())
    row = gw.store.get_call(cid)
    if row is None:
        return error_response(NotFoundError(f"no call {cid!r}; call ids come from `Prefer: respond-async` "
                                            "responses and are kept for COCOON_RESULT_TTL_S seconds"))
    view = {k: row[k] for k in ("id", "function", "version", "status", "created", "finished")}
    if row["result"] is not None and row["status"] == "succeeded":
        view["result"] = json.loads(row["result"])
    if row["error"]:
        view["error"] = row["error"]
    return json_response(view)


async def cancel_call(request: Request) -> Response:
    gw = _gw(request)
    cid = request.path_params["id"]
    rec = gw.calls.get(cid)
    if rec is None:
        row = gw.store.get_call(cid)
        if row is None:
            return error_response(NotFoundError(f"no call {cid!r}"))
        if gw.store.request_cancel(cid):  # running on another gateway: it picks the request up within a beat
            return json_response({"id": cid, "function": row["function"], "version": row["version"],
                                  "status": "cancelling", "created": row["created"], "finished": None}, 202)
        return error_response(ConflictError(f"call {cid!r} already finished; nothing to cancel"))
    if rec.status in ("succeeded", "failed", "cancelled"):
        return error_response(ConflictError(f"call {cid!r} already {rec.status}; nothing to cancel"))
    if rec.task is not None:
        rec.task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(rec.task), 5)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass
    return json_response(rec.view())


routes = [
    Route("/fn/{name}", call_function, methods=["POST"]),
    Route("/v1/calls/{id}", get_call, methods=["GET"]),
    Route("/v1/calls/{id}", cancel_call, methods=["DELETE"]),
]
