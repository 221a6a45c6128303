"""Several gateways, one set of replicas: the replica registry in the store and each gateway's view of it.

A replica started by any gateway (a deploy, or the leader's autoscaler) is a *detached, named* Ray actor, so it
outlives the gateway that created it, and gets a row in the store's ``replicas`` table (address and public facts)
once it is ready. Every gateway syncs its routing table from the store every `interval` seconds: it adopts the
current version of each function, connects to every registered replica of that version (the data path accepts
several connections) and stops routing to replicas whose row is gone. Lifecycle decisions — replacing a dead
replica, scaling up and down from the demand all gateways report — are taken by the leader only (`leading`).
Any gateway may still deploy, roll back or delete; the others follow within one sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cocoon_faas.errors import CocoonError

from .replica_client import ReplicaHandle
from .store import ReplicaRow, Store

if TYPE_CHECKING:
    from .cluster import Cluster
    from .controller import Controller, FunctionRuntime

log = logging.getLogger("cocoon.fleet")

_PUBLIC_FACTS = ("pid", "setup_s", "sandboxed", "key_id", "document", "code_locked")
_SECRET = "_secret"


def actor_name(replica_id: str) -> str:
    return f"cocoon-replica-{replica_id}"


class Fleet:
    def __init__(self, store: Store, cluster: Cluster, interval: float = 0.5) -> None:
        self.store, self.cluster, self.interval = store, cluster, interval
        self.controller: Controller | None = None
        self.mine: set[str] = set()  # replicas this gateway started (it adds them to routing itself)
        self.others_demand: dict[str, int] = {}  # per function, what the other live gateways reported
        self._connecting: set[str] = set()
        self.synced = False  # the leader scales only once its view holds every registered replica
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.cluster.is_leader

    @property
    def may_scale(self) -> bool:
        return self.cluster.is_leader and self.synced and not self._connecting

    def demand(self, fr: FunctionRuntime) -> int:
        return fr.inflight + fr.queued + self.others_demand.get(fr.name, 0)

    # -- registry writes (the gateway that started or retires a replica) ---------------------------------
    def register(self, r: ReplicaHandle) -> None:
        facts: dict[str, object] = {k: r.extra[k] for k in _PUBLIC_FACTS if k in r.extra}
        # the data port answers only HELLO with the replica's secret: the other gateways need it to connect
        # (the shared database is the operator's, like the ledger; it never leaves the gateways)
        facts[_SECRET] = r.secret.hex()
        self.store.put_replica(ReplicaRow(r.id, r.function, r.version, r.host, r.port, r.node,
                                          json.dumps(facts, default=str), self.cluster.id, time.time()))
        r.extra["registered_at"] = time.time()

    def unregister(self, r: ReplicaHandle) -> None:
        self.store.delete_replica(r.id)
        self.mine.discard(r.id)

    # -- the sync loop (every gateway) -----------------------------------------------------------------
    def start(self, controller: Controller) -> None:
        self.controller = controller
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - the database may be briefly unreachable; try again
                log.exception("replica sync failed")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        ctl = self.controller
        assert ctl is not None
        loop = asyncio.get_running_loop()
        t0 = time.time()
        functions, rows = await loop.run_in_executor(None, lambda: (self.store.functions(), self.store.replicas()))
        current = {name: (owner, version) for name, owner, version in functions}
        for name, (owner, version) in current.items():
            fr = ctl.functions.get(name)
            if (fr is None or fr.version != version) and name not in ctl.activating:
                await self._adopt(name, owner, version)
        for name in [n for n in ctl.functions if n not in current and n not in ctl.activating]:
            fr = ctl.functions.get(name)
            if fr is not None and fr.version > 0:
                ctl.forget(name, "deleted on another gateway")
        present = {row.id for row in rows}
        for fr in list(ctl.functions.values()):
            local = {r.id for r in fr.all}
            for row in rows:
                if (row.function == fr.name and row.version == fr.version and row.id not in local
                        and row.id not in self.mine and row.id not in self._connecting):
                    self._connecting.add(row.id)
                    ctl.spawn(self._connect(fr, row))
            for r in list(fr.all):  # retired by another gateway: stop routing to it, finish our calls
                if r.id not in present and r.extra.get("registered_at", t0) < t0 and r.state == "ready":
                    ctl.drop_local(fr, r)
        self.synced = True

    async def _adopt(self, name: str, owner: str, version: int) -> None:
        ctl = self.controller
        assert ctl is not None
        loop = asyncio.get_running_loop()
        row = await loop.run_in_executor(None, self.store.version, name, version)
        again = await loop.run_in_executor(None, self.store.current_version, name)
        fr = ctl.functions.get(name)
        if again != version or name in ctl.activating or (fr is not None and fr.version == version):
            return  # moved meanwhile (or this gateway is switching it itself): the next sync sees it
        ctl.adopt(ctl.runtime(name, owner, row.version, row.spec, row.signature, row.code, row.measurement,
                              row.meta))

    async def _connect(self, fr: FunctionRuntime, row: ReplicaRow) -> None:
        ctl = self.controller
        assert ctl is not None
        try:
            facts = json.loads(row.facts)
            secret = bytes.fromhex(str(facts.pop(_SECRET, "")))
            r = ReplicaHandle(id=row.id, function=row.function, version=row.version, actor=None, node=row.node,
                              secret=secret, max_frame=ctl.settings.max_frame_bytes,
                              direct=ctl.settings.direct_calls,
                              extra={**{k: facts[k] for k in _PUBLIC_FACTS if k in facts},
                                     "registered_at": row.updated})
            try:
                await asyncio.wait_for(r.connect(row.host, row.port), 5)
            except (OSError, CocoonError, asyncio.TimeoutError):
                if self.leading:  # nobody listens there: the replica is gone (its gateway died mid-retire)
                    await asyncio.get_running_loop().run_in_executor(None, self._reap, row)
                return
            ctl.attach(fr, r)
        finally:
            self._connecting.discard(row.id)

    def _reap(self, row: ReplicaRow) -> None:
        ctl = self.controller
        assert ctl is not None
        log.warning("replica %s of %s at %s:%s is unreachable; removing it", row.id, row.function, row.host,
                    row.port)
        ctl.backend.kill_named(actor_name(row.id))
        self.store.delete_replica(row.id)

    def last_one(self) -> bool:
        """True when no other gateway is alive (this one stopping may take the replicas down with it)."""
        return [g.id for g in self.cluster.alive()] == [self.cluster.id]

    def kill_all(self, kill: Callable[[str], None]) -> None:
        for row in self.store.replicas():
            kill(actor_name(row.id))
            self.store.delete_replica(row.id)
