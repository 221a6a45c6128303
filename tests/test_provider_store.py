"""Provider nodes shared by several gateways (gateway/provider_store.py, gateway/provider_book.py), on both
backends: a node registered through gateway A is listed, placed on, heartbeats, leaves and is revoked through
gateway B; the leader alone sweeps silent nodes down; nonces, tokens and usage are shared. Incremental reads: a
refresh reads only the rows changed since the previous one, a heartbeat that changes nothing routing uses costs
the other gateways no read, a left node disappears, a row whose stamp commits out of order is not lost
(PostgreSQL), and the full read brings what incremental reads leave out."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.admission import OPEN, Admission
from cocoon_faas.gateway.db import open_database
from cocoon_faas.gateway.market_nodes import Usage
from cocoon_faas.gateway.marketplace import DOWN, DRAINING, LEFT, UP, Marketplace, Node, Requirements
from cocoon_faas.gateway.migrations import migrate, schema_version
from cocoon_faas.gateway.provider_book import ProviderBook, token_hash
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.gateway.provider_store import LOAD_STEP, PROVIDER_MIGRATIONS, ProviderStore
from cocoon_faas.gateway.store import Store
from cocoon_faas.ton.keys import PrivateKey
from tests.test_marketplace_routes import H100, signed


class Gw:
    """One gateway's provider side: its own marketplace and book over the shared database, its routes."""

    def __init__(self, db: Any, clock: list[float], leading: bool) -> None:
        self.store = Store(db)  # the wallets (approvals) the operator routes use
        self.market = Marketplace(heartbeat_interval=1.0, clock=lambda: clock[0])
        self.events: list[tuple[str, str]] = []
        self.market.subscribe(lambda e: self.events.append((e.kind, e.node.node_id)))
        self.leading = leading
        self.book = ProviderBook(self.market, ProviderStore(db), leading=lambda: self.leading,
                                 clock=lambda: clock[0])
        admission = Admission(OPEN, status_of=self.store.wallet_status, max_price=10**10)
        self.http = TestClient(Starlette(routes=provider_routes(
            self.book, ray_address="127.0.0.1:6379", wallets=lambda: self.store, admission=admission,
            is_operator=lambda r: r.headers.get("x-operator") == "yes")))

    def refresh(self, full: bool = False) -> None:
        asyncio.run(self.book.refresh(full))

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
    a.refresh(full=True)  # the totals are not stamped (not routed on): full reads bring them
    b.refresh(full=True)
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
    assert s.sweep(silent_before=50.0, expired_before=0.0, keep=lambda nid: False) == []
    assert s.sweep(silent_before=101.0, expired_before=0.0, keep=lambda nid: False) == ["n1"]
    assert s.record("n1").status == DOWN  # type: ignore[union-attr]
    s.sweep(silent_before=0.0, expired_before=200.0, keep={"n1"}.__contains__)  # still holds replicas: kept
    assert s.record("n1") is not None
    s.sweep(silent_before=0.0, expired_before=200.0, keep=lambda nid: False)
    assert s.record("n1") is None
    # the marketplace forgets it at the next refresh
    market = Marketplace(heartbeat_interval=1.0)
    market.register(node)
    book = ProviderBook(market, s)
    asyncio.run(book.refresh())
    assert market.listing() == []


# -- incremental reads ---------------------------------------------------------------------------------------

def node(i: int) -> Node:
    return Node(f"n{i}", f"EQw{i}", "00" * 32, H100, 100 + i, 1, f"box{i}")


def ids(records: list[Any]) -> list[str]:
    return [r.node.node_id for r in records]


def test_a_read_returns_only_the_rows_changed_since_the_last(database: Any) -> None:
    writer, reader = ProviderStore(database()), ProviderStore(database())
    for i in range(5):
        writer.register(node(i), f"0:{i}", token_hash(f"t{i}"), None, 100.0)
    recs, full = reader.changes()
    assert full and ids(recs) == [f"n{i}" for i in range(5)]
    assert reader.changes() == ([], False)  # nothing changed

    writer.leave("n1", token_hash("t1"))
    writer.mark("n3", 100.0, DOWN, True)
    recs, full = reader.changes()
    assert not full and [(r.node.node_id, r.status) for r in recs] == [("n1", DRAINING), ("n3", DOWN)]

    # heartbeats: the time alone is not stamped; a revival or a load step is
    writer.heartbeat("n0", token_hash("t0"), 0.1, 105.0)
    writer.heartbeat("n2", token_hash("t2"), LOAD_STEP / 2, 105.0)
    assert reader.changes() == ([], False)
    writer.heartbeat("n2", token_hash("t2"), LOAD_STEP + 0.01, 106.0)  # LOAD_STEP from the last one stamped
    writer.heartbeat("n3", token_hash("t3"), 0.0, 106.0)  # down -> up
    recs, _ = reader.changes()
    assert [(r.node.node_id, r.status, r.utilisation) for r in recs] == [("n2", UP, LOAD_STEP + 0.01),
                                                                        ("n3", UP, 0.0)]
    writer.add_usage([("n4", Usage(3, 30, ok=3, latency_s=0.3))])  # totals are not stamped either …
    assert reader.changes() == ([], False)
    writer.add_usage([("n1", Usage(3, 0, ok=0, latency_s=3.0))])  # … failures that move the success rate are
    recs, _ = reader.changes()
    assert [(r.node.node_id, r.success, r.mean_latency) for r in recs] == [("n1", 2 / 5, 1.0)]

    recs, full = reader.changes(full=True)  # the full read brings what was left out
    by_id = {r.node.node_id: r for r in recs}
    assert full and by_id["n0"].last_seen == 105.0 and by_id["n0"].utilisation == 0.1
    assert (by_id["n4"].calls, by_id["n4"].earned) == (3, 30)

    writer.revoke_wallet("0:4")
    writer.register(node(5), "0:5", token_hash("t5"), None, 107.0)
    down = writer.sweep(silent_before=106.5, expired_before=0.0, keep=lambda nid: False)
    assert sorted(down) == ["n0", "n1", "n2", "n3"]
    recs, _ = reader.changes()
    assert [(r.node.node_id, r.status) for r in recs] == [("n0", DOWN), ("n1", LEFT), ("n2", DOWN),
                                                          ("n3", DOWN), ("n4", DOWN), ("n5", UP)]


def test_rows_from_before_the_stamps_are_read_then_followed(database: Any) -> None:
    db = database()
    migrate(db, "providers", PROVIDER_MIGRATIONS[:1])  # a database of the release before the stamps
    db.execute("INSERT INTO provider_nodes (node_id, wallet, wallet_key, public_key, name, hardware, gpu_price, "
               "cpu_price, status, registered, last_seen, token_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
               ("old", "EQw", "0:9", "00" * 32, "box", json.dumps(H100.to_dict()), 5, 1, UP, 1.0, 1.0,
                token_hash("t")))
    store = ProviderStore(db)  # migrates
    assert schema_version(db, "providers") == len(PROVIDER_MIGRATIONS)
    recs, full = store.changes()
    assert full and [(r.node.node_id, r.node.hardware) for r in recs] == [("old", H100)]
    assert store.changes() == ([], False)
    ProviderStore(database()).leave("old", token_hash("t"))  # through another gateway
    assert [(r.node.node_id, r.status) for r in store.changes()[0]] == [("old", DRAINING)]


def test_a_change_through_one_gateway_is_in_the_others_next_incremental_read(pair: Any) -> None:
    a, b, clock = pair
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    nid, token = r.json()["node_id"], r.json()["token"]
    auth = {"authorization": f"Bearer {token}"}
    b.refresh()  # B's first read is a full one
    assert b.status(nid) == UP
    b.book.full_every = 3600.0  # from here on B reads incrementally only (the cadence is checked below)

    # a heartbeat through A that changes nothing routing uses: B does not re-read the row, yet keeps routing
    # to the node well past 3 heartbeat intervals, since the store still lists it up
    for _ in range(5):
        clock[0] += 1.0
        assert a.http.post(f"/v1/providers/{nid}/heartbeat", json={"load": 0.1}, headers=auth).status_code == 200
        b.refresh()
    assert b.market.view(nid).last_seen_s == 5.0  # B's copy of the heartbeat time is from its full read …
    assert a.market.view(nid).last_seen_s == 0.0
    assert b.market.routable(nid) and b.market.place(Requirements.parse("H100:1")).node_id == nid  # … yet

    # it goes silent: B keeps it only until the leader marks it down in the store
    clock[0] += 3.5
    b.refresh()
    assert b.market.routable(nid)
    a.refresh()  # the leader sweeps
    assert a.status(nid) == DOWN
    b.refresh()
    assert b.status(nid) == DOWN and not b.market.routable(nid) and ("down", nid) in b.events

    # it comes back through A, then leaves through B; the leader ends the drain; A and B see every step
    assert a.http.post(f"/v1/providers/{nid}/heartbeat", json={}, headers=auth).json()["status"] == UP
    b.refresh()
    assert b.market.routable(nid) and ("up", nid) in b.events
    assert b.http.post(f"/v1/providers/{nid}/leave", headers=auth).json()["status"] == DRAINING
    a.refresh()
    assert a.status(nid) == LEFT  # nothing on it: the leader ends the drain and stores it at its next refresh
    a.refresh()
    b.refresh()
    assert b.status(nid) == LEFT and ("left", nid) in b.events
    assert b.http.get("/v1/providers").json()["providers"] == []  # the left node disappears from B's listing


def test_without_a_leader_a_silent_node_is_dropped_within_the_full_read_bound(pair: Any) -> None:
    a, b, clock = pair
    a.leading = False  # nobody sweeps
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    nid = r.json()["node_id"]
    b.refresh()
    b.book.full_every = 10.0  # (whether a refresh below is full or not, the row is the same)
    limit = 3 * b.market.heartbeat_interval + b.book.full_every + 2 * b.book.interval
    clock[0] += limit - 0.5
    b.refresh()
    assert b.market.routable(nid)  # vouched for by the store, within the bound
    clock[0] += 1.0
    b.refresh()
    assert not b.market.routable(nid)  # its last heartbeat is too old to vouch for
    b.refresh(full=True)
    assert not b.market.routable(nid) and b.status(nid) == UP  # still up in the store: no leader swept it
    b.market.vouch(age=b.market.heartbeat_interval * 3 + 1, slack=1e9)
    assert not b.market.routable(nid)  # a store read older than 3 intervals vouches for nothing


def test_the_full_read_forgets_expired_rows_and_runs_on_its_cadence(pair: Any) -> None:
    a, b, clock = pair
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    nid = r.json()["node_id"]
    b.refresh()
    b.book.full_every = 3600.0
    clock[0] += 3 * a.market.heartbeat_interval + 1
    a.refresh()  # down
    b.refresh()
    assert b.status(nid) == DOWN
    clock[0] += a.market.expiry_s + 1
    a.refresh()  # expired: the leader deletes the row
    assert a.book.store.record(nid) is None
    b.refresh()
    assert b.market.knows(nid)  # a deletion is not in an incremental read …
    b.book.full_every = 0.0
    b.refresh()  # … the full read, on its cadence, forgets the node
    assert not b.market.knows(nid)
    # a row changed behind the stamps' back (an operator's hand edit) is also righted by the full read
    r = a.http.post("/v1/providers", json=signed(PrivateKey.generate()))
    other = r.json()["node_id"]
    b.refresh()
    a.book.store.db.execute("UPDATE provider_nodes SET gpu_price=? WHERE node_id=?", (7, other))
    b.book.full_every = 3600.0
    b.refresh()
    assert b.market.node(other).gpu_price == 500_000
    b.refresh(full=True)
    assert b.market.node(other).gpu_price == 7


def test_a_node_failing_on_one_gateway_is_demoted_on_all(pair: Any) -> None:
    a, b, clock = pair
    keys = [PrivateKey.generate() for _ in range(2)]
    bad, good = (a.http.post("/v1/providers", json=signed(k, name=n)).json()["node_id"]
                 for k, n in zip(keys, ("bad", "good"), strict=True))
    req = Requirements.parse("H100:1")
    for g in (a, b):
        g.refresh()
        for nid in (bad, good):
            g.market.assign("f", nid, req)
    for _ in range(20):  # its calls fail on A
        a.market.record_result(bad, False, 0.5)
        a.market.record_result(good, True, 0.01)
    store = a.book.store
    assert store.record(bad).rep_calls == 0  # type: ignore[union-attr]  # no write per call …
    a.refresh()  # … one batch per refresh
    shared = store.record(bad)
    assert shared is not None and (shared.rep_calls, shared.rep_ok, shared.calls) == (20, 0, 20)
    b.refresh()  # an incremental read: the success rate moved, so the row was stamped
    assert b.market.view(bad).success_rate == round(2 / 22, 4) and b.market.view(bad).mean_latency_s == 0.5
    assert {b.market.route("f") for _ in range(10)} == {good}  # B has seen no failure itself
    assert b.market.view(good).success_rate == 1.0

    for _ in range(200):  # it recovers, on B this time: the older outcomes fade (about the last 100 calls count)
        b.market.record_result(bad, True, 0.01)
    b.refresh()
    a.refresh()
    view = a.market.view(bad)
    assert 0.95 < view.success_rate < 1.0 and view.mean_latency_s < 0.05
    # joining again does not wash a reputation away
    for _ in range(50):
        a.market.record_result(good, False, 0.5)
    a.refresh()
    assert a.market.view(good).success_rate < 0.5
    assert a.http.post("/v1/providers", json=signed(keys[1], name="good")).status_code == 201
    b.refresh()
    assert b.market.view(good).success_rate == a.market.view(good).success_rate < 0.5


def test_a_stamp_that_commits_after_a_higher_one_is_not_lost(pg_cluster: Any) -> None:
    """PostgreSQL hands out transaction ids (the stamps) in one order and commits them in another: a mark by
    one gateway holds a low stamp while it waits for a row lock, a registration with a higher stamp commits
    first, a reader reads in between. The low one must still reach the reader."""
    import psycopg

    url = pg_cluster.new_database()
    dbs = [open_database(url) for _ in range(3)]
    try:
        slow, fast, reader = (ProviderStore(db) for db in dbs)
        slow.register(node(1), "0:1", token_hash("t1"), None, 100.0)
        assert ids(reader.changes()[0]) == ["n1"]

        with psycopg.connect(url) as blocker:  # holds n1's row lock, so the mark waits inside its UPDATE
            blocker.execute("SELECT 1 FROM provider_nodes WHERE node_id='n1' FOR UPDATE")
            done: list[bool] = []
            t = threading.Thread(target=lambda: done.append(slow.mark("n1", 100.0, DOWN, True)))
            t.start()
            with psycopg.connect(url, autocommit=True) as watch:  # wait until it has its stamp and is blocked
                deadline = time.monotonic() + 30
                while not watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock' "
                                        "AND query LIKE 'UPDATE provider_nodes SET status=%'").fetchone()[0]:
                    assert time.monotonic() < deadline, "the mark never reached the row lock"
                    time.sleep(0.02)
            fast.register(node(2), "0:2", token_hash("t2"), None, 101.0)  # a higher stamp, committed first
            recs, _ = reader.changes()
            assert ids(recs) == ["n2"]  # n1's change is not committed yet
            blocker.rollback()  # let the mark go on and commit
            t.join(30)
        assert done == [True]
        stamps = dict(dbs[0].query("SELECT node_id, ver FROM provider_nodes"))
        assert stamps["n1"] < stamps["n2"]  # the race happened: "above the last stamp read" would skip n1
        recs, full = reader.changes()  # (n2 again too: stamps above the watermark are read twice, never lost)
        assert not full and ("n1", DOWN) in [(r.node.node_id, r.status) for r in recs]
    finally:
        for db in dbs:
            db.close()
