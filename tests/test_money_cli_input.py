"""Bad input to the money commands (`cocoon wallet|channel|ledger|provider`), tried as a new user would: every case
ends with one `error:` line that names the fix, exit code 1, no traceback, and no money moved or file changed.

The gateway is the real payment routes in process (a TestClient reached through `httpx.request`, which is all the
CLI uses), on a real local chain file that the CLI shares."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner, Result
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.cli.pay import register
from cocoon_faas.errors import CocoonError, InvalidRequestError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.gateway.payments_routes import payment_routes
from cocoon_faas.gateway.requirements import ton_to_nanoton
from cocoon_faas.payer import default_payer
from cocoon_faas.runtime.node_agent import GatewayLink
from cocoon_faas.settings import reload_settings
from cocoon_faas.ton.amounts import MAX_COINS, to_nano
from cocoon_faas.ton.chain import LocalChain
from cocoon_faas.ton.closing import ClosingTerms
from cocoon_faas.ton.keys import PrivateKey

OP = PrivateKey(b"\x17" * 32)
TERMS = ClosingTerms(quarantine_s=100, conditional_close_s=0, fine_bps=1000)


def _setting_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, match: str) -> None:
    """Reading the settings with `name=value` set fails naming `match`; the settings are read again without it, so
    later tests get the session's own."""
    monkeypatch.setenv(name, value)
    try:
        with pytest.raises(ValidationError, match=match):
            reload_settings()
    finally:
        monkeypatch.delenv(name)
        reload_settings()


@pytest.fixture()
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, LocalChain, Path]]:
    home = tmp_path / "caller"
    monkeypatch.setenv("COCOON_HOME", str(home))
    monkeypatch.setenv("COCOON_CHAIN_PATH", str(tmp_path / "chain.db"))
    monkeypatch.setenv("COCOON_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("COCOON_API_KEY", raising=False)
    reload_settings()
    chain = LocalChain(tmp_path / "chain.db")
    gate = PaymentGate(Ledger(tmp_path / "l.db"), OP, chain=chain, terms=TERMS)
    gw = TestClient(Starlette(routes=payment_routes(gate, OP, is_operator=lambda r: False)))

    def request(method: str, url: str, timeout: float | None = None, **kw: Any) -> httpx.Response:
        return gw.request(method, url, **kw)

    monkeypatch.setattr(httpx, "request", request)

    @click.group()
    def main() -> None:
        pass

    register(main)
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(main, list(args))

    yield run, chain, home
    monkeypatch.undo()  # back to the test session's own home before the settings are read again
    reload_settings()


def _one_line_error(r: Result, *words: str) -> None:
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # not a traceback
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], r.output


def _files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def test_amounts_people_type() -> None:
    assert to_nano(" 1 ") == 10**9 and to_nano("1e3") == 1000 * 10**9 and to_nano("1E-9") == 1
    assert to_nano("1329227995784915872903807060.280344575") == MAX_COINS
    for bad, why in (("inf", "finite"), ("nan", "finite"), ("-inf", "finite"), ("-1", "negative"),
                     ("1e30", "too large"), ("1e999999999", "too large"), ("1329227995784915872903807060.280344576",
                     "too large"), ("1.0000000000000000000000000000001", "9 decimals"),  # 29+ digits: no rounding
                     ("1e-999999999", "9 decimals"), ("1,5", "not a number")):
        with pytest.raises(InvalidRequestError, match=why):
            to_nano(bad)
    # the provider's price goes through the same parser: a 10th decimal is refused, not truncated to a free node
    with pytest.raises(InvalidRequestError, match="9 decimals"):
        ton_to_nanoton("0.0000000001")
    with pytest.raises(InvalidRequestError, match="finite"):
        ton_to_nanoton("inf")
    assert ton_to_nanoton("0.0005") == 500_000


def test_faucet_bad_amounts_change_nothing(cli) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    assert run("wallet", "create").exit_code == 0
    assert run("wallet", "faucet", "2").exit_code == 0
    before = _files(home)
    for amount, why in (("inf", "finite"), ("nan", "finite"), ("1e30", "too large"),
                        ("99999999999999999999999", "ask the faucet for less"), ("abc", "not a number")):
        _one_line_error(run("wallet", "faucet", amount), why)
    assert json.loads(run("wallet", "show").output)["balance_ton"] == "2"
    assert _files(home) == before


def test_channel_open_checks_the_wallet_before_any_money_moves(cli) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    run("wallet", "create")
    run("wallet", "faucet", "1.57")  # covers the deposit and one message, not the second (the init)
    _one_line_error(run("channel", "open", "--deposit", "1.5"), "holds 1.57 TON", "wallet faucet")
    assert json.loads(run("wallet", "show").output)["balance_ton"] == "1.57"  # the top-up never left
    assert not (home / "channel.json").exists()
    _one_line_error(run("channel", "open", "--deposit", "0"), "--deposit 5")
    for amount in ("-1", "inf", "0.0000000001", "x"):
        _one_line_error(run("channel", "open", "--deposit", amount))
    assert json.loads(run("wallet", "show").output)["balance_ton"] == "1.57"


def test_a_second_channel_open_never_hides_the_first(cli) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    run("wallet", "create")
    run("wallet", "faucet", "10")
    first = run("channel", "open", "--deposit", "2")
    assert first.exit_code == 0, first.output
    record = (home / "channel.json").read_bytes()
    balance = json.loads(run("wallet", "show").output)["balance_ton"]
    _one_line_error(run("channel", "open", "--deposit", "3"), str(json.loads(record)["channel_id"]),
                    "cocoon channel close")
    assert (home / "channel.json").read_bytes() == record
    assert json.loads(run("wallet", "show").output)["balance_ton"] == balance


def test_damaged_money_files_end_in_one_line(cli) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    run("wallet", "create")
    run("wallet", "faucet", "10")
    assert run("channel", "open", "--deposit", "2").exit_code == 0
    record = json.loads((home / "channel.json").read_text())
    signer_file = home / "channels" / f"{record['channel_id']}.json"
    wallet, channel, signer = (home / "wallet.json").read_bytes(), (home / "channel.json").read_bytes(), \
        signer_file.read_bytes()
    commands = (["channel", "show"], ["channel", "close"], ["channel", "close", "--force"], ["channel", "finish"])
    for damaged in ("{bad", "{}", '{"channel_id": "x"}', "[]"):
        (home / "channel.json").write_text(damaged)
        for c in commands + (["channel", "open", "--deposit", "1"],):
            _one_line_error(run(*c), "channel.json", "restore it")
        with pytest.raises(CocoonError, match="damaged"):
            default_payer(home)
    (home / "channel.json").write_bytes(channel)
    for damaged in ("garbage", '{"words": 5}', "{bad"):
        (home / "wallet.json").write_text(damaged)
        for c in (["wallet", "show"], ["channel", "show"]):
            _one_line_error(run(*c), "wallet.json", "24 words")
    (home / "wallet.json").write_bytes(wallet)
    for damaged in ("x", '{"channel_id": 1}', '{"channel_id": 1, "deposit": -5}', '{"nope": 1}'):
        signer_file.write_text(damaged)
        for c in (["channel", "show"], ["channel", "close"]):
            _one_line_error(run(*c), "signing state", "restore it")
    signer_file.write_bytes(signer)
    assert run("channel", "show").exit_code == 0  # restored: everything works again


def test_a_server_that_is_not_a_gateway(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    page = "<!DOCTYPE html>\n<html>\n<body>\nNot Found\n</body>\n</html>\n"
    for status in (404, 200):
        monkeypatch.setattr(httpx, "request", lambda *a, s=status, **kw: httpx.Response(s, text=page))
        _one_line_error(run("ledger"), f"HTTP {status}", "COCOON_GATEWAY_URL")
    link = GatewayLink("http://127.0.0.1:9", client=httpx.Client(
        transport=httpx.MockTransport(lambda req: httpx.Response(200, text=page))))
    with pytest.raises(CocoonError, match="Cocoon gateway"):
        link.call("GET", "/v1/providers")
    with pytest.raises(CocoonError, match="cannot reach"):
        GatewayLink("http://[::1").call("GET", "/v1/providers")


@pytest.mark.parametrize("url", ["http://[::1", "http://host:port", "http://:8000"])
def test_a_gateway_url_that_is_no_address(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _setting_refused(monkeypatch, "COCOON_GATEWAY_URL", url, "http://127.0.0.1:8000")


def test_a_malformed_close_answer_closes_nothing(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    run, chain, home = cli
    run("wallet", "create")
    run("wallet", "faucet", "10")
    assert run("channel", "open", "--deposit", "2").exit_code == 0
    before, balance = _files(home), json.loads(run("wallet", "show").output)["balance_ton"]
    for answer in ({"nope": 1}, {"charged": "x"}, {"charged": 0, "signature_b": "not hex"}):
        monkeypatch.setattr(httpx, "request", lambda *a, ans=answer, **kw: httpx.Response(200, json=ans))
        _one_line_error(run("channel", "close"), "cocoon channel close --force")
    assert _files(home) == before
    assert json.loads(run("wallet", "show").output)["balance_ton"] == balance


def test_wallet_create_force_never_strands_a_deposit_or_a_key(cli) -> None:  # type: ignore[no-untyped-def]
    """`wallet create --force` replaced the key that an open channel's deposit (and the old wallet's TON) can
    only come back with; the old words were gone for good."""
    run, chain, home = cli
    first = json.loads(run("wallet", "create").output)
    run("wallet", "faucet", "10")
    assert run("channel", "open", "--deposit", "2").exit_code == 0
    wallet = (home / "wallet.json").read_bytes()
    _one_line_error(run("wallet", "create", "--force"), "is open with this wallet's key", "cocoon channel close")
    assert (home / "wallet.json").read_bytes() == wallet
    (home / "channel.json").unlink()  # (as a close does)
    second = json.loads(run("wallet", "create", "--force").output)
    assert second["address"] != first["address"]
    kept = Path(second["previous_wallet_kept_at"])
    assert kept.parent == home and kept.read_bytes() == wallet


@pytest.mark.parametrize("env", ["COCOON_OPERATOR_FEE_BPS=-3", "COCOON_OPERATOR_FEE_BPS=10001",
                                 "COCOON_CPU_PRICE_NANOTON=-1000", "COCOON_GPU_PRICE_NANOTON=-1",
                                 "COCOON_MAX_PRICE_NANOTON=-1", "COCOON_HOLD_GRACE_S=-1",
                                 "COCOON_HOLD_SWEEP_INTERVAL_S=0"])
def test_operator_money_settings_out_of_range_are_refused(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A negative local price or fee made every charge negative (the caller was paid for calling)."""
    name, value = env.split("=")
    _setting_refused(monkeypatch, name, value, name.removeprefix("COCOON_").lower())


def test_a_cli_on_another_local_chain_is_told_which(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A caller with its own COCOON_HOME and no COCOON_CHAIN_PATH funds the channel on its own local chain file;
    the gateway then answered only "not deployed ... top it up and init it first (`cocoon channel open` does
    both)", which is what the caller had just done."""
    run, chain, home = cli
    mine = tmp_path / "callers-own-chain.db"
    monkeypatch.setenv("COCOON_CHAIN_PATH", str(mine))
    reload_settings()
    run("wallet", "create")
    run("wallet", "faucet", "10")
    _one_line_error(run("channel", "open", "--deposit", "2"), str(mine), "COCOON_CHAIN_PATH",
                    "cocoon channel close --force")


def test_a_port_out_of_range_is_refused_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cocoon serve --port 99999` started Ray, printed its URL and then hung (uvicorn could not bind)."""
    from cocoon_faas.cli import main

    for cmd in (["serve", "--port", "99999"], ["serve", "--port", "0"], ["proxy", "--port", "70000"]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 2 and "is not in the range 1<=x<=65535" in r.output, (cmd, r.output)
    _setting_refused(monkeypatch, "COCOON_PORT", "99999", "port")


def test_a_channel_closed_without_this_cli_does_not_block_the_next(cli) -> None:  # type: ignore[no-untyped-def]
    """A record whose channel was closed on chain by someone else (the operator's forced close, a crash after our
    own close) is set aside, not a dead end: close, finish and open all refused for good otherwise."""
    from cocoon_faas.ton.address import Address
    from cocoon_faas.ton.chain import require_ok
    from cocoon_faas.ton.channel import ChannelConfig
    from cocoon_faas.ton.closing import closing_from_dict
    from cocoon_faas.ton.home_files import load_wallet_key
    from cocoon_faas.ton.messages import CooperativeClose, sign_close
    from cocoon_faas.ton.wallet import Wallet

    run, chain, home = cli
    run("wallet", "create")
    run("wallet", "faucet", "10")
    assert run("channel", "open", "--deposit", "2").exit_code == 0
    c = json.loads((home / "channel.json").read_text())
    caller = load_wallet_key(home / "wallet.json")
    cfg = ChannelConfig(c["channel_id"], caller.public_key(), OP.public_key(), Address.parse(c["dest_a"]),
                        Address.parse(c["dest_b"]), closing_from_dict(c["closing"]))
    args = (c["channel_id"], c["deposit"], 0, 1, 1)
    close = CooperativeClose(sign_close(caller, *args), sign_close(OP, *args), *args)
    require_ok(chain.send_to_channel(caller, Wallet(caller.public_key()), cfg, close.to_cell(), 50_000_000), "close")
    again = run("channel", "open", "--deposit", "1")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["channel_id"] != c["channel_id"]
    assert json.loads((home / f"channel-{c['channel_id']}-closed.json").read_text())["channel_id"] == c["channel_id"]
