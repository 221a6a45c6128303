"""Matching, placement, routing, reputation, health and earnings of the provider marketplace (pure core)."""

from __future__ import annotations

import random

import pytest

from cocoon_faas.errors import InvalidRequestError, NoCapacityError, NotFoundError
from cocoon_faas.gateway.marketplace import (
    DOWN,
    DRAINING,
    LEFT,
    UP,
    MarketEvent,
    Marketplace,
    Node,
    Requirements,
    ton_to_nanoton,
)
from cocoon_faas.runtime.hardware import GIB, Hardware


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def hw(model: str | None, count: int = 1, gb: int = 80, cpus: int = 16, mem_gb: int = 64) -> Hardware:
    return Hardware("declared", model, count if model else 0, gb * GIB if model else 0, None, cpus, mem_gb * GIB)


def node(nid: str, model: str | None, count: int = 1, gb: int = 80, price: int = 1000, cpu_price: int = 0,
         **kw: int) -> Node:
    return Node(nid, f"EQ{nid}", "00" * 32, hw(model, count, gb, **kw), price, cpu_price, name=nid)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def market(clock: Clock) -> Marketplace:
    return Marketplace(heartbeat_interval=1.0, clock=clock, rng=random.Random(7))


def test_requirements_parse_forms() -> None:
    assert Requirements.parse("H100") == Requirements("H100", 1, 0)
    assert Requirements.parse("A100-80GB:2") == Requirements("A100", 2, 80)
    assert Requirements.parse("any") == Requirements(None, 1, 0)
    assert Requirements.parse("any:4").gpu_count == 4
    assert Requirements.parse(None, cpus=2).label == "cpu x2"
    assert Requirements.parse("nvidia h100:2").label == "gpu:H100 x2"
    with pytest.raises(InvalidRequestError, match="count must be an integer"):
        Requirements.parse("H100:two")
    with pytest.raises(InvalidRequestError, match=">= 1"):
        Requirements.parse("H100:0")


def test_requirements_from_spec_duck_typed() -> None:
    class Gpu:
        model, count = "A100-80GB", 2

    class Spec:
        gpu, cpu, memory = Gpu(), 4.0, 8 * GIB

    assert Requirements.from_spec(Spec()) == Requirements("A100", 2, 80, 4.0, 8 * GIB)

    class CpuSpec:
        gpu, cpu, memory = None, 1.0, 0

    assert Requirements.from_spec(CpuSpec()).gpu_count == 0


def test_ton_prices_are_exact_nanoton() -> None:
    assert ton_to_nanoton("0.0005") == 500_000
    assert ton_to_nanoton("1") == 1_000_000_000
    assert ton_to_nanoton("0.000000001") == 1
    with pytest.raises(InvalidRequestError):
        ton_to_nanoton("-1")
    with pytest.raises(InvalidRequestError):
        ton_to_nanoton("cheap")


def test_eligibility_follows_model_size_count_and_host(market: Marketplace) -> None:
    market.register(node("h1", "H100", 1))
    market.register(node("h2", "H100", 2))
    market.register(node("a40", "A100", 1, gb=40))
    market.register(node("a80", "A100", 2, gb=80))
    market.register(node("cpu", None, cpus=4, mem_gb=8))

    def ids(req: Requirements) -> set[str]:
        return {n.node_id for n in market.eligible(req)}

    assert ids(Requirements.parse("H100")) == {"h1", "h2"}
    assert ids(Requirements.parse("H100:2")) == {"h2"}
    assert ids(Requirements.parse("A100")) == {"a40", "a80"}
    assert ids(Requirements.parse("A100-80GB")) == {"a80"}
    assert ids(Requirements.parse("A100-80GB:2")) == {"a80"}
    assert ids(Requirements.parse("any:2")) == {"h2", "a80"}
    assert ids(Requirements.parse(None, cpus=8)) == {"h1", "h2", "a40", "a80"}  # the CPU box has 4
    assert ids(Requirements.parse(None, cpus=1, memory=32 * GIB)) == {"h1", "h2", "a40", "a80"}
    assert ids(Requirements.parse(None, cpus=1)) == {"h1", "h2", "a40", "a80", "cpu"}


def test_place_prefers_price_then_respects_max_price(market: Marketplace) -> None:
    market.register(node("dear", "H100", price=3000))
    market.register(node("cheap", "H100", price=1000))
    market.register(node("mid", "H100", price=2000))
    req = Requirements.parse("H100")
    assert market.place(req).node_id == "cheap"
    assert [n.node_id for n in market.eligible(req)] == ["cheap", "mid", "dear"]
    assert market.place(req, exclude=["cheap"]).node_id == "mid"
    with pytest.raises(NoCapacityError, match="max_price 500 nanoton/s .cheapest: 1000") as ei:
        market.place(req, max_price=500)
    assert ei.value.status == 503 and ei.value.details["missing"] == "gpu:H100 x1"


def test_rate_and_charge_count_gpus_and_cpus() -> None:
    n = node("x", "H100", 4, price=1000, cpu_price=10)
    req = Requirements.parse("H100:2", cpus=3)
    assert n.rate(req) == 2 * 1000 + 3 * 10
    assert n.charge(req, 1_500_000_000) == 2030 * 3 // 2
    assert n.charge(req, 0) == 0


def test_no_capacity_names_missing_resource_inventory_and_fix(market: Marketplace) -> None:
    market.register(node("a", "A100", 1))
    market.register(node("c1", None))
    market.register(node("c2", None))
    with pytest.raises(NoCapacityError) as ei:
        market.place(Requirements.parse("H100:2"))
    msg = str(ei.value)
    assert "no provider offers gpu:H100 x2" in msg
    assert "A100 x1" in msg and "CPU-only x2" in msg
    assert "cocoon provider join --gpus H100:2" in msg


def test_load_and_reputation_shift_placement(market: Marketplace, clock: Clock) -> None:
    market.register(node("a", "H100", price=1000))
    market.register(node("b", "H100", price=1100))
    req = Requirements.parse("H100")
    assert market.place(req).node_id == "a"
    market.heartbeat("a", load=0.9)  # busy: a 10 % cheaper node is not worth waiting for
    assert market.place(req).node_id == "b"
    market.heartbeat("a", load=0.0)
    assert market.place(req).node_id == "a"
    for _ in range(10):
        market.record_result("a", ok=False, latency_s=0.1)
        market.record_result("b", ok=True, latency_s=0.1)
    assert market.place(req).node_id == "b"
    view = market.view("a")
    assert view.calls == 10 and view.success_rate == pytest.approx(2 / 12, abs=1e-3)


def test_reputation_window_forgets_old_failures(clock: Clock) -> None:
    market = Marketplace(heartbeat_interval=1.0, window=5, clock=clock)
    market.register(node("a", "H100"))
    for _ in range(5):
        market.record_result("a", ok=False, latency_s=2.0)
    assert market.view("a").success_rate == pytest.approx(2 / 7, abs=1e-3)
    for _ in range(5):
        market.record_result("a", ok=True, latency_s=0.5)
    assert market.view("a").success_rate == 1.0
    assert market.view("a").mean_latency_s == pytest.approx(0.5)


def test_capacity_is_reserved_by_assign(market: Marketplace) -> None:
    market.register(node("h", "H100", 2))
    req = Requirements.parse("H100")
    market.assign("f", market.place(req).node_id, req)
    market.assign("g", market.place(req).node_id, req)
    with pytest.raises(NoCapacityError, match="full"):
        market.place(req)
    market.unassign("f", "h")
    assert market.place(req).node_id == "h"
    assert market.replicas_on("h") == {"g": 1}


def test_silent_node_is_unroutable_at_once_then_swept_down(market: Marketplace, clock: Clock) -> None:
    events: list[MarketEvent] = []
    market.subscribe(events.append)
    market.register(node("a", "H100", 2, price=1000))
    market.register(node("b", "H100", 2, price=2000))
    req = Requirements.parse("H100")
    market.assign("f", "a", req)
    market.assign("f", "b", req)
    clock.t += 2.5
    market.heartbeat("b")
    assert market.routable("a")
    clock.t += 1.0  # a: 3.5 s silent > 3 x 1 s
    assert not market.routable("a") and market.routable("b")
    assert {market.route("f") for _ in range(50)} == {"b"}  # no call goes to a before any sweep
    assert market.place(req).node_id == "b"
    assert market.sweep() == ["a"]
    assert market.status("a") == DOWN
    assert [(e.kind, e.node.node_id) for e in events][-1] == ("down", "a")
    assert market.replicas_on("a") == {"f": 1}  # the controller replaces these
    market.heartbeat("a")
    assert market.status("a") == UP and events[-1].kind == "up"


def test_route_spreads_over_replicas_by_load(market: Marketplace) -> None:
    for nid in "abcd":
        market.register(node(nid, "H100"))
        market.assign("f", nid, Requirements.parse("H100"))
    counts = {nid: 0 for nid in "abcd"}
    for _ in range(2000):
        counts[market.route("f")] += 1
    assert all(c > 300 for c in counts.values()), counts
    market.heartbeat("a", load=5.0)
    picks = [market.route("f") for _ in range(2000)]
    assert picks.count("a") < 50  # two choices: a loaded replica only wins when both picks are it... never
    with pytest.raises(NoCapacityError, match="no replica"):
        market.route("missing")
    for nid in "abcd":
        market.mark_down(nid, "test")
    with pytest.raises(NoCapacityError, match="down"):
        market.route("f")


def test_route_respects_max_price_and_exclude(market: Marketplace) -> None:
    market.register(node("cheap", "H100", price=100))
    market.register(node("dear", "H100", price=900))
    req = Requirements.parse("H100")
    market.assign("f", "cheap", req)
    market.assign("f", "dear", req)
    assert {market.route("f", max_price=500) for _ in range(30)} == {"cheap"}
    assert {market.route("f", exclude=["cheap"]) for _ in range(30)} == {"dear"}


def test_leave_drains_then_leaves_when_empty(market: Marketplace) -> None:
    events: list[str] = []
    market.subscribe(lambda e: events.append(f"{e.kind}:{e.node.node_id}"))
    market.register(node("a", "H100"))
    market.register(node("b", "H100"))
    req = Requirements.parse("H100")
    market.assign("f", "a", req)
    market.call_started("a")
    assert market.leave("a") == DRAINING
    assert market.place(req).node_id == "b"  # no new replicas on a draining node
    market.assign("f", "b", req)
    market.unassign("f", "a")
    assert market.status("a") == DRAINING  # one call still in flight
    market.record_result("a", ok=True, latency_s=0.2, finished=True)
    assert market.status("a") == LEFT
    assert events == ["joined:a", "joined:b", "draining:a", "left:a"]
    assert [v.node_id for v in market.listing()] == ["b"]
    assert market.heartbeat("a") == LEFT  # the agent stops on this
    with pytest.raises(NotFoundError, match="join"):
        market.heartbeat("never-joined")


def test_attestation_failure_excludes_from_confidential_only(market: Marketplace) -> None:
    market.register(node("a", "H100", price=100))
    market.register(node("b", "H100", price=200))
    market.set_attestation("a", False)
    assert market.place(Requirements.parse("H100", confidential=True)).node_id == "b"
    assert market.place(Requirements.parse("H100")).node_id == "a"


def test_earnings_accumulate_per_provider(market: Marketplace) -> None:
    market.register(node("a", "H100", 2, price=ton_to_nanoton("0.0005")))
    req = Requirements.parse("H100:2")
    assert market.credit("a", req, 2_000_000_000) == 2 * 2 * 500_000
    assert market.credit("a", req, 500_000_000) == 500_000
    assert market.earnings("a") == 2_500_000
    assert market.view("a").to_dict()["earned"] == 2_500_000


def test_sync_ray_nodes_marks_dead_raylets_down(market: Marketplace) -> None:
    market.register(node("a", "H100"))
    market.register(node("b", "A100"))
    alive = [
        {"NodeID": "ra", "Alive": True, "Resources": {"cocoon-node:a": 1000.0, "gpu:H100": 1.0}},
        {"NodeID": "rb", "Alive": True, "Resources": {"cocoon-node:b": 1000.0}},
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 1.0}},
    ]
    assert market.sync_ray_nodes(alive) == []
    # Ray lists a dead node without its resources; a vanished one not at all
    dead = market.sync_ray_nodes([{"NodeID": "ra", "Alive": False, "Resources": {}}, alive[2]])
    assert sorted(dead) == ["a", "b"]
    assert market.status("a") == DOWN and market.status("b") == DOWN
    assert market.heartbeat("a") == DOWN  # its agent still talks, but only a new join brings a new Ray node
    market.register(node("a", "H100"))
    assert market.status("a") == UP


def test_reregistration_keeps_counters(market: Marketplace) -> None:
    market.register(node("a", "H100", price=100))
    market.credit("a", Requirements.parse("H100"), 1_000_000_000)
    market.register(node("a", "H100", price=200))
    assert market.earnings("a") == 100 and market.node("a").gpu_price == 200


def test_subscriber_errors_do_not_break_membership(market: Marketplace) -> None:
    def boom(_: MarketEvent) -> None:
        raise RuntimeError("bug")

    market.subscribe(boom)
    market.register(node("a", "H100"))
    assert market.status("a") == UP


def test_node_that_just_lost_a_replica_is_placed_on_last(market: Marketplace, clock: Clock) -> None:
    """A killed raylet takes its workers before its heartbeats stop: a replacement must not go back there."""
    market.register(node("cheap", "H100", price=1000))
    market.register(node("dear", "H100", price=3000))
    req = Requirements.parse("H100")
    market.assign("f", "cheap", req)
    market.unassign("f", "cheap")
    market.replica_lost("cheap")
    assert market.place(req).node_id == "dear"
    market.assign("g", "dear", req)  # the only other node is full: the suspect one is still used
    assert market.place(req).node_id == "cheap"
    market.unassign("g", "dear")
    clock.t += 3.1  # 3 heartbeat intervals later it would have been swept down had it died
    market.heartbeat("cheap")
    market.heartbeat("dear")
    assert market.place(req).node_id == "cheap"


def test_view_lists_functions_and_ray_node(market: Marketplace) -> None:
    market.register(node("a", "H100", 2))
    req = Requirements.parse("H100")
    market.assign("f", "a", req)
    market.assign("f", "a", req)
    assert market.view("a").to_dict()["functions"] == {"f": 2}
    assert market.view("a").ray_node_id is None
    market.sync_ray_nodes([{"Alive": True, "NodeID": "ray1", "Resources": {"cocoon-node:a": 1000.0}}])
    assert market.view("a").to_dict()["ray_node_id"] == "ray1"
