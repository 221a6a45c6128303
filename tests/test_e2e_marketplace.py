"""End to end through a real gateway and a real multi-node Ray cluster on this machine: provider nodes join with
`cocoon provider join` (simulated GPUs), placement follows requirements and price, a joining node picks up waiting
replicas, a SIGKILLed raylet under load loses no call, `cocoon provider leave` drains with no failed call, and the
listing shows load, health, reputation and earnings.

The tests run in order over one module-scoped cluster (each builds on the previous state, like a day in the
market). Nodes (prices in TON per GPU-second / per CPU-second):

    h100-cheap  H100:1  1 / 0.001      h100-dear  H100:1  3 / 0.003      a100  A100:1  2 / 0.002
    h100-big    H100:8  2 / 0.004      (joins during the tests)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayProc
from tests.ray_nodes import FAST_HEALTH, RayCluster, node_ports, raylet_of, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NANOTON = 10**9
APP = '''
import time
import cocoon_faas as cocoon


def where() -> str:
    """The provider node this replica runs on, read inside the call (the sandbox has no Ray: the platform
    names the node in COCOON_NODE)."""
    import os

    return os.environ.get("COCOON_NODE") or "local"


@cocoon.function(gpu="H100", cpu=0.1, memory="64Mi", min_replicas=1, max_replicas=1)
def on_h100() -> dict:
    return {"node": where()}


@cocoon.function(gpu="A100", cpu=0.1, memory="64Mi", min_replicas=1, max_replicas=1)
def on_a100() -> dict:
    return {"node": where()}


@cocoon.function(gpu="H100:4", cpu=0.1, memory="64Mi", min_replicas=1, max_replicas=1)
def on_h100x4() -> dict:
    return {"node": where()}


@cocoon.function(gpu="H100", cpu=0.1, memory="64Mi", min_replicas=2, max_replicas=2)
def pair() -> dict:
    return {"node": where()}


@cocoon.function(cpu=2, memory="64Mi", retries=2, timeout=30, min_replicas=2, max_replicas=2, max_concurrency=8)
def steady(ms: float = 20) -> dict:
    time.sleep(ms / 1000)
    return {"node": where()}
'''


@dataclass
class Provider:
    """One `cocoon provider join` process with its own COCOON_HOME, wallet and Ray temp dir."""

    name: str
    gpus: str
    price: str
    cpu_price: str
    home: Path
    temp_dir: str
    gateway: str
    proc: subprocess.Popen[bytes] | None = None
    wallet: str = ""
    node_id: str = ""
    starts: list[float] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "COCOON_"))}
        return {**env, "COCOON_HOME": str(self.home), "COCOON_GATEWAY_URL": self.gateway, "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def join(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.wallet:
            made = self.cli("wallet", "create")
            assert made.returncode == 0, made.stderr
            self.wallet = json.loads(made.stdout)["address"]
        args = ["provider", "join", "--gateway", self.gateway, "--wallet", self.wallet, "--price", self.price,
                "--cpu-price", self.cpu_price, "--gpus", self.gpus, "--cpus", "4", "--name", self.name,
                "--temp-dir", self.temp_dir, "--object-store-memory", "80000000",
                *(f"--ray-arg={a}" for a in node_ports())]
        self.proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", *args], env=self.env,
                                     stdout=open(self.home / "join.log", "ab"), stderr=subprocess.STDOUT)
        self.starts.append(time.monotonic())

    def log(self) -> str:
        f = self.home / "join.log"
        return f.read_text()[-3000:] if f.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Market:
    """The gateway, its providers and helpers over the HTTP API."""

    def __init__(self, gw: GatewayProc, cluster: RayCluster) -> None:
        self.gw, self.cluster = gw, cluster
        self.http = gw.http()
        self.providers: dict[str, Provider] = {}

    def provider(self, name: str, gpus: str, price: str, cpu_price: str) -> Provider:
        p = Provider(name, gpus, price, cpu_price, self.gw.home.parent / f"prov-{name}", self.cluster.node_dir(name),
                     self.gw.url)
        self.providers[name] = p
        return p

    def rows(self) -> dict[str, dict[str, Any]]:
        r = self.http.get("/v1/providers")
        assert r.status_code == 200, r.text
        return {row["name"]: row for row in r.json()["providers"]}

    def row(self, node_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/providers/{node_id}").json()

    def join(self, p: Provider, timeout: float = 60) -> dict[str, Any]:
        """Join and wait until the gateway sees the node's Ray node alive (one node at a time: raylets starting
        together starve a 2-core machine past Ray's start-up deadline; a node that missed it joins again)."""
        for _ in range(2):
            p.join()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and p.proc is not None and p.proc.poll() is None:
                row = self.rows().get(p.name)
                if row and row["ray_node_id"] and row["healthy"]:
                    p.node_id = row["node_id"]
                    return row
                time.sleep(0.25)
            p.stop()
        raise AssertionError(f"provider {p.name} did not join:\n{p.log()}")

    def fn(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/functions/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def placement(self, function: str) -> Counter[str]:
        """Provider name -> replicas of ``function`` there, as GET /v1/providers lists them."""
        return Counter({name: row["functions"].get(function, 0) for name, row in self.rows().items()
                        if row["functions"].get(function)})

    def call(self, function: str, **kw: Any) -> httpx.Response:
        return self.http.post(f"/fn/{function}", json=kw)

    def names(self) -> dict[str, str]:
        return {p.node_id: name for name, p in self.providers.items() if p.node_id}


class Load:
    """Calls to ``function`` from a few threads until stopped; every response is kept."""

    def __init__(self, market: Market, function: str, threads: int = 4) -> None:
        self.url, self.headers, self.function = market.gw.url, market.gw.headers(), function
        self.results: list[tuple[int, dict[str, Any] | str, float]] = []  # status, body, exec ms
        self.attempts: list[int] = []  # X-Cocoon-Attempts of each answered call
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as c:
            while not self._stop.is_set():
                self._one(c, 20)

    def _one(self, c: httpx.Client, ms: float) -> None:
        try:
            r = c.post(f"/fn/{self.function}", json={"ms": ms})
            body: dict[str, Any] | str = r.json() if r.status_code == 200 else r.text
            self.results.append((r.status_code, body, float(r.headers.get("X-Cocoon-Exec-Ms", 0))))
            self.attempts.append(int(r.headers.get("X-Cocoon-Attempts", 0)))
        except httpx.HTTPError as exc:
            self.results.append((0, repr(exc), 0.0))

    def long_calls(self, n: int, ms: float) -> None:
        """Start ``n`` calls of ``ms`` each (kept with the others) and return once they are sent."""
        def one() -> None:
            with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as c:
                self._one(c, ms)
        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        self._threads += threads
        for t in threads:
            t.start()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def served(self) -> int:
        return len(self.results)

    def failures(self) -> list[tuple[int, Any, float]]:
        return [r for r in self.results if r[0] != 200]


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cluster = RayCluster()  # only its unique temp dir and teardown: the gateway's own Ray is the head
    token = secrets.token_hex(32)
    gw = GatewayProc(tmp_path_factory.mktemp("mkt") / "home", env={"COCOON_RAY_LOOPBACK_ONLY": "false",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **FAST_HEALTH,
        "COCOON_PROVIDER_HEARTBEAT_S": "0.5", "COCOON_RAY_NUM_CPUS": "2", "COCOON_QUEUE_LIMIT": "256",
        "COCOON_SCALE_DOWN_DELAY_S": "600", "COCOON_REPLICA_START_TIMEOUT_S": "60"})
    m: Market | None = None
    try:
        m = Market(gw.start(), cluster)
        yield m
    finally:
        if m is not None:
            m.http.close()
        for p in (m.providers.values() if m is not None else ()):
            p.stop()
        gw.stop()
        cluster.teardown()
        assert cluster.pids() == []


def test_placement_follows_requirements_and_price(market: Market, tmp_path: Path) -> None:
    for name, gpus, price, cpu_price in [("h100-cheap", "H100:1", "1", "0.001"), ("h100-dear", "H100:1", "3", "0.003"),
                                         ("a100", "A100:1", "2", "0.002")]:
        row = market.join(market.provider(name, gpus, price, cpu_price))
        assert row["status"] == "up" and row["gpu"] == gpus.replace(":", "-80GB x")
        assert row["gpu_price"] == int(float(price) * NANOTON) and row["hardware"]["cpus"] == 4
    app = tmp_path / "market_app.py"
    app.write_text(APP)
    out = market.gw.cli("deploy", str(app)).stdout
    assert "on_h100x4" in out
    ids = {name: p.node_id for name, p in market.providers.items()}

    # the H100 function runs on the cheaper H100 node (Ray placed it there: the call reads its node), the A100
    # function on the A100 node
    for fn, node in [("on_h100", "h100-cheap"), ("on_a100", "a100")]:
        r = market.call(fn)
        assert r.status_code == 200, r.text
        assert r.json() == {"node": ids[node]}
        assert market.placement(fn) == Counter({node: 1})
    # two H100 replicas: the cheap node is full, so the second lands on the dear one
    assert market.placement("pair") == Counter({"h100-dear": 1})
    assert market.fn("pair")["replicas"] == 1

    # nothing offers four H100s: a clear 503 naming the missing resource and how to fix it
    assert market.fn("on_h100x4")["status"] == "waiting_for_capacity"
    r = market.call("on_h100x4")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert "gpu:H100 x4" in err["message"] and "cocoon provider join --gpus H100:4" in err["message"]
    assert err["missing"] == "gpu:H100 x4"


def test_joining_node_picks_up_waiting_replicas(market: Market) -> None:
    before = {fn: market.fn(fn)["version"] for fn in ("on_h100x4", "pair")}
    t0 = time.monotonic()
    market.join(market.provider("h100-big", "H100:8", "2", "0.004"))
    big = market.providers["h100-big"].node_id
    # without a redeploy: the 4-GPU function gets its replica and the pair its second one, both on the new node
    wait_for(lambda: market.fn("on_h100x4")["replicas"] == 1 and market.fn("pair")["replicas"] == 2, 120,
             "replicas on the joining node")  # generous: other suites may load this 2-core machine
    picked_up_s = time.monotonic() - t0
    assert market.placement("on_h100x4") == Counter({"h100-big": 1})
    assert market.placement("pair") == Counter({"h100-dear": 1, "h100-big": 1})
    r = market.call("on_h100x4")
    assert r.status_code == 200 and r.json() == {"node": big}, r.text
    assert {fn: market.fn(fn)["version"] for fn in before} == before
    assert market.rows()["h100-big"]["functions"] == {"on_h100x4": 1, "pair": 1}
    assert picked_up_s < 120


def _expected_earnings(market: Market, results: list[tuple[int, Any, float]], cpus: float) -> Counter[str]:
    """What each provider earns for the calls served: CPU-seconds x its CPU price, once per call."""
    out: Counter[str] = Counter()
    price = {p.node_id: int(float(p.cpu_price) * NANOTON) for p in market.providers.values()}
    for status, body, ms in results:
        if status == 200:
            nid = body["node"]
            out[nid] += int(price[nid] * cpus) * int(ms * 1e6) // NANOTON
    return out


def test_killed_raylet_under_load_loses_no_call(market: Market) -> None:
    wait_for(lambda: market.fn("steady")["replicas"] == 2, 60, "steady's two replicas")
    # cheapest CPU price first, one replica per node (2 of its 4 CPUs each): h100-cheap and a100
    assert market.placement("steady") == Counter({"h100-cheap": 1, "a100": 1})
    victim = market.providers["h100-cheap"]
    earned0 = {nid: market.row(nid)["earned"] for nid in market.names()}
    calls0 = market.fn("steady")["calls"]

    with Load(market, "steady") as load:
        wait_for(lambda: load.served() >= 40, 30, "load to build")
        # long calls on both replicas (each call goes to the one with fewer in flight): the victim's is in flight
        # when its raylet dies, so it is lost there, retried and answered on another node
        load.long_calls(4, 5000)
        time.sleep(0.5)
        os.kill(raylet_of(victim.proc.pid), signal.SIGKILL)  # type: ignore[union-attr]
        killed_at, served_at_kill = time.monotonic(), load.served()
        wait_for(lambda: market.row(victim.node_id)["status"] == "down", 10, "the node to be marked down")
        down_s = time.monotonic() - killed_at
        # its replicas are replaced on the other eligible nodes: steady on the next cheapest CPU node with room,
        # the H100 function on the one H100 node with a free GPU
        wait_for(lambda: market.placement("steady") == Counter({"a100": 1, "h100-dear": 1})
                 and market.fn("steady")["replicas"] == 2, 45, "steady's replacement")
        wait_for(lambda: market.placement("on_h100") == Counter({"h100-big": 1})
                 and market.fn("on_h100")["replicas"] == 1, 45, "on_h100's replacement")
        n = load.served()
        wait_for(lambda: load.served() >= n + 20, 30, "calls on the replacement")
    assert load.served() > served_at_kill + 20
    assert load.failures() == [], load.failures()[:5]
    assert any(a >= 2 for a in load.attempts), load.attempts  # the lost call ran again on another node
    assert down_s < 8, down_s  # 3 heartbeats of 0.5 s, or Ray's own health check
    assert victim.proc is not None and victim.proc.wait(30) == 1  # the agent saw its Ray node die
    assert "the Ray node stopped" in victim.log()

    # every call counted and credited exactly once, to the node that answered it (a retried call's lost attempt
    # earns nothing): the earnings moved by exactly CPU-seconds x price of the answered calls
    fn = market.fn("steady")
    assert fn["calls"] - calls0 == len(load.results) and fn["errors"] == 0
    want = _expected_earnings(market, load.results, cpus=2)
    assert set(want) <= {market.providers[n].node_id for n in ("h100-cheap", "a100", "h100-dear")}
    for nid, before in earned0.items():
        got = market.row(nid)["earned"] - before
        # exec ms is rounded to the microsecond in the header: allow that much per call
        assert abs(got - want[nid]) <= len(load.results), (market.names()[nid], got, want[nid])
    assert market.call("on_h100").json() == {"node": market.providers["h100-big"].node_id}


def test_leave_drains_under_load_with_no_failed_call(market: Market) -> None:
    leaver = market.providers["a100"]
    assert market.placement("steady")["a100"] == 1
    with Load(market, "steady") as load:
        wait_for(lambda: load.served() >= 40, 30, "load to build")
        t0 = time.monotonic()
        out = leaver.cli("provider", "leave", "--timeout", "60")
        leave_s = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"node_id": leaver.node_id, "status": "left"}
        # the replica moves to the only node with room; nothing else offers an A100, so that function waits
        wait_for(lambda: market.placement("steady") == Counter({"h100-dear": 1, "h100-big": 1})
                 and market.fn("steady")["replicas"] == 2, 45, "steady's replacement")
        n = load.served()
        wait_for(lambda: load.served() >= n + 20, 30, "calls after the leave")
    assert load.failures() == [], load.failures()[:5]
    assert leave_s < 60
    assert {b["node"] for s, b, _ in load.results[-20:]} <= {market.providers[n].node_id
                                                             for n in ("h100-dear", "h100-big")}
    # the node is gone from the listing, its own view says left, its join process stopped Ray and exited cleanly
    assert "a100" not in market.rows()
    assert market.row(leaver.node_id)["status"] == "left"
    assert leaver.proc is not None and leaver.proc.wait(30) == 0
    assert json.loads(leaver.log().strip().splitlines()[-1])["status"] == "left"
    r = market.call("on_a100")
    assert r.status_code == 503 and "gpu:A100 x1" in r.json()["error"]["message"]


def test_listing_shows_hardware_price_load_health_reputation_earnings(market: Market) -> None:
    rows = market.rows()
    assert set(rows) == {"h100-cheap", "h100-dear", "h100-big"}
    assert rows["h100-cheap"]["status"] == "down" and rows["h100-cheap"]["healthy"] is False
    for name in ("h100-dear", "h100-big"):
        row = rows[name]
        assert row["status"] == "up" and row["healthy"] is True and row["last_seen_s"] < 3
        assert row["calls"] > 0 and row["earned"] > 0 and row["success_rate"] > 0.5
        assert 0 < row["mean_latency_s"] < 5 and row["load"] >= 0
    assert rows["h100-big"]["hardware"]["gpu_count"] == 8 and rows["h100-big"]["gpu_price"] == 2 * NANOTON
    # the dead node was credited for what it served before it died, and its failed calls show in its success rate
    give_up = time.monotonic() + 45  # outcomes are stored once per refresh and every row re-read each full read
    while rows["h100-cheap"]["success_rate"] >= 1 and time.monotonic() < give_up:
        time.sleep(1)
        rows = market.rows()
    assert rows["h100-cheap"]["earned"] > 0 and rows["h100-cheap"]["success_rate"] < 1

    p = market.providers["h100-dear"]
    ls = p.cli("provider", "ls", "--gateway", market.gw.url, "--json")
    assert ls.returncode == 0, ls.stderr
    assert {r["name"]: r["earned"] for r in json.loads(ls.stdout)} == {n: r["earned"] for n, r in rows.items()}
    table = p.cli("provider", "ls", "--gateway", market.gw.url)
    assert table.returncode == 0, table.stderr
    for name in rows:
        assert name in table.stdout
    assert "H100-80GB x8" in table.stdout and "down" in table.stdout
    status = p.cli("provider", "status")
    assert status.returncode == 0, status.stderr
    mine = json.loads(status.stdout)
    assert mine["node_id"] == p.node_id and mine["earned_nanoton"] >= rows["h100-dear"]["earned"] > 0


def test_paid_calls_charge_the_serving_providers_own_price(market: Market) -> None:
    """With payments, the ledger books each call to the node that answered it at that node's own price, exactly
    what the marketplace shows it earned (not the gateway's local default price)."""
    from cocoon_faas.ton.client import ChannelSigner, PayingClient
    from cocoon_faas.ton.keys import PrivateKey

    gw = market.gw
    home = gw.home.parent / "caller"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COCOON_", "RAY_AUTH"))}
    env.update(COCOON_HOME=str(home), COCOON_GATEWAY_URL=gw.url, COCOON_CHAIN_PATH=str(gw.home / "chain.db"))

    def cli(*args: str) -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    cli("wallet", "create")
    cli("wallet", "faucet", "10")
    cid = cli("channel", "open", "--deposit", "5")["channel_id"]
    key = PrivateKey.from_mnemonic(json.loads((home / "wallet.json").read_text())["words"])
    payer = PayingClient(ChannelSigner(home / "channels" / f"{cid}.json", key))
    op = gw.headers()
    hold = int(market.fn("steady")["pricing"]["max_cost_nanoton"])
    earned0 = {nid: market.row(nid)["earned"] for nid in market.names()}
    price = {p.node_id: int(float(p.cpu_price) * NANOTON) for p in market.providers.values()}
    booked: Counter[str] = Counter()
    for _ in range(6):
        headers, ticket = payer.headers(hold)
        r = httpx.post(f"{gw.url}/fn/steady", json={"ms": 20}, headers=headers, timeout=60)
        payer.settle(ticket, dict(r.headers))
        assert r.status_code == 200, r.text
        nid = r.json()["node"]
        row = httpx.get(f"{gw.url}/v1/ledger/calls/{r.headers['X-Cocoon-Call-Id']}", headers=op, timeout=30).json()
        assert row["status"] == "charged" and row["charged"] == int(r.headers["X-Cocoon-Charge"])
        ms = float(r.headers["X-Cocoon-Exec-Ms"])
        want = 2 * price[nid] * ms / 1000  # CPU-seconds x this node's CPU price
        assert abs(row["provider_nanoton"] - want) <= 2 * price[nid] / 1e6 + 1, (row, want)
        booked[nid] += row["provider_nanoton"]
    assert len(booked) >= 1 and set(booked) <= {market.providers[n].node_id for n in ("h100-dear", "h100-big")}
    for nid, amount in booked.items():  # the provider's own view agrees with the ledger to the call
        got = market.row(nid)["earned"] - earned0[nid]
        assert abs(got - amount) <= 6, (got, amount)
    dues = httpx.get(f"{gw.url}/v1/ledger/providers", headers=op, timeout=30).json()
    assert set(booked) <= {d.get("provider") or d.get("provider_id") for d in dues.get("providers", dues)}
