"""The dashboard's provider view: logging in as a provider (gateway/dashboard_login.py) and its private data.

    POST /dashboard/api/provider/challenge      -> {"challenge", "expires_in"} (no credentials; bounded)
    POST /dashboard/api/provider/login          {"login", "signature"} signed by the wallet key -> one-time code
    POST /dashboard/api/provider/session        {"code"} (from the page) -> session cookie + {"wallet", "csrf", ...}
    POST /dashboard/api/provider/ton-proof/payload  -> {"payload", "expires_at"} (no credentials; bounded)
    POST /dashboard/api/provider/ton-proof      a TON Connect wallet's reply with ton_proof (gateway/ton_proof.py)
                                                -> the same session cookie + {"wallet", "csrf", ...}
    GET  /dashboard/tonconnect-manifest.json    the app manifest a TON Connect wallet fetches (url, name, icon)
    GET  /dashboard/api/provider/me             the session's provider: nodes, earnings, payouts, due, charts
    GET  /dashboard/api/provider/nodes/{id}     one of its nodes (another provider's: 404, as if absent)
    POST /dashboard/api/provider/logout         ends the session (X-Cocoon-CSRF header required)

Only the session cookie opens the private routes: an API key (a tenant's, even the operator's) does not, and a
session sees only nodes registered with its own wallet. State changes from the page (session, logout) must come
from the gateway's own origin as JSON, and logout must carry the session's CSRF token: SameSite=Strict already
keeps the cookie off cross-site requests; these checks hold where a browser or a proxy does not.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cocoon_faas.errors import CocoonError, InvalidRequestError, NotFoundError, PermissionDeniedError
from cocoon_faas.gateway.admission import wallet_key
from cocoon_faas.gateway.dashboard_login import ProviderLogin, ProviderSession, SessionBook
from cocoon_faas.gateway.http import error_response, json_response, read_json
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.marketplace import Marketplace, ProviderView
from cocoon_faas.gateway.payments import provider_earnings
from cocoon_faas.gateway.payouts import payout_channels_of
from cocoon_faas.gateway.ton_proof import TonProof

COOKIE = "cocoon_provider"
CSRF_HEADER = "x-cocoon-csrf"
SERIES_WINDOW_S = 6 * 3600.0  # the charts show the last six hours, ten-second buckets, plus what came before
SERIES_BUCKET_S = 10.0
MAX_BODY = 16 * 1024
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class ProviderDashboard:
    """What the routes read: sessions, the marketplace's nodes and the ledger (None on a gateway without one)."""

    sessions: Callable[[], SessionBook]
    market: Callable[[], Marketplace]
    ledger: Callable[[], Ledger | None]
    clock: Callable[[], float] = time.time
    hosts: frozenset[str] = frozenset()  # COCOON_DASHBOARD_HOSTS: the names logins may be signed for


def _same_wallet(a: str, b: str) -> bool:
    try:
        return wallet_key(a) == wallet_key(b)
    except CocoonError:
        return False


def _host(request: Request) -> str:
    return request.headers.get("host", "")


def _check_origin(request: Request) -> None:
    """A browser's state change must come from this gateway's page, as JSON (a cross-site form cannot be)."""
    origin = request.headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != _host(request)):
        raise PermissionDeniedError(f"cross-site request from {origin!r} refused; use the dashboard this gateway "
                                    "serves", reason="csrf")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise PermissionDeniedError("send the body as application/json (the dashboard page does)", reason="csrf")


def nodes_of(market: Marketplace, wallet: str) -> list[ProviderView]:
    return [v for v in market.listing() if _same_wallet(v.wallet, wallet)]


def _series(ledger: Ledger, ids: list[str], now: float) -> dict[str, list[float]]:
    """Cumulative earned and paid out as steps: flat, then up at the end of each bucket where either moved;
    from a bucket before the first move in the window (or the window's start) to now."""
    since, step = now - SERIES_WINDOW_S, SERIES_BUCKET_S
    e, earned = ledger.provider_income(ids, "charges", since, step)
    p, paid = ledger.provider_income(ids, "payouts", since, step)
    de, dp = dict(earned), dict(paid)
    moves = sorted(set(de) | set(dp))
    out: dict[str, list[float]] = {"t": [], "earned": [], "paid": [], "due": []}

    def point(t: float) -> None:
        if out["t"] and t <= out["t"][-1]:
            out["t"].pop()
            for k in ("earned", "paid", "due"):
                out[k].pop()
        out["t"].append(t)
        out["earned"].append(e)
        out["paid"].append(p)
        out["due"].append(e - p)

    point(max(since, moves[0] - step) if moves else since)
    for t in moves:
        point(t)  # the level before the bucket's calls and payouts
        e, p = e + de.get(t, 0), p + dp.get(t, 0)
        point(min(t + step, now))
    point(now)
    return out


def provider_data(dash: ProviderDashboard, session: ProviderSession) -> dict[str, Any]:
    """Everything the provider view shows, for the session's wallet only."""
    now = dash.clock()
    nodes = nodes_of(dash.market(), session.wallet)
    ids = [v.node_id for v in nodes]
    ledger = dash.ledger()
    books = {e["provider_id"]: e for e in provider_earnings(ledger)} if ledger is not None else {}
    rows = []
    for v in nodes:
        b = books.get(v.node_id, {})
        rows.append({**v.to_dict(), "ledger_earned": b.get("earned", 0), "ledger_paid": b.get("paid", 0),
                     "due": b.get("due", 0)})
    # channel ids are 63-bit: as strings, or the page's JSON.parse rounds them to the nearest double
    payouts = [{**p, "channel_id": str(p["channel_id"])} for p in ledger.payouts_to(ids)] if ledger is not None else []
    channels = [{**c, "channel_id": str(c["channel_id"])} for c in payout_channels_of(ledger, ids)] \
        if ledger is not None else []
    totals = {k: sum(r[f] for r in rows) for k, f in (("earned", "ledger_earned"), ("paid", "ledger_paid"),
                                                       ("due", "due"))}
    last = payouts[0] if payouts else None
    return {"wallet": session.wallet, "expires_at": session.expires, "csrf": session.csrf, "nodes": rows,
            "totals": totals, "payouts": payouts,
            "pending": {"due": totals["due"], "last_payout": last,
                        "state": "awaiting the operator's payout" if totals["due"] > 0 else "nothing due",
                        "channels": channels},
            "series": _series(ledger, ids, now) if ledger is not None else None}


def provider_dashboard_routes(dash: ProviderDashboard) -> list[BaseRoute]:
    def session_of(request: Request) -> ProviderSession:
        return dash.sessions().session(request.cookies.get(COOKIE))

    async def challenge(request: Request) -> Response:
        secret, expires = dash.sessions().new_challenge()
        return json_response({"challenge": secret, "expires_in": round(expires - dash.clock())}, headers=_NO_STORE)

    def names_of(request: Request, signed_for: str) -> set[str] | frozenset[str]:
        """The names a login may be signed for: a gateway that knows its names (COCOON_DASHBOARD_HOSTS) also
        refuses a login a look-alike gateway relays with a forged Host header; otherwise the Host reached."""
        names = dash.hosts or {_host(request)}
        if _host(request) not in names:
            raise PermissionDeniedError(f"this login was signed for {signed_for!r}, and this gateway answers as "
                                        f"{', '.join(sorted(names))}, not as {_host(request)!r}; log in at this "
                                        "gateway's own address", reason="audience")
        return names

    def with_nodes(wallet: str, shown: str, fix: str) -> str:
        key = wallet_key(wallet)
        if not nodes_of(dash.market(), key):
            raise NotFoundError(f"wallet {shown} has no node on this gateway; {fix}")
        return key

    def session_response(request: Request, sid: str, s: ProviderSession) -> Response:
        r = json_response({"wallet": s.wallet, "expires_at": s.expires, "csrf": s.csrf}, headers=_NO_STORE)
        secure = (request.headers.get("x-forwarded-proto") or request.url.scheme) == "https"
        r.set_cookie(COOKIE, sid, max_age=int(s.expires - dash.clock()), path="/dashboard", httponly=True,
                     samesite="strict", secure=secure)
        return r

    async def login(request: Request) -> Response:
        proof, sig = ProviderLogin.from_wire(await read_json(request, MAX_BODY))
        names = names_of(request, proof.gateway)
        if proof.gateway not in names:  # the name the provider's CLI reached
            raise PermissionDeniedError(f"this login was signed for gateway {proof.gateway!r}, not this one "
                                        f"({', '.join(sorted(names))}); run `cocoon provider login --gateway` with "
                                        "this gateway's URL", reason="audience")
        proof.verify(sig)
        wallet = with_nodes(proof.wallet, proof.wallet, "join one with `cocoon provider join --wallet ...` first")
        dash.sessions().use_challenge(proof.challenge)
        code, expires = dash.sessions().new_code(wallet)
        scheme = request.headers.get("x-forwarded-proto") or request.url.scheme
        return json_response({"code": code, "expires_in": round(expires - dash.clock()), "wallet": wallet,
                              "url": f"{scheme}://{_host(request)}/dashboard#provider-code={code}"},
                             headers=_NO_STORE)

    async def session(request: Request) -> Response:
        _check_origin(request)
        body = await read_json(request, MAX_BODY)
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str) or not code:
            raise InvalidRequestError('body must be {"code": "<the code `cocoon provider login` printed>"}')
        sid, s = dash.sessions().redeem(code.strip())
        return session_response(request, sid, s)

    async def manifest(request: Request) -> Response:
        """The wallet shows this name and icon and signs its proof for this url's host, so the url is the host the
        browser reached (one of COCOON_DASHBOARD_HOSTS when set)."""
        host = _host(request) if not dash.hosts or _host(request) in dash.hosts else sorted(dash.hosts)[0]
        origin = f"{request.headers.get('x-forwarded-proto') or request.url.scheme}://{host}"
        return json_response({"url": origin, "name": "Cocoon FaaS dashboard",
                              "iconUrl": f"{origin}/dashboard/assets/tonconnect-icon.png"},
                             headers={**_NO_STORE, "Access-Control-Allow-Origin": "*"})

    async def ton_proof_payload(request: Request) -> Response:
        secret, expires = dash.sessions().new_challenge("ton-proof")
        return json_response({"payload": secret, "expires_at": expires}, headers=_NO_STORE)

    async def ton_proof(request: Request) -> Response:
        """Every check before any state changes: a refused proof leaves its payload usable and opens nothing."""
        _check_origin(request)
        proof = TonProof.from_wire(await read_json(request, MAX_BODY))
        names = names_of(request, proof.domain)
        sessions = dash.sessions()
        sessions.check_ton_proof_payload(proof.payload)
        proof.verify(names, dash.clock())
        wallet = with_nodes(proof.address.raw, proof.address.friendly(bounceable=False),
                            "join one with `cocoon provider join --wallet <this address> --wallet-version "
                            "v4r2|v5r1` first, or log in with the wallet your nodes joined with")
        sessions.use_ton_proof_payload(proof.payload)  # once, on whichever gateway gets there first
        sid, s = sessions.open_session(wallet)
        return session_response(request, sid, s)

    async def me(request: Request) -> Response:
        return json_response(provider_data(dash, session_of(request)), headers=_NO_STORE)

    async def node(request: Request) -> Response:
        s = session_of(request)
        nid = request.path_params["node_id"]
        rows = [r for r in provider_data(dash, s)["nodes"] if r["node_id"] == nid]
        if not rows:  # another provider's node reads as absent: its existence is not this session's business
            raise NotFoundError(f"no node {nid!r} among this provider's nodes")
        return json_response(rows[0], headers=_NO_STORE)

    async def logout(request: Request) -> Response:
        _check_origin(request)
        s = session_of(request)
        if not s.check_csrf(request.headers.get(CSRF_HEADER)):
            raise PermissionDeniedError("missing or wrong X-Cocoon-CSRF header; log out from the dashboard page",
                                        reason="csrf")
        dash.sessions().end(request.cookies[COOKIE])
        r = json_response({"status": "logged out"}, headers=_NO_STORE)
        r.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
        return r

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except CocoonError as exc:
                return error_response(exc, _NO_STORE)
        return handler

    base = "/dashboard/api/provider"
    return [Route(f"{base}/challenge", guarded(challenge), methods=["POST"]),
            Route(f"{base}/login", guarded(login), methods=["POST"]),
            Route(f"{base}/session", guarded(session), methods=["POST"]),
            Route(f"{base}/ton-proof/payload", guarded(ton_proof_payload), methods=["POST"]),
            Route(f"{base}/ton-proof", guarded(ton_proof), methods=["POST"]),
            Route("/dashboard/tonconnect-manifest.json", guarded(manifest), methods=["GET"]),
            Route(f"{base}/me", guarded(me), methods=["GET"]),
            Route(f"{base}/nodes/{{node_id}}", guarded(node), methods=["GET"]),
            Route(f"{base}/logout", guarded(logout), methods=["POST"])]
