"""Per-function endpoints: `POST /fn/{name}` (sync, async with `Prefer: respond-async`, SSE streams; JSON or
sealed) and `/v1/calls/{id}` (poll, cancel): adapters over gateway/pipeline.py. The gateway checks JSON arguments
against the deployed signature and forwards the raw bytes; it never unpickles anything.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cocoon_faas.confidential import SEALED_FRAME_CONTENT_TYPE
from cocoon_faas.errors import CocoonError, ConflictError, InvalidRequestError, NotFoundError
from cocoon_faas.gateway.connection import abort_connection
from cocoon_faas.gateway.http import error_response, json_response, refuse_unreadable_answer
from cocoon_faas.gateway.limits import check_args
from cocoon_faas.gateway.pipeline import Call, CallStream, Pipeline, Plan, call_id_of
from cocoon_faas.gateway.sealed import is_sealed, sealed_plan

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _pipeline(request: Request) -> Pipeline:
    return request.app.state.gw.pipeline  # type: ignore[no-any-return]


def json_plan(request: Request) -> Any:
    """The body of a plain `/fn` call: a JSON object of arguments the deployed signature accepts."""
    fr = request.app.state.gw.controller.get(request.path_params["name"])

    def plan(body: bytes) -> Plan:
        refuse_unreadable_answer(request, fr.name, fr.spec.streams)
        if fr.flags.confidential:
            raise InvalidRequestError(f"function {fr.name!r} is a confidential deployment: it accepts only sealed "
                                      "calls (`cocoon call --confidential`, Client.call_confidential)")
        try:
            args = json.loads(body) if body.strip() else {}
        except RecursionError:
            raise InvalidRequestError("the arguments are nested too deeply; flatten them") from None
        except (ValueError, UnicodeDecodeError) as exc:
            if str(exc).startswith("Exceeds the limit"):  # Python's advice (set_int_max_str_digits) is not the caller's
                raise InvalidRequestError("a number in the body has more than 4300 digits; send a smaller number "
                                          "(or a string)") from None
            raise InvalidRequestError(f"request body is not valid JSON ({exc}); send a JSON object of arguments, "
                                      f"e.g. {fr.signature.example()}") from None
        check_args(body, args)
        fr.signature.check(fr.name, args)
        return Plan(fr, body)

    return plan


def _async_answerable(request: Request) -> None:
    """An async call's answer is one JSON result: a generator's stream has no place in it, so it is refused before
    anything is read or held (it used to run, fail as the function's error and be charged)."""
    fr = request.app.state.gw.controller.get(request.path_params["name"])
    if fr.spec.streams:
        raise InvalidRequestError(
            f"function {fr.name!r} is a generator: its answer is a stream of events, which an async call "
            "(Prefer: respond-async) cannot hold; call it without Prefer: respond-async and read the stream (SDK: "
            "fn.stream(...), CLI: `cocoon call --stream`)")


async def call_function(request: Request) -> Response:
    """`POST /fn/{name}`: JSON or sealed (routed on the envelope's clear header only), unary, stream or async."""
    try:
        call_id = call_id_of(request)
    except CocoonError as exc:
        return error_response(exc)
    headers = {"X-Cocoon-Call-Id": call_id}
    pipeline = _pipeline(request)
    sealed = is_sealed(request)
    try:
        if "respond-async" in request.headers.get("prefer", "").lower():
            _async_answerable(request)
            pipeline.async_room()  # refused before admission: nothing read, held or recorded
        plan = sealed_plan(request, call_id) if sealed else json_plan(request)
        call = await pipeline.admit(request, call_id, plan)
    except CocoonError as exc:
        return error_response(exc, headers)
    return await respond(request, call, headers, sealed)


async def respond(request: Request, call: Call, headers: dict[str, str], sealed: bool) -> Response:
    """Run an admitted call as the request asks (async, stream or unary) and answer it the `/fn` way."""
    pipeline = _pipeline(request)
    if "respond-async" in request.headers.get("prefer", "").lower():
        rec = pipeline.submit(call)
        url = f"{str(request.base_url).rstrip('/')}/v1/calls/{rec.id}"
        return json_response({"id": rec.id, "status": rec.status, "status_url": url}, 202,
                             {**headers, "Location": url})
    if call.fr.spec.streams:
        return await stream_response(pipeline.stream(call), headers, sealed)
    ans, paid = await pipeline.run(call)
    headers.update(paid.headers())
    if ans.attempts:  # more than 1: a replica was lost mid-call and the call ran again on another (`retries`)
        headers["X-Cocoon-Attempts"] = str(ans.attempts)
    if ans.error is not None and not (sealed and ans.body is not None):
        return error_response(ans.error, headers)
    assert ans.body is not None
    headers["X-Cocoon-Exec-Ms"] = f"{ans.exec_ms:.3f}"
    if sealed:  # the replica's sealed frame: `res`, or `err` for the function's own exception
        headers["X-Cocoon-Sealed-Kind"] = "err" if ans.error is not None else "res"
        return Response(ans.body, 200, headers, media_type=SEALED_FRAME_CONTENT_TYPE)
    return Response(ans.body, 200, headers, media_type="application/json")


class _Stalled(Exception):
    """The client took no bytes for COCOON_STREAM_STALL_S while the stream had an item to send."""


class CallStreamResponse(StreamingResponse):
    """An SSE response that settles its call however it ends: a client that hangs up before the body starts
    leaves the body generator unstarted (so its own `finally` never runs); this one always closes the stream.

    A client that keeps its connection open but stops reading is cut after COCOON_STREAM_STALL_S: flow control
    already pauses the function's generator, but the call would keep its replica slot (and any hold) until the
    function's time limit. uvicorn's `send` waits while its socket is full, so one body send that waits that long
    is a client taking nothing; a slow reader completes sends and is never cut. The cut resets the connection
    (gateway/connection.py): a graceful close would keep the socket and its buffers until the client reads."""

    def __init__(self, st: CallStream, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
        self.st = st

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stall = self.st.pipeline.stream_stall_s

        async def send_or_cut(message: Any) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            try:
                async with asyncio.timeout(stall):  # a timer handle, not a task: cheap per item
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        why = "the client closed the stream"
        try:
            await super().__call__(scope, receive, send_or_cut)
        except _Stalled:
            why = f"the client took no bytes for {stall:g} s (COCOON_STREAM_STALL_S)"
            if abort_connection(scope, send):  # elsewhere than uvicorn: returning unfinished closes it gracefully
                await asyncio.sleep(0)  # uvicorn's connection_lost runs first: it logs no error for a cut
        finally:
            await self.st.close(why)


def sse(event: str | None, data: bytes) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + data + b"\n\n"


async def stream_response(st: CallStream, headers: dict[str, str], sealed: bool) -> Response:
    """SSE: each item as `data:` (sealed: `event: frame` with the base64 frame), then `event: end` with the call
    id, metering and the charge; `event: error` when the call fails after the first item."""
    call = st.call
    try:
        await st.open()
    except CocoonError as exc:
        headers.update(call.settlement.headers() if call.settlement else {})
        return error_response(exc, headers)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for frame in st.chunks():
                yield sse("frame", base64.b64encode(frame.body)) if sealed else sse(None, frame.body)
            paid = st.end()  # raises (settled) when a sealed end frame fails its receipt check
            assert st.final is not None
            if sealed:
                yield sse("frame", base64.b64encode(st.final.body))
            fields = call.check.end_fields() if call.check is not None else {
                "items": st.final.meta.get("seq", st.delivered), "exec_ms": st.final.meta.get("ms")}
            yield sse("end", json.dumps(paid.end_event(call.id, **fields)).encode())
        except CocoonError as exc:
            yield sse("error", json.dumps(st.fail(exc).to_dict()).encode())
        finally:
            await st.close()

    return CallStreamResponse(st, events(), headers)


async def get_call(request: Request) -> Response:
    gw = request.app.state.gw
    cid = request.path_params["id"]
    rec = gw.pipeline.calls.get(cid)
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
    gw = request.app.state.gw
    cid = request.path_params["id"]
    rec = gw.pipeline.calls.get(cid)
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
