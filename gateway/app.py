"""The gateway application: state, lifespan (Ray, SQLite, controller) and the route table."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cocoon_faas.errors import CocoonError, ConflictError, NotFoundError
from cocoon_faas.gateway import dashboard, openai_routes, routes_attest, routes_control, routes_fn
from cocoon_faas.gateway.admission import Admission, resolve_mode, startup_warning
from cocoon_faas.gateway.billing import Billing
from cocoon_faas.gateway.caller_tags import CallerTags
from cocoon_faas.gateway.cluster import Cluster
from cocoon_faas.gateway.connection import RAW_SEND
from cocoon_faas.gateway.controller import Controller, RayBackend
from cocoon_faas.gateway.dashboard_login import SessionBook
from cocoon_faas.gateway.dashboard_provider import ProviderDashboard, provider_dashboard_routes
from cocoon_faas.gateway.db import SqliteDatabase, open_database
from cocoon_faas.gateway.fleet import Fleet
from cocoon_faas.gateway.holds_sweeper import sweep_forever
from cocoon_faas.gateway.http import error_response, json_response
from cocoon_faas.gateway.limits import BodyLimit
from cocoon_faas.gateway.marketplace import Marketplace
from cocoon_faas.gateway.metrics import Metrics
from cocoon_faas.gateway.openapi import openapi_document
from cocoon_faas.gateway.payments_routes import gateway_operator, payment_routes
from cocoon_faas.gateway.pipeline import Pipeline
from cocoon_faas.gateway.provider_book import ProviderBook
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.gateway.provider_store import ProviderStore
from cocoon_faas.gateway.store import Store, hash_key
from cocoon_faas.pricing import Price
from cocoon_faas.settings import Settings

log = logging.getLogger("cocoon.gateway")


def ensure_local_key(store: Store, settings: Settings) -> str:
    """On first start create a developer key and store it (0600) where the CLI on this machine finds it."""
    f = settings.key_file
    keys = store.keys()
    if f.exists():
        key = f.read_text().strip()
        if hash_key(key) in keys:
            return key
    try:
        key, _ = store.create_key("default", for_developer=store.developer_id("default"))
    except ConflictError:  # another gateway process created "default" at the same moment
        key, _ = store.create_key("default", for_developer=store.developer_id("default"))
    f.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(f, 0o600)
    return key


class Gateway:
    """Everything the routes share."""

    def __init__(self, settings: Settings, backend: Any = None) -> None:
        self.settings = settings
        self._backend = backend
        # this process among the gateways sharing the database: it owns the async calls and holds it takes
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.store: Store = None  # type: ignore[assignment]
        self.controller: Controller = None  # type: ignore[assignment]
        self.pipeline: Pipeline = None  # type: ignore[assignment]
        self.dashboard_sessions: SessionBook = None  # type: ignore[assignment]  # the provider view's logins
        settings.home.mkdir(parents=True, exist_ok=True)
        # a sole gateway (SQLite, one process) releases every open hold when it restarts; gateways sharing a
        # database own their holds by id and lease (gateway/cluster.py releases a dead one's)
        self.shared = bool(settings.database_url) or settings.workers > 1
        # one PostgreSQL pool per gateway process for the store and the ledger
        self._pg = open_database(settings.database_url, settings.db_pool_size) if settings.database_url else None
        self.billing = Billing(settings, gateway_id=self.gateway_id if self.shared else None, db=self._pg)
        self.market = Marketplace(heartbeat_interval=settings.provider_heartbeat_s,
                                  expiry_s=settings.provider_expiry_s)
        self.admission = Admission(
            resolve_mode(settings.provider_admission, settings.host),
            status_of=self._wallet_status, max_price=settings.max_price_nanoton,
            measurements=[m for m in settings.provider_measurements.split(",") if m.strip()] or None,
            dev_keys=settings.provider_dev_keys.split(","))
        self.billing.price_for = self.provider_price  # type: ignore[method-assign]  # nodes charge their own price
        self.keys: dict[str, str] = {}
        self.auth_cache: dict[str | None, str] = {}
        self.metrics = Metrics()
        self._bg: list[asyncio.Task[None]] = []
        self.cluster: Cluster | None = None
        self.fleet: Fleet | None = None
        self.providers: ProviderBook = None  # type: ignore[assignment]  # the nodes every gateway shares

    def _wallet_status(self, wallet: str) -> str | None:
        return self.store.wallet_status(wallet)

    def provider_price(self, provider: str) -> Price:
        """What the node that answers a call charges per second: a provider node its own prices, the gateway's
        own Ray the local ones; "any" (a hold, taken before a node is chosen) the highest any of them asks."""
        local = self.billing.local_price
        if provider == "any":
            gpu, cpu = self.market.max_prices()
            return Price(max(cpu, local.cpu_per_s), max(gpu, local.gpu_per_s))
        try:
            node = self.market.node(provider) if provider != "local" else None
        except CocoonError:
            node = None
        return Price(node.cpu_price, node.gpu_price) if node is not None else local

    def registered_node(self, node_id: str) -> tuple[str, str] | None:
        """(wallet, public key hex) a provider node registered with, as payouts to it must use; None if unknown."""
        if not self.market.knows(node_id):
            return None
        node = self.market.node(node_id)
        return node.wallet, node.public_key

    async def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(self._pg or open_database(self.settings.db_path), gateway_id=self.gateway_id)
        for db in (self.store.db, self.billing.ledger.db):
            if isinstance(db, SqliteDatabase):
                db.checkpoint_in_background()  # no fsync inside a call's commit
        self.dashboard_sessions = SessionBook(self.store.db)
        warning = startup_warning(self.admission.mode)
        if warning:
            log.warning("%s", warning)
        if self.shared:
            self.cluster = Cluster(self.store.db, self.gateway_id, self.settings.gateway_lease_s,
                                   f"http://{self.settings.host}:{self.settings.port}")
            self.billing.gate.is_dead = self.cluster.is_dead
            lost = self.store.mark_unfinished_failed(alive=[g.id for g in self.cluster.alive()])
        else:
            lost = self.store.mark_unfinished_failed()
        if lost:
            log.warning("%d calls were in flight when the gateway stopped; marked failed", lost)
        self.providers = ProviderBook(self.market, ProviderStore(self.store.db),
                                      interval=self.settings.provider_sync_s,
                                      full_every=self.settings.provider_full_sync_s,
                                      leading=lambda: self.cluster is None or self.cluster.is_leader)
        await self.providers.refresh()  # the nodes registered before (on any gateway) are known before routing
        ensure_local_key(self.store, self.settings)
        self.keys = self.store.keys()
        backend = self._backend or RayBackend(self.settings)
        self.controller = Controller(self.store, self.settings, backend)
        self.controller.market = self.market
        if self.cluster is not None:  # route to every gateway's replicas; the leader alone scales them
            self.fleet = Fleet(self.store, self.cluster)
            self.controller.fleet = self.fleet
        self.market.subscribe(self.controller.on_market_event)
        await self.controller.start()
        if self.fleet is not None:
            self.fleet.start(self.controller)
        for name, (calls, errors) in self.store.call_counts().items():
            fr = self.controller.functions.get(name)
            if fr is not None:
                fr.calls, fr.errors = calls, errors
        self.pipeline = Pipeline(self.controller, self.billing, self.store, self.metrics, self.market,
                                 self.settings.max_body_bytes, shared=self.shared,
                                 max_pending_async=self.settings.max_pending_async_calls,
                                 caller_tags=CallerTags.load(self.settings.home),
                                 stream_window=self.settings.stream_window_bytes,
                                 stream_stall_s=self.settings.stream_stall_s)
        loop = asyncio.get_running_loop()
        gc.collect()
        gc.freeze()  # start-up objects (Ray's included) leave the GC's scans: full collections stalled calls
        if self.cluster is not None:
            self._bg.append(loop.create_task(self._coordinate()))
        self._bg += [loop.create_task(self._flusher()), loop.create_task(self._sweeper()),
                     loop.create_task(self.providers.run(ray_nodes=getattr(backend, "ray_nodes", None))),
                     loop.create_task(sweep_forever(self.billing.gate, self.hold_limit_s, self.settings.hold_grace_s,
                                                    self.settings.hold_sweep_interval_s)),
                     # gateways sharing a database: only the leader watches the chain (one challenge, one finish)
                     loop.create_task(self.billing.watchtower.run(
                         lambda: self.cluster is None or self.cluster.is_leader))]

    def hold_limit_s(self, function: str) -> float:
        """How long a call of ``function`` may hold its payment: its time limit (an hour when unknown: deleted)."""
        fr = self.controller.functions.get(function)
        return float(fr.spec.timeout) if fr is not None else 3600.0

    async def stop(self) -> None:
        for t in self._bg:
            t.cancel()
        if self.controller is not None:
            await self.controller.stop()
        if self.cluster is not None:
            self.cluster.close()
        if self.store is not None:
            self.store.close()
        if self._pg is None:
            self.billing.ledger.close()  # its own SQLite file (a shared pool was closed with the store)

    async def _coordinate(self) -> None:
        """Gateways sharing a database: heartbeat with load figures, renew this gateway's hold leases, pick up
        cancel requests made on other gateways; as leader, clean up after dead gateways."""
        loop = asyncio.get_running_loop()
        beat = max(0.2, min(1.0, self.settings.gateway_lease_s / 5))
        while True:
            load = {fr.name: {"demand": fr.inflight + fr.queued, "ready": len(fr.ready)}
                    for fr in self.controller.functions.values()}
            running = [cid for cid, rec in self.pipeline.calls.items() if rec.finished is None]
            try:
                cancel = await loop.run_in_executor(None, self._coordinate_once, load, running)
            except Exception:  # noqa: BLE001 - the database may be briefly unreachable; keep beating
                log.exception("gateway heartbeat failed")
                cancel = []
            for cid in cancel:
                rec = self.pipeline.calls.get(cid)
                if rec is not None and rec.task is not None:
                    rec.task.cancel()
            await asyncio.sleep(beat)

    def _coordinate_once(self, load: dict[str, Any], running: list[str]) -> list[str]:
        """One beat, off the event loop; returns the ids of this gateway's calls to cancel."""
        cluster = self.cluster
        assert cluster is not None
        cluster.beat(load)
        self.billing.gate.renew_leases()
        cancel = self.store.cancel_requests(running)
        was = cluster.is_leader
        if cluster.try_lead():
            if not was:
                log.warning("gateway %s is now the leader", self.gateway_id)
            if self.fleet is not None:
                self.fleet.others_demand = cluster.demand(exclude_self=True)
            released = self.billing.gate.release_orphans(cluster.is_dead)
            failed = self.store.mark_unfinished_failed(alive=[g.id for g in cluster.alive()])
            gone = cluster.forget_dead()
            if released or failed or gone:
                log.warning("gateways %s are gone: released %d holds, failed %d async calls", gone, released,
                            failed)
        return cancel

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.2)
            try:
                await loop.run_in_executor(None, self.store.flush)
            except Exception:  # noqa: BLE001
                log.exception("flushing call records failed")

    async def _sweeper(self) -> None:
        last_retention = 0.0
        while True:
            await asyncio.sleep(5)
            if time.time() - last_retention > 600:  # retention scans whole tables: every ten minutes is plenty
                last_retention = time.time()
                s = self.settings
                try:
                    await asyncio.to_thread(self.store.apply_retention, time.time() - s.call_retention_s,
                                            time.time() - s.log_retention_s, s.max_log_rows_per_function)
                except Exception:  # noqa: BLE001 - the sweeper outlives a busy database
                    log.exception("applying retention to call records and logs failed")
            cutoff = time.time() - self.settings.result_ttl_s
            calls = self.pipeline.calls
            for cid, rec in list(calls.items()):
                if rec.finished is not None and rec.finished < time.time() - 60:
                    del calls[cid]  # kept in SQLite until the TTL
            self.store.expire_results(cutoff)
            self.store.prune_call_ids(cutoff)  # a resend arrives within seconds; an hour is plenty


async def healthz(request: Request) -> Response:
    gw = request.app.state.gw
    return json_response({"status": "ok", "functions": len(gw.controller.functions), "gateway": gw.gateway_id,
                          "leader": gw.cluster.is_leader if gw.cluster is not None else True})


async def metrics(request: Request) -> Response:
    gw = request.app.state.gw
    for fr in gw.controller.functions.values():
        gw.metrics.inflight.labels(fr.name).set(fr.inflight)
        gw.metrics.replicas.labels(fr.name).set(len(fr.ready))
    gw.metrics.stream_buffered.set(gw.pipeline.stream_buffered_bytes())
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    return json_response(openapi_document(request.app.state.gw.controller.functions.values()))


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFoundError(f"no route {request.method} {request.url.path}; see /openapi.json"))


async def cocoon_error(request: Request, exc: Exception) -> Response:
    """A CocoonError a route let through (a body over the limit seen mid-stream, say) keeps its own status."""
    if not isinstance(exc, CocoonError):
        raise exc
    return error_response(exc)


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    err = CocoonError(f"{request.method} is not allowed on {request.url.path}; see /openapi.json")
    err.status, err.type = 405, "method_not_allowed"
    return error_response(err)


def create_app(settings: Settings, backend: Any = None, extra_routes: list[Any] | None = None) -> FastPath:
    gw = Gateway(settings, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        _settle_heap()
        try:
            yield
        finally:
            await gw.stop()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *payment_routes(gw.billing.gate, gw.billing.operator_key, watchtower=gw.billing.watchtower,
                        registered=gw.registered_node),
        *provider_routes(lambda: gw.providers, admission=gw.admission, wallets=lambda: gw.store,
                         is_operator=gateway_operator),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *routes_fn.routes,
        *routes_attest.routes,
        *routes_control.routes,
        *openai_routes.routes,
        *dashboard.routes,
        *provider_dashboard_routes(ProviderDashboard(
            lambda: gw.dashboard_sessions, lambda: gw.market, lambda: gw.billing.ledger,
            hosts=frozenset(h.strip() for h in settings.dashboard_hosts.split(",") if h.strip()))),
        *(extra_routes or []),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: method_not_allowed, CocoonError: cocoon_error})
    app.state.gw = gw
    return FastPath(app)


def _settle_heap() -> None:
    """After start-up: move every object alive now (modules, Ray's client, settings, routes: a few hundred thousand)
    out of the cyclic collector's sight, and collect the young generation less often. A call allocates a few
    hundred short-lived objects; with the default thresholds the collector ran every few calls and its full passes
    walked the whole start-up heap each time. Measured (benchmarks/RESULTS.md, round 8): no-op calls at c=64
    +16 % req/s, gateway CPU per call -11 %. Start-up objects that later become cyclic garbage are not reclaimed:
    start-up builds nothing that is later dropped in bulk."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


_GC_THRESHOLDS = (20_000, 20, 20)


class FastPath:
    """The ASGI entry: `POST /fn/{name}` goes straight to its handler; everything else through Starlette.

    The per-call path is the product's hot path; Starlette's middleware stack and router scan cost more than
    the rest of the gateway's work for a no-op call, and none of it applies to this one route."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state
        self.router = app.router
        max_body = app.state.gw.settings.max_body_bytes
        self.max_header_bytes = app.state.gw.settings.max_header_bytes
        # one limit for every other route; a deployment carries code bundles, hence its larger allowance
        self.limited = BodyLimit(app, lambda path: max_body * 10 if path == "/v1/deployments" else max_body)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            err = CocoonError(f"the request's headers are over {self.max_header_bytes} bytes; send fewer or "
                              "shorter headers (or raise COCOON_MAX_HEADER_BYTES on the gateway)")
            err.status, err.type = 431, "headers_too_large"
            await error_response(err, {"Connection": "close"})(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/fn/"):
            name = scope["path"][4:]
            if name and "/" not in name:
                scope["app"] = self.app
                scope["path_params"] = {"name": name}
                try:
                    response = await routes_fn.call_function(Request(scope, receive, send))
                except Exception:  # noqa: BLE001 - one JSON shape even for our own bugs
                    log.exception("unhandled error in POST %s", scope["path"])
                    response = error_response(CocoonError("internal error in the gateway; see its log"))
                await response(scope, receive, send)
                return
        scope[RAW_SEND] = send  # Starlette wraps `send`; a stalled stream's cut needs the server's own
        await self.limited(scope, receive, send)
