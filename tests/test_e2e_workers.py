"""`cocoon serve --workers 2` on the embedded default: two gateway processes on one port, one local Ray, one SQLite
file. Calls are answered by both processes, a paid caller's calls are each charged exactly once wherever they land,
an async call is polled on whichever process the poll reaches, and the ledger verifies. (Two gateways on
PostgreSQL: tests/test_e2e_scaleout.py.)"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from typing import Any

import httpx
import pytest

from cocoon_faas.client import Client
from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey
from tests.conftest import ROOT, GatewayProc
from tests.ray_nodes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("workers")
    g = GatewayProc(root / "home", env={"COCOON_WORKERS": "2", "COCOON_CHAIN_PATH": str(root / "chain.db"),
                                        "COCOON_QUEUE_LIMIT": "64"})
    try:
        g.start()
        g.cli("deploy", str(ROOT / "tests" / "apps" / "scale.py"))
        yield g
    finally:
        g.stop()


def _async_gateways(gw: GatewayProc, n: int) -> set[str]:
    """Submit ``n`` async calls at once, each on a connection of its own; the gateway processes that ran them."""
    ids: list[str] = []

    def one(i: int) -> None:
        r = httpx.post(f"{gw.url}/fn/echo", json={"n": i}, headers={**gw.headers(), "Prefer": "respond-async"},
                       timeout=60)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    def done(cid: str) -> dict[str, Any] | None:
        v = httpx.get(f"{gw.url}/v1/calls/{cid}", headers=gw.headers(), timeout=10).json()
        return v if v["status"] == "succeeded" else None

    for cid in ids:  # polled on whichever process the new connection reaches: both read the one store
        view = wait_for(lambda: done(cid), 30, cid)  # noqa: B023 - called before the loop moves on
        assert view["result"]["n"] in range(n)
    with closing(sqlite3.connect(f"file:{gw.home / 'cocoon.db'}?mode=ro", uri=True)) as db:  # each call's runner
        marks = ",".join("?" * len(ids))
        return {g for (g,) in db.execute(f"SELECT gateway FROM calls WHERE id IN ({marks})", ids)}


def test_both_processes_serve_and_share_one_store(gw: GatewayProc) -> None:
    seen: set[str] = set()
    wait_for(lambda: len(seen.__ior__(_async_gateways(gw, 16))) == 2, 60, "calls run by both gateway processes")
    assert len(seen) == 2


def test_paid_calls_are_charged_once_whichever_process_answers(gw: GatewayProc) -> None:
    home = gw.home.parent / "caller"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COCOON_", "RAY_AUTH"))}
    env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=gw.url, COCOON_CHAIN_PATH=gw.env["COCOON_CHAIN_PATH"])
    for args in (("wallet", "create"), ("wallet", "faucet", "10"), ("channel", "open", "--deposit", "5")):
        p = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
    cid = json.loads((home / "channel.json").read_text())["channel_id"]
    key = PrivateKey.from_mnemonic(json.loads((home / "wallet.json").read_text())["words"])
    payer = PayingClient(ChannelSigner(home / "channels" / f"{cid}.json", key))
    served: dict[str, int] = {}
    lock = threading.Lock()

    def load(t: int) -> None:  # a client (one connection) per thread: the calls spread over both processes
        with Client(gw.url, payer=payer) as c:
            for i in range(15):
                r = c.call_raw("echo", {"n": t * 1000 + i})
                assert r.status_code == 200 and r.json() == {"n": t * 1000 + i}, r.text
                with lock:
                    served[r.headers["X-Cocoon-Call-Id"]] = int(r.headers["X-Cocoon-Charge"])

    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(served) == 60
    for call_id, charge in served.items():
        row = httpx.get(f"{gw.url}/v1/ledger/calls/{call_id}", headers=gw.headers(), timeout=30).json()
        assert row["status"] == "charged" and row["charged"] == charge > 0, row
    summary = httpx.get(f"{gw.url}/v1/channels/{cid}", timeout=10).json()
    assert summary["reserved"] == 0 and summary["charged"] == sum(served.values()) == payer.signer.charged
    out = httpx.get(f"{gw.url}/v1/ledger?verify=1", headers=gw.headers(), timeout=30).json()
    assert out["verify"]["ok"], out["verify"]["problems"]
