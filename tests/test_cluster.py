"""Gateways on one database (both backends): liveness, leader election and takeover, money across gateways."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cocoon_faas.errors import ConflictError, PaymentError, PaymentRequiredError
from cocoon_faas.gateway.cluster import Cluster
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import FeePolicy, PaymentGate
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey

OP = PrivateKey(b"\x07" * 32)
CALLER = PrivateKey(b"\x08" * 32)


def test_leader_is_unique_and_moves_on_close(database):
    a, b = Cluster(database(), "gw-a"), Cluster(database(), "gw-b")
    assert a.try_lead() and not b.try_lead()
    a.beat({"f": {"demand": 3}})
    b.beat({"f": {"demand": 4}, "g": {"demand": 1}})
    assert a.demand() == {"f": 7, "g": 1}
    assert {g.id for g in b.alive()} == {"gw-a", "gw-b"} and not b.is_dead("gw-a")
    assert [g.leader for g in b.gateways() if g.id == "gw-a"] == [True]
    a.close()
    assert b.is_dead("gw-a") and b.try_lead()  # a clean exit hands over at once
    assert [g.id for g in b.alive()] == ["gw-b"]
    b.close()


_HOLDER = r"""
import sys, time
from pathlib import Path
from cocoon_faas.gateway.db import open_database
from cocoon_faas.gateway.cluster import Cluster
where = sys.argv[1]
db = open_database(Path(where) if not where.startswith("postgresql://") else where)
c = Cluster(db, "gw-killed", lease_s=3600)
assert c.try_lead()
c.beat()
print("leading", flush=True)
time.sleep(600)
"""


def test_sigkilled_leader_is_detected_dead_and_replaced_at_once(database, tmp_path: Path):
    db = database()
    where = str(getattr(db, "path", None) or db.url)  # type: ignore[attr-defined]
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, where], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"
        me = Cluster(db, "gw-survivor", lease_s=3600)  # a long lease: only the lock can tell it died
        assert not me.try_lead() and not me.is_dead("gw-killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(100):  # PostgreSQL notices the closed connection within moments
            if me.try_lead():
                break
            threading.Event().wait(0.05)
        assert me.is_leader and me.is_dead("gw-killed")
        assert me.forget_dead() == ["gw-killed"]
        me.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gateways(database, tmp_path: Path, deposit: int, n: int = 2):
    gates = []
    for i in range(n):
        ledger = Ledger(database(), home=tmp_path)
        if i == 0:
            ledger.add_channel(1, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "alice", deposit)
        gates.append(PaymentGate(ledger, OP, FeePolicy(bps=1000), gateway_id=f"gw-{i}", lease_s=60))
    return gates


def test_concurrent_holds_never_overcommit_or_reuse_a_seqno(database, tmp_path: Path):
    """Two gateways, four threads each, one channel: each state's `sent` covers 10 holds' worth, so only what
    the deposit allows is ever held at once; a seqno is accepted by exactly one gateway."""
    cost, deposit = 1000, 10_000
    a, b = _gateways(database, tmp_path, deposit)
    signer = ChannelSigner(tmp_path / "caller.json", CALLER, 1, deposit)
    tickets = []
    for _ in range(40):  # each state offers the whole deposit: only the gateways' holds bound what is used
        t = signer.sign_for_call(deposit)
        signer.complete(t, 0)
        tickets.append(t)
    outcome: dict[str, list[object]] = {"held": [], "refused": [], "replayed": []}
    lock = threading.Lock()

    def work(gate: PaymentGate, mine: list[tuple[int, object]]) -> None:
        for i, t in mine:
            try:
                h = gate.authorize(t.header, f"c{i}-{gate.gateway_id}", "f", cost)
                with lock:
                    outcome["held"].append(h)
            except PaymentRequiredError:
                with lock:
                    outcome["refused"].append(i)
            except PaymentError as exc:
                with lock:
                    outcome["replayed" if exc.to_dict()["error"].get("problem") == "replayed" else "refused"].append(i)

    # every ticket is offered to both gateways (a client retrying on the other one): at most one accepts it
    jobs = list(enumerate(tickets))
    threads = [threading.Thread(target=work, args=(g, jobs[k::4])) for g in (a, b) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = outcome["held"]
    seqnos = [h.seqno for h in held]  # type: ignore[attr-defined]
    assert len(seqnos) == len(set(seqnos)), "a seqno was accepted twice"
    assert len(held) == deposit // cost  # exactly the deposit's worth is held, never more
    ch = a.ledger.channel(1)
    assert a.ledger.reserved(1) == len(held) * cost <= ch.deposit
    assert outcome["replayed"] or outcome["refused"]
    for h in held:  # settled on whichever gateway: each charged once
        (a if h.call_id.endswith("gw-0") else b).settle(h, "prov", 500, "dev", 100)  # type: ignore[attr-defined]
    with pytest.raises(ConflictError):
        b.settle(held[0], "prov", 1, "dev", 0)  # type: ignore[arg-type]
    report = b.ledger.verify()
    assert report["ok"], report["problems"]
    assert report["charges"] == len(held) and b.ledger.reserved(1) == 0


def test_dead_gateways_holds_are_released_by_another(database, tmp_path: Path):
    a, b = _gateways(database, tmp_path, 10**9)
    signer = ChannelSigner(tmp_path / "caller.json", CALLER, 1, 10**9)
    h_a = a.authorize(signer.sign_for_call(5000).header, "on-a", "f", 5000)
    h_b = b.authorize(signer.sign_for_call(5000).header, "on-b", "f", 5000)
    alive = {"gw-0": True, "gw-1": True}
    assert b.release_orphans(lambda g: not alive[g]) == 0  # a live gateway's hold is left alone
    alive["gw-0"] = False
    assert b.release_orphans(lambda g: not alive[g]) == 1  # ... a dead one's is released, not charged
    assert b.ledger.call("on-a")["status"] == "released"
    with pytest.raises(ConflictError):
        a.settle(h_a, "prov", 1, "dev", 0)  # the dead gateway coming back cannot charge it any more
    assert b.settle(h_b, "prov", 100, "dev", 0) > 0
    # an expired lease is released without asking about liveness
    h_c = a.authorize(signer.sign_for_call(5000).header, "lease", "f", 5000)
    a.ledger.db.execute("UPDATE pay_calls SET lease_until=? WHERE call_id=?", (1.0, h_c.call_id))
    assert b.release_orphans() == 1
    a.renew_leases()  # renewing touches only this gateway's own open holds
    report = b.ledger.verify()
    assert report["ok"], report["problems"]
    assert b.ledger.reserved(1) == 0


def test_cancel_requested_on_one_gateway_reaches_the_owner(database):
    from cocoon_faas.gateway.store import Store

    a, b = Store(database(), "gw-a"), Store(database(), "gw-b")
    a.record_call("x", "f", 1, "running", 1.0, None, None, None, None, "d", durable=True)
    assert b.request_cancel("x") and a.cancel_requests(["x"]) == ["x"]
    a.close()
    b.close()


def test_credit_held_by_a_dead_gateway_is_freed_for_the_next_call(database, tmp_path: Path):
    a, b = _gateways(database, tmp_path, 10_000)
    signer = ChannelSigner(tmp_path / "caller.json", CALLER, 1, 10_000)
    t = signer.sign_for_call(10_000)
    a.authorize(t.header, "stuck-on-a", "f", 10_000)  # the whole deposit held by A, which then dies
    signer.complete(t, 0)
    t2 = signer.sign_for_call(10_000)
    with pytest.raises(PaymentRequiredError):
        b.authorize(t2.header, "next", "f", 10_000)  # A is alive: its hold stands
    b.is_dead = lambda gw: gw == "gw-0"
    h = b.authorize(t2.header, "next", "f", 10_000)  # A is gone: its hold is released, this one fits
    assert a.ledger.call("stuck-on-a")["status"] == "released" and h.amount == 10_000
    assert b.ledger.verify()["ok"]
