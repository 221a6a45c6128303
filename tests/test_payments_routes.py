"""payment_routes: register a channel, pay, read the ledger and get the operator's close signature."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.gateway.payments_routes import payment_routes
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import CooperativeClose


def test_routes(tmp_path: Path) -> None:
    op, caller = PrivateKey.generate(), PrivateKey.generate()
    gate = PaymentGate(Ledger(tmp_path / "l.db"), op)
    client = TestClient(Starlette(routes=payment_routes(gate, op)))
    assert client.get("/v1/payments/operator").json()["public_key"] == op.public_key().hex()
    r = client.post("/v1/channels", json={"channel_id": 9, "key_a": caller.public_key().hex(), "address": "0:00",
                                          "caller": "bob", "deposit": 10**9})
    assert r.status_code == 201
    assert client.post("/v1/channels", json={"channel_id": 9}).status_code == 400
    signer = ChannelSigner(tmp_path / "c.json", caller, 9, 10**9)
    t = signer.sign_for_call(1000)
    gate.settle(gate.authorize(t.header, "c1", "f", 1000), "p", 500, "d", 0)
    assert client.get("/v1/channels/9").json()["charged"] == 525
    led = client.get("/v1/ledger?verify=1").json()
    assert led["verify"]["ok"] and led["balances"]["caller"] == {"bob": 525}
    bad = client.post("/v1/channels/9/close", json={"balance_a": 10**9, "balance_b": 0, "seqno_a": 1, "seqno_b": 1})
    assert bad.status_code == 400
    ok = client.post("/v1/channels/9/close", json={"balance_a": 10**9 - 525, "balance_b": 525, "seqno_a": 1,
                                                   "seqno_b": 1})
    sig_b = bytes.fromhex(ok.json()["signature_b"])
    msg = CooperativeClose(b"\0" * 64, sig_b, 9, 10**9 - 525, 525, 1, 1)
    assert op.public_key().is_valid(sig_b, msg.payload_hash())
