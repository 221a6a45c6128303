"""OpenAI-compatible endpoints backed by deployed functions that declare what they serve (`serves=`): adapters over
gateway/pipeline.py, so they are authenticated, paid, held, settled and recorded exactly like `/fn` calls.

`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` take an API key or, instead, `X-Cocoon-Payment`, and
honour COCOON_PAYMENTS_REQUIRED. A function that declares token prices is charged per token from the usage it
reports (cocoon_faas/pricing.py), else per second. The charge and receipt come back as `X-Cocoon-Charge` /
`X-Cocoon-Receipt` headers and, in the body, as `cocoon: {call_id, charge, receipt}` (for streams: on the final
chunk, the one with `finish_reason`, and on the usage chunk). A sealed body (the envelope of sealed `/fn` calls,
sealed by `cocoon proxy` on the caller's machine) is routed on its clear header to the function it names, which
must serve the route's kind, and answered exactly as a sealed `/fn` call: the gateway sees only ciphertext.
Request and response shapes live in cocoon_faas/openai_compat.py, shared with the proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cocoon_faas.errors import CallCancelledError, CocoonError, NotFoundError
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.http import error_response, json_response
from cocoon_faas.gateway.limits import loads_bounded
from cocoon_faas.gateway.pipeline import Call, Pipeline, Plan, Settlement, new_call_id
from cocoon_faas.gateway.routes_fn import CallStreamResponse, respond
from cocoon_faas.gateway.sealed import is_sealed, sealed_plan
from cocoon_faas.openai_compat import (
    OPTIONAL_ARGS,
    Assembler,
    chat_args,
    check_accepted,
    completion_args,
    embedding_inputs,
    embeddings_response,
    model_of,
    stream_mode,
)
from cocoon_faas.pricing import Usage

KINDS = ("chat", "completions", "embeddings")


def served(gw: Any, kind: str) -> dict[str, FunctionRuntime]:
    out: dict[str, FunctionRuntime] = {}
    for fr in gw.controller.functions.values():
        for s in fr.spec.serves:
            k, _, model = s.partition(":")
            if k == kind:
                out[model] = fr
    return out


def _function_for(gw: Any, kind: str, model: str) -> FunctionRuntime:
    table = served(gw, kind)
    if model not in table:
        raise NotFoundError(f"no deployed function serves {kind} model {model!r}; available: {sorted(table)} "
                            f"(deploy one with serves=\"{kind}:{model}\")", param="model")
    return table[model]


def _bad_output(message: str) -> CocoonError:
    err = CocoonError(message)
    err.status, err.type = 502, "bad_function_output"
    return err


def _cocoon(call: Call, paid: Settlement) -> dict[str, Any]:
    out: dict[str, Any] = {"call_id": call.id}
    if paid.charge is not None:
        out["charge"] = paid.charge
        out["receipt"] = paid.receipt
    return out


def accepts(fr: FunctionRuntime) -> list[str] | None:
    """Which of the options a request may ask for (OPTIONAL_ARGS) the function takes; None: all (**kwargs)."""
    if fr.signature.var_kwargs:
        return None
    names = {p.name for p in fr.signature.params}
    return [a for a in OPTIONAL_ARGS if a in names]


def _models(gw: Any) -> list[dict[str, Any]]:
    data = []
    for kind in KINDS:
        for model, fr in sorted(served(gw, kind).items()):
            data.append({"id": model, "object": "model", "created": 0, "owned_by": gw.store.developer_name(fr.owner),
                         "cocoon": {"function": fr.name, "kind": kind, "measurement": fr.measurement,
                                    "confidential": fr.flags.confidential, "accepts": accepts(fr)}})
    return data


async def list_models(request: Request) -> Response:
    """What the gateway serves (public, like GET /v1/functions/{name}: a paying caller has no API key)."""
    return json_response({"object": "list", "data": _models(request.app.state.gw)})


async def get_model(request: Request) -> Response:
    """`GET /v1/models/{model}` (OpenAI clients' `models.retrieve`): the first entry of that id in the list."""
    model = request.path_params["model"]
    data = _models(request.app.state.gw)
    hit = next((m for m in data if m["id"] == model), None)
    if hit is None:
        return error_response(NotFoundError(f"no deployed function serves model {model!r}; available: "
                                            f"{sorted({m['id'] for m in data})} (see GET /v1/models)", param="model"))
    return json_response(hit)


async def _sealed(request: Request, call_id: str, kinds: tuple[str, ...]) -> Response:
    headers = {"X-Cocoon-Call-Id": call_id}
    try:
        call = await request.app.state.gw.pipeline.admit(request, call_id, sealed_plan(request, call_id, kinds))
    except CocoonError as exc:
        return error_response(exc, headers)
    return await respond(request, call, headers, sealed=True)


async def embeddings(request: Request) -> Response:
    call_id = new_call_id()
    if is_sealed(request):
        return await _sealed(request, call_id, ("embeddings",))
    gw = request.app.state.gw
    pipeline: Pipeline = gw.pipeline
    headers = {"X-Cocoon-Call-Id": call_id}
    req: dict[str, Any] = {}

    def plan(raw: bytes) -> Plan:
        body = loads_bounded(raw) if raw.strip() else {}
        model = model_of(body)
        inputs, fmt = embedding_inputs(body)
        req.update(model=model, inputs=inputs, fmt=fmt)
        return Plan(_function_for(gw, "embeddings", model), b"", units=len(inputs))

    try:
        call = await pipeline.admit(request, call_id, plan)
    except CocoonError as exc:
        return error_response(exc, headers)
    try:  # one request, one hold, one record: a replica call per input (a @batched function shares passes)
        answers = await asyncio.gather(*(pipeline.unary(call, json.dumps({"text": t}).encode())
                                         for t in req["inputs"]))
    except asyncio.CancelledError:
        call.finish(CallCancelledError(f"call {call_id}: the client went away"), 0.0, "local")
        raise
    exec_ms = sum(a.exec_ms for a in answers)
    provider = answers[0].provider
    err = next((a.error for a in answers if a.error is not None), None)
    if err is None:
        try:
            resp, tokens = embeddings_response(req["model"], [json.loads(a.body or b"null") for a in answers],
                                               req["fmt"])
        except (CocoonError, ValueError) as exc:
            err = _bad_output(f"the embeddings function {call.fr.name!r} answered in the wrong shape ({exc}); "
                              "it must return {'embedding': [float], 'tokens': int}")
    if err is not None:
        paid = call.finish(err, exec_ms, provider)
        return error_response(err, {**headers, **paid.headers()})
    paid = call.finish(None, exec_ms, provider, Usage(tokens, 0) if call.per_token else None)
    resp["cocoon"] = _cocoon(call, paid)
    return json_response(resp, 200, {**headers, **paid.headers()})


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completions")


async def _generate(request: Request, kind: str) -> Response:
    call_id = new_call_id()
    if is_sealed(request):
        return await _sealed(request, call_id, ("chat",) if kind == "chat" else ("completions", "chat"))
    gw = request.app.state.gw
    pipeline: Pipeline = gw.pipeline
    headers = {"X-Cocoon-Call-Id": call_id}
    req: dict[str, Any] = {}

    def plan(raw: bytes) -> Plan:
        body = loads_bounded(raw) if raw.strip() else {}
        model = model_of(body)
        if kind == "chat":
            fr, args = _function_for(gw, "chat", model), chat_args(body)
        else:
            own = served(gw, "completions").get(model)
            fr = own or _function_for(gw, "chat", model)  # a chat model answers a prompt as one user message
            args = completion_args(body, as_chat=own is None)
        check_accepted(args, accepts(fr), model, fr.name)
        req["body"], req["args"] = body, args
        return Plan(fr, json.dumps(args).encode())

    try:
        call = await pipeline.admit(request, call_id, plan)
    except CocoonError as exc:
        return error_response(exc, headers)
    body = req["body"]
    streamed, include_usage = stream_mode(body)
    asm = Assembler.for_request(model_of(body), call_id, kind, include_usage, body, req["args"])
    if not call.fr.spec.streams:  # a unary function answers with one item: {"text"|"delta", "usage", ...}
        ans, paid = await pipeline.run(call)
        headers.update(paid.headers())
        if ans.error is not None:
            return error_response(ans.error, headers)
        asm.take(json.loads(ans.body or b"null"))
        return json_response(asm.response(_cocoon(call, paid)), 200, headers)
    st = pipeline.stream(call)
    try:
        await st.open()
    except CocoonError as exc:
        return error_response(exc, {**headers, **(call.settlement.headers() if call.settlement else {})})
    if not streamed:
        try:
            async for frame in st.chunks():
                asm.take(json.loads(frame.body))
            paid = st.end()
        except CocoonError as exc:
            err = st.fail(exc)
            return error_response(err, {**headers, **(call.settlement.headers() if call.settlement else {})})
        finally:
            await st.close()
        return json_response(asm.response(_cocoon(call, paid)), 200, {**headers, **paid.headers()})

    def data(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def sse() -> AsyncIterator[bytes]:
        try:
            for chunk in asm.opening():
                yield data(chunk)
            async for frame in st.chunks():
                delta = asm.take(json.loads(frame.body))
                if delta is not None:
                    yield data(asm.chunk(delta))
            paid = st.end()
            for chunk in asm.closing(_cocoon(call, paid)):
                yield data(chunk)
        except CocoonError as exc:
            yield data(st.fail(exc).to_dict())
        finally:
            await st.close()  # a client gone mid-stream: settled here (per-token: the items delivered)
        yield b"data: [DONE]\n\n"

    return CallStreamResponse(st, sse(), headers)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
