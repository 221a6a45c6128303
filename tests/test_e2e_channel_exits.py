"""End-to-end exits on a real gateway whose channels have a short quarantine (6 s) on the local chain:

- a caller closes with a stale state (less than it was charged); the gateway's watchtower challenges within the
  quarantine, the contract fines the caller, the watchtower finishes the close, and `cocoon ledger --verify` agrees
  with what the chain paid the operator, to the nanoton;
- a caller pays for calls, the gateway is stopped for good, and the caller gets its deposit back less exactly what
  it was charged with the CLI alone (`cocoon channel close --force`, `show`, `finish`).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.amounts import to_nano
from cocoon_faas.ton.chain import MESSAGE_FEE, LocalChain
from cocoon_faas.ton.channel import ChannelConfig, SignedSemiChannel
from cocoon_faas.ton.closing import closing_from_dict
from cocoon_faas.ton.keys import PublicKey
from cocoon_faas.ton.messages import StartUncooperativeClose
from cocoon_faas.ton.wallet import Wallet
from tests.conftest import ROOT, GatewayProc
from tests.ray_nodes import wait_for
from tests.test_e2e_payments import Caller

pytestmark = pytest.mark.e2e
T = 10**9
GAS = 50_000_000
QUARANTINE_S = 6


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Any:
    g = GatewayProc(tmp_path_factory.mktemp("exitgw") / "home",
                    env={"COCOON_CHANNEL_QUARANTINE_S": str(QUARANTINE_S), "COCOON_WATCHTOWER_INTERVAL_S": "0.2"}).start()
    g.cli("deploy", str(ROOT / "examples" / "hello.py"))
    yield g
    g.stop()


def _cfg(c: dict[str, Any]) -> ChannelConfig:
    return ChannelConfig(c["channel_id"], PublicKey(bytes.fromhex(c["key_a"])), PublicKey(bytes.fromhex(c["key_b"])),
                         Address.parse(c["dest_a"]), Address.parse(c["dest_b"]), closing_from_dict(c["closing"]))


def _caller(gw: GatewayProc, name: str, deposit: str, calls: int) -> Caller:
    c = Caller(gw.home.parent / name, gw)
    c.cli("wallet", "create")
    c.cli("wallet", "faucet", "10")
    opened = json.loads(c.cli("channel", "open", "--deposit", deposit).stdout)
    assert opened["closing"]["quarantine_s"] == QUARANTINE_S and opened["closing"]["fine"] == int(deposit) * T // 10
    for i in range(calls):
        assert json.loads(c.cli("call", "greet", json.dumps({"name": f"n{i}"})).stdout) == {"message": f"Hello, n{i}."}
    return c


def _until(what: str, check: Any, timeout: float = 60.0) -> Any:
    return wait_for(check, timeout, what)


def test_a_stale_close_loses_to_the_watchtower(gw: GatewayProc) -> None:
    c = _caller(gw, "cheat", "2", 2)
    ch = c.channel()
    cid, cfg = ch["channel_id"], _cfg(ch)
    charged = int(httpx.get(f"{gw.url}/v1/channels/{cid}").json()["charged"])
    signer = c.signer()
    assert signer.charged == charged > 0
    stale = signer.close_state(charged // 3)  # pays a third of what it was charged
    exit_state = SignedSemiChannel.from_boc(base64.b64decode(ch["exit_state"]))
    chain = LocalChain(gw.home / "chain.db")
    res = chain.send_to_channel(c.key(), Wallet(c.key().public_key()), cfg,
                                StartUncooperativeClose.signed(c.key(), True, cid, stale, exit_state).to_cell(), GAS)
    assert res.exit_code == 0
    ledger = gw.http()
    _until("the watchtower to see the close",
           lambda: ledger.get(f"/v1/channels/{cid}").json()["status"] in ("quarantine", "closed"))
    refused = c.cli("call", "greet", '{"name":"late"}', check=False)  # no call on a closing (or closed) channel
    assert refused.returncode == 1 and "no calls are served on it" in refused.stderr
    closes = _until("the watchtower's finish", lambda: ledger.get("/v1/ledger").json()["closes"])
    (close,) = closes
    op_paid = sum(a for d, a in chain.payouts(cfg) if d == cfg.dest_b)
    fine = ch["closing"]["fine"]
    assert close["how"] == "forced_by_caller_challenged" and close["paid_b"] == op_paid
    assert op_paid >= charged + fine  # the covering state's sent (charges and the holds signed for), plus the fine
    out = json.loads(gw.cli("ledger", "--verify").stdout)
    assert out["verify"]["ok"], out["verify"]["problems"]
    assert out["verify"]["caller_debits"] == op_paid  # the ledger's books match the chain's payout to the nanoton
    assert out["verify"]["chain"] == {"checked": 1, "problems": []}  # and the gateway checked them against it
    assert json.loads(c.cli("channel", "show").stdout)["phase"] == "closed"
    ledger.close()


def test_the_caller_leaves_alone_after_the_gateway_is_gone(gw: GatewayProc) -> None:
    """Last in this module: the gateway is stopped for good."""
    c = _caller(gw, "alone", "1", 2)
    ch = c.channel()
    cfg = _cfg(ch)
    charged = int(httpx.get(f"{gw.url}/v1/channels/{ch['channel_id']}").json()["charged"])
    assert c.signer().charged == charged > 0
    gw.stop()
    gw.proc = None
    with pytest.raises(httpx.TransportError):
        httpx.get(gw.url + "/healthz", timeout=2)
    me = Wallet(c.key().public_key()).address
    chain = LocalChain(gw.home / "chain.db")
    messages = 2  # top-up and init
    forced = json.loads(c.cli("channel", "close", "--force").stdout)
    messages += 1
    assert forced["counted_by"] == "local" and to_nano(forced["pays_operator_ton"]) == charged
    shown = json.loads(c.cli("channel", "show").stdout)
    assert shown["phase"] in ("quarantine", "settling", "awaiting_finish") and shown["started_by"] == "caller"
    assert "error" in shown["gateway"]  # the gateway is gone; the chain answers
    assert shown["finish_possible_at"] == forced["finish_possible_at"]
    early = c.cli("channel", "finish", check=False)
    messages += 1
    if early.returncode == 0:  # only on a machine so slow that the quarantine passed in between
        assert shown["finish_possible_at"] <= int(time.time())
    else:
        assert "too early" in early.stderr

        def finish() -> bool:
            nonlocal messages
            messages += 1
            return c.cli("channel", "finish", check=False).returncode == 0

        _until("the end of the quarantine", finish, timeout=QUARANTINE_S + 60)
    paid = chain.payouts(cfg)
    assert [(d, a) for d, a in paid if d == cfg.dest_b] == [(cfg.dest_b, charged)]  # the operator: its charges
    # the caller: its deposit less exactly the charges; every one of its messages cost only the chain's fee
    assert chain.balance(me) == 10 * T - charged - messages * MESSAGE_FEE
    assert not (c.home / "channel.json").exists()
    books = Ledger(gw.home / "ledger.db")  # the stopped gateway's own books agree
    assert books.channel(ch["channel_id"]).charged == charged and books.verify()["ok"]
    books.close()
