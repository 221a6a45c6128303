"""OpenAI-compatible endpoints backed by deployed functions that declare what they serve.

A function declares `serves="embeddings:<model>"` or `serves="chat:<model>"` and follows one calling convention:

- embeddings: called once per input as `{"text": str}`, returns `{"embedding": [float], "tokens": int}`.
  Declare it `@cocoon.batched(...)` and the concurrent per-input calls of one request share a forward pass.
- chat: a generator called as `{"messages", "max_tokens", "temperature", "top_p", "seed", "stop"}` that yields
  `{"delta": str}` items and lastly `{"finish_reason": "stop"|"length", "usage": {"prompt_tokens",
  "completion_tokens"}}`.

Usage token counts come back in every response, so a price per token can be derived from them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cocoon_faas import protocol as P
from cocoon_faas.errors import CocoonError, InvalidRequestError, NotFoundError
from cocoon_faas.gateway.controller import FunctionRuntime
from cocoon_faas.gateway.http import developer_of, error_response, json_response, read_json
from cocoon_faas.gateway.invoke import Outcome

UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio",
                    "modalities", "logit_bias", "prediction", "parallel_tool_calls", "web_search_options")
KNOWN_CHAT = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "response_format",
              "metadata", "store", "service_tier", *UNSUPPORTED_CHAT}
KNOWN_EMB = {"model", "input", "encoding_format", "dimensions", "user"}


def _served(gw: Any, kind: str) -> dict[str, FunctionRuntime]:
    out: dict[str, FunctionRuntime] = {}
    for fr in gw.controller.functions.values():
        for s in fr.spec.serves:
            k, _, model = s.partition(":")
            if k == kind:
                out[model] = fr
    return out


def _function_for(gw: Any, kind: str, model: Any) -> FunctionRuntime:
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required: a model id from GET /v1/models", param="model")
    served = _served(gw, kind)
    if model not in served:
        raise NotFoundError(f"no deployed function serves {kind} model {model!r}; available: {sorted(served)} "
                            f"(deploy one with serves=\"{kind}:{model}\")", param="model")
    return served[model]


async def _call(gw: Any, fr: FunctionRuntime, args: dict[str, Any], caller: str) -> Any:
    call_id = uuid.uuid4().hex
    t0 = time.monotonic()
    outcome, err, meta = await gw.invoker.call(fr, json.dumps(args).encode(), {"id": call_id})
    gw.finish_call(fr, call_id, caller, t0, outcome, err, meta)
    if err is not None:
        raise err
    assert outcome is not None
    return json.loads(outcome.body)


async def list_models(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        developer_of(request)
    except CocoonError as exc:
        return error_response(exc)
    data = []
    for kind in ("embeddings", "chat"):
        for model, fr in sorted(_served(gw, kind).items()):
            data.append({"id": model, "object": "model", "created": 0, "owned_by": gw.store.developer_name(fr.owner),
                         "cocoon": {"function": fr.name, "kind": kind}})
    return json_response({"object": "list", "data": data})


async def embeddings(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        caller = developer_of(request)
        body = await read_json(request, gw.settings.max_body_bytes)
        if not isinstance(body, dict):
            raise InvalidRequestError("body must be a JSON object with 'model' and 'input'")
        unknown = sorted(set(body) - KNOWN_EMB)
        if unknown:
            raise InvalidRequestError(f"unsupported field(s) {unknown}; supported: {sorted(KNOWN_EMB)}")
        if body.get("dimensions") is not None:
            raise InvalidRequestError("'dimensions' is not supported: the model's embedding size is fixed",
                                      param="dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise InvalidRequestError("'input' must be a string or a non-empty list of strings (token arrays are "
                                      "not supported)", param="input")
        if len(inputs) > 2048:
            raise InvalidRequestError("'input' may hold at most 2048 strings", param="input")
        fr = _function_for(gw, "embeddings", body.get("model"))
        results = await asyncio.gather(*(_call(gw, fr, {"text": t}, caller) for t in inputs))
    except CocoonError as exc:
        return error_response(exc)
    data = []
    tokens = 0
    for i, r in enumerate(results):
        emb = r["embedding"]
        tokens += int(r.get("tokens", 0))
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(emb)}f", *emb)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response({"object": "list", "data": data, "model": body["model"],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _chat_args(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object with 'model' and 'messages'")
    for f in UNSUPPORTED_CHAT:
        if body.get(f) not in (None, False):
            raise InvalidRequestError(f"'{f}' is not supported by this gateway; remove it", param=f)
    unknown = sorted(set(body) - KNOWN_CHAT)
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {unknown}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise InvalidRequestError("only response_format {'type': 'text'} is supported", param="response_format")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise InvalidRequestError(f"messages[{i}] needs a role of system, developer, user or assistant",
                                      param="messages")
        content = m.get("content")
        if isinstance(content, list):  # text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequestError(f"messages[{i}] has non-text content; only text is supported",
                                          param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise InvalidRequestError("'max_tokens' must be an integer between 1 and 4096", param="max_tokens")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise InvalidRequestError("'temperature' must be between 0 and 2", param="temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidRequestError("'top_p' must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequestError("'seed' must be an integer", param="seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequestError("'stop' must be a string or up to 4 non-empty strings", param="stop")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
        raise InvalidRequestError("'stream_options' supports only include_usage", param="stream_options")
    return {"messages": clean, "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "seed": seed, "stop": stop}


async def chat_completions(request: Request) -> Response:
    gw = request.app.state.gw
    try:
        caller = developer_of(request)
        body = await read_json(request, gw.settings.max_body_bytes)
        args = _chat_args(body)
        fr = _function_for(gw, "chat", body.get("model"))
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        call_id = uuid.uuid4().hex
        t0 = time.monotonic()
        agen = gw.invoker.stream(fr, json.dumps(args).encode(), {"id": call_id})
        first = await agen.__anext__()
    except CocoonError as exc:
        return error_response(exc)
    cid = f"chatcmpl-{call_id}"
    created = int(time.time())
    model = body["model"]

    async def frames() -> AsyncIterator[dict[str, Any]]:
        frame = first
        try:
            while frame.type == P.CHUNK:
                yield json.loads(frame.body)
                frame = await agen.__anext__()
            gw.finish_call(fr, call_id, caller, t0, Outcome(b"", float(frame.meta.get("ms", 0)), "", 1), None,
                           frame.meta)
        except CocoonError as exc:
            gw.finish_call(fr, call_id, caller, t0, None, exc, {})
            raise
        finally:
            await agen.aclose()

    if not stream:
        text, finish, usage = [], "stop", {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            async for item in frames():
                if "delta" in item:
                    text.append(item["delta"])
                if "usage" in item:
                    usage = item["usage"]
                    finish = item.get("finish_reason", finish)
        except CocoonError as exc:
            return error_response(exc)
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        return json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage})

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                               if choices else []}
        if include_usage:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def sse() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for item in frames():
                if item.get("delta"):
                    yield chunk({"content": item["delta"]})
                if "usage" in item:
                    yield chunk({}, item.get("finish_reason", "stop"))
                    if include_usage:
                        u = item["usage"]
                        yield chunk({}, usage={**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]},
                                    choices=False)
        except CocoonError as exc:
            yield b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
