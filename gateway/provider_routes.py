"""HTTP edge of the provider marketplace: join, heartbeat, leave and the public listing.

    POST /v1/providers                    signed registration (runtime/registration.py) -> node id, token,
                                          the Ray address (and auth token) to join, the heartbeat interval,
                                          the Ray resources to advertise
    POST /v1/providers/{id}/heartbeat     Bearer <token>; {"load": 0..n} -> {"status": ...}
    POST /v1/providers/{id}/leave         Bearer <token> -> {"status": "draining" | "left"}
    GET  /v1/providers/approvals          operator: the admission mode and the approved/revoked wallets
    POST /v1/providers/approvals          operator: {"wallet"} approve (`cocoon provider approve WALLET`)
    DELETE /v1/providers/approvals/{w}    operator: revoke (its nodes go down now; `cocoon provider revoke`)
    GET  /v1/providers                    every listed node: hardware, price, load, health, reputation, earnings
    GET  /v1/providers/{id}               one node

Registration proves control of the wallet (Ed25519 over the canonical registration, key owning the address);
the node then authenticates with a random per-registration token whose SHA-256 is all the gateway keeps. Nodes,
tokens and nonces live in the store every gateway shares (gateway/provider_book.py): a node may heartbeat or
leave through any gateway, and the operator approve or revoke through any.
Errors answer the one JSON shape of :mod:`cocoon_faas.errors`.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from cocoon_faas.errors import (
    AuthenticationError,
    CocoonError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PermissionDeniedError,
)
from cocoon_faas.gateway.admission import Admission, WalletBook, wallet_key
from cocoon_faas.gateway.http import read_json
from cocoon_faas.gateway.marketplace import Marketplace, Node
from cocoon_faas.gateway.provider_book import ProviderBook
from cocoon_faas.runtime.node_attestation import seal_secrets
from cocoon_faas.runtime.registration import Registration

MAX_BODY = 64 * 1024
MAX_LOAD = 10_000  # a node's load is a busy fraction (above 1 when overloaded); beyond this it means nothing


def _default_ray_address() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().gcs_address)
    except Exception:  # no Ray in this process: fall back to settings
        pass
    from cocoon_faas.settings import get_settings

    return get_settings().ray_address


def _default_ray_token() -> str | None:
    """The cluster's Ray auth token when token auth is on (Ray's own variables and default file)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


async def health_loop(market: Marketplace, *, interval: float | None = None,
                      ray_nodes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
    """Run forever for a marketplace kept by itself (no store; a gateway runs `ProviderBook.run` instead):
    sweep silent nodes down and, given ``ray_nodes`` (``ray.nodes``), mark down nodes whose Ray node died.
    Subscribers hear ``down`` and replace the replicas."""
    import asyncio

    period = interval or market.heartbeat_interval / 2
    while True:
        market.sweep()
        if ray_nodes is not None:
            try:
                nodes = await asyncio.to_thread(ray_nodes)
            except Exception:  # Ray briefly unreachable: heartbeats still cover node health
                nodes = None
            if nodes is not None:
                market.sync_ray_nodes(nodes)
        await asyncio.sleep(period)


def provider_routes(providers: Marketplace | ProviderBook | Callable[[], ProviderBook], *, ray_address: str | Callable[[], str | None] | None = None,
                    ray_token: str | Callable[[], str | None] | None = None,
                    clock: Callable[[], float] = time.time, admission: Admission | None = None,
                    wallets: Callable[[], WalletBook] | None = None,
                    is_operator: Callable[[Request], bool] | None = None) -> list[BaseRoute]:
    """The provider endpoints over ``providers`` (a bare marketplace gets a private in-memory store; a callable
    is asked on each request, for a gateway whose store opens at start-up).

    ``ray_address`` is the GCS address joining nodes are told to join (default: this process's Ray, else
    ``COCOON_RAY_ADDRESS``); ``ray_token`` the cluster's auth token they need when Ray token auth is on
    (default: read from Ray's ``RAY_AUTH_*`` variables). Note that a Ray cluster trusts its nodes: the token
    lets a provider's node run cluster work, which is why who may join is decided by ``admission``
    (gateway/admission.py; None: open, for unit tests) and the secrets go sealed to an attested node's key.
    ``wallets`` gives the operator's approvals, ``is_operator`` tells the operator's requests (for approve/revoke).
    """
    if isinstance(providers, (Marketplace, ProviderBook)):
        fixed = providers if isinstance(providers, ProviderBook) else ProviderBook.in_memory(providers)
        providers = lambda: fixed  # noqa: E731
    book_of = providers

    def address() -> str:
        addr = ray_address() if callable(ray_address) else ray_address
        addr = addr or _default_ray_address()
        if not addr:
            raise NoCapacityError("the gateway runs no joinable Ray cluster; set COCOON_RAY_ADDRESS on the gateway")
        return addr

    def token_of(request: Request) -> str:
        """The bearer token (checked by the store in the statement that acts on it)."""
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else ""

    async def body_of(request: Request) -> Any:
        return await read_json(request, MAX_BODY)

    async def register(request: Request) -> JSONResponse:
        book = book_of()
        body = await body_of(request)
        reg, sig = Registration.from_wire(body)
        now = clock()
        reg.verify(sig, now)
        admitted = admission.check(reg, body.get("attestation"), now) if admission is not None else None
        node = Node(reg.node_id, reg.wallet, reg.public_key, reg.hardware, reg.gpu_price, reg.cpu_price, reg.name)
        ray_addr = address()
        if not await book.claim_nonce(reg.nonce, now):  # on any gateway: the nonces are shared
            raise AuthenticationError("registration nonce was already used; sign a fresh registration")
        token = secrets.token_urlsafe(32)
        attested = True if admitted is not None and admitted.sealing_key is not None else None
        status = await book.register(node, wallet_key(reg.wallet), token, attested)
        ray_tok = ray_token() if callable(ray_token) else ray_token
        secret = {"token": token, "ray_address": ray_addr,
                  "ray_token": ray_tok if ray_tok is not None else _default_ray_token()}
        answer: dict[str, Any] = {
            "node_id": node.node_id, "heartbeat_interval_s": book.heartbeat_interval,
            "resources": node.hardware.ray_resources(node.node_id), "status": status,
            "admission": admitted.mode if admitted is not None else "open"}
        if admitted is not None and admitted.sealing_key is not None:  # only the attested key can open it
            answer["sealed"] = seal_secrets(admitted.sealing_key, node.node_id, secret)
        else:
            answer.update(secret)
        return JSONResponse(answer, status_code=201)

    def operator_only(request: Request) -> WalletBook:
        if is_operator is None or wallets is None:
            raise NotFoundError("this gateway has no provider approvals")
        if not is_operator(request):
            raise PermissionDeniedError("approving providers is for the gateway operator; send the API key in the "
                                        "gateway's $COCOON_HOME/api_key")
        return wallets()

    async def approve(request: Request) -> JSONResponse:
        book = operator_only(request)
        body = await body_of(request)
        wallet = body.get("wallet") if isinstance(body, dict) else None
        if not isinstance(wallet, str):
            raise InvalidRequestError('body must be {"wallet": "<TON address>"}')
        key = wallet_key(wallet)
        book.set_wallet_status(key, "approved")
        return JSONResponse({"wallet": key, "status": "approved"})

    async def revoke(request: Request) -> JSONResponse:
        approvals = operator_only(request)
        key = wallet_key(request.path_params["wallet"])
        approvals.set_wallet_status(key, "revoked")
        down = await book_of().revoke(key)  # its nodes leave placement and routing now; joining again is refused
        return JSONResponse({"wallet": key, "status": "revoked", "nodes_down": down})

    async def approvals(request: Request) -> JSONResponse:
        book = operator_only(request)
        mode = admission.mode if admission is not None else "open"
        return JSONResponse({"admission": mode, "wallets": [{"wallet": w, "status": s, "at": t}
                                                            for w, s, t in book.wallet_statuses()]})

    async def heartbeat(request: Request) -> JSONResponse:
        book = book_of()
        node_id = request.path_params["node_id"]
        body = await body_of(request)
        load = body.get("load", 0.0) if isinstance(body, dict) else 0.0
        # a number as JSON sends it: "inf" or "nan" in a string became a load that no listing could encode (500)
        if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 <= load <= MAX_LOAD:
            raise InvalidRequestError(f"load must be a number from 0 to {MAX_LOAD} (the node's busy CPUs per CPU), "
                                      f"got {load!r}")
        status = await book.heartbeat(node_id, token_of(request), float(load))
        return JSONResponse({"status": status, "heartbeat_interval_s": book.heartbeat_interval})

    async def leave(request: Request) -> JSONResponse:
        book = book_of()
        node_id = request.path_params["node_id"]
        status = await book.leave(node_id, token_of(request))
        return JSONResponse({"status": status, "replicas": book.market.replicas_on(node_id)})

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"providers": [v.to_dict() for v in book_of().market.listing()]})

    async def one(request: Request) -> JSONResponse:
        return JSONResponse(book_of().market.view(request.path_params["node_id"]).to_dict())

    def guarded(fn: Callable[[Request], Awaitable[JSONResponse]]) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def handler(request: Request) -> JSONResponse:
            try:
                return await fn(request)
            except CocoonError as exc:
                return JSONResponse(exc.to_dict(), status_code=exc.status)
        return handler

    return [
        Route("/v1/providers/approvals", guarded(approvals), methods=["GET"]),
        Route("/v1/providers/approvals", guarded(approve), methods=["POST"]),
        Route("/v1/providers/approvals/{wallet}", guarded(revoke), methods=["DELETE"]),
        Route("/v1/providers", guarded(register), methods=["POST"]),
        Route("/v1/providers", guarded(listing), methods=["GET"]),
        Route("/v1/providers/{node_id}", guarded(one), methods=["GET"]),
        Route("/v1/providers/{node_id}/heartbeat", guarded(heartbeat), methods=["POST"]),
        Route("/v1/providers/{node_id}/leave", guarded(leave), methods=["POST"]),
    ]
