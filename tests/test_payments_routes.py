"""payment_routes: channels are registered from the chain (claims are checked), the ledger is operator-only, and
a close needs the caller's signature and pays out exactly the ledger's balances on the local chain."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.gateway.payments_routes import payment_routes
from cocoon_faas.ton.chain import LocalChain, require_ok
from cocoon_faas.ton.channel import ChannelConfig, ClosingConfig
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.closing import ClosingTerms, closing_to_dict
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import CooperativeClose, InitChannel, TopUp, sign_close
from cocoon_faas.ton.wallet import Wallet

OP, CALLER = PrivateKey(b"\x07" * 32), PrivateKey(b"\x08" * 32)
DEP, GAS = 10**9, 50_000_000
TERMS = ClosingTerms(quarantine_s=100, conditional_close_s=0, fine_bps=1000)
TOKEN = {"Authorization": "Bearer op-token"}


def _open_on_chain(chain: LocalChain, cid: int, key: PrivateKey, op_key: PrivateKey, init: bool = True,
                   closing: ClosingConfig = TERMS.config_for(DEP)) -> ChannelConfig:
    w = Wallet(key.public_key())
    chain.faucet(w.address, 3 * DEP)
    cfg = ChannelConfig(cid, key.public_key(), op_key.public_key(), w.address, Wallet(op_key.public_key()).address,
                        closing)
    require_ok(chain.send_to_channel(key, w, cfg, TopUp(DEP).to_cell(), DEP + GAS), "top-up")
    if init:
        require_ok(chain.send_to_channel(key, w, cfg, InitChannel.signed(key, True, cid, DEP, 0).to_cell(), GAS),
                   "init")
    return cfg


@pytest.fixture()
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    chain = LocalChain(tmp_path / "chain.db")
    gate = PaymentGate(Ledger(tmp_path / "l.db"), OP, chain=chain, terms=TERMS)

    def is_op(request: Request) -> bool:
        return request.headers.get("authorization") == TOKEN["Authorization"]

    return chain, gate, TestClient(Starlette(routes=payment_routes(gate, OP, is_operator=is_op)))


def _reg(client: TestClient, cfg: ChannelConfig, **extra: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/channels", json={"channel_id": cfg.channel_id, "key_a": cfg.key_a.hex(),
                                             "dest_a": cfg.dest_a.raw, "closing": closing_to_dict(cfg.closing),
                                             **extra})


def test_registration_reads_the_chain_and_refuses_mismatches(env) -> None:  # type: ignore[no-untyped-def]
    chain, gate, client = env
    op = client.get("/v1/payments/operator").json()
    assert op["public_key"] == OP.public_key().hex() and op["closing"] == TERMS.to_dict()
    assert "exit_state" not in op
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    lie = _reg(client, cfg, deposit=DEP * 100)
    assert lie.status_code == 409 and lie.json()["error"]["problem"] == "mismatch"
    assert lie.json()["error"]["on_chain"] == DEP
    wrong_addr = _reg(client, cfg, address=Wallet(CALLER.public_key()).address.raw)
    assert wrong_addr.status_code == 409 and "not the address" in wrong_addr.json()["error"]["message"]
    assert gate.ledger.channels() == []
    # a channel that exists only in the caller's imagination, one to another operator, one never initialised
    ghost = ChannelConfig(10, cfg.key_a, cfg.key_b, cfg.dest_a, cfg.dest_b)
    assert _reg(client, ghost).json()["error"]["problem"] == "not_on_chain"
    other_op = _open_on_chain(chain, 11, CALLER, PrivateKey(b"\x09" * 32))
    assert _reg(client, other_op).json()["error"]["problem"] == "not_on_chain"
    half = _open_on_chain(chain, 12, CALLER, OP, init=False)
    assert _reg(client, half).json()["error"]["problem"] == "not_inited"
    assert client.post("/v1/channels", json={"channel_id": 2**64, "key_a": cfg.key_a.hex(),
                                             "dest_a": cfg.dest_a.raw}).status_code == 400
    # a channel without a dispute window, or with a fine below the operator's: the watchtower could not defend it
    for closing in (ClosingConfig(), ClosingConfig(100, 0, 0), ClosingConfig(10, DEP // 10, 0)):
        weak = _open_on_chain(chain, 13, CALLER, OP, closing=closing)
        refused = _reg(client, weak)
        assert refused.status_code == 409 and refused.json()["error"]["problem"] == "terms", refused.text
        assert refused.json()["error"]["quarantine_s"] == 100 and refused.json()["error"]["fine"] == DEP // 10
    assert gate.ledger.channels() == []
    ok = _reg(client, cfg, address=cfg.address.friendly())
    assert ok.status_code == 201 and ok.json()["deposit"] == DEP
    assert _reg(client, cfg).status_code == 409  # once
    assert client.post("/v1/channels", json={"channel_id": 9}).status_code == 400


def test_ledger_is_operator_only_and_close_pays_the_ledger(env) -> None:  # type: ignore[no-untyped-def]
    chain, gate, client = env
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    signer = ChannelSigner(Path(gate.ledger.path).with_name("c.json"), CALLER, 9, DEP)
    t = signer.sign_for_call(1000)
    gate.settle(gate.authorize(t.header, "c1", "f", 1000), "p", 500, "d", 0)
    assert client.get("/v1/channels/9").json()["charged"] == 525
    assert client.get("/v1/ledger").status_code == 403
    assert client.get("/v1/ledger/calls/c1").status_code == 403
    led = client.get("/v1/ledger?verify=1", headers=TOKEN).json()
    assert led["verify"]["ok"] and led["balances"]["caller"] == {cfg.dest_a.friendly(): 525}
    call = client.get("/v1/ledger/calls/c1", headers=TOKEN).json()
    assert call["charged"] == 525 and call["provider_nanoton"] == 500 and call["status"] == "charged"
    assert client.get("/v1/ledger/calls/nope", headers=TOKEN).status_code == 404

    args = (9, DEP - 525, 525, 1, 1)
    fields = {"balance_a": args[1], "balance_b": args[2], "seqno_a": 1, "seqno_b": 1}
    stranger = sign_close(PrivateKey(b"\x0a" * 32), *args).hex()
    assert client.post("/v1/channels/9/close", json={**fields, "signature_a": stranger}).status_code == 403
    greedy = (9, DEP, 0, 1, 1)
    bad = client.post("/v1/channels/9/close", json={"balance_a": DEP, "balance_b": 0, "seqno_a": 1, "seqno_b": 1,
                                                    "signature_a": sign_close(CALLER, *greedy).hex()})
    assert bad.status_code == 400 and bad.json()["error"]["charged"] == 525
    assert gate.ledger.channel(9).status == "open"
    sig_a = sign_close(CALLER, *args)
    ok = client.post("/v1/channels/9/close", json={**fields, "signature_a": sig_a.hex()})
    sig_b = bytes.fromhex(ok.json()["signature_b"])
    assert gate.ledger.channel(9).status == "closing"
    op_addr = Wallet(OP.public_key()).address
    caller_before = chain.balance(cfg.dest_a)
    contract = chain.contract_balance(cfg)
    res = require_ok(chain.send_to_channel(CALLER, Wallet(CALLER.public_key()), cfg,
                                           CooperativeClose(sig_a, sig_b, *args).to_cell(), GAS), "close")
    assert chain.balance(op_addr) == 525  # exactly the ledger's charge
    # the caller gets the rest: its deposit minus the charge, plus the gas left in the contract, minus fees
    assert chain.balance(cfg.dest_a) == caller_before - GAS - 5_000_000 + contract + GAS - 525
    assert [p.dest for p in res.payouts] == [op_addr, cfg.dest_a]


def test_provider_earnings_and_payout_through_a_channel(env) -> None:  # type: ignore[no-untyped-def]
    chain, gate, client = env
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    signer = ChannelSigner(Path(gate.ledger.path).with_name("c.json"), CALLER, 9, DEP)
    for i in range(3):
        t = signer.sign_for_call(10**6)
        gate.settle(gate.authorize(t.header, f"c{i}", "f", 10**6), "gpu-1", 400_000, "d", 0)
    assert client.get("/v1/ledger/providers").status_code == 403
    (e,) = client.get("/v1/ledger/providers", headers=TOKEN).json()["providers"]
    assert e == {"provider_id": "gpu-1", "earned": 1_200_000, "paid": 0, "due": 1_200_000}
    prov = PrivateKey(b"\x0b" * 32)
    prov_wallet = Wallet(prov.public_key()).address
    body = {"public_key": prov.public_key().hex(), "wallet": prov_wallet.raw, "deposit": DEP // 2}
    assert client.post("/v1/ledger/providers/gpu-1/payout", json=body).status_code == 403
    broke = client.post("/v1/ledger/providers/gpu-1/payout", json=body, headers=TOKEN)  # operator wallet is empty
    assert broke.status_code == 402 and gate.ledger.paid_out() == {}
    op_wallet = Wallet(OP.public_key())
    chain.faucet(op_wallet.address, DEP)
    paid = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "amount": 700_000}, headers=TOKEN).json()
    assert paid["amount"] == 700_000
    paid = client.post("/v1/ledger/providers/gpu-1/payout", json=body, headers=TOKEN).json()
    assert paid["amount"] == 500_000
    assert client.post("/v1/ledger/providers/gpu-1/payout", json=body, headers=TOKEN).status_code == 409
    (e,) = client.get("/v1/ledger/providers", headers=TOKEN).json()["providers"]
    assert e["paid"] == 1_200_000 and e["due"] == 0
    # the provider holds the operator's signed state for the cumulative 1.2M and claims it on chain
    from cocoon_faas.gateway.payments import decode_header

    st = decode_header(paid["state"])
    assert st.is_signed_by(OP.public_key()) and st.state.data.sent >= 1_200_000
    pcfg = ChannelConfig(paid["channel_id"], OP.public_key(), prov.public_key(), op_wallet.address, prov_wallet)
    on_chain = chain.channel_data(pcfg)
    assert on_chain is not None and on_chain.inited and on_chain.balance_a == DEP // 2
    args = (paid["channel_id"], DEP // 2 - 1_200_000, 1_200_000, st.state.data.seqno, 1)
    close = CooperativeClose(sign_close(OP, *args), sign_close(prov, *args), *args)
    require_ok(chain.send_to_channel(OP, op_wallet, pcfg, close.to_cell(), GAS), "payout close")
    assert chain.balance(prov_wallet) == 1_200_000
    assert gate.ledger.verify()["ok"]


def test_exit_state_and_the_operators_forced_close(tmp_path: Path) -> None:
    from cocoon_faas.gateway.payments import decode_header
    from cocoon_faas.gateway.watchtower import Watchtower
    from cocoon_faas.ton.closing import check_exit_state

    chain = LocalChain(tmp_path / "chain.db")
    gate = PaymentGate(Ledger(tmp_path / "l.db"), OP, chain=chain, terms=TERMS)
    tower = Watchtower(gate.ledger, chain, OP)

    def is_op(request: Request) -> bool:
        return request.headers.get("authorization") == TOKEN["Authorization"]

    client = TestClient(Starlette(routes=payment_routes(gate, OP, is_operator=is_op, watchtower=tower)))
    op = client.get("/v1/payments/operator?channel_id=21").json()
    check_exit_state(decode_header(op["exit_state"]), OP.public_key(), 21)  # signed, seqno 0, nothing sent
    assert client.get("/v1/payments/operator?channel_id=-1").status_code == 400
    assert client.get("/v1/payments/operator?channel_id=x").json()["error"]["type"] == "invalid_request"
    cfg = _open_on_chain(chain, 21, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    assert client.post("/v1/ledger/channels/21/close").status_code == 403
    never_paid = client.post("/v1/ledger/channels/21/close", headers=TOKEN)
    assert never_paid.status_code == 409 and "never paid" in never_paid.json()["error"]["message"]
    signer = ChannelSigner(tmp_path / "c.json", CALLER, 21, DEP, limit=DEP - DEP // 10)
    t = signer.sign_for_call(1000)
    gate.settle(gate.authorize(t.header, "c1", "f", 1000), "p", 500, "d", 0)
    started = client.post("/v1/ledger/channels/21/close", headers=TOKEN)
    assert started.status_code == 200 and started.json()["phase"] == "quarantine", started.text
    assert client.get("/v1/channels/21").json()["status"] == "quarantine"
    again = client.post("/v1/ledger/channels/21/close", headers=TOKEN)
    assert again.status_code == 409
    late = signer.sign_for_call(1000)
    with pytest.raises(Exception, match="closing on chain"):
        gate.authorize(late.header, "c2", "f", 1000)
    # a forced close under way: the cooperative close no longer applies
    args = (21, DEP - 525, 525, 1, 1)
    coop = client.post("/v1/channels/21/close", json={"balance_a": args[1], "balance_b": args[2], "seqno_a": 1,
                                                      "seqno_b": 1, "signature_a": sign_close(CALLER, *args).hex()})
    assert coop.status_code == 409 and "forced close" in coop.json()["error"]["message"]


def test_payout_amounts_are_checked_before_a_channel_is_funded(env) -> None:  # type: ignore[no-untyped-def]
    """An operator's typo pays nothing and funds nothing: a float or a bool is not truncated to 1 nanoton, a
    deposit past what the ledger stores is 400 (not 500), and an amount over what is due or a deposit below it
    is refused before the operator's wallet funds a channel that could never pay it."""
    chain, gate, client = env
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    signer = ChannelSigner(Path(gate.ledger.path).with_name("c.json"), CALLER, 9, DEP)
    t = signer.sign_for_call(10**6)
    gate.settle(gate.authorize(t.header, "c0", "f", 10**6), "gpu-1", 400_000, "d", 0)
    op_wallet = Wallet(OP.public_key())
    chain.faucet(op_wallet.address, 3 * DEP)
    prov = PrivateKey(b"\x0c" * 32)
    body = {"public_key": prov.public_key().hex(), "wallet": Wallet(prov.public_key()).address.raw}
    for extra in ({"amount": 1.5}, {"amount": True}, {"amount": -1}, {"amount": 0}, {"amount": "5"},
                  {"deposit": -1}, {"deposit": 0}, {"deposit": 10**30}, {"deposit": 2.5 * DEP}):
        r = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, **extra}, headers=TOKEN)
        assert r.status_code == 400 and "nanoton" in r.json()["error"]["message"], (extra, r.text)
    over = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "amount": 400_001}, headers=TOKEN)
    assert over.status_code == 409 and over.json()["error"]["due"] == 400_000
    small = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "deposit": 399_999}, headers=TOKEN)
    assert small.status_code == 400 and "larger deposit" in small.json()["error"]["message"]
    assert chain.balance(op_wallet.address) == 3 * DEP  # no channel was funded by any of them
    assert gate.ledger.paid_out() == {} and gate.ledger.verify()["ok"]
    ok = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "deposit": 400_000}, headers=TOKEN)
    assert ok.status_code == 200 and ok.json()["amount"] == 400_000


def test_a_payout_channel_that_ran_out_is_retired_and_the_next_payout_opens_a_new_one(env) -> None:  # type: ignore[no-untyped-def]
    """A payout channel cannot be topped up once open (the contract refuses): when what is due no longer fits, the
    payout retires it and pays through a new channel. The provider closes each channel with its own last state
    and collects everything it earned; the operator gets back what was left in the old deposit."""
    from cocoon_faas.gateway.payments import decode_header
    from cocoon_faas.gateway.payouts import payout_channels_of

    chain, gate, client = env
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    signer = ChannelSigner(Path(gate.ledger.path).with_name("c.json"), CALLER, 9, DEP)

    def earn(i: int, amount: int) -> None:
        t = signer.sign_for_call(10**6)
        gate.settle(gate.authorize(t.header, f"c{i}", "f", 10**6), "gpu-1", amount, "d", 0)

    op_wallet = Wallet(OP.public_key())
    chain.faucet(op_wallet.address, 3 * DEP)
    prov = PrivateKey(b"\x0d" * 32)
    prov_wallet = Wallet(prov.public_key()).address
    body = {"public_key": prov.public_key().hex(), "wallet": prov_wallet.raw}
    earn(0, 400_000)
    first = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "deposit": 500_000}, headers=TOKEN).json()
    assert first["amount"] == 400_000 and "retired_channel_id" not in first
    earn(1, 300_000)  # 300k due, 100k left in the channel
    funded = chain.balance(op_wallet.address)
    small = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "deposit": 299_999}, headers=TOKEN)
    assert small.status_code == 400 and "larger deposit" in small.json()["error"]["message"], small.text
    assert chain.balance(op_wallet.address) == funded and gate.ledger.paid_out() == {"gpu-1": 400_000}
    second = client.post("/v1/ledger/providers/gpu-1/payout", json={**body, "deposit": 600_000}, headers=TOKEN)
    assert second.status_code == 200, second.text
    second = second.json()
    assert second["retired_channel_id"] == first["channel_id"] != second["channel_id"]
    assert second["amount"] == 300_000 and second["seqno"] == 1  # a new channel's first state
    (e,) = client.get("/v1/ledger/providers", headers=TOKEN).json()["providers"]
    assert e == {"provider_id": "gpu-1", "earned": 700_000, "paid": 700_000, "due": 0}
    listed = payout_channels_of(gate.ledger, ["gpu-1"])
    assert [(c["channel_id"], c["status"], c["sent"]) for c in listed] == [
        (second["channel_id"], "open", 300_000), (first["channel_id"], "retired", 400_000)]
    assert [c["latest_state"] for c in listed] == [second["state"], first["state"]]

    # the provider closes both channels on chain, each with the operator's last state for it
    for paid, deposit in ((first, 500_000), (second, 600_000)):
        st = decode_header(paid["state"])
        sent = st.state.data.sent
        pcfg = ChannelConfig(paid["channel_id"], OP.public_key(), prov.public_key(), op_wallet.address, prov_wallet)
        args = (paid["channel_id"], deposit - sent, sent, st.state.data.seqno, 1)
        close = CooperativeClose(sign_close(OP, *args), sign_close(prov, *args), *args)
        require_ok(chain.send_to_channel(OP, op_wallet, pcfg, close.to_cell(), GAS), "payout close")
    assert chain.balance(prov_wallet) == 700_000  # all it earned, once
    assert gate.ledger.verify()["ok"]


def test_channel_ids_and_close_numbers_out_of_range_are_4xx(tmp_path: Path) -> None:
    """A channel id in the URL past 64 bits, or a close's seqno past 64 bits, answered 500 (the database driver
    and the cell builder raised); now 404 (no such channel can be in the ledger) and 400, changing nothing."""
    from cocoon_faas.gateway.watchtower import Watchtower

    chain = LocalChain(tmp_path / "chain.db")
    gate = PaymentGate(Ledger(tmp_path / "l.db"), OP, chain=chain, terms=TERMS)
    client = TestClient(Starlette(routes=payment_routes(
        gate, OP, is_operator=lambda r: r.headers.get("authorization") == TOKEN["Authorization"],
        watchtower=Watchtower(gate.ledger, chain, OP))))
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    before = client.get("/v1/channels/9").json()
    ok_args = {"balance_a": DEP, "balance_b": 0, "seqno_a": 1, "seqno_b": 1,
               "signature_a": sign_close(CALLER, 9, DEP, 0, 1, 1).hex()}
    for cid in (2**63, 2**70, 2**100):
        assert client.get(f"/v1/channels/{cid}").status_code == 404
        assert client.post(f"/v1/channels/{cid}/close", json=ok_args).status_code == 404
        assert client.post(f"/v1/ledger/channels/{cid}/close", headers=TOKEN).status_code == 404
    for field, value in (("seqno_a", 2**64), ("seqno_b", -1), ("balance_a", 2**63), ("balance_b", -5)):
        r = client.post("/v1/channels/9/close", json={**ok_args, field: value})
        assert r.status_code == 400 and "below 2**64" in r.json()["error"]["message"], (field, r.text)
    assert client.get("/v1/channels/9").json() == before
    assert gate.ledger.verify()["ok"]


def test_a_payout_to_a_known_node_goes_to_the_wallet_it_registered(tmp_path: Path) -> None:
    """The operator typed the provider's wallet and key by hand, and nothing checked them against what the node
    registered: a typo (or whoever holds the operator key) sent a provider's earnings to another wallet."""
    chain = LocalChain(tmp_path / "chain.db")
    gate = PaymentGate(Ledger(tmp_path / "l.db"), OP, chain=chain, terms=TERMS)
    prov, thief = PrivateKey(b"\x0d" * 32), PrivateKey(b"\x0e" * 32)
    prov_wallet = Wallet(prov.public_key()).address
    client = TestClient(Starlette(routes=payment_routes(
        gate, OP, is_operator=lambda r: r.headers.get("authorization") == TOKEN["Authorization"],
        registered=lambda nid: (prov_wallet.friendly(), prov.public_key().hex()) if nid == "gpu-1" else None)))
    cfg = _open_on_chain(chain, 9, CALLER, OP)
    assert _reg(client, cfg).status_code == 201
    t = ChannelSigner(tmp_path / "c.json", CALLER, 9, DEP).sign_for_call(10**6)
    gate.settle(gate.authorize(t.header, "c0", "f", 10**6), "gpu-1", 400_000, "d", 0)
    op_wallet = Wallet(OP.public_key()).address
    chain.faucet(op_wallet, 3 * DEP)
    for key, wallet in ((thief, Wallet(thief.public_key()).address), (thief, prov_wallet),
                        (prov, Wallet(thief.public_key()).address)):
        r = client.post("/v1/ledger/providers/gpu-1/payout", headers=TOKEN,
                        json={"public_key": key.public_key().hex(), "wallet": wallet.raw})
        assert r.status_code == 409 and r.json()["error"]["wallet"] == prov_wallet.friendly(), r.text
    assert chain.balance(op_wallet) == 3 * DEP and gate.ledger.paid_out() == {}
    ok = client.post("/v1/ledger/providers/gpu-1/payout", headers=TOKEN,
                     json={"public_key": prov.public_key().hex(), "wallet": prov_wallet.raw})
    assert ok.status_code == 200 and ok.json()["amount"] == 400_000
    assert gate.ledger.verify()["ok"]
