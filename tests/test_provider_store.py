"""Provider nodes shared by several gateways (gateway/provider_store.py, gateway/provider_book.py), on both
backends: a node registered through gateway A is listed, placed on, heartbeats, leaves and is revoked through
gateway B; the leader alone sweeps silent nodes down; nonces, tokens and usage are shared."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.admission import OPEN, Admission
from cocoon_faas.gateway.marketplace import DOWN, DRAINING, LEFT, UP, Marketplace, Node, Requirements
from cocoon_faas.gateway.provider_book import ProviderBook
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.gateway.provider_store import ProviderStore
from cocoon_faas.gateway.store import Store
from cocoon_faas.ton.keys import PrivateKey
from tests.test_marketplace_routes import H100, signed


class Gw:
    """One gateway's provider side: its own marketplace and book over the shared database, its routes."""

    def __init__(self, db: Any, clock: list[float], leading: bool) -> None:
        self.store = Store(db)  # the wallets (approvals) the operator routes use
        self.market = Marketplace(heartbeat_interval=1.0)
        self.events: list[tuple[str, str]] = []
        self.market.subscribe(lambda e: self.events.append((e.kind, e.node.node_id)))
        self.leading = leading
        self.book = ProviderBook(self.market, ProviderStore(db), leading=lambda: self.leading,
                                 clock=lambda: clock[0])
        admission = Admission(OPEN, status_of=self.store.wallet_status, max_price=10**10)
        self.http = TestClient(Starlette(routes=provider_routes(
            self.book, ray_address="127.0.0.1:6379", wallets=lambda: self.store, admission=admission,
            is_operator=lambda r: r.headers.get("x-operator") == "yes")))

    def refresh(self) -> None:
        asyncio.run(self.book.refresh())

    def status(self, nid: str) -> str:
        return self.market.status(nid)


@pytest.fixture
def pair(database: Any) -> Any:
    clock = [1_000_000.0]
    a, b = Gw(database(), clock, leading=True), Gw(database(), clock, leading=False)
    yield a, b, clock
    for g in (a, b):
        g.http.close()


def test_a_node_joined_on_one_gateway_is_served_and_controlled_by_another(pair: Any) -> None:
    a, b, clock = pair
    key = PrivateKey.generate()
    body = signed(key)
    r = a.http.post("/v1/providers", json=body)
    assert r.status_code == 201, r.text
    nid, token = r.json()["node_id"], r.json()["token"]
    # the same signed registration replayed to the other gateway is refused: nonces are shared
    r2 = b.http.post("/v1/providers", json=body)
    assert r2.status_code == 401 and "nonce" in r2.json()["error"]["message"]

    assert b.http.get("/v1/providers").json()["providers"] == []  # not yet refreshed: B's cache is stale
    b.refresh()
    row = b.http.get(f"/v1/providers/{nid}").json()
    assert (row["status"], row["healthy"], row["gpu"], row["gpu_price"]) == (UP, True, "H100-80GB x2", 500_000)
    assert ("joined", nid) in b.events
    assert b.market.place(Requirements.parse("H100:2")).node_id == nid  # B places on A's node

    # heartbeats through B with the token A issued; a wrong token is refused on either gateway
    auth = {"authorization": f"Bearer {token}"}
    r = b.http.post(f"/v1/providers/{nid}/heartbeat", json={"load": 0.5}, headers=auth)
    assert r.status_code == 200 and r.json()["status"] == UP
    bad = a.http.post(f"/v1/providers/{nid}/heartbeat", json={}, headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and "token" in bad.json()["error"]["message"]
    assert b.http.post("/v1/providers/ghost/heartbeat", json={}, headers=auth).status_code == 404
    a.refresh()
    assert a.http.get(f"/v1/providers/{nid}").json()["load"] == 0.5  # A sees the load reported through B

    # silence: the follower never sweeps; the leader marks it down from the shared heartbeat time
    clock[0] += 10
    b.refresh()
    assert b.status(nid) == UP
    a.refresh()
    assert a.status(nid) == DOWN and ("down", nid) in a.events
    b.refresh()
    assert b.status(nid) == DOWN and ("down", nid) in b.events
    # a heartbeat through B revives it for everyone
    assert b.http.post(f"/v1/providers/{nid}/heartbeat", json={}, headers=auth).json()["status"] == UP
    a.refresh()
    assert a.status(nid) == UP and ("up", nid) in a.events

    # the operator revokes the wallet on B: the node is down for good on A too, its session gone
    r = b.http.delete(f"/v1/providers/approvals/{row['wallet']}", headers={"x-operator": "yes"})
    assert r.status_code == 200 and r.json()["nodes_down"] == [nid]
    a.refresh()
    assert a.status(nid) == DOWN
    r = a.http.post(f"/v1/providers/{nid}/heartbeat", json={}, headers=auth)
    assert r.status_code == 401 and "join again" in r.json()["error"]["message"]
    again = a.http.post("/v1/providers", json=signed(key))  # joining again is refused on any gateway
    assert again.status_code == 403 and "revoked" in again.json()["error"]["message"]


def test_leave_through_another_gateway_drains_and_the_leader_ends_it(pair: Any) -> None:
    a, b, clock = pair
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    nid, token = r.json()["node_id"], r.json()["token"]
    req = Requirements.parse("H100:1")
    a.market.assign("f", nid, req)  # the leader placed a replica there
    b.refresh()
    r = b.http.post(f"/v1/providers/{nid}/leave", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["status"] == DRAINING
    b.refresh()
    assert b.status(nid) == DRAINING  # a follower does not end a drain by itself
    a.refresh()
    assert a.status(nid) == DRAINING and ("draining", nid) in a.events  # the replica is still there
    a.market.unassign("f", nid)  # moved: the leader ends the drain and stores it
    assert a.status(nid) == LEFT
    a.refresh()
    b.refresh()
    assert b.status(nid) == LEFT and ("left", nid) in b.events
    assert b.http.get("/v1/providers").json()["providers"] == []
    hb = b.http.post(f"/v1/providers/{nid}/heartbeat", json={}, headers={"authorization": f"Bearer {token}"})
    assert hb.json()["status"] == LEFT  # the agent stops on this


def test_usage_and_ray_deaths_are_shared(pair: Any) -> None:
    a, b, clock = pair
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    nid = r.json()["node_id"]
    b.refresh()
    req = Requirements.parse("H100:1")
    for g, n in ((a, 2), (b, 3)):
        for _ in range(n):
            g.market.record_result(nid, True, 0.01)
            g.market.credit(nid, req, 2_000_000_000)
    a.refresh()
    b.refresh()
    a.refresh()
    for g in (a, b):  # every gateway's calls and earnings, on every gateway
        view = g.market.view(nid)
        assert (view.calls, view.earned) == (5, 5 * 2 * 500_000), g
    # B sees the node's Ray node die: it is down (for good) on A too
    b.market.sync_ray_nodes([{"NodeID": "r1", "Alive": True, "Resources": {f"cocoon-node:{nid}": 1000.0,
                                                                            "GPU": 2, "CPU": 16,
                                                                            "gpu:H100": 2, "gpu:H100-80GB": 2,
                                                                            "memory": 64 * 2**30}}])
    b.market.sync_ray_nodes([{"NodeID": "r1", "Alive": False, "Resources": {}}])
    assert b.status(nid) == DOWN
    b.refresh()
    a.refresh()
    assert a.status(nid) == DOWN and not a.market.revivable(nid)


def test_records_round_trip_and_expire(database: Any) -> None:
    s = ProviderStore(database())
    node = Node("n1", "EQwallet", "00" * 32, H100, 7, 3, "box")
    rec = s.register(node, "0:abc", "h1", True, 100.0)
    assert (rec.node, rec.status, rec.registered, rec.attested, rec.revivable) == (node, UP, 100.0, True, True)
    assert s.records() == [rec]
    assert s.sweep(silent_before=50.0, expired_before=0.0, keep=()) == []
    assert s.sweep(silent_before=101.0, expired_before=0.0, keep=()) == ["n1"]
    assert s.record("n1").status == DOWN  # type: ignore[union-attr]
    s.sweep(silent_before=0.0, expired_before=200.0, keep={"n1"})  # still holds replicas: kept
    assert s.record("n1") is not None
    s.sweep(silent_before=0.0, expired_before=200.0, keep=())
    assert s.record("n1") is None
    # the marketplace forgets it at the next refresh
    market = Marketplace(heartbeat_interval=1.0)
    market.register(node)
    book = ProviderBook(market, s)
    asyncio.run(book.refresh())
    assert market.listing() == []
