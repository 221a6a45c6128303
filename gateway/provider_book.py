"""The provider nodes as every gateway sees them: the shared store is the truth, the marketplace a cache.

A registration, heartbeat, leave or revoke that reaches any gateway is written to the store first
(gateway/provider_store.py) and then applied to that gateway's marketplace, so its answer is current. Every
``interval`` seconds (`run`; 1 s by default, ``COCOON_PROVIDER_SYNC_S``) each gateway reads the node rows changed
since its previous read (an incremental read: `ProviderStore.changes`), and every ``full_every`` seconds
(``COCOON_PROVIDER_FULL_SYNC_S``, 30 s) every row: a node registered on gateway A is listed, placed on and routed to
by gateway B within ``interval``. Routing itself reads only the in-memory marketplace.

What an incremental read carries: everything routing and placement use (registration, status, attestation, a
load change of `LOAD_STEP` or more). What waits for the full read: heartbeat times alone, other gateways' call and
earning totals, and rows deleted long after their node went down or left. So a heartbeat costs the other gateways
nothing. A node counts as heard from on a gateway that did not take its heartbeats because the store still lists
it up as of the last read (`Marketplace.vouch`): the leader marks it down there as soon as its last heartbeat,
taken by whichever gateway, is 3 heartbeat intervals old, and that change is in everyone's next read. A silent
node thus stops being routed to within 3 heartbeat intervals plus about two refresh periods (the leader's sweep,
then the read); if no gateway leads meanwhile, within 3 intervals plus ``full_every``.

Who decides what: the sweep that turns silent nodes *down* runs on the leader only, as one conditional statement;
so does ending a drain (*left*, once the leader — which places and retires replicas — sees nothing left on the
node). A node whose Ray node died is marked down by whichever gateway sees it first. Changes the marketplace makes
itself are stored at the next refresh and win over the older record read meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cocoon_faas.errors import NotFoundError
from cocoon_faas.runtime.registration import MAX_SKEW_S

from .db import SqliteDatabase
from .market_nodes import DOWN, LEFT, MarketEvent, Node, NodeRecord, Usage
from .marketplace import Marketplace
from .provider_store import ProviderStore

log = logging.getLogger("cocoon.providers")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ProviderBook:
    """One gateway's marketplace kept in step with the shared provider records."""

    def __init__(self, market: Marketplace, store: ProviderStore, *, interval: float = 1.0,
                 full_every: float = 30.0, leading: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.market, self.store, self.interval, self.full_every = market, store, interval, full_every
        self._last_full = -math.inf  # monotonic time of the last full read
        self.leading, self.clock = leading, clock
        self._applying = False
        self._changed: dict[str, tuple[str, bool, float]] = {}  # node -> (status, revivable, registered) to store
        self._registered: dict[str, float] = {}  # node -> the registration its record belongs to
        self._touched: dict[str, float] = {}  # node -> monotonic time a route applied a fresher record
        self._applied: dict[str, NodeRecord] = {}  # node -> the record last applied (unchanged ones are skipped)
        market.subscribe(self._on_event)

    @classmethod
    def in_memory(cls, market: Marketplace, **kw: Any) -> ProviderBook:
        """A book over a private in-memory SQLite database: one gateway, nothing shared (tests, embedding)."""
        return cls(market, ProviderStore(SqliteDatabase(Path(":memory:"))), **kw)

    @property
    def heartbeat_interval(self) -> float:
        return self.market.heartbeat_interval

    # -- what the provider routes do (store first, then this gateway's cache) -----------------------------
    async def claim_nonce(self, nonce: str, now: float) -> bool:
        return await asyncio.to_thread(self.store.claim_nonce, nonce, now)

    async def register(self, node: Node, wallet_key: str, token: str, attested: bool | None) -> str:
        rec = await asyncio.to_thread(self.store.register, node, wallet_key, token_hash(token), attested,
                                      self.clock())
        return self._apply_fresh(rec)

    async def heartbeat(self, node_id: str, token: str, load: float) -> str:
        rec = await asyncio.to_thread(self.store.heartbeat, node_id, token_hash(token), load, self.clock())
        return self._apply_fresh(rec)

    async def leave(self, node_id: str, token: str) -> str:
        rec = await asyncio.to_thread(self.store.leave, node_id, token_hash(token))
        return self._apply_fresh(rec)

    async def revoke(self, wallet_key: str) -> list[str]:
        recs = await asyncio.to_thread(self.store.revoke_wallet, wallet_key)
        for rec in recs:
            self._apply_fresh(rec)
        return [rec.node.node_id for rec in recs]

    def _apply_fresh(self, rec: NodeRecord) -> str:
        nid = rec.node.node_id
        self._touched[nid] = time.monotonic()
        self._apply([rec], self.clock())
        self.market.finish_leaves([nid])  # (this node only: a pass over every node per heartbeat adds up)
        try:
            return self.market.status(nid)
        except NotFoundError:  # a record of a node that has left and was never seen here
            return rec.status

    # -- the refresh loop ------------------------------------------------------------------------------
    async def run(self, ray_nodes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """Forever: learn Ray node deaths (given ``ray.nodes``), store this gateway's changes and usage, sweep
        (leader), then re-read every record. A failing database is retried next period; routing goes on."""
        while True:
            if ray_nodes is not None:
                try:
                    nodes = await asyncio.to_thread(ray_nodes)
                except Exception:  # noqa: BLE001 - Ray briefly unreachable: heartbeats still cover node health
                    nodes = None
                if nodes is not None:
                    self.market.sync_ray_nodes(nodes)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001
                log.exception("refreshing provider nodes from the store failed")
            await asyncio.sleep(self.interval)

    async def refresh(self, full: bool = False) -> None:
        """Store this gateway's changes, sweep when leading, then read the rows changed since the last refresh
        (every row when ``full`` or ``full_every`` has passed) into the marketplace."""
        leading = self.leading()
        self.market.decides = leading
        changed, self._changed = self._changed, {}
        usage = self.market.take_usage()
        started = time.monotonic()
        full = full or started - self._last_full >= self.full_every
        try:
            records, full, now = await asyncio.to_thread(self._exchange, changed, usage, leading, full)
        except BaseException:
            self.market.give_back_usage(usage)
            for nid, change in changed.items():
                self._changed.setdefault(nid, change)
            raise
        fresh = {nid for nid, t in self._touched.items() if t >= started}  # a route applied newer rows
        self._touched = {nid: t for nid, t in self._touched.items() if t >= started}
        self._apply([r for r in records if r.node.node_id not in fresh and r.node.node_id not in self._changed],
                    now)
        if full:  # a node the store no longer lists has expired there
            self._last_full = started
            listed = {r.node.node_id for r in records} | fresh
            for nid in self.market.ids():
                if nid not in listed and self.market.forget(nid):
                    self._registered.pop(nid, None)
                    self._applied.pop(nid, None)
        # the store's statuses as of the read: a node it lists as up is heard from (see the module docstring)
        self.market.vouch(time.monotonic() - started, slack=self.full_every + 2 * self.interval)
        if leading:
            self.market.finish_leaves()

    def _exchange(self, changed: dict[str, tuple[str, bool, float]], usage: dict[str, Usage],
                  leading: bool, full: bool) -> tuple[list[NodeRecord], bool, float]:
        """Off the event loop: write what this gateway decided, sweep when leading, read the changed records."""
        for nid, (status, revivable, registered) in changed.items():
            if not self.store.mark(nid, registered, status, revivable):
                self._applied.pop(nid, None)  # the store disagrees: take its record again even if unchanged
        if usage:
            self.store.add_usage(usage.items(), self.market.window)
        now = self.clock()
        if leading:
            silent = now - 3 * self.market.heartbeat_interval
            down = self.store.sweep(silent, now - self.market.expiry_s, self.market.holds)
            if down:
                log.warning("%d provider nodes are down (%s%s): no heartbeat on any gateway for %.1fs", len(down),
                            ", ".join(down[:5]), ", …" if len(down) > 5 else "", 3 * self.market.heartbeat_interval)
            self.store.prune_nonces(now - 2 * MAX_SKEW_S)  # older ones fail the freshness check anyway
        records, full = self.store.changes(full)
        return records, full, now

    def _apply(self, records: list[NodeRecord], now: float) -> None:
        self._applying = True
        try:
            for rec in records:
                nid = rec.node.node_id
                if self._applied.get(nid) is rec:
                    continue  # the same row as last time: the marketplace already holds it
                self._registered[nid] = rec.registered
                self._applied[nid] = rec
                self.market.apply(rec, now)
        finally:
            self._applying = False

    def _on_event(self, ev: MarketEvent) -> None:
        """A change the marketplace made itself (not one read from the store) is stored at the next refresh."""
        nid = ev.node.node_id
        if self._applying or ev.kind not in ("down", "left") or nid not in self._registered:
            return
        status = self.market.status(nid)
        if status in (DOWN, LEFT):  # not an exclusion (its Ray node contradicts its claims: up but unused)
            self._changed[nid] = (status, self.market.revivable(nid), self._registered[nid])
