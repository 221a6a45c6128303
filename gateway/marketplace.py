"""The provider marketplace: who offers what, who is healthy, and where a function should run.

A pure, in-memory core (clock and randomness are passed in; no I/O). The gateway feeds it registrations,
heartbeats, call results and Ray node states; the controller asks it where to place replicas and subscribes to
node events so replicas follow providers joining, draining and dying without a redeploy.

Matching: a node is *eligible* for a requirement when its hardware satisfies it (GPU family, nominal memory per
GPU, count; host CPUs and RAM), it has that much capacity free, it is up and not draining, it passes attestation
when the function is confidential, and its price rate for the requirement (GPU-seconds and CPU-seconds at its
prices, nanoton per second) is at most the caller's ``max_price`` (the analogue of Cocoon's ``max_coefficient``).

Ranking (lower is better)::

    score = (rate + 1) * (1 + load) * (1 + latency_s) / success**2

where ``load`` is the node's reported utilisation plus in-flight calls per GPU (or CPU) slot, ``latency_s`` the
mean call latency and ``success`` the smoothed success rate over a sliding window of recent calls. Cheap nodes win;
busy, slow and failing nodes lose their edge.

Health: a node is routable only while its last heartbeat is younger than ``3 x heartbeat_interval``; the check is
made on every routing decision, so a silent node stops receiving calls at once, before the sweeper
(:meth:`Marketplace.sweep`) turns it *down* and tells the subscribers. With a shared store, a node the store lists
as up also counts as heard from as of the store's last read (:meth:`Marketplace.vouch`): there the leader's sweep
decides silence from whichever gateway took the heartbeats.

Shared state: with a store (gateway/provider_book.py) the node records — registration, status, last heartbeat,
load, attestation, calls and earnings — live in the database every gateway shares, and this object is one gateway's
cache of them, refreshed by :meth:`Marketplace.apply`. So is reputation: success rate and latency rank a node by
every gateway's outcomes as last read (each adds its own once per refresh; see ``Usage``) with this gateway's
newer ones folded in; in-flight calls stay what this gateway has. Only a deciding gateway (``decides``: the
leader) turns a drained node *left* by itself.

Single event loop use is assumed for reads; mutations take a lock so a controller thread may call in too.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.errors import NoCapacityError, NotFoundError
from cocoon_faas.gateway.market_nodes import (
    DOWN,
    DRAINING,
    LEFT,
    UP,
    MarketEvent,
    Node,
    NodeRecord,
    ProviderView,
    Reputation,
    Usage,
    claims_problem,
    pin,
)
from cocoon_faas.gateway.requirements import NANOTON, Requirements, ton_to_nanoton
from cocoon_faas.runtime.hardware import GIB

log = logging.getLogger(__name__)
_PLACE_CANDIDATES = 32  # placement scores at most this many cheapest fitting nodes: flat in inventory size
__all__ = ["DOWN", "DRAINING", "LEFT", "NANOTON", "UP", "MarketEvent", "Marketplace", "Node", "NodeRecord",
           "ProviderView", "Requirements", "claims_problem", "pin", "ton_to_nanoton"]


@dataclass
class _State:
    node: Node
    status: str
    last_seen: float
    utilisation: float = 0.0
    inflight: int = 0
    attested: bool | None = None  # None: not checked; False excludes it from confidential functions
    revivable: bool = True  # a heartbeat may bring it back from down
    used_gpus: int = 0
    used_cpus: float = 0.0
    used_memory: int = 0
    earned: int = 0
    calls: int = 0
    rep: Reputation = field(default_factory=lambda: Reputation(100))
    lost_at: float = -math.inf  # when a replica on it last died unexpectedly (the node may be dying)
    excluded: str | None = None  # why it takes no replicas although up (its Ray node contradicts its claims)
    registered: float = 0.0  # the shared record's registration time (0: registered here, no store)
    new: Usage = Usage()  # calls, earnings and outcomes counted here and not yet added to the shared record
    shared: tuple[float, float, float] | None = None  # every gateway's (calls, ok, latency) as last read (Usage)

    def _outcomes(self) -> tuple[float, float, float]:
        """(calls, successes, latency) that rank the node: with a store, every gateway's shared figures with
        this gateway's outcomes not yet stored folded in the same way (see Usage); alone, this gateway's window.
        A node failing on any gateway is demoted on all, one failing here at once."""
        if self.shared is None:
            return len(self.rep.calls), self.rep.ok, self.rep.latency
        keep = (1.0 - 1.0 / max(1, self.rep.size)) ** self.new.calls
        calls, ok, latency = self.shared
        return calls * keep + self.new.calls, ok * keep + self.new.ok, latency * keep + self.new.latency_s

    def success(self) -> float:
        calls, ok, _ = self._outcomes()
        return (ok + 2) / (calls + 2)  # smoothed as Reputation.success

    def mean_latency(self) -> float:
        calls, _, latency = self._outcomes()
        return max(0.0, latency / calls) if calls > 0 else 0.0

    def load(self) -> float:
        slots = self.node.hardware.gpu_count or max(1, self.node.hardware.cpus)
        return self.utilisation + self.inflight / slots

    def score(self, rate: int) -> float:
        return (rate + 1) * (1.0 + self.load()) * (1.0 + self.mean_latency()) / (self.success() ** 2)


class Marketplace:
    """The registry of provider nodes and the matching, placement, routing and reputation over it."""

    def __init__(self, *, heartbeat_interval: float = 5.0, window: int = 100,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 expiry_s: float = 3600.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.expiry_s = expiry_s
        self.window = window
        self._clock = clock
        self._rng = rng or random.Random()
        self._nodes: dict[str, _State] = {}
        self._fits: dict[Requirements, list[str]] = {}  # hardware-eligible node ids, cheapest first
        self._full_prefix: dict[Requirements, int] = {}  # how many of those, from the front, are full
        self._replicas: dict[str, list[tuple[str, Requirements]]] = {}  # function -> [(node id, req)]
        self._by_node: dict[str, dict[str, int]] = {}  # node id -> {function: replica count}
        self._subscribers: list[Callable[[MarketEvent], None]] = []
        self._ray_ids: dict[str, str] = {}  # node id -> Ray node id, learned by sync_ray_nodes
        self._ray_tracked = False  # once Ray is watched, a node counts only after its Ray node is seen
        self._max_prices: tuple[int, int] | None = None
        self._vouched, self._vouch_slack = -math.inf, 0.0  # see vouch
        self._used: set[str] = set()  # nodes with calls or earnings not yet taken (take_usage)
        self._lock = threading.RLock()
        self.decides = True  # False on a gateway that follows the shared store: it does not end drains itself

    # --- membership -----------------------------------------------------------------------------------
    def register(self, node: Node) -> Node:
        """Add or refresh a node (a re-registration after a gateway restart keeps its id and counters)."""
        with self._lock:
            old = self._nodes.get(node.node_id)
            now = self._clock()
            if old is None or old.status == LEFT:
                self._nodes[node.node_id] = _State(node, UP, now, rep=Reputation(self.window))
                kind = "joined"
            else:
                old.node, old.status, old.last_seen, old.excluded = node, UP, now, None
                self._ray_ids.pop(node.node_id, None)  # its claims are checked again against its Ray node
                kind = "updated"
            self._invalidate()
        self._emit(kind, node)
        return node

    def heartbeat(self, node_id: str, load: float = 0.0) -> str:
        """Keep a node listed; a down node that heartbeats again comes back up. Returns its status."""
        st = self._state(node_id)
        if st.status == LEFT:  # the agent stops on this; joining again is a new registration
            return LEFT
        st.last_seen = self._clock()
        st.utilisation = max(0.0, float(load))
        if st.status == DOWN and st.revivable:
            with self._lock:
                st.status = UP
                self._invalidate()
            self._emit("up", st.node)
        return st.status

    def leave(self, node_id: str) -> str:
        """Start draining: no new replicas or calls; leaves once its replicas are moved and calls finished."""
        st = self._state(node_id)
        if st.status in (UP, DOWN):
            with self._lock:
                st.status = DRAINING
                self._invalidate()
            self._emit("draining", st.node)
        self._maybe_left(st)
        return st.status

    def mark_down(self, node_id: str, reason: str = "", *, revivable: bool = True) -> None:
        """Take a node out of routing and placement now (dead raylet, failed health check). A node down for
        silence comes back with its next heartbeat; one not ``revivable`` (its Ray node died) only by joining."""
        st = self._nodes.get(node_id)
        if st is None or st.status in (DOWN, LEFT):
            return
        with self._lock:
            draining = st.status == DRAINING
            st.status = DOWN
            st.revivable = revivable
            self._invalidate()
        log.warning("provider node %s is down%s", node_id, f": {reason}" if reason else "")
        self._emit("down", st.node)
        if draining:  # a draining node that dies has left
            self._finish_leave(st)

    def set_attestation(self, node_id: str, ok: bool) -> None:
        """Record the node's attestation result; a failed one excludes it from confidential functions."""
        with self._lock:
            self._state(node_id).attested = ok
            self._invalidate()

    def sweep(self, now: float | None = None) -> list[str]:
        """Mark down every node silent for 3 heartbeat intervals; returns their ids (call it periodically)."""
        now = self._clock() if now is None else now
        limit = 3 * self.heartbeat_interval
        stale = [nid for nid, st in self._nodes.items()
                 if st.status in (UP, DRAINING) and now - st.last_seen > limit]
        for nid in stale:
            self.mark_down(nid, f"no heartbeat for {now - self._nodes[nid].last_seen:.1f}s")
        expired = [nid for nid, st in self._nodes.items() if st.status in (DOWN, LEFT)
                   and now - st.last_seen > self.expiry_s and not self._by_node.get(nid) and not st.inflight]
        if expired:  # stale registrations are forgotten: listing, prices and memory stay bounded
            with self._lock:
                for nid in expired:
                    self._nodes.pop(nid, None)
                    self._ray_ids.pop(nid, None)
                    self._by_node.pop(nid, None)
                self._invalidate()
        return stale

    def sync_ray_nodes(self, ray_nodes: Iterable[dict[str, Any]]) -> list[str]:
        """Mark down nodes whose Ray node died or vanished; call it with ``ray.nodes()`` periodically.

        A live Ray node is matched to its provider node by its ``cocoon-node:<id>`` resource and remembered by
        Ray node id, because Ray lists a dead node without its resources. Returns the ids marked down.
        """
        self._ray_tracked = True
        alive_ray: set[str] = set()
        for rn in ray_nodes:
            if not rn.get("Alive"):
                continue
            rid = str(rn.get("NodeID", ""))
            alive_ray.add(rid)
            resources = rn.get("Resources") or {}
            for res in resources:
                nid = res[12:]
                if res.startswith("cocoon-node:") and nid in self._nodes and self._ray_ids.get(nid) != rid:
                    self._ray_ids[nid] = rid
                    self._came_up(nid, resources)
        dead = [nid for nid, rid in self._ray_ids.items()
                if rid not in alive_ray and self._nodes[nid].status in (UP, DRAINING)]
        for nid in dead:
            self._ray_ids.pop(nid, None)
            self.mark_down(nid, "its Ray node died", revivable=False)
        return dead

    def _came_up(self, nid: str, resources: dict[str, Any]) -> None:
        """A node's Ray node appeared: it counts for placement and pricing only if Ray reports what it claimed."""
        st = self._nodes[nid]
        problem = claims_problem(st.node.hardware, resources, nid)
        with self._lock:
            st.excluded = problem
            self._invalidate()
        if problem is not None:
            log.warning("provider node %s excluded: %s", nid, problem)
            self._emit("down", st.node)  # replicas already placed there are moved
        elif st.status == UP:
            self._emit("up", st.node)  # functions waiting for capacity try again

    def subscribe(self, callback: Callable[[MarketEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on every node event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    # --- the shared store's view (gateway/provider_book.py) --------------------------------------------
    def apply(self, rec: NodeRecord, now: float) -> None:
        """Take ``rec`` (the shared record, as of wall time ``now``) as the truth about its node, telling the
        subscribers what changed: joined, updated (registered again), up, down, draining or left."""
        nid = rec.node.node_id
        with self._lock:
            st = self._nodes.get(nid)
            kind: str | None = None
            if st is None or (st.status == LEFT and st.registered != rec.registered):
                if rec.status == LEFT:
                    return  # nothing to show or route to
                st = self._nodes[nid] = _State(rec.node, rec.status, 0.0, rep=Reputation(self.window))
                kind = "joined" if rec.status == UP else None
                changed = True
            else:
                changed = st.node != rec.node or st.attested != rec.attested
                if st.registered != rec.registered:
                    self._ray_ids.pop(nid, None)  # its claims are checked again against its Ray node
                    st.excluded, changed = None, True
                    kind = "updated" if rec.status == UP else rec.status
                elif st.status != rec.status:
                    kind, changed = rec.status, True  # the event kinds are the statuses
            st.node, st.status, st.registered, st.revivable = rec.node, rec.status, rec.registered, rec.revivable
            st.last_seen = self._clock() - max(0.0, now - rec.last_seen)
            st.utilisation, st.attested = max(0.0, rec.utilisation), rec.attested
            st.calls, st.earned = rec.calls + st.new.calls, rec.earned + st.new.earned
            st.shared = (rec.rep_calls, rec.rep_ok, rec.rep_latency)
            if changed:
                self._invalidate()
        if kind is not None:
            self._emit(kind, st.node)

    def forget(self, node_id: str) -> bool:
        """Drop a node the shared store no longer lists (expired); kept while replicas or calls still use it."""
        with self._lock:
            st = self._nodes.get(node_id)
            if st is None or self._by_node.get(node_id) or st.inflight:
                return st is None
            del self._nodes[node_id]
            self._ray_ids.pop(node_id, None)
            self._invalidate()
        return True

    def finish_leaves(self, node_ids: Iterable[str] | None = None) -> None:
        """Draining nodes (of ``node_ids``, or all) with nothing left on them leave (a deciding gateway; see
        ``decides``)."""
        states = self._nodes.values() if node_ids is None else [self._nodes.get(nid) for nid in node_ids]
        for st in [st for st in states if st is not None and st.status == DRAINING]:
            self._maybe_left(st)

    def take_usage(self) -> dict[str, Usage]:
        """Calls, earnings and outcomes counted here since the last take, per node (to add to the shared
        record)."""
        out = {}
        with self._lock:
            used, self._used = self._used, set()
            for nid in used:
                st = self._nodes.get(nid)
                if st is not None and st.new != Usage():
                    out[nid], st.new = st.new, Usage()
        return out

    def give_back_usage(self, usage: dict[str, Usage]) -> None:
        """Undo :meth:`take_usage` for figures that could not be stored (they are added next time)."""
        with self._lock:
            for nid, u in usage.items():
                st = self._nodes.get(nid)
                if st is not None:
                    st.new += u
                    self._used.add(nid)

    def holds(self, node_id: str) -> bool:
        """Replicas or calls are on the node (its record must not expire)."""
        st = self._nodes.get(node_id)
        return bool(self._by_node.get(node_id)) or (st is not None and st.inflight > 0)

    def ids(self) -> list[str]:
        return list(self._nodes)

    def knows(self, node_id: str) -> bool:
        return node_id in self._nodes

    def revivable(self, node_id: str) -> bool:
        return self._state(node_id).revivable

    # --- queries --------------------------------------------------------------------------------------
    def node(self, node_id: str) -> Node:
        return self._state(node_id).node

    def status(self, node_id: str) -> str:
        return self._state(node_id).status

    def routable(self, node_id: str, now: float | None = None) -> bool:
        """Up and heard from within 3 heartbeat intervals: checked on every decision, not only by sweeps."""
        st = self._nodes.get(node_id)
        if st is None or st.status != UP or st.excluded is not None:
            return False
        return self._heard(st, self._clock() if now is None else now)

    def vouch(self, age: float, slack: float) -> None:
        """The shared store listed every node's status ``age`` seconds ago (gateway/provider_book.py): a node
        still up there counts as heard from then, as long as the last heartbeat known here is at most ``slack``
        seconds older than a live node's may be (heartbeat times alone reach this gateway only now and then)."""
        self._vouched, self._vouch_slack = self._clock() - age, slack

    def _heard(self, st: _State, now: float) -> bool:
        limit = 3 * self.heartbeat_interval
        age = now - st.last_seen
        return age <= limit or (now - self._vouched <= limit and age <= limit + self._vouch_slack)

    def max_prices(self) -> tuple[int, int]:
        """The highest (GPU, CPU) prices any listed node asks: what a call's hold must cover before the node
        that answers it is known."""
        if self._max_prices is None:  # only nodes that can serve: a node down, lying or not yet up sets no price
            live = [st.node for nid, st in self._nodes.items() if st.status == UP and st.excluded is None
                    and (not self._ray_tracked or nid in self._ray_ids)]
            self._max_prices = (max((n.gpu_price for n in live), default=0),
                                max((n.cpu_price for n in live), default=0))
        return self._max_prices

    def eligible(self, req: Requirements, max_price: int | None = None) -> list[Node]:
        """Every node that can take a replica of ``req`` now, best first."""
        now = self._clock()
        found = [(self._nodes[nid].score(self._nodes[nid].node.rate(req)), nid)
                 for nid in self._fitting(req) if self._usable(nid, req, max_price, now)]
        found.sort()
        return [self._nodes[nid].node for _, nid in found]

    def place(self, req: Requirements, max_price: int | None = None, exclude: Iterable[str] = ()) -> Node:
        """The best node for a new replica of ``req``, or NoCapacityError naming what is missing."""
        now = self._clock()
        skip = set(exclude)
        best: tuple[float, str] | None = None
        suspect: tuple[float, str] | None = None
        seen = 0
        ids = self._fitting(req)
        start = self._full_prefix.get(req, 0)
        prefix = True
        # cheapest first, so the first few fitting nodes hold the best score; nodes at the front that are full
        # for this requirement are skipped from then on (until an unassign frees room anywhere)
        for i in range(start, len(ids)):
            nid = ids[i]
            st = self._nodes[nid]
            if not self._has_room(st, req):
                if prefix:
                    self._full_prefix[req] = i + 1
                continue
            prefix = False
            if nid in skip or not self._usable(nid, req, max_price, now):
                continue
            cand = (st.score(st.node.rate(req)), nid)
            if now - st.lost_at <= 3 * self.heartbeat_interval:
                if suspect is None or cand < suspect:
                    suspect = cand
                continue
            if best is None or cand < best:
                best = cand
            seen += 1
            if seen >= _PLACE_CANDIDATES:
                break
        best = best or suspect
        if best is None:
            raise self._no_capacity(req, max_price, skip)
        return self._nodes[best[1]].node

    # --- replicas and routing -------------------------------------------------------------------------
    def assign(self, function: str, node_id: str, req: Requirements) -> None:
        """Record a replica of ``function`` on ``node_id`` (reserves its resources there)."""
        with self._lock:
            st = self._state(node_id)
            self._replicas.setdefault(function, []).append((node_id, req))
            per = self._by_node.setdefault(node_id, {})
            per[function] = per.get(function, 0) + 1
            st.used_gpus += req.gpu_count
            st.used_cpus += req.cpus
            st.used_memory += req.memory

    def unassign(self, function: str, node_id: str) -> None:
        """Forget one replica of ``function`` on ``node_id``; a draining node left empty then leaves."""
        with self._lock:
            reps = self._replicas.get(function, [])
            idx = next((i for i, (nid, _) in enumerate(reps) if nid == node_id), None)
            if idx is None:
                return
            req = reps.pop(idx)[1]
            if not reps:
                self._replicas.pop(function, None)
            per = self._by_node.get(node_id, {})
            per[function] -= 1
            if not per[function]:
                del per[function]
            st = self._nodes.get(node_id)
            self._full_prefix.clear()
            if st is not None:
                st.used_gpus -= req.gpu_count
                st.used_cpus -= req.cpus
                st.used_memory -= req.memory
        if st is not None:
            self._maybe_left(st)

    def replica_lost(self, node_id: str) -> None:
        """A replica on the node died unexpectedly. Its node may be dying (a killed raylet takes its workers
        first and its heartbeats stop a moment later), so placement prefers other nodes until the node has had
        3 heartbeat intervals to be swept down; it is still used when nothing else fits."""
        st = self._nodes.get(node_id)
        if st is not None:
            st.lost_at = self._clock()

    def replica_nodes(self, function: str) -> list[str]:
        """The nodes holding replicas of ``function`` (one entry per replica)."""
        return [nid for nid, _ in self._replicas.get(function, ())]

    def replicas_on(self, node_id: str) -> dict[str, int]:
        """Functions with replicas on the node, and how many (the controller replaces these on down/drain)."""
        return dict(self._by_node.get(node_id, {}))

    def route(self, function: str, max_price: int | None = None, exclude: Sequence[str] = ()) -> str:
        """Pick the node for one call of ``function``: power of two choices over its routable replicas."""
        reps = self._replicas.get(function)
        if not reps:
            raise NoCapacityError(f"function {function!r} has no replica; deploy it or wait for a provider")
        n = len(reps)
        if n == 1:
            picks: Sequence[tuple[str, Requirements]] = reps
        else:
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            picks = (reps[i], reps[j + (j >= i)])
        best_nid, best_score = self._best(picks, max_price, exclude)
        if best_nid is None and n > 2:  # both picks unusable: look at every replica (rare)
            best_nid, best_score = self._best(reps, max_price, exclude)
        if best_nid is None:
            raise NoCapacityError(f"every replica of {function!r} is on a node that is down, draining, "
                                  "excluded or over max_price; retry shortly", function=function)
        return best_nid

    def _best(self, picks: Sequence[tuple[str, Requirements]], max_price: int | None,
              exclude: Sequence[str]) -> tuple[str | None, float]:
        now = self._clock()
        best_nid, best_score = None, math.inf
        for nid, req in picks:
            st = self._nodes.get(nid)
            if (st is None or st.status != UP or st.excluded or not self._heard(st, now) or nid in exclude
                    or (max_price is not None and st.node.rate(req) > max_price)):
                continue
            s = st.score(st.node.rate(req))
            if s < best_score:
                best_nid, best_score = nid, s
        return best_nid, best_score

    # --- outcomes -------------------------------------------------------------------------------------
    def call_started(self, node_id: str) -> None:
        st = self._nodes.get(node_id)
        if st is not None:
            st.inflight += 1

    def record_result(self, node_id: str, ok: bool, latency_s: float, *, finished: bool = False) -> None:
        """Feed one call's outcome into the node's reputation (``finished``: also end a ``call_started``)."""
        st = self._nodes.get(node_id)
        if st is None:
            return
        latency_s = max(0.0, float(latency_s))
        st.rep.add(bool(ok), latency_s)
        st.calls += 1
        st.new += Usage(1, 0, int(bool(ok)), latency_s)
        self._used.add(node_id)
        if finished and st.inflight:
            st.inflight -= 1
            self._maybe_left(st)

    def credit(self, node_id: str, req: Requirements, duration_ns: int) -> int:
        """Record and return the provider's earnings for one charged call (nanoton)."""
        st = self._state(node_id)
        amount = st.node.charge(req, duration_ns)
        st.earned += amount
        st.new += Usage(earned=amount)
        self._used.add(node_id)
        return amount

    def earnings(self, node_id: str) -> int:
        return self._state(node_id).earned

    def listing(self) -> list[ProviderView]:
        now = self._clock()
        return [self._view(st, now) for st in sorted(self._nodes.values(), key=lambda s: s.node.node_id)
                if st.status != LEFT]

    def view(self, node_id: str) -> ProviderView:
        return self._view(self._state(node_id), self._clock())

    # --- internals ------------------------------------------------------------------------------------
    def _state(self, node_id: str) -> _State:
        st = self._nodes.get(node_id)
        if st is None:
            raise NotFoundError(f"no provider node {node_id!r}; register it with `cocoon provider join`")
        return st

    def _view(self, st: _State, now: float) -> ProviderView:
        n = st.node
        return ProviderView(
            n.node_id, n.name, n.wallet, n.hardware, n.gpu_price, n.cpu_price, st.status,
            self.routable(n.node_id, now), round(st.load(), 4), st.inflight,
            sum(self._by_node.get(n.node_id, {}).values()), round(st.success(), 4),
            round(st.mean_latency(), 6), st.calls, st.earned, round(now - st.last_seen, 3), st.attested,
            dict(self._by_node.get(n.node_id, {})), self._ray_ids.get(n.node_id), st.excluded)

    def _fitting(self, req: Requirements) -> list[str]:
        ids = self._fits.get(req)
        if ids is None:
            with self._lock:
                ids = sorted((nid for nid, st in self._nodes.items()
                              if st.status in (UP, DRAINING, DOWN) and req.hardware_fits(st.node.hardware)),
                             key=lambda nid: (self._nodes[nid].node.rate(req), nid))
                self._fits[req] = ids
        return ids

    def _usable(self, nid: str, req: Requirements, max_price: int | None, now: float) -> bool:
        st = self._nodes[nid]
        if st.status != UP or st.excluded is not None or not self._heard(st, now):
            return False
        if self._ray_tracked and nid not in self._ray_ids:  # registered, but its Ray node never came up
            return False
        if req.confidential and st.attested is False:
            return False
        if max_price is not None and st.node.rate(req) > max_price:
            return False
        return self._has_room(st, req)

    @staticmethod
    def _has_room(st: _State, req: Requirements) -> bool:
        hw = st.node.hardware
        return (hw.gpu_count - st.used_gpus >= req.gpu_count and hw.cpus - st.used_cpus >= req.cpus
                and hw.memory - st.used_memory >= req.memory)

    def _no_capacity(self, req: Requirements, max_price: int | None, skip: set[str]) -> NoCapacityError:
        fits = [nid for nid in self._fitting(req) if nid not in skip]
        hint = req.join_hint()
        if not fits:
            have: dict[str, int] = {}
            for st in self._nodes.values():
                if st.status != LEFT:
                    hw = st.node.hardware
                    key = f"{hw.gpu_model} x{hw.gpu_count}" if hw.gpu_count else "CPU-only"
                    have[key] = have.get(key, 0) + 1
            inv = ", ".join(f"{k} x{v}" if k == "CPU-only" else (k if v == 1 else f"{v} nodes of {k}")
                            for k, v in sorted(have.items())) or "no providers"
            extra = ""
            if req.memory or req.cpus:
                extra = f" with {req.cpus:g} CPUs and {req.memory / GIB:.1f} GiB RAM"
            return NoCapacityError(f"no provider offers {req.label}{extra} (have: {inv}); start one with "
                                   f"`{hint}`", missing=req.label)
        now = self._clock()
        up = [nid for nid in fits if self.routable(nid, now)]
        if not up:
            return NoCapacityError(f"all {len(fits)} providers offering {req.label} are down or draining; "
                                   f"wait for them or start one with `{hint}`", missing=req.label)
        if max_price is not None:
            cheapest = min(self._nodes[nid].node.rate(req) for nid in up)
            if cheapest > max_price:
                return NoCapacityError(
                    f"no provider offers {req.label} at max_price {max_price} nanoton/s (cheapest: {cheapest}); "
                    "raise max_price", missing=req.label, cheapest=cheapest)
        if req.confidential and all(self._nodes[nid].attested is False for nid in up):
            return NoCapacityError(f"every provider offering {req.label} failed attestation", missing=req.label)
        return NoCapacityError(f"every provider offering {req.label} is full ({len(up)} nodes); retry when "
                               f"replicas free up or start one with `{hint}`", missing=req.label)

    def _invalidate(self) -> None:
        self._max_prices = None
        self._fits.clear()
        self._full_prefix.clear()

    def _maybe_left(self, st: _State) -> None:
        nid = st.node.node_id
        if self.decides and st.status == DRAINING and not st.inflight and not self._by_node.get(nid):
            self._finish_leave(st)

    def _finish_leave(self, st: _State) -> None:
        with self._lock:
            st.status = LEFT
            self._invalidate()
        self._emit("left", st.node)

    def _emit(self, kind: str, node: Node) -> None:
        ev = MarketEvent(kind, node)
        for cb in list(self._subscribers):
            try:
                cb(ev)
            except Exception:  # a subscriber's bug must not break membership
                log.exception("marketplace subscriber failed on %s %s", kind, node.node_id)
