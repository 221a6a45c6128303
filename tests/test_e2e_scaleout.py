"""Two gateways, one PostgreSQL, one Ray: deploy on one and call on the other; a paid async call submitted on one
is polled and cancelled on the other (it stops, its hold released once); a provider node joined through one is
listed and heartbeats through the other; SIGKILL one under paid load from clients that know both URLs: nothing a
client could resend is lost, nothing is executed or charged twice, the ledger verifies, the leader moves and the
new leader autoscales."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from cocoon_faas.client import Client
from cocoon_faas.errors import CocoonError
from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey
from tests.conftest import ROOT, GatewayProc, free_port
from tests.ray_nodes import RayCluster, wait_for

pytestmark = pytest.mark.e2e


def _wait(what: str, check: Any, timeout: float = 60) -> Any:
    """Poll until `check()` is truthy (a wait for an event, not a timing assertion)."""
    return wait_for(check, timeout, what)


def _health(gw: GatewayProc) -> dict[str, Any]:
    return dict(httpx.get(gw.url + "/healthz", timeout=10).json())


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Any) -> Any:
    ray = RayCluster(num_cpus=4)
    gws: list[GatewayProc] = []
    try:
        ray.start_head()
        root = tmp_path_factory.mktemp("scaleout")
        env = {"COCOON_DATABASE_URL": pg_cluster.new_database(), "COCOON_RAY_ADDRESS": ray.address,
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray.token, "COCOON_GATEWAY_LEASE_S": "3",
               "COCOON_CHAIN_PATH": str(root / "chain.db"), "COCOON_SCALE_UP_DELAY_S": "0.5",
               "COCOON_QUEUE_LIMIT": "64", "COCOON_PROVIDER_HEARTBEAT_S": "1"}
        a = GatewayProc(root / "a", env=env).start()
        gws.append(a)
        (root / "b").mkdir()
        shutil.copy(root / "a" / "operator_key", root / "b" / "operator_key")  # one operator, one channel party
        b = GatewayProc(root / "b", env=env).start()
        gws.append(b)
        a.cli("deploy", str(ROOT / "tests" / "apps" / "scale.py"))
        yield a, b, root
    finally:
        for g in gws:
            g.stop()
        ray.teardown()


def _haproxy(root: Path, a: GatewayProc, b: GatewayProc) -> tuple[subprocess.Popen[bytes] | None, str]:
    """docs/haproxy.cfg in front of both gateways (None where Debian's haproxy is not installed)."""
    exe = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if exe is None:
        return None, ""
    port = free_port()
    cfg = (ROOT / "docs" / "haproxy.cfg").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    cfg = cfg.replace("127.0.0.1:8001", f"127.0.0.1:{a.port}").replace("127.0.0.1:8002", f"127.0.0.1:{b.port}")
    (root / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen([exe, "-db", "-f", str(root / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                            stderr=open(root / "haproxy.log", "wb"))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"haproxy exited: {(root / 'haproxy.log').read_text()[-1500:]}")
        return _get(url + "/healthz") == 200

    _wait("haproxy", up, timeout=20)
    return proc, url


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.fixture(scope="module")
def caller(platform: Any) -> Any:
    """A caller with its own home (no API key) and a 5 TON channel: (env, channel, payer)."""
    a, b, root = platform
    home = root / "caller"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=f"{a.url},{b.url}",
               COCOON_CHAIN_PATH=str(root / "chain.db"))
    for args in (("wallet", "create"), ("wallet", "faucet", "10"), ("channel", "open", "--deposit", "5")):
        p = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
    channel = json.loads((home / "channel.json").read_text())
    key = PrivateKey.from_mnemonic(json.loads((home / "wallet.json").read_text())["words"])
    payer = PayingClient(ChannelSigner(home / "channels" / f"{channel['channel_id']}.json", key))
    return env, channel, payer


def test_paid_async_call_cancelled_on_the_other_gateway(platform: Any, caller: Any) -> None:
    a, b, root = platform
    _, channel, payer = caller
    on_a, on_b = Client(a.url, payer=payer), Client(b.url, payer=payer)
    summary = lambda: httpx.get(f"{b.url}/v1/channels/{channel['channel_id']}", timeout=10).json()  # noqa: E731
    charged_before = summary()["charged"]
    cid = on_a.spawn("spin", {"seconds": 120}).id  # runs on A for two minutes unless cancelled
    _wait("the call to run (seen on B)", lambda: on_b.get_call(cid)["status"] == "running")
    held = httpx.get(f"{b.url}/v1/ledger/calls/{cid}", headers=b.headers(), timeout=10).json()
    assert held["status"] == "held" and held["hold"] > 0 and summary()["reserved"] == held["hold"]
    assert on_b.cancel(cid)["status"] in ("cancelling", "cancelled")  # B asks A, which owns the call
    done = _wait("the cancel to reach A", lambda: (v := on_b.get_call(cid))["status"] not in ("queued", "running")
                 and v)
    assert done["status"] == "cancelled", done
    assert on_a.get_call(cid)["status"] == "cancelled"
    # the hold is released, once: nothing charged, nothing left reserved (a second release would go negative)
    row = _wait("the ledger to release the hold", lambda: (r := httpx.get(
        f"{b.url}/v1/ledger/calls/{cid}", headers=b.headers(), timeout=10).json())["status"] != "held" and r)
    assert (row["status"], row["charged"]) == ("released", 0), row
    s = summary()
    assert (s["reserved"], s["charged"]) == (0, charged_before)
    out = httpx.get(f"{b.url}/v1/ledger?verify=1", headers=b.headers(), timeout=30).json()
    assert out["verify"]["ok"], out["verify"]["problems"]
    # the call stopped: spin's only replica (one call at a time) serves the next call instead of spinning on
    assert on_b.call("spin", {"seconds": 0}) == 0
    for c in (on_a, on_b):
        c.close()


def test_a_provider_joined_on_one_gateway_is_served_by_the_other(platform: Any) -> None:
    from cocoon_faas.runtime.hardware import GIB, Hardware
    from cocoon_faas.runtime.registration import Registration
    from cocoon_faas.ton.wallet import Wallet

    a, b, _ = platform
    hw = Hardware("declared", "H100", 1, 80 * GIB, None, 8, 32 * GIB)

    def join(gw: GatewayProc, name: str) -> tuple[str, str]:
        key = PrivateKey.generate()
        reg = Registration.new(wallet=Wallet(key.public_key()).address.friendly(),
                               public_key=key.public_key().to_bytes(), name=name, hardware=hw, gpu_price=1000)
        r = httpx.post(gw.url + "/v1/providers", json=reg.signed(key), timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["node_id"], r.json()["token"]

    def status(gw: GatewayProc, nid: str) -> str:
        return str(httpx.get(f"{gw.url}/v1/providers/{nid}", timeout=10).json().get("status", ""))  # "": not yet

    # a node that joins through B and then falls silent: the leader (A) marks it down, and B follows
    quiet, quiet_token = join(b, "e2e-quiet")
    _wait("the leader to sweep the silent node down", lambda: status(a, quiet) == "down")
    _wait("B to see it down", lambda: status(b, quiet) == "down")
    nid, token = join(a, "e2e-node")  # (heartbeats stop after one: it may be swept down meanwhile; fine)
    listed = _wait("B to list the node", lambda: [p for p in httpx.get(b.url + "/v1/providers", timeout=10)
                                                   .json()["providers"] if p["node_id"] == nid])
    assert listed[0]["gpu"] == "H100-80GB x1" and listed[0]["gpu_price"] == 1000
    hb = httpx.post(f"{b.url}/v1/providers/{nid}/heartbeat", json={"load": 0.75},
                    headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert hb.status_code == 200 and hb.json()["status"] == "up"
    _wait("A to see the load reported through B",
          lambda: httpx.get(f"{a.url}/v1/providers/{nid}", timeout=10).json()["load"] == 0.75)
    left = httpx.post(f"{b.url}/v1/providers/{nid}/leave", headers={"authorization": f"Bearer {token}"},
                      timeout=10).json()
    assert left["status"] in ("draining", "left")
    _wait("the leader to end the drain", lambda: status(a, nid) == "left")
    # the silent one leaves too (a listed node, even down, keeps tenant replicas off the gateways' own Ray)
    assert httpx.post(f"{a.url}/v1/providers/{quiet}/leave", headers={"authorization": f"Bearer {quiet_token}"},
                      timeout=10).status_code == 200
    _wait("both nodes gone from B's listing", lambda: httpx.get(b.url + "/v1/providers", timeout=10)
          .json()["providers"] == [])


def test_two_gateways_one_database_survive_a_sigkill(platform: Any, caller: Any) -> None:
    a, b, root = platform
    front, front_url = _haproxy(root, a, b)
    try:
        _scenario(a, b, root, front_url, caller)
    finally:
        if front is not None:
            front.terminate()
            front.wait(10)


def _scenario(a: GatewayProc, b: GatewayProc, root: Path, front_url: str, caller: Any) -> None:
    assert _health(a)["leader"] and not _health(b)["leader"]
    # deployed on A, called on B: B found A's replicas through the store, A's key works on B (one database)
    r = httpx.post(b.url + "/fn/echo", json={"n": 7}, headers=a.headers(), timeout=60)
    assert r.status_code == 200 and r.json() == {"n": 7}
    # an async call started on B is polled on A
    r = httpx.post(b.url + "/fn/echo", json={"n": 8}, headers={**a.headers(), "Prefer": "respond-async"},
                   timeout=60)
    cid = r.json()["id"]
    done = _wait("the async call", lambda: (v := httpx.get(f"{a.url}/v1/calls/{cid}", headers=a.headers(),
                                                            timeout=10).json())["status"] == "succeeded" and v)
    assert done["result"] == {"n": 8}

    if front_url:  # one HAProxy front (docs/haproxy.cfg) reaches the function through either gateway
        assert {httpx.post(front_url + "/fn/echo", json={"n": i}, headers=a.headers(), timeout=60).json()["n"]
                for i in range(4)} == {0, 1, 2, 3}

    # the caller (own home, no API key) with a channel, whose clients know both gateways
    _, channel, payer = caller
    clients = [Client(f"{a.url},{b.url}", payer=payer), Client(f"{b.url},{a.url}", payer=payer)]
    served: dict[str, int] = {}
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(t: int) -> None:
        c, i = clients[t % 2], 0
        while not stop.is_set():
            i += 1
            try:
                r = c.call_raw("echo", {"n": t * 100_000 + i})
            except CocoonError as exc:
                with lock:
                    failures.append(f"{exc.type}: {exc.message}")
                continue
            assert r.json()["n"] == t * 100_000 + i
            with lock:
                served[r.headers["X-Cocoon-Call-Id"]] = int(r.headers["X-Cocoon-Charge"])

    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        _wait("paid calls on both gateways", lambda: len(served) >= 40)
        a.kill()  # SIGKILL: no goodbye, its holds and leadership must be taken over
        before = len(served)
        _wait("calls served after the kill", lambda: len(served) >= before + 40)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    # a call resent after A died mid-call is refused by B if A had taken it (409): never run twice
    assert {f.split(":")[0] for f in failures} <= {"conflict"}, failures[:5]
    assert len(failures) <= 4  # at most one call in flight per load thread at the kill
    _wait("B to lead", lambda: _health(b)["leader"], timeout=30)
    summary = lambda: httpx.get(f"{b.url}/v1/channels/{channel['channel_id']}", timeout=10).json()  # noqa: E731
    _wait("A's holds to be released", lambda: summary()["reserved"] == 0, timeout=30)
    for call_id, charge in served.items():  # every answered call charged exactly once, in the shared ledger
        row = httpx.get(f"{b.url}/v1/ledger/calls/{call_id}", headers=b.headers(), timeout=30).json()
        assert row["status"] == "charged" and row["charged"] == charge > 0, row
    out = httpx.get(f"{b.url}/v1/ledger?verify=1", headers=b.headers(), timeout=30).json()
    assert out["verify"]["ok"], out["verify"]["problems"]
    # the client booked every charge it was told of; a call charged as A died unanswered is covered by its state
    assert sum(served.values()) <= payer.signer.charged <= summary()["charged"] <= payer.signer.sent
    for c in clients:
        c.close()

    if front_url:  # the front skips the dead gateway (health check, and redispatch of refused connections)
        for i in range(6):
            r = httpx.post(front_url + "/fn/echo", json={"n": i}, headers=b.headers(), timeout=60)
            assert r.status_code == 200 and r.json() == {"n": i}

    # the new leader autoscales: concurrent slow calls (one per replica at a time) add replicas
    def replicas() -> int:
        return int(httpx.get(f"{b.url}/v1/functions/slow", headers=b.headers(), timeout=10).json()["replicas"])

    assert replicas() == 1
    burst = [threading.Thread(target=lambda: httpx.post(b.url + "/fn/slow", json={"seconds": 3},
                                                        headers=b.headers(), timeout=60)) for _ in range(3)]
    for t in burst:
        t.start()
    _wait("the leader to add replicas", lambda: replicas() >= 2, timeout=45)
    for t in burst:
        t.join(60)
