"""The marketplace's values: a provider node, its shared record, the events about it, a listing row, and the
node's reputation. Plain data (gateway/marketplace.py holds the registry and the matching over them)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.gateway.requirements import NANOTON, Requirements
from cocoon_faas.runtime.hardware import NODE_RESOURCE_UNITS, Hardware

__all__ = ["DOWN", "DRAINING", "LEFT", "UP", "MarketEvent", "Node", "NodeRecord", "ProviderView", "Reputation",
           "claims_problem", "pin"]


def claims_problem(hw: Hardware, resources: dict[str, Any], node_id: str) -> str | None:
    """What the node claimed that its Ray node does not report (None when Ray backs every claim)."""
    want = {"CPU": float(hw.cpus), "GPU": float(hw.gpu_count), **hw.ray_resources(node_id)}
    if hw.memory:
        want["memory"] = float(hw.memory)
    for name, claimed in sorted(want.items()):
        try:
            have = float(resources.get(name, 0.0))
        except (TypeError, ValueError):
            have = 0.0
        if have + 1e-6 < claimed * (0.99 if name == "memory" else 1.0):
            return (f"claimed {claimed:g} {name} but its Ray node reports {have:g}; join again declaring what "
                    "the machine has")
    return None


def pin(node_id: str) -> dict[str, float]:
    """Ray resources that pin an actor to a provider node: a sliver of its ``cocoon-node:<id>`` resource."""
    return {f"cocoon-node:{node_id}": 1 / NODE_RESOURCE_UNITS}


UP, DRAINING, DOWN, LEFT = "up", "draining", "down", "left"


@dataclass(frozen=True)
class Node:
    """A registered provider node (what it offers and asks). Prices in nanoton per GPU-second / CPU-second."""

    node_id: str
    wallet: str
    public_key: str
    hardware: Hardware
    gpu_price: int
    cpu_price: int
    name: str = ""

    def rate(self, req: Requirements) -> int:
        """Nanoton per second this node charges for one replica of ``req``."""
        return self.gpu_price * req.gpu_count + math.ceil(self.cpu_price * req.cpus)

    def charge(self, req: Requirements, duration_ns: int) -> int:
        """Provider earnings for a call of ``duration_ns``: GPU-seconds x price (+ CPU-seconds x price)."""
        return self.rate(req) * max(0, int(duration_ns)) // NANOTON


@dataclass(frozen=True)
class NodeRecord:
    """A node as the shared store keeps it; every gateway's marketplace is refreshed from these
    (:meth:`Marketplace.apply`). Times are wall-clock seconds (gateways share no monotonic clock)."""

    node: Node
    status: str
    registered: float  # when this registration was made: a new one resets what was learned about the node
    last_seen: float
    utilisation: float = 0.0
    attested: bool | None = None
    revivable: bool = True
    calls: int = 0
    earned: int = 0
    rep_calls: float = 0.0  # every gateway's call outcomes, decayed per call (see Usage): the shared reputation
    rep_ok: float = 0.0
    rep_latency: float = 0.0

    @property
    def success(self) -> float:
        """Smoothed as `Reputation.success` (two virtual successes)."""
        return (self.rep_ok + 2) / (self.rep_calls + 2)

    @property
    def mean_latency(self) -> float:
        return max(0.0, self.rep_latency / self.rep_calls) if self.rep_calls > 0 else 0.0


@dataclass(frozen=True)
class Usage:
    """What one gateway counted on a node since it last stored it: calls and earnings (nanoton), and how many
    of those calls succeeded and their summed latency. The store folds the outcomes into the node's shared
    reputation as an average over about the last ``window`` calls on any gateway: before adding n outcomes the
    sums are scaled by (1 - 1/window)**n."""

    calls: int = 0
    earned: int = 0
    ok: int = 0
    latency_s: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.calls + other.calls, self.earned + other.earned, self.ok + other.ok,
                     self.latency_s + other.latency_s)


@dataclass(frozen=True)
class MarketEvent:
    """What a subscriber hears: kind is joined, updated, draining, down, up or left."""

    kind: str
    node: Node


@dataclass
class Reputation:
    """Success and latency over the last ``size`` calls, kept as running sums (O(1) per call)."""

    size: int
    calls: deque[tuple[bool, float]] = field(default_factory=deque)
    ok: int = 0
    latency: float = 0.0

    def add(self, ok: bool, latency_s: float) -> None:
        self.calls.append((ok, latency_s))
        self.ok += ok
        self.latency += latency_s
        if len(self.calls) > self.size:
            old_ok, old_lat = self.calls.popleft()
            self.ok -= old_ok
            self.latency -= old_lat

    @property
    def success(self) -> float:
        """Smoothed with two virtual successes, so a new node is trusted but one failure is not fatal."""
        return (self.ok + 2) / (len(self.calls) + 2)

    @property
    def mean_latency(self) -> float:
        return max(0.0, self.latency / len(self.calls)) if self.calls else 0.0


@dataclass(frozen=True)
class ProviderView:
    """A row of ``GET /v1/providers`` and ``cocoon provider ls``."""

    node_id: str
    name: str
    wallet: str
    hardware: Hardware
    gpu_price: int
    cpu_price: int
    status: str
    healthy: bool
    load: float
    inflight: int
    replicas: int
    success_rate: float
    mean_latency_s: float
    calls: int
    earned: int
    last_seen_s: float
    attested: bool | None
    functions: dict[str, int] = field(default_factory=dict)  # replicas per function on the node
    ray_node_id: str | None = None  # its Ray node, once the gateway has seen it alive in ray.nodes()
    excluded: str | None = None  # why placement skips it (claims its Ray node contradicts), shown by `ls`

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("hardware", "functions")}
        d["functions"] = dict(self.functions)
        d["hardware"] = self.hardware.to_dict()
        d["gpu"] = self.hardware.label
        return d
