"""Replica lifecycle on Ray: deploy, redeploy without dropping calls, rollback, autoscale, replace the dead.

Ray places and supervises replica actors; this controller decides how many there are and which version they run,
and keeps the routing set (`FunctionRuntime.ready`) that the call path reads without awaiting anything.

Trust: a replica runs on a provider's node, which controls its process, so this module never fetches a value an
actor produced (`ray.get`, awaiting an ObjectRef: Ray would unpickle it here). The `.remote()` calls below are
actor creation and `start`, whose ObjectRef is only ever passed to `ray.wait(fetch_local=False)` to learn that
it finished; the start-up facts are read as bytes from Ray's key-value store and parsed by
`replica_wire.decode_facts`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import functools
import ipaddress
import logging
import os
import random
import secrets
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.bundle import measurement_of
from cocoon_faas.errors import (
    CocoonError,
    ConflictError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PermissionDeniedError,
)
from cocoon_faas.gateway.autoscale import ScaleState, engine_demand, target_replicas
from cocoon_faas.gateway.chooser import Chooser, Eligibility
from cocoon_faas.gateway.replica_client import ReplicaHandle
from cocoon_faas.gateway.replica_wire import ReplicaFacts, ReplicaProtocolError, decode_facts
from cocoon_faas.gateway.store import Store
from cocoon_faas.settings import Settings
from cocoon_faas.signature import Signature
from cocoon_faas.spec import FunctionSpec

log = logging.getLogger("cocoon.controller")


class StartupError(CocoonError):
    """Raised when a replica's code could not be loaded or its setup hook raised."""

    status = 400
    type = "startup_failed"


@dataclass(frozen=True)
class DeploymentFlags:
    """How a version was deployed (the bundle's "meta", parsed once): `confidential` = sealed code, sealed
    calls only, no output forwarded, and only attested nodes may run it."""

    confidential: bool = False

    @classmethod
    def from_json(cls, meta: Any) -> DeploymentFlags:
        if meta is None:
            return cls()
        if not isinstance(meta, dict):
            raise InvalidRequestError("deployment 'meta' must be an object like {\"confidential\": true}")
        unknown = sorted(set(meta) - {"confidential"})
        if unknown:
            raise InvalidRequestError(f"deployment 'meta' has unknown field(s) {unknown}; known: ['confidential']")
        conf = meta.get("confidential", False)
        if not isinstance(conf, bool):
            raise InvalidRequestError("deployment meta 'confidential' must be true or false")
        return cls(confidential=conf)

    def to_json(self) -> dict[str, Any]:
        return {"confidential": True} if self.confidential else {}


@dataclass(eq=False)
class FunctionRuntime:
    """One deployed function as the gateway routes it."""

    name: str
    owner: str
    version: int
    spec: FunctionSpec
    signature: Signature
    measurement: str
    code: bytes
    flags: DeploymentFlags
    ready: list[ReplicaHandle] = field(default_factory=list)
    all: set[ReplicaHandle] = field(default_factory=set)
    starting: int = 0
    queued: int = 0
    waiters: deque[asyncio.Future[Any]] = field(default_factory=deque)  # queued calls (gateway/chooser.py)
    scale: ScaleState = field(default_factory=ScaleState)
    problem: CocoonError | None = None  # why replicas cannot start now
    problem_at: float = 0.0
    calls: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.all)

    def wake(self, n: int | None = None) -> None:
        n = len(self.waiters) if n is None else n
        while n > 0 and self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_result(None)
                n -= 1


class RayBackend:
    """The thin edge to Ray: create, start and kill replica actors; read cluster resources."""

    def __init__(self, settings: Settings) -> None:
        import ray

        self.ray = ray
        self.settings = settings
        from cocoon_faas.runtime.replica import Replica

        self._actor_cls = ray.remote(Replica)
        self._waits = ThreadPoolExecutor(max_workers=32, thread_name_prefix="cocoon-replica-start")

    def cluster_resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()

    def ray_nodes(self) -> list[dict[str, Any]]:
        return self.ray.nodes()

    def options(self, spec: FunctionSpec, extra_resources: dict[str, float] | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": spec.cpu, "memory": spec.memory, "max_concurrency": 10_000,
                                "max_restarts": 0}
        resources = dict(extra_resources or {})
        pinned = any(k.startswith("cocoon-node:") for k in resources)
        if spec.gpu is not None:
            opts["num_gpus"] = spec.gpu.count
            if spec.gpu.resource and not pinned:  # a pinned node was matched by the marketplace already
                resources[spec.gpu.resource] = float(spec.gpu.count)
        if resources:
            opts["resources"] = resources
        return opts

    def missing_resource(self, spec: FunctionSpec) -> str | None:
        """Name a resource the whole cluster lacks for this spec (so waiting would never help)."""
        total = self.cluster_resources()
        if spec.gpu is not None:
            if spec.gpu.resource and total.get(spec.gpu.resource, 0) < spec.gpu.count:
                return f"{spec.gpu.resource} x{spec.gpu.count}"
            if total.get("GPU", 0) < spec.gpu.count:
                return f"GPU x{spec.gpu.count} (any model)"
        if total.get("CPU", 0) < spec.cpu:
            return f"CPU x{spec.cpu:g}"
        if total.get("memory", float("inf")) < spec.memory:
            return f"memory {spec.memory // 2**20} MiB"
        return None

    def create(self, fr: FunctionRuntime, forward_logs: bool, replica_id: str, secret: bytes,
               extra_resources: dict[str, float] | None = None, name: str | None = None) -> Any:
        """A new replica actor (its handle: platform-made, nothing a replica produced)."""
        models = self.settings.models_dir or self.settings.home / "models"
        opts = self.options(fr.spec, extra_resources)
        if name is not None:  # several gateways: the replica outlives the gateway that started it
            opts.update(name=name, lifetime="detached")
        return self._actor_cls.options(**opts).remote(
            fr.name, fr.version, fr.code, fr.spec.to_json(), self.settings.replica_host, forward_logs,
            replica_id, secret, self.settings.sandbox == "on", str(models) if os.path.isdir(models) else None,
        )

    def start(self, actor: Any) -> Any:
        """Fire the actor's start; the returned ref is never fetched (see `ended`)."""
        return actor.start.remote()

    async def ended(self, ref: Any, timeout: float) -> bool:
        """Whether a task ended within `timeout`, without fetching (or unpickling) its value. `ray.wait` blocks,
        so it waits in a thread: polled on the event loop (a GCS round trip every few ms per starting replica),
        it took a quarter of the gateway's loop while replicas started under load."""
        wait = functools.partial(self.ray.wait, [ref], num_returns=1, timeout=timeout, fetch_local=False)
        ready, _ = await asyncio.get_running_loop().run_in_executor(self._waits, wait)
        return bool(ready)

    def read_facts(self, replica_id: str) -> bytes | None:
        """The facts a replica wrote, as bytes (Ray's key-value store holds bytes; nothing is unpickled)."""
        from ray.experimental import internal_kv

        from cocoon_faas.runtime.replica import FACTS_NAMESPACE, facts_key

        key = facts_key(replica_id)
        raw = internal_kv._internal_kv_get(key, namespace=FACTS_NAMESPACE)
        if raw is not None:
            internal_kv._internal_kv_del(key, namespace=FACTS_NAMESPACE)
        return raw

    def node_addresses(self) -> set[str]:
        return {str(n.get("NodeManagerAddress")) for n in self.ray_nodes() if n.get("Alive")}

    def kill_named(self, name: str) -> None:
        """Kill a replica another gateway started (found by its Ray actor name)."""
        try:
            self.kill(self.ray.get_actor(name))
        except ValueError:
            pass  # already gone

    def kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


class Controller:
    """Owns every FunctionRuntime; the call path uses `acquire`/`release`."""

    def __init__(self, store: Store, settings: Settings, backend: RayBackend) -> None:
        self.store = store
        self.settings = settings
        self.backend = backend
        self.functions: dict[str, FunctionRuntime] = {}
        self.rng = random.Random()
        self.chooser = Chooser(self.functions, settings.queue_limit, self._reconcile, self.rng)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.market: Any = None  # the provider marketplace (gateway/marketplace.py), when the gateway has one
        self._on_node: dict[str, set[ReplicaHandle]] = {}  # provider node -> its replicas, starting ones too
        self.fleet: Any = None  # gateway/fleet.py when several gateways share the database and Ray
        self.activating: set[str] = set()  # functions this gateway is switching to a new version right now

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        for name, owner, version in self.store.functions():
            row = self.store.version(name, version)
            self.functions[name] = self._runtime(name, owner, row.version, row.spec, row.signature, row.code,
                                                 row.measurement, row.meta)
        self._loop_task = asyncio.get_running_loop().create_task(self._autoscale_loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        shared_on = self.fleet is not None and not self.fleet.last_one()
        if self.fleet is not None:
            self.fleet.stop()
        for fr in self.functions.values():
            for r in list(fr.all):
                r.on_lost = None
                r.close()
                if not shared_on:  # other gateways still route to shared replicas: leave them running
                    self._kill(r)
        if self.fleet is not None and not shared_on:
            self.fleet.kill_all(self.backend.kill_named)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return self._spawn(coro)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- following other gateways (gateway/fleet.py) ----------------------------------------------------
    def adopt(self, new: FunctionRuntime) -> None:
        """Another gateway switched `new.name` to this version: route to it (its replicas arrive by sync)."""
        old = self.functions.get(new.name)
        if old is not None:
            new.calls, new.errors, new.latencies = old.calls, old.errors, old.latencies
        self.functions[new.name] = new
        if old is not None:
            old.wake()  # its queued calls move over to the new version
            for r in list(old.all):
                self.drop_local(old, r)

    def forget(self, name: str, why: str) -> None:
        fr = self.functions.pop(name, None)
        if fr is None:
            return
        for r in list(fr.all):
            self.drop_local(fr, r)
        fr.problem = NotFoundError(f"function {name!r} was {why}")
        fr.wake()

    def attach(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        """A replica another gateway started, connected: route to it."""
        if self.functions.get(fr.name) is not fr:
            r.close()
            return
        if self.market is not None and r.node != "local" and not self.market.knows(r.node):
            r.close()  # on a node this gateway has not read from the store yet: the next sync attaches it
            return
        r.state = "ready"
        r.on_lost = self._on_lost
        self._assign(r, fr)  # its node's capacity is taken, whoever placed it (placement sees every replica)
        fr.ready.append(r)
        fr.all.add(r)
        fr.problem = None
        fr.wake(fr.spec.max_concurrency)

    def drop_local(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        """Stop routing to `r` and close our connection once our calls on it finish; whoever retired it kills
        it (the replica is not this gateway's to kill)."""
        if r in fr.ready:
            fr.ready.remove(r)
        r.state = "draining"

        async def close_when_idle() -> None:
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while r.inflight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            fr.all.discard(r)
            r.on_lost = None
            r.close()
            self._unassign(r)

        self._spawn(close_when_idle())

    def runtime(self, name: str, owner: str, version: int, spec: dict[str, Any], sig: dict[str, Any], code: bytes,
                measurement: str, meta: dict[str, Any]) -> FunctionRuntime:
        return self._runtime(name, owner, version, spec, sig, code, measurement, meta)

    @staticmethod
    def _runtime(name: str, owner: str, version: int, spec: dict[str, Any], sig: dict[str, Any], code: bytes,
                 measurement: str, meta: dict[str, Any]) -> FunctionRuntime:
        return FunctionRuntime(name, owner, version, FunctionSpec.from_json(spec), Signature.from_json(sig),
                               measurement, code, DeploymentFlags.from_json(meta))

    def get(self, name: str) -> FunctionRuntime:
        fr = self.functions.get(name)
        if fr is None:
            near = difflib.get_close_matches(name, list(self.functions), n=1)  # names are public (/openapi.json)
            hint = f"did you mean {near[0]!r}? Or deploy" if near else "deploy"
            raise NotFoundError(f"no function named {name!r} is deployed; {hint} it with `cocoon deploy app.py`")
        return fr

    # -- deploy, rollback, delete --------------------------------------------------------------------
    async def deploy(self, owner: str, item: Any) -> dict[str, Any]:
        name, spec, sig, code, measurement, flags = _parse_bundle(item)
        self._check_models(name, owner, spec.serves)
        self._check_quota(name, owner, spec)
        version = self.store.add_version(name, owner, spec.to_json(), sig.to_json(), code, measurement,
                                         flags.to_json())
        new = FunctionRuntime(name, owner, version, spec, sig, measurement, code, flags)
        try:
            status = await self._activate(new)
        except BaseException:
            self.store.drop_version(name, version)
            raise
        self.store.prune_versions(name, self.settings.max_versions_kept, version)
        return {"name": name, "version": version, "measurement": measurement, "status": status,
                "replicas": len(new.ready)}

    def _check_quota(self, name: str, owner: str, spec: FunctionSpec) -> None:
        mine = [fr for fr in self.functions.values() if fr.owner == owner and fr.name != name]
        s = self.settings
        if len(mine) >= s.max_functions_per_developer:
            raise PermissionDeniedError(f"you have {len(mine)} functions, the most one developer may deploy "
                                        "(COCOON_MAX_FUNCTIONS_PER_DEVELOPER); `cocoon rm` one first")
        replicas = sum(fr.spec.max_replicas for fr in mine) + spec.max_replicas
        if replicas > s.max_replicas_per_developer:
            raise PermissionDeniedError(f"max_replicas over your functions would be {replicas}, above the "
                                        f"{s.max_replicas_per_developer} one developer may have "
                                        "(COCOON_MAX_REPLICAS_PER_DEVELOPER); lower max_replicas")

    def _check_models(self, name: str, owner: str, serves: Any) -> None:
        """A model id in ``serves=`` belongs to the first developer who deployed it: another developer claiming
        it would receive every caller's prompts for that model."""
        for claim in serves:
            for fr in self.functions.values():
                if fr.name != name and fr.owner != owner and claim in fr.spec.serves:
                    raise ConflictError(f"model {claim!r} is served by function {fr.name!r} of another developer; "
                                        "serve it under another model id", owner_function=fr.name)

    async def rollback(self, name: str, version: int | None) -> dict[str, Any]:
        fr = self.get(name)
        if version is None:
            older = [v for v, _, _ in self.store.versions(name) if v < fr.version]
            if not older:
                raise InvalidRequestError(f"function {name!r} has no version before {fr.version} to roll back to")
            version = older[-1]
        if version == fr.version:
            raise InvalidRequestError(f"function {name!r} already runs version {version}")
        row = self.store.version(name, version)
        new = self._runtime(name, fr.owner, row.version, row.spec, row.signature, row.code, row.measurement, row.meta)
        status = await self._activate(new)
        return {"name": name, "version": version, "measurement": row.measurement, "status": status}

    async def _activate(self, new: FunctionRuntime) -> str:
        """Start the new version's replicas, then switch routing and drain the old ones."""
        self.activating.add(new.name)
        try:
            return await self._switch(new)
        finally:
            self.activating.discard(new.name)

    async def _switch(self, new: FunctionRuntime) -> str:
        old = self.functions.get(new.name)
        n = max(new.spec.min_replicas, min(len(old.ready) if old else 0, new.spec.max_replicas), 1)
        status = "ready"
        started: list[ReplicaHandle] = []
        try:
            results = await asyncio.gather(*(self._start_replica(new) for _ in range(n)), return_exceptions=True)
            for res in results:
                if isinstance(res, ReplicaHandle):
                    started.append(res)
            errors = [e for e in results if isinstance(e, BaseException)]
            startup = [e for e in errors if isinstance(e, StartupError)]
            if startup:
                raise startup[0]
            if errors and not started:
                if isinstance(errors[0], NoCapacityError):
                    new.problem = errors[0]
                    status = "waiting_for_capacity"
                else:
                    raise errors[0]
        except BaseException:
            for r in started:
                self._kill(r)
            raise
        self.store.set_current(new.name, new.version)
        if old is not None:
            new.calls, new.errors, new.latencies = old.calls, old.errors, old.latencies
        new.ready = started
        new.all = set(started)
        for r in started:
            r.state = "ready"
            r.on_lost = self._on_lost
        self.functions[new.name] = new
        if old is not None:
            old.wake()  # its queued calls move over to the new version
            for r in list(old.all):
                self._spawn(self._retire(old, r))
        return status

    async def delete(self, name: str) -> None:
        fr = self.get(name)
        self.activating.add(name)
        try:
            del self.functions[name]
            self.store.delete_function(name)
        finally:
            self.activating.discard(name)
        for r in list(fr.all):
            self._spawn(self._retire(fr, r))
        fr.problem = NotFoundError(f"function {name!r} was deleted")
        fr.wake()

    # -- replicas ------------------------------------------------------------------------------------
    def _place(self, fr: FunctionRuntime) -> tuple[str, dict[str, float] | None]:
        """(node, extra Ray resources): a provider node chosen by the marketplace, else the local cluster."""
        market = self.market
        if market is not None and market.listing():
            from cocoon_faas.gateway.marketplace import Requirements, pin

            # once providers exist, tenant replicas run only on them: the head node holds the operator's keys
            node = market.place(Requirements.from_spec(fr.spec, confidential=fr.flags.confidential))
            return node.node_id, pin(node.node_id)
        missing = self.backend.missing_resource(fr.spec)
        if missing is not None:
            raise NoCapacityError(
                f"no node in the cluster offers {missing} for function {fr.name!r}; add a provider with "
                f"`cocoon provider join --gpus MODEL:COUNT` or change the function's resources",
                missing=missing,
            )
        return "local", None

    async def _start_replica(self, fr: FunctionRuntime) -> ReplicaHandle:
        node, extra = self._place(fr)
        rid, secret = uuid.uuid4().hex, secrets.token_bytes(32)
        name = None
        if self.fleet is not None:
            from cocoon_faas.gateway.fleet import actor_name

            name = actor_name(rid[:12])
            self.fleet.mine.add(rid[:12])
        actor = self.backend.create(fr, forward_logs=not fr.flags.confidential, replica_id=rid,
                                    secret=secret, extra_resources=extra, **({"name": name} if name else {}))
        r = ReplicaHandle(id=rid[:12], function=fr.name, version=fr.version, actor=actor, node=node, secret=secret,
                          max_frame=self.settings.max_frame_bytes, direct=self.settings.direct_calls)
        r.extra["facts_id"] = rid
        self._assign(r, fr)
        try:
            r = await self._boot(fr, r)
            if self.fleet is not None:
                self.fleet.register(r)
            return r
        except BaseException:
            self._unassign(r)
            if self.fleet is not None:
                self.fleet.mine.discard(rid[:12])
            raise

    def _assign(self, r: ReplicaHandle, fr: FunctionRuntime) -> None:
        if self.market is not None and r.node != "local":
            from cocoon_faas.gateway.marketplace import Requirements

            self.market.assign(fr.name, r.node, Requirements.from_spec(fr.spec, confidential=fr.flags.confidential))
            r.extra["assigned"] = True
            self._on_node.setdefault(r.node, set()).add(r)

    def _unassign(self, r: ReplicaHandle) -> None:
        if r.extra.pop("assigned", False) and self.market is not None:
            self._on_node.get(r.node, set()).discard(r)
            if r.on_lost is not None:  # from _on_lost: it died, not retired; its node may be dying
                self.market.replica_lost(r.node)
            self.market.unassign(r.function, r.node)

    async def _facts(self, fr: FunctionRuntime, r: ReplicaHandle) -> ReplicaFacts:
        """Wait for the replica's start-up facts: bytes from the key-value store, decoded strictly. The start
        task's ref tells only *that* it ended (a replica that died or raised leaves no facts)."""
        rid = r.extra["facts_id"]
        ref = self.backend.start(r.actor)
        deadline = time.monotonic() + self.settings.replica_start_timeout_s
        while True:
            # checked before reading: facts are written before start returns
            done = await self.backend.ended(ref, min(max(deadline - time.monotonic(), 0.0), 1.0))
            raw = self.backend.read_facts(rid)
            if raw is not None:
                try:
                    return decode_facts(raw)
                except ReplicaProtocolError as exc:
                    raise NoCapacityError(f"a replica of {fr.name!r} on node {r.node} sent start-up facts the "
                                          f"gateway refuses ({exc}); it was dropped") from None
            if done:
                raise NoCapacityError(f"a replica of {fr.name!r} on node {r.node} exited before it reported "
                                      "(its worker died or was unschedulable); retry later or add capacity")
            if time.monotonic() > deadline:
                raise NoCapacityError(
                    f"a replica of {fr.name!r} did not start within {self.settings.replica_start_timeout_s:g}s "
                    "(the cluster may be full); retry later or add capacity")

    def _check_address(self, fr: FunctionRuntime, r: ReplicaHandle, host: str) -> None:
        """A replica names where to connect; only its own node's address (or loopback, locally) is accepted,
        so a replica cannot point the gateway at another service."""
        if r.node == "local" and ipaddress.ip_address(host).is_loopback:
            return
        if host == self.settings.replica_host or host in self.backend.node_addresses():
            return
        raise NoCapacityError(f"a replica of {fr.name!r} on node {r.node} named address {host}, which is no node "
                              "of the cluster; it was dropped")

    async def _boot(self, fr: FunctionRuntime, r: ReplicaHandle) -> ReplicaHandle:
        actor = r.actor
        try:
            facts = await self._facts(fr, r)
            if facts.ok:
                self._check_address(fr, r, facts.host)
        except BaseException:
            self.backend.kill(actor)
            raise
        if not facts.ok:
            self.backend.kill(actor)
            self.store.record_logs(fr.name, fr.version, None, [*facts.logs, ("stderr", facts.traceback)])
            raise StartupError(
                f"function {fr.name!r} failed to start: {facts.error_type}: {facts.message}; "
                f"see `cocoon logs {fr.name}`",
                exc_type=facts.error_type,
            )
        if facts.logs:
            self.store.record_logs(fr.name, fr.version, None, list(facts.logs))
        try:
            await r.connect(facts.host, facts.port)
        except (OSError, CocoonError) as exc:
            self.backend.kill(actor)
            raise NoCapacityError(f"a replica of {fr.name!r} on node {r.node} did not accept the gateway's "
                                  f"connection ({exc}); retry later") from None
        r.extra.update(facts.public())  # + the attestation facts (public)
        return r

    def _kill(self, r: ReplicaHandle) -> None:
        r.state = "dead"
        r.on_lost = None
        r.close()
        self._unassign(r)
        if self.fleet is not None:
            self.fleet.unregister(r)
        if r.actor is not None:
            self.backend.kill(r.actor)
        elif self.fleet is not None:  # started by another gateway: found by its Ray name
            from cocoon_faas.gateway.fleet import actor_name

            self.backend.kill_named(actor_name(r.id))

    def _on_lost(self, r: ReplicaHandle) -> None:
        fr = self.functions.get(r.function)
        if fr is None:
            return
        if r in fr.ready:
            fr.ready.remove(r)
        fr.all.discard(r)
        if self.fleet is not None and not self.fleet.leading:
            self._unassign(r)
            return  # the leader replaces it; this gateway only stops routing to it
        log.warning("replica %s of %s on node %s died; replacing it", r.id, r.function, r.node)
        self._unassign(r)
        self.backend.kill(r.actor)
        self._reconcile(fr)

    # -- provider events (marketplace) ---------------------------------------------------------------
    def on_market_event(self, event: Any) -> None:
        """A node went down: drop its replicas at once (their calls retry elsewhere). Draining: replace its
        replicas and retire them when their calls finish. Joined/up: retry functions waiting for capacity."""
        nid = event.node.node_id
        if event.kind != "down" and self.fleet is not None and not self.fleet.leading:
            return  # every gateway hears every node's events; replicas are moved by the leader alone
        if event.kind == "down":  # a replica still starting there would wait for the dead node forever
            for r in [r for r in self._on_node.get(nid, ()) if r.state == "starting"]:
                self.backend.kill(r.actor)
        for fr in list(self.functions.values()):
            if event.kind == "down":
                for r in [r for r in fr.all if r.node == nid]:
                    r.close()  # connection loss -> _on_lost: removed from routing, retried, replaced
            elif event.kind == "draining":
                for r in [r for r in fr.ready if r.node == nid]:
                    self._spawn(self._retire(fr, r))
                self._reconcile(fr)
            elif event.kind in ("joined", "up", "updated") and isinstance(fr.problem, NoCapacityError):
                fr.problem = None
                self._reconcile(fr)
                fr.wake()

    def record(self, r: ReplicaHandle, ok: bool, latency_s: float) -> None:
        if self.market is not None and r.node != "local":
            self.market.record_result(r.node, ok, latency_s)

    async def _retire(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        if r in fr.ready:
            fr.ready.remove(r)
        r.state = "draining"
        deadline = time.monotonic() + self.settings.drain_timeout_s
        if self.fleet is not None:  # the other gateways stop routing to it within a sync; then drain
            await asyncio.get_running_loop().run_in_executor(None, self.fleet.unregister, r)
            await asyncio.sleep(min(2 * self.fleet.interval + 0.5, self.settings.drain_timeout_s))
        while r.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        fr.all.discard(r)
        self._kill(r)

    async def _add_replica(self, fr: FunctionRuntime) -> None:
        fr.starting += 1
        try:
            r = await self._start_replica(fr)
        except CocoonError as exc:
            fr.problem, fr.problem_at = exc, time.monotonic()
            fr.wake()
            return
        finally:
            fr.starting -= 1
        if self.functions.get(fr.name) is not fr:  # redeployed or deleted meanwhile
            self._kill(r)
            return
        fr.problem = None
        r.state = "ready"
        r.on_lost = self._on_lost
        fr.ready.append(r)
        fr.all.add(r)
        fr.wake(fr.spec.max_concurrency)

    # -- autoscaling -----------------------------------------------------------------------------------
    def _reconcile(self, fr: FunctionRuntime, now: float | None = None) -> None:
        if self.fleet is not None and not self.fleet.may_scale:
            return  # one leader scales for every gateway, from the demand they all report
        now = time.monotonic() if now is None else now
        current = len(fr.ready) + fr.starting
        demand = self.fleet.demand(fr) if self.fleet is not None else fr.inflight + fr.queued
        loads = [r.load for r in fr.ready if r.load is not None]
        if loads:  # engine-backed: queue depth and KV occupancy count too
            demand = max(demand, engine_demand(loads, fr.spec.max_concurrency,
                                               self.settings.engine_target_utilization))
        target = target_replicas(
            now=now, current=current, demand=demand, max_concurrency=fr.spec.max_concurrency,
            min_replicas=fr.spec.min_replicas, max_replicas=fr.spec.max_replicas, state=fr.scale,
            up_delay=self.settings.scale_up_delay_s, down_delay=self.settings.scale_down_delay_s,
            idle_timeout=self.settings.idle_timeout_s,
        )
        if target > current:
            if fr.problem is not None and isinstance(fr.problem, StartupError):
                return  # broken code: don't spin; the version must be redeployed
            if isinstance(fr.problem, NoCapacityError) and now - fr.problem_at < 5.0:
                return  # nothing offers the resources: retry every 5 s, or at once when a provider joins
            for _ in range(target - current):
                self._spawn(self._add_replica(fr))
        elif target < len(fr.ready):
            victims = sorted(fr.ready, key=lambda r: r.inflight)[: len(fr.ready) - target]
            for r in victims:
                self._spawn(self._retire(fr, r))

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for fr in list(self.functions.values()):
                try:
                    self._reconcile(fr, now)
                except Exception:  # noqa: BLE001 - keep the loop alive
                    log.exception("autoscaler failed for %s", fr.name)

    # -- the call path (choosing and queueing live in gateway/chooser.py) ------------------------------
    async def acquire(self, fr: FunctionRuntime, deadline: float, want: Eligibility | None = None
                      ) -> ReplicaHandle:
        return await self.chooser.acquire(fr, deadline, want)

    def release(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        self.chooser.release(fr, r)


def _parse_bundle(item: Any) -> tuple[str, FunctionSpec, Signature, bytes, str, DeploymentFlags]:
    if not isinstance(item, dict):
        raise InvalidRequestError("each deployment item must be an object with name, spec, signature, code")
    missing = [k for k in ("name", "spec", "signature", "code", "measurement") if k not in item]
    if missing:
        raise InvalidRequestError(f"deployment item is missing {missing}; deploy with `cocoon deploy app.py`")
    spec = FunctionSpec.from_json(item["spec"])
    if spec.name != item["name"]:
        raise InvalidRequestError(f"item name {item['name']!r} differs from spec name {spec.name!r}")
    sig = Signature.from_json(item["signature"])
    try:
        code = base64.b64decode(item["code"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequestError("deployment 'code' is not valid base64") from None
    flags = DeploymentFlags.from_json(item.get("meta"))
    if flags.confidential:  # sealed code: the gateway checks only the sealed header, never the plaintext
        from cocoon_faas.gateway.routes_attest import check_sealed_bundle

        check_sealed_bundle(code, spec.name, item["measurement"])
    elif measurement_of(code, spec.canonical()) != item["measurement"]:
        raise InvalidRequestError("deployment measurement does not match SHA-256(code || spec); rebuild the bundle")
    return spec.name, spec, sig, code, item["measurement"], flags


__all__ = ["Controller", "DeploymentFlags", "FunctionRuntime", "RayBackend", "StartupError"]
