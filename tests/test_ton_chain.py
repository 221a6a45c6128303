"""The local SQLite chain: faucet, top-up, init, paid calls through the gate, cooperative close, bounces."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocoon_faas.errors import PaymentRequiredError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.ton.chain import MESSAGE_FEE, LocalChain, require_ok
from cocoon_faas.ton.channel import ChannelConfig
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import CooperativeClose, InitChannel, TopUp, sign_close
from cocoon_faas.ton.wallet import Wallet

T = 10**9


def test_open_pay_close_on_local_chain(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "chain.db", clock=lambda: 1_700_000_000)
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    wa, wb = Wallet(ka.public_key()), Wallet(kb.public_key())
    cfg = ChannelConfig(42, ka.public_key(), kb.public_key(), wa.address, wb.address)
    with pytest.raises(PaymentRequiredError):
        chain.send_to_channel(ka, wa, cfg, TopUp(5 * T).to_cell(), 5 * T)
    chain.faucet(wa.address, 10 * T)
    chain.faucet(wb.address, T)
    require_ok(chain.send_to_channel(ka, wa, cfg, TopUp(5 * T).to_cell(), 5 * T + T // 20), "top-up")
    require_ok(chain.send_to_channel(ka, wa, cfg, InitChannel.signed(ka, True, 42, 5 * T, 0).to_cell(), T // 20),
               "init")
    # a rejected message bounces: only the fee is lost
    before = chain.balance(wa.address)
    assert chain.send_to_channel(ka, wa, cfg, TopUp(T).to_cell(), T).exit_code == 100
    assert chain.balance(wa.address) == before - MESSAGE_FEE
    data = chain.channel_data(cfg)
    assert data is not None and data.inited and data.balance_a == 5 * T
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.add_channel(42, ka.public_key(), kb.public_key(), cfg.address.raw, "alice", 5 * T)
    gate = PaymentGate(ledger, kb)
    signer = ChannelSigner(tmp_path / "c.json", ka, 42, 5 * T)
    for i in range(5):
        t = signer.sign_for_call(T // 10)
        signer.complete(t, gate.settle(gate.authorize(t.header, f"c{i}", "f", T // 10), "p", T // 20, "d", 0))
    charged = ledger.channel(42).charged
    assert charged == signer.charged > 0
    args = (42, 5 * T - charged, charged, signer.seqno, 1)
    b_before = chain.balance(wb.address)
    a_before = chain.balance(wa.address)
    close = CooperativeClose(sign_close(ka, *args), sign_close(kb, *args), *args)
    require_ok(chain.send_to_channel(kb, wb, cfg, close.to_cell(), T // 20), "close")
    assert chain.balance(wb.address) == b_before - MESSAGE_FEE - T // 20 + charged
    assert chain.balance(wa.address) > a_before + 5 * T - charged
    assert not chain.channel_data(cfg).inited  # type: ignore[union-attr]
    assert ledger.verify()["ok"]
