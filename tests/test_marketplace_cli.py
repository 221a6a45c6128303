"""`cocoon provider ls | leave | status | join` against a real provider-routes server on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette

from cocoon_faas.cli import main
from cocoon_faas.gateway.marketplace import Marketplace, Requirements
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.runtime import hardware
from cocoon_faas.runtime.node_agent import GatewayLink, NodeAgent
from cocoon_faas.settings import reload_settings
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet


@pytest.fixture
def server() -> Iterator[tuple[str, Marketplace]]:
    market = Marketplace(heartbeat_interval=5.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Starlette(routes=provider_routes(market, ray_address="127.0.0.1:1"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", market
    srv.should_exit = True
    t.join(5)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("COCOON_HOME", str(tmp_path))
    reload_settings()
    yield tmp_path
    monkeypatch.undo()  # back to the test session's own home, never the user's
    reload_settings()


def joined(url: str, home: Path, price: int = 500_000) -> NodeAgent:
    """A node as `join` leaves it: registered, with its session file."""
    key = PrivateKey.generate()
    agent = NodeAgent(GatewayLink(url), key, wallet=Wallet(key.public_key()).address.friendly(),
                      hardware=hardware.detect("H100:2", cpus=4, memory=1 << 30), gpu_price=price, name="rig")
    info = agent.register()
    (home / "provider.json").write_text(json.dumps({"node_id": info.node_id, "token": info.token, "gateway": url,
                                                    "pid": 0}))
    return agent


def test_ls_shows_hardware_price_health_and_earnings(server: tuple[str, Marketplace], home: Path) -> None:
    url, market = server
    agent = joined(url, home)
    nid = agent.info.node_id  # type: ignore[union-attr]
    market.credit(nid, Requirements.parse("H100:2"), 3_000_000_000)  # 3 s on 2 GPUs at 0.0005 TON
    market.record_result(nid, ok=True, latency_s=0.25)
    r = CliRunner().invoke(main, ["provider", "ls", "--gateway", url, "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)[0]
    assert (row["gpu"], row["gpu_price"], row["earned"], row["calls"], row["status"]) == \
        ("H100-80GB x2", 500_000, 3_000_000, 1, "up")
    r = CliRunner().invoke(main, ["provider", "ls", "--gateway", url])
    assert r.exit_code == 0 and "H100-80GB x2" in r.output and "0.003" in r.output
    r = CliRunner().invoke(main, ["provider", "status"])
    assert r.exit_code == 0, r.output
    mine = json.loads(r.output)
    assert (mine["earned_ton"], mine["status"], mine["calls"]) == ("0.003", "up", 1)


def test_provider_group_keeps_the_payment_commands() -> None:
    group = main.get_command(click.Context(main), "provider")  # loads both modules that fill the group
    assert isinstance(group, click.Group)
    assert {"join", "leave", "ls", "status", "earnings", "payout", "approve", "revoke"} <= set(group.commands)


def test_leave_drains_then_reports_left(server: tuple[str, Marketplace], home: Path) -> None:
    url, market = server
    agent = joined(url, home)
    nid = agent.info.node_id  # type: ignore[union-attr]
    req = Requirements.parse("H100")
    market.assign("f", nid, req)
    threading.Timer(0.8, lambda: market.unassign("f", nid)).start()  # the controller moves the replica
    r = CliRunner().invoke(main, ["provider", "leave", "--timeout", "10"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"node_id": nid, "status": "left"}
    assert agent.heartbeat() == "left"  # the running join sees it and stops Ray


def test_leave_without_a_node_says_how_to_join(home: Path) -> None:
    r = CliRunner().invoke(main, ["provider", "leave"])
    assert r.exit_code == 1 and "cocoon provider join" in r.output


def test_join_rejects_a_key_that_does_not_own_the_wallet(server: tuple[str, Marketplace], home: Path) -> None:
    url, market = server
    (home / "wallet.json").write_text(json.dumps({"words": __import__("cocoon_faas.ton.keys", fromlist=["x"])
                                                  .new_mnemonic()}))
    other = Wallet(PrivateKey.generate().public_key()).address.friendly()
    r = CliRunner().invoke(main, ["provider", "join", "--gateway", url, "--wallet", other, "--price", "0.001"])
    assert r.exit_code == 1 and "does not own" in r.output
    assert market.listing() == []


def test_join_rejects_bad_gpus_and_missing_key(server: tuple[str, Marketplace], home: Path) -> None:
    url, _ = server
    key = PrivateKey.generate()
    (home / "seed").write_text(key.to_bytes().hex())
    wallet = Wallet(key.public_key()).address.friendly()
    r = CliRunner().invoke(main, ["provider", "join", "--gateway", url, "--wallet", wallet, "--price", "0.001",
                                  "--key-file", str(home / "seed"), "--gpus", "H100:lots"])
    assert r.exit_code == 2 and "COUNT must be an integer" in r.output
    r = CliRunner().invoke(main, ["provider", "join", "--gateway", url, "--wallet", wallet, "--price", "free"])
    assert r.exit_code == 2 and "is not a number" in r.output
    r = CliRunner().invoke(main, ["provider", "join", "--gateway", url, "--wallet", wallet, "--price", "0.001"])
    assert r.exit_code == 1 and "cocoon wallet create" in r.output


def test_a_damaged_session_file_is_one_error_line(home: Path) -> None:
    for damaged in ("{bad", "[]", '{"node_id": 5}', '{"node_id": "n", "token": "t"}'):
        (home / "provider.json").write_text(damaged)
        for cmd in (["provider", "status"], ["provider", "leave", "--timeout", "0"]):
            r = CliRunner().invoke(main, cmd)
            assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (damaged, cmd, r.output)
            assert r.output.startswith("error: ") and "provider.json is damaged" in r.output, r.output


def test_ls_prints_a_nodes_name_as_text_not_markup(server: tuple[str, Marketplace], home: Path) -> None:
    """A provider's node name reached the operator's terminal as rich markup (and, before registration refused
    them, as raw escape sequences): a node could restyle or fake lines of `cocoon provider ls`."""
    url, market = server
    key = PrivateKey.generate()
    agent = NodeAgent(GatewayLink(url), key, wallet=Wallet(key.public_key()).address.friendly(),
                      hardware=hardware.detect("H100:2", cpus=4, memory=1 << 30), gpu_price=1,
                      name="[bold red]status: up[/bold red]")
    agent.register()
    r = CliRunner().invoke(main, ["provider", "ls", "--gateway", url])
    assert r.exit_code == 0 and "[bold red]status: up[/bold red]" in r.output, r.output


def test_a_second_join_from_one_home_is_refused(server: tuple[str, Marketplace], home: Path) -> None:
    """A second `cocoon provider join` from the home of a running one re-registered the node (the running agent's
    token stopped working), overwrote its session file and started a second Ray node beside the first."""
    import subprocess
    import sys

    url, market = server
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for a live join
    try:
        (home / "provider.json").write_text(json.dumps({"node_id": "abc", "token": "t", "gateway": url,
                                                        "pid": other.pid}))
        key = PrivateKey.generate()
        (home / "seed").write_text(key.to_bytes().hex())
        r = CliRunner().invoke(main, ["provider", "join", "--gateway", url, "--wallet",
                                      Wallet(key.public_key()).address.friendly(), "--price", "0.001",
                                      "--key-file", str(home / "seed"), "--gpus", "H100:1"])
        assert r.exit_code == 1 and f"already runs from this COCOON_HOME (pid {other.pid})" in r.output, r.output
        assert market.listing() == [] and json.loads((home / "provider.json").read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
