"""The holds sweeper against a real ledger: stale holds are released once, fresh and settled ones untouched."""

from __future__ import annotations

import time

from cocoon_faas.gateway.holds_sweeper import stale_holds, sweep_once
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.ton.keys import PrivateKey


def _held(ledger: Ledger, call_id: str, function: str, created: float, status: str = "held") -> None:
    with ledger.transaction() as db:
        db.execute("INSERT INTO pay_calls (call_id, channel_id, seqno, function, hold, status, created_at) "
                   "VALUES (?,?,?,?,?,?,?)", (call_id, 7, int(created), function, 1000, status, created))


def test_sweeper_releases_only_holds_past_limit_plus_grace(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    gate = PaymentGate(ledger, PrivateKey.generate())
    now = time.time()
    _held(ledger, "old", "slow", now - 200)       # limit 100 + grace 60 < 200: stale
    _held(ledger, "young", "slow", now - 150)     # within limit + grace
    _held(ledger, "gone", "deleted", now - 5000)  # unknown function: the default limit
    _held(ledger, "done", "slow", now - 9999, status="released")
    limits = {"slow": 100.0}

    def limit_for(fn: str) -> float:
        return limits.get(fn, 3600.0)

    assert [s.hold.call_id for s in stale_holds(gate, now, limit_for, 60.0)] == ["old", "gone"]
    released = sweep_once(gate, limit_for, 60.0, now=now)
    assert sorted(s.hold.call_id for s in released) == ["gone", "old"]
    status = dict(ledger.query("SELECT call_id, status FROM pay_calls"))
    assert status == {"old": "released", "young": "held", "gone": "released", "done": "released"}
    assert sweep_once(gate, limit_for, 60.0, now=now) == []  # nothing twice
    assert ledger.reserved(7) == 1000  # only the young hold still reserves credit
