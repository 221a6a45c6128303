"""The operator's payout channels in the shared ledger (gateway/payouts.py), on both backends: opened once,
paid through any gateway, never a seqno signed twice nor more paid than due; older file state imported."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cocoon_faas.errors import CocoonError, ConflictError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import FeePolicy, PaymentGate, provider_earnings
from cocoon_faas.gateway.payouts import PayoutChannels
from cocoon_faas.ton.chain import LocalChain
from cocoon_faas.ton.channel import SignedSemiChannel
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet

OP, CALLER, PROV = PrivateKey(b"\x07" * 32), PrivateKey(b"\x08" * 32), PrivateKey(b"\x0b" * 32)
DEP = 10**9


def _earn(ledger: Ledger, tmp_path: Path, n: int, each: int) -> None:
    """`n` paid calls whose provider share is `each` for provider "gpu-1"."""
    ledger.add_channel(1, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "alice", DEP)
    gate = PaymentGate(ledger, OP, FeePolicy(bps=0))
    signer = ChannelSigner(tmp_path / "caller.json", CALLER, 1, DEP)
    for i in range(n):
        gate.settle(gate.authorize(signer.sign_for_call(each).header, f"c{i}", "f", each), "gpu-1", each, "d", 0)


def _two_gateways(database: Any, tmp_path: Path, calls: int) -> tuple[Ledger, PayoutChannels, PayoutChannels]:
    """Two gateways on one database with the operator's wallet funded on a local chain, after `calls` paid calls
    earned "gpu-1" 100k each: A's ledger and each gateway's payout channels."""
    chain = LocalChain(tmp_path / "chain.db")
    chain.faucet(Wallet(OP.public_key()).address, 10 * DEP)
    a, b = Ledger(database(), home=tmp_path / "a"), Ledger(database(), home=tmp_path / "b")
    _earn(a, tmp_path, calls, 100_000)
    return a, PayoutChannels(a, chain, OP), PayoutChannels(b, chain, OP)


def test_two_gateways_pay_one_provider_through_one_channel(database: Any, tmp_path: Path) -> None:
    a, pa, pb = _two_gateways(database, tmp_path, 8)
    b = pb.ledger
    wallet = Wallet(PROV.public_key()).address
    cid = pa.ensure_open("gpu-1", PROV.public_key(), wallet, DEP // 2)
    assert pb.ensure_open("gpu-1", PROV.public_key(), wallet, DEP // 2) == cid  # B uses A's channel
    with pytest.raises(ConflictError, match="another key or wallet"):
        pb.ensure_open("gpu-1", CALLER.public_key(), wallet, DEP // 2)
    # both gateways pay at once, 100k at a time: the row lock serializes them
    paid: list[dict[str, Any]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def pay(p: PayoutChannels) -> None:
        for _ in range(6):
            try:
                out = p.pay("gpu-1", 100_000)
            except CocoonError as exc:
                with lock:
                    refused.append(exc.message)
                continue
            with lock:
                paid.append(out)

    threads = [threading.Thread(target=pay, args=(p,)) for p in (pa, pb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(paid) == 8 and len(refused) == 4 and all("is due 0" in m for m in refused)
    assert sorted(p["seqno"] for p in paid) == list(range(1, 9))  # no seqno signed twice
    last = max(paid, key=lambda p: p["seqno"])
    state = SignedSemiChannel.from_boc(base64.b64decode(last["state"]))
    assert state.is_signed_by(OP.public_key()) and state.state.data.sent == 800_000
    assert state.state.channel_id == cid
    assert provider_earnings(b) == [{"provider_id": "gpu-1", "earned": 800_000, "paid": 800_000, "due": 0}]
    assert a.verify()["ok"]


def test_a_failed_open_leaves_nothing_and_file_state_is_imported(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "chain.db")  # the operator's wallet is empty: the top-up fails
    ledger = Ledger(tmp_path / "l.db")
    _earn(ledger, tmp_path, 2, 300_000)
    p = PayoutChannels(ledger, chain, OP)
    wallet = Wallet(PROV.public_key()).address
    with pytest.raises(CocoonError):
        p.ensure_open("gpu-1", PROV.public_key(), wallet, DEP)
    assert ledger.query("SELECT COUNT(*) FROM pay_payout_channels") == [(0,)]
    # a channel an older gateway kept in files under its home: resumed past its lease, never re-signing a seqno
    d = ledger.home / "payout_channels"
    d.mkdir()
    stem = hashlib.sha256(b"gpu-1").hexdigest()[:32]
    (d / f"{stem}.channel.json").write_text(json.dumps(
        {"provider_id": "gpu-1", "channel_id": 77, "key_b": PROV.public_key().hex(), "dest_b": wallet.raw,
         "address": "x", "deposit": DEP}))
    (d / f"{stem}.json").write_text(json.dumps({"channel_id": 77, "deposit": DEP, "seqno": 3, "sent": 1000,
                                                "lease_seqno": 258, "lease_sent": 5000}))
    assert p.ensure_open("gpu-1", PROV.public_key(), wallet, DEP) == 77
    out = p.pay("gpu-1")
    assert (out["channel_id"], out["seqno"], out["amount"]) == (77, 259, 600_000)
    assert SignedSemiChannel.from_boc(base64.b64decode(out["state"])).state.data.sent == 5000 + 600_000


def test_an_opening_left_unfinished_is_resumed_never_funded_twice(database: Any, tmp_path: Path) -> None:
    from cocoon_faas.gateway.payouts import GAS
    from cocoon_faas.ton.chain import require_ok
    from cocoon_faas.ton.channel import ChannelConfig
    from cocoon_faas.ton.messages import TopUp

    chain = LocalChain(tmp_path / "chain.db")
    op_wallet = Wallet(OP.public_key())
    chain.faucet(op_wallet.address, 10 * DEP)
    ledger = Ledger(database(), home=tmp_path)
    p = PayoutChannels(ledger, chain, OP)
    wallet = Wallet(PROV.public_key()).address
    # a gateway claimed the row and topped the channel up, then died before the init
    cfg = ChannelConfig(42, OP.public_key(), PROV.public_key(), op_wallet.address, wallet)
    require_ok(chain.send_to_channel(OP, op_wallet, cfg, TopUp(DEP).to_cell(), DEP + GAS), "top-up")
    ledger.db.execute("INSERT INTO pay_payout_channels (provider_id, channel_id, key_b, dest_b, address, deposit, "
                      "status, opened_at) VALUES (?,?,?,?,?,?,?,?)",
                      ("gpu-1", 42, PROV.public_key().hex(), wallet.raw, "", DEP, "opening", time.time()))
    with pytest.raises(ConflictError, match="being opened"):  # it may still be working on it
        p.ensure_open("gpu-1", PROV.public_key(), wallet, DEP)
    ledger.db.execute("UPDATE pay_payout_channels SET opened_at=opened_at-3600")  # long gone
    before = chain.balance(op_wallet.address)
    assert p.ensure_open("gpu-1", PROV.public_key(), wallet, DEP) == 42
    data = chain.channel_data(cfg)
    assert data is not None and data.inited and data.balance_a == DEP
    assert before - chain.balance(op_wallet.address) < DEP  # only the init's gas: the deposit went in once
    assert ledger.query("SELECT status FROM pay_payout_channels") == [("open",)]


def test_a_short_channel_is_retired_once_and_listed_with_its_last_state(database: Any, tmp_path: Path) -> None:
    from cocoon_faas.gateway.payouts import payout_channels_of

    a, pa, pb = _two_gateways(database, tmp_path, 3)
    b = pb.ledger
    wallet = Wallet(PROV.public_key()).address
    old = pa.ensure_open("gpu-1", PROV.public_key(), wallet, 250_000)
    first = pa.pay("gpu-1", 200_000)
    assert pa.retire_if_short("gpu-1", 50_000) is None  # 50k left: room enough, nothing retired
    assert pa.retire_if_short("gpu-1", 100_000) == old
    assert pb.retire_if_short("gpu-1", 100_000) is None  # the other gateway finds it retired already
    new = pb.ensure_open("gpu-1", PROV.public_key(), wallet, 250_000)
    second = pb.pay("gpu-1")
    assert new != old and second["amount"] == 100_000 and second["seqno"] == 1
    listed = payout_channels_of(b, ["gpu-1"])
    assert [(c["channel_id"], c["status"], c["sent"], c["left"]) for c in listed] == [
        (new, "open", 100_000, 150_000), (old, "retired", 200_000, 50_000)]
    assert [c["latest_state"] for c in listed] == [second["state"], first["state"]]
    assert provider_earnings(a) == [{"provider_id": "gpu-1", "earned": 300_000, "paid": 300_000, "due": 0}]
    assert a.verify()["ok"]
