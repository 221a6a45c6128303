"""`cocoon proxy`: an OpenAI-compatible API on the caller's machine that seals every request, pays it, and checks
what it was charged. Any OpenAI client gets confidential, paid inference by changing only its `base_url`.

For each request the proxy (on 127.0.0.1) checks the body with the same code as the gateway
(cocoon_faas/openai_compat.py), finds the function serving the model, verifies the attestation documents of its
replicas against the caller's policy (the function's pinned measurement: the one `cocoon deploy` recorded here,
else the one first seen, pinned from then on; TDX evidence, or this machine's dev key with
`--allow-dev-attestation`), seals the arguments to them (the envelope of sealed `/fn` calls), posts the ciphertext to
the gateway's OpenAI route with a payment from the caller's channel, opens the sealed answer, checks the receipt
and the charge against it (per token: the usage the replica reported inside the sealed answer, times the
function's prices, plus royalty and fee), and answers in the OpenAI shapes. The gateway learns the route, the
sizes and the charge; never the prompt or the answer.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cocoon_faas.confidential import Receipt, seal_request
from cocoon_faas.confidential_client import (
    build_policy,
    pinned_measurement,
    record_deployment,
    verified_replicas,
)
from cocoon_faas.errors import CocoonError, InvalidRequestError, NotFoundError, PaymentError
from cocoon_faas.openai_compat import (
    Assembler,
    chat_args,
    check_accepted,
    completion_args,
    embedding_inputs,
    embeddings_response,
    model_of,
    prompt_as_chat,
    stream_mode,
)
from cocoon_faas.pricing import CHARGE_HEADER, FeePolicy, TokenPrices, Usage
from cocoon_faas.transport import Transport

SEALED_HEADERS = {"Content-Type": "application/cocoon-sealed"}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, headers, media_type="application/json")


def _error(exc: CocoonError) -> Response:
    """The error as the gateway would answer it; a 429's Retry-After passes on (OpenAI clients back off by it).
    A sealed answer saying the function refused its input (cocoon.InvalidRequestError, e.g. a prompt past the
    model's context) is the client's 400: as a 500, OpenAI clients sent it twice more, each charged."""
    retry = exc.details.get("retry_after")
    body, status = exc.to_dict(), exc.status
    if exc.type == "function_error" and exc.details.get("exception_type") == "InvalidRequestError":
        body["error"]["type"], status = "invalid_request", 400
    return _json(body, status, {"Retry-After": str(retry)} if retry is not None else None)


async def _body(request: Request) -> Any:
    """The request's JSON (an InvalidRequestError, 400, when it is not JSON: every other error is the client's too)."""
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise InvalidRequestError("request body is not valid JSON; send a JSON object") from None


class ChargeMismatch(PaymentError):
    """Raised when the gateway charged other than the receipt and the function's prices say."""

    status = 502


class Proxy:
    """The proxy's state: the caller's transport (payer), trust policy and what it learnt of the gateway."""

    def __init__(self, transport: Transport, home: Path, allow_dev_attestation: bool | str | list[str] = False,
                 tofu: bool = True) -> None:
        self.t, self.home, self.allow_dev = transport, Path(home), allow_dev_attestation
        self.tofu = tofu
        self._models: tuple[float, dict[tuple[str, str], dict[str, Any]]] = (0.0, {})
        self._quotes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.charges: list[tuple[str, int, int]] = []  # (call id, charged, expected): what was checked

    # -- what the gateway serves --------------------------------------------------------------------------
    def models(self, refresh: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
        stamp, table = self._models
        if refresh or time.monotonic() - stamp > 30:
            data = self.t.request("GET", "/v1/models").json()["data"]
            table = {(m["cocoon"]["kind"], m["id"]): m["cocoon"] for m in data}
            self._models = (time.monotonic(), table)
        return table

    def function_for(self, kind: str, model: str) -> dict[str, Any]:
        table = self.models()
        hit = table.get((kind, model)) or self.models(refresh=True).get((kind, model))
        if hit is None:
            raise NotFoundError(f"the gateway serves no {kind} model {model!r}; see GET /v1/models", param="model")
        return hit

    def quote(self, function: str) -> dict[str, Any]:
        if function not in self._quotes:
            self._quotes[function] = self.t.request("GET", f"/v1/functions/{function}").json()["pricing"]
        return self._quotes[function]

    def policy(self, info: dict[str, Any]) -> Any:
        """The caller's policy for `info["function"]`: its pinned measurement (pinned now on first use)."""
        name = info["function"]
        with self._lock:
            if pinned_measurement(self.home, self.t.url, name) is None:
                if not self.tofu:
                    raise NotFoundError(f"no measurement pinned for {name!r}; deploy it from this machine "
                                        "(`cocoon deploy` records it) or let the proxy pin the first one it sees "
                                        "(Proxy(..., tofu=True), what `cocoon proxy` does)")
                record_deployment(self.home, self.t.url, {"name": name, "measurement": info["measurement"]},
                                  confidential=bool(info.get("confidential")))
        return build_policy(self.home, self.t.url, name, allow_dev_attestation=self.allow_dev)

    # -- one sealed call ------------------------------------------------------------------------------------
    def sealed(self, path: str, info: dict[str, Any], args: dict[str, Any]) -> Iterator[Any]:
        """Seal `args` to the function's verified replicas, post them paid, yield each opened item and lastly
        the `end` event's fields (with "receipt_checked"). Reseals once on 421 stale keys."""
        name = info["function"]
        policy = self.policy(info)
        raw = json.dumps(args).encode()
        for attempt in (0, 1):
            replicas = verified_replicas(self.t, name, policy, refresh=attempt > 0)
            body, ctx = seal_request(raw, name, replicas)
            receipt: Receipt | None = None
            seen: Usage | None = None  # the usage inside the sealed answer: what a per-token charge must match
            try:
                events = self.t.events(path, name, content=[bytes(body)], headers=SEALED_HEADERS)
                for event, data in events:
                    if event == "frame":
                        opened = ctx.open_chunk(base64.b64decode(data))
                        if isinstance(opened, Receipt):
                            receipt = opened
                        else:
                            item = json.loads(opened)
                            if isinstance(item, dict):
                                seen = Usage.from_json(item.get("usage")) or seen
                            yield item
                    elif event == "end":
                        end = json.loads(data)
                        if receipt is None or not ctx.finished:
                            raise CocoonError("the sealed answer ended without its authenticated end frame")
                        end["receipt_checked"] = self.check_charge(name, end, receipt, seen)
                        yield end
                        return
            except CocoonError as exc:
                if exc.type == "stale_keys" and not attempt:
                    continue
                raise
            return

    def sealed_unary(self, path: str, info: dict[str, Any], args: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """A unary sealed call (embeddings): (result, {"charge": ...})."""
        name = info["function"]
        policy = self.policy(info)
        raw = json.dumps(args).encode()
        for attempt in (0, 1):
            replicas = verified_replicas(self.t, name, policy, refresh=attempt > 0)
            body, ctx = seal_request(raw, name, replicas)
            try:
                r = self.t.call("POST", path, name, content=[bytes(body)], headers=SEALED_HEADERS)
            except CocoonError as exc:
                if exc.type == "stale_keys" and not attempt:
                    continue
                raise
            result, receipt = ctx.open_response(r.content)
            end = {"charge": int(r.headers.get(CHARGE_HEADER) or 0), "call_id": r.headers.get("x-cocoon-call-id")}
            value = json.loads(result)
            tokens = value.get("tokens") if isinstance(value, dict) else None
            self.check_charge(name, end, receipt, Usage(tokens, 0) if isinstance(tokens, int) else None)
            return value, end
        raise AssertionError("unreachable")

    def check_charge(self, function: str, end: dict[str, Any], receipt: Receipt, usage: Usage | None) -> bool:
        """The gateway's charge against the receipt (per second: the replica's metered price) or, for a per-token
        function, against the usage inside the sealed answer times its prices; royalty and fee on top."""
        if "charge" not in end and self.t.payer is None:
            return True
        charged = int(end.get("charge") or 0)
        q = self.quote(function)
        royalty, fees = int(q["royalty_nanoton"]), FeePolicy(bps=int(q["operator_fee_bps"]))
        per_token = q.get("per_token")
        if per_token and usage is not None:
            compute = TokenPrices(int(per_token["prompt_nanoton_per_million"]),
                                  int(per_token["completion_nanoton_per_million"])).cost(usage)
        else:
            compute = max(int(receipt.price_nanoton) - royalty, 0)
        expected = min(compute + royalty + fees.fee(compute, royalty), self.t.hold_for(function))
        self.charges.append((str(end.get("call_id")), charged, expected))
        if charged != expected:
            raise ChargeMismatch(f"the gateway charged {charged} nanoton for call {end.get('call_id')}, but the "
                                 f"receipt and prices say {expected}; keep the receipt and dispute the charge",
                                 problem="charge_mismatch", charged=charged, expected=expected)
        return True


def create_proxy_app(proxy: Proxy) -> Starlette:
    async def models(request: Request) -> Response:
        try:
            table = await run_in_threadpool(proxy.models, True)
        except CocoonError as exc:
            return _error(exc)
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "cocoon", "cocoon": info}
                for (_, model), info in sorted(table.items())]
        return _json({"object": "list", "data": data})

    async def models_one(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            table = await run_in_threadpool(proxy.models, True)
        except CocoonError as exc:
            return _error(exc)
        hit = next((info for (_, m), info in sorted(table.items()) if m == model), None)
        if hit is None:
            return _error(NotFoundError(f"the gateway serves no model {model!r}; see GET /v1/models", param="model"))
        return _json({"id": model, "object": "model", "created": 0, "owned_by": "cocoon", "cocoon": hit})

    async def generate(request: Request, kind: str) -> Response:
        try:  # the body is checked before anything is asked of the gateway: a bad request costs no round trip
            body = await _body(request)
            model = model_of(body)
            stream, include_usage = stream_mode(body)
            if kind == "chat":
                args = chat_args(body)
                info, path = await run_in_threadpool(proxy.function_for, "chat", model), "/v1/chat/completions"
            else:
                args, path = completion_args(body, as_chat=False), "/v1/completions"
                own = (await run_in_threadpool(proxy.models)).get(("completions", model))
                if own is not None:
                    info = own
                else:  # a chat model serves the completion: the prompt as one user message
                    info, args = await run_in_threadpool(proxy.function_for, "chat", model), prompt_as_chat(args)
            check_accepted(args, info.get("accepts"), model, str(info.get("function")))
        except CocoonError as exc:
            return _error(exc)
        asm = Assembler.for_request(model, "", kind, include_usage, body, args)
        items = proxy.sealed(path, info, args)

        def first() -> Any:
            return next(items, None)

        try:
            head = await run_in_threadpool(first)
        except CocoonError as exc:
            return _error(exc)

        def rest() -> Iterator[Any]:
            if head is not None:
                yield head
            yield from items

        if not stream:
            def collect() -> dict[str, Any]:
                end: dict[str, Any] = {}
                for item in rest():
                    if isinstance(item, dict) and "receipt_checked" in item:
                        end = item
                    else:
                        asm.take(item)
                asm.call_id = str(end.get("call_id", ""))
                return asm.response({k: end.get(k) for k in ("call_id", "charge", "receipt", "receipt_checked")})

            try:
                return _json(await run_in_threadpool(collect))
            except CocoonError as exc:
                return _error(exc)

        def sse() -> Iterator[bytes]:
            def data(obj: Any) -> bytes:
                return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

            try:
                for chunk in asm.opening():
                    yield data(chunk)
                for item in rest():
                    if isinstance(item, dict) and "receipt_checked" in item:
                        cocoon = {k: item.get(k) for k in ("call_id", "charge", "receipt", "receipt_checked")}
                        asm.call_id = str(item.get("call_id", ""))
                        for chunk in asm.closing(cocoon):
                            yield data(chunk)
                    else:
                        delta = asm.take(item)
                        if delta is not None:
                            yield data(asm.chunk(delta))
            except CocoonError as exc:
                yield data(exc.to_dict())
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completions")

    async def embeddings(request: Request) -> Response:
        try:
            body = await _body(request)
            model = model_of(body)
            inputs, fmt = embedding_inputs(body)
            info = await run_in_threadpool(proxy.function_for, "embeddings", model)
        except CocoonError as exc:
            return _error(exc)

        def run() -> dict[str, Any]:
            with ThreadPoolExecutor(min(8, len(inputs))) as ex:
                done = list(ex.map(lambda t: proxy.sealed_unary("/v1/embeddings", info, {"text": t}), inputs))
            resp, _ = embeddings_response(model, [r for r, _ in done], fmt)
            resp["cocoon"] = {"charge": sum(e["charge"] for _, e in done),
                              "call_ids": [e["call_id"] for _, e in done], "receipt_checked": True}
            return resp

        try:
            return _json(await run_in_threadpool(run))
        except CocoonError as exc:
            return _error(exc)

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models_one, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ])


def run_proxy(port: int = 8080, allow_dev_attestation: bool = False) -> None:
    """`cocoon proxy`: serve on 127.0.0.1:`port` until interrupted."""
    import uvicorn

    from cocoon_faas.client import Client
    from cocoon_faas.settings import get_settings

    client = Client()  # pays from the channel under COCOON_HOME; a paid call carries no API key
    proxy = Proxy(client.transport, get_settings().home, allow_dev_attestation)
    uvicorn.run(create_proxy_app(proxy), host="127.0.0.1", port=port, log_level="warning")
