"""The `ton` settlement backend, offline up to the bytes it would send.

A transport fake answers get methods by running the real contracts (wallet v3R2 from our constants, the payment
channel from tonweb, see test_ton_contract.py) in the pytvm emulator and records the BOCs it is asked to send.
We check: the wallet accepts our signed transfer and emits exactly our internal message; a first message to a
channel carries the StateInit of the channel's address; get_channel_data parses to the storage's ChannelData
(through the emulator and through tonlib's JSON stack shape); the gateway registers a channel read that way.
Talking to a liteserver is skipped: tests reach 127.0.0.1 only.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from pytoniq_core import Cell, begin_cell
from pytoniq_core.tlb.transaction import MessageAny

from cocoon_faas.errors import ConflictError, InvalidRequestError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.settings import Settings
from cocoon_faas.ton import rules
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.chain import backend_from_settings
from cocoon_faas.ton.channel import ChannelConfig, ClosingConfig, SemiChannel, SemiChannelBody
from cocoon_faas.ton.closing import ClosingTerms
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import InitChannel, StartUncooperativeClose, TopUp
from cocoon_faas.ton.tonlib import TonChain, parse_channel_data, plain, stack_from_tonlib
from cocoon_faas.ton.wallet import Wallet, internal_message, wallet_code
from tests.test_ton_contract import _contract_code, _engine

T = 10**9
KA, KB = PrivateKey(b"\x11" * 32), PrivateKey(b"\x12" * 32)
WA, WB = Wallet(KA.public_key()), Wallet(KB.public_key())
NOW = 1_700_000_000


class EmulatedNet:
    """Transport fake: accounts are (code, data) run in the TVM emulator; sent BOCs are recorded."""

    def __init__(self) -> None:
        self.engine = _engine()
        self.accounts: dict[str, tuple[Cell, Cell]] = {}
        self.sent: list[bytes] = []

    def send_boc(self, boc: bytes) -> None:
        self.sent.append(boc)

    def run_get_method(self, address: Address, method: str) -> tuple[int, list[Any]]:
        if address.raw not in self.accounts:
            return -13, []  # tonlib's answer for an uninitialised account
        from pytvm.tvm_emulator import TvmEmulator

        code, data = self.accounts[address.raw]
        res = TvmEmulator(code, data, engine=self.engine).run_get_method(method, [])
        return int(res["vm_exit_code"]), list(res["stack"])

    def balance(self, address: Address) -> int:
        return 0


@pytest.fixture(scope="module")
def code() -> Cell:
    return _contract_code()


def _cfg(cid: int) -> ChannelConfig:
    return ChannelConfig(cid, KA.public_key(), KB.public_key(), WA.address, WB.address,
                         ClosingConfig(100, T // 10, 50))


def test_wallet_accepts_our_transfer_and_sends_exactly_our_message(code: Cell) -> None:
    net = EmulatedNet()
    net.accounts[WA.address.raw] = (wallet_code("v3r2"), WA.data_cell(seqno=5))
    chain = TonChain(net, channel_code=code, clock=lambda: NOW)
    cfg = _cfg(501)
    assert chain.wallet_seqno(WA) == 5
    res = chain.send_to_channel(KA, WA, cfg, TopUp(2 * T).to_cell(), 2 * T + T // 20)
    assert res.ok and len(net.sent) == 1
    ext = Cell.one_from_boc(net.sent[0])
    msg = MessageAny.deserialize(ext.begin_parse())
    assert Address(msg.info.dest.wc, msg.info.dest.hash_part) == WA.address
    assert msg.init is None  # the wallet is deployed (seqno 5): no StateInit
    from pytvm.tvm_emulator import TvmEmulator
    from pytvm.utils import DEFAULT_CONFIG_BOC

    em = TvmEmulator(wallet_code("v3r2"), WA.data_cell(seqno=5), engine=net.engine)
    em.set_c7(WA.address.raw, NOW, 10 * T, "00" * 32, Cell.one_from_boc(DEFAULT_CONFIG_BOC))
    out = em.send_external_message(msg.body)
    assert out["vm_exit_code"] == 0 and out["accepted"] in (True, "True")
    assert out["new_data"].hash == WA.data_cell(seqno=6).hash
    (action,) = out["actions"]
    assert action.mode == 3
    sent = action.out_msg
    assert Address(sent.info.dest.wc, sent.info.dest.hash_part) == cfg.address
    assert sent.info.value.grams == 2 * T + T // 20
    assert sent.body.hash == TopUp(2 * T).to_cell().hash
    # the channel was not deployed: the internal message carries its StateInit, whose hash is its address
    assert sent.init is not None and Address.from_state_init(sent.init.serialize()) == cfg.address
    expected = internal_message(cfg.address, 2 * T + T // 20, TopUp(2 * T).to_cell(),
                                chain.channel_state_init(cfg))
    raw = em2_actions(net, msg.body)  # the wallet passes our message cell on untouched (SENDRAWMSG)
    assert raw.begin_parse().load_uint(32) == 0x0EC3C86D and raw.refs[1].hash == expected.hash
    # a replay of the same transfer (seqno 5 again) is refused by the wallet after it moved to seqno 6
    again = TvmEmulator(wallet_code("v3r2"), out["new_data"], engine=net.engine)
    again.set_c7(WA.address.raw, NOW, 10 * T, "00" * 32, Cell.one_from_boc(DEFAULT_CONFIG_BOC))
    assert int(again.raw_send_external_message(msg.body)["vm_exit_code"]) == 33


def test_first_transfer_deploys_the_wallet_and_code_is_required(code: Cell) -> None:
    net = EmulatedNet()
    chain = TonChain(net, clock=lambda: NOW)
    ext = chain.transfer(KA, WA, WB.address, T, None)
    msg = MessageAny.deserialize(ext.begin_parse())
    assert msg.init is not None and msg.init.serialize().hash == WA.state_init().hash
    with pytest.raises(ConflictError, match="contract code"):
        chain.send_to_channel(KA, WA, _cfg(502), TopUp(T).to_cell(), T)
    assert net.sent == []
    with pytest.raises(InvalidRequestError):
        TonChain(net, channel_code=begin_cell().store_uint(1, 8).end_cell()).channel_state_init(_cfg(502))


def em2_actions(net: EmulatedNet, body: Cell) -> Cell:
    from pytvm.tvm_emulator import TvmEmulator
    from pytvm.utils import DEFAULT_CONFIG_BOC

    em = TvmEmulator(wallet_code("v3r2"), WA.data_cell(seqno=5), engine=net.engine)
    em.set_c7(WA.address.raw, NOW, 10 * T, "00" * 32, Cell.one_from_boc(DEFAULT_CONFIG_BOC))
    return Cell.one_from_boc(base64.b64decode(em.raw_send_external_message(body)["actions"]))


def _to_tonlib(v: Any) -> dict[str, Any]:
    """A value as tonlib's JSON stack entry (what pytonlib hands back inside tuples)."""
    if isinstance(v, int):
        return {"@type": "tvm.stackEntryNumber", "number": {"@type": "tvm.numberDecimal", "number": str(v)}}
    if isinstance(v, list):
        return {"@type": "tvm.stackEntryTuple", "tuple": {"elements": [_to_tonlib(x) for x in v]}}
    if v is None:
        return {"@type": "tvm.stackEntryUnsupported"}
    cell = v if isinstance(v, Cell) else v.to_cell()
    return {"@type": "tvm.stackEntrySlice", "slice": {"bytes": base64.b64encode(cell.to_boc()).decode()}}


def _top(v: Any) -> list[Any]:
    """A value as pytonlib's top-level serialized entry."""
    if isinstance(v, int):
        return ["num", hex(v)]
    if isinstance(v, list):
        return ["tuple", {"elements": [_to_tonlib(x) for x in v]}]
    if v is None:
        return ["null", None]
    return ["cell", {"bytes": _to_tonlib(v)["slice"]["bytes"]}]


def test_get_channel_data_parses_to_the_storage(code: Cell) -> None:
    net = EmulatedNet()
    cfg = _cfg(503)
    data = cfg.initial_data()
    for body in (TopUp(3 * T).to_cell(), InitChannel.signed(KA, True, 503, 3 * T, 0).to_cell()):
        out = rules.apply(data, body, 3 * T + T // 10, NOW)
        assert out.accepted
        data = out.data
    net.accounts[cfg.address.raw] = (code, data.to_cell())
    chain = TonChain(net)
    assert chain.channel_data(cfg) == data and data.inited and data.balance_a == 3 * T
    a = SemiChannel(503, SemiChannelBody(4, T), SemiChannelBody(0, 0)).sign(KA)
    b = SemiChannel(503, SemiChannelBody(0, 0), SemiChannelBody(4, T)).sign(KB)
    closing = rules.apply(data, StartUncooperativeClose.signed(KA, True, 503, a, b).to_cell(), 3 * T, NOW)
    assert closing.accepted and closing.data.quarantine is not None
    net.accounts[cfg.address.raw] = (code, closing.data.to_cell())
    _, raw_stack = net.run_get_method(cfg.address, "get_channel_data")
    stack = plain(raw_stack)
    assert parse_channel_data(stack) == closing.data
    assert parse_channel_data(stack_from_tonlib([_top(v) for v in stack])) == closing.data
    assert chain.channel_data(_cfg(504)) is None


def test_gateway_registers_a_channel_read_from_the_ton_backend(code: Cell, tmp_path: Path) -> None:
    net = EmulatedNet()
    cfg = ChannelConfig(505, KA.public_key(), KB.public_key(), WA.address, WB.address)
    data = cfg.initial_data()
    for body in (TopUp(2 * T).to_cell(), InitChannel.signed(KA, True, 505, 2 * T, 0).to_cell()):
        data = rules.apply(data, body, 2 * T + T // 10, NOW).data
    net.accounts[cfg.address.raw] = (code, data.to_cell())
    # an operator that asks for no dispute window (quarantine 0) accepts the all-zero closing config
    gate = PaymentGate(Ledger(tmp_path / "l.db"), KB, chain=TonChain(net), terms=ClosingTerms(0, 0, 0))
    with pytest.raises(Exception) as lie:
        gate.register(505, KA.public_key(), WA.address, deposit=5 * T)
    assert "does not match" in str(lie.value)
    row = gate.register(505, KA.public_key(), WA.address)
    assert row.deposit == 2 * T and row.key_b == KB.public_key()


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    local = backend_from_settings(Settings(home=tmp_path, settlement="local", chain_path=tmp_path / "c.db"))
    assert type(local).__name__ == "LocalChain" and (tmp_path / "c.db").exists()
    ton = backend_from_settings(Settings(home=tmp_path, settlement="ton", ton_network="mainnet"))
    assert isinstance(ton, TonChain) and ton.network == "mainnet"
    with pytest.raises(InvalidRequestError):
        backend_from_settings(Settings(home=tmp_path, settlement="eth"))


def test_pytonlib_transport_needs_a_config_and_the_network() -> None:
    pytest.importorskip("pytonlib", reason="pytonlib (optional extra `ton`) is not installed")
    from cocoon_faas.ton.tonlib import PytonlibTransport

    with pytest.raises(InvalidRequestError, match="COCOON_TON_CONFIG"):
        PytonlibTransport(None)
    pytest.skip("reaching a TON liteserver needs the internet; tests may only talk to 127.0.0.1")
