"""An engine-backed function behind a real gateway and local Ray (tests/apps/tiny_engine.py: `llm.Engine` on a
tiny random-weights model in the sandbox): the prefix cache is per caller, and the engine's queue depth and KV
occupancy reach the gateway, which stops sending calls to a saturated replica (queue, then 429 with Retry-After)
and scales the function up on them while in-flight calls alone would not. A sealed call the engine refuses for a
full queue is a 429 with Retry-After too (the replica says so outside the sealed answer), and is not charged."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cocoon_faas.confidential import SEALED_CONTENT_TYPE, seal_request
from cocoon_faas.confidential_client import build_policy, verified_replicas
from cocoon_faas.ton.client import PayingClient
from cocoon_faas.transport import Transport
from tests.conftest import ROOT
from tests.test_e2e_payments import Caller, hold, ledger, ledger_call, summary

pytestmark = pytest.mark.e2e

FN = "/fn/TinyEngine.generate"
PROMPT = " ".join(f"w{3 + i % 60}" for i in range(40))  # 40 tokens: 2 full blocks of 16 can be reused


@pytest.fixture(scope="module")
def tiny(gateway):
    gateway.cli("deploy", str(ROOT / "tests" / "apps" / "tiny_engine.py"), timeout=300)
    with gateway.http() as c:
        bob = c.post("/v1/keys", json={"name": "engine-bob"}).json()["key"]
    yield bob
    with gateway.http() as c:
        c.delete("/v1/functions/TinyEngine.generate")
        c.delete("/v1/functions/TinyQueue.generate")


def _call(gateway, key: str | None, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(gateway.url + FN, json={"prompt": prompt, "max_tokens": max_tokens},
                      headers=gateway.headers(key), timeout=120)


def test_prefix_cache_is_shared_only_within_one_caller(gateway, tiny):
    alice1 = _call(gateway, None, PROMPT, 4).json()
    bob1 = _call(gateway, tiny, PROMPT, 4).json()
    alice2 = _call(gateway, None, PROMPT, 4).json()
    bob2 = _call(gateway, tiny, PROMPT, 4).json()
    assert alice1["usage"]["cached_tokens"] == 0
    assert bob1["usage"]["cached_tokens"] == 0  # nothing tells bob that alice sent this prompt
    assert alice2["usage"]["cached_tokens"] == 32 and bob2["usage"]["cached_tokens"] == 32
    assert alice1["tokens"] == bob1["tokens"] == alice2["tokens"] == bob2["tokens"]  # greedy, same either way


def _view(c: httpx.Client) -> dict[str, Any]:
    return c.get("/v1/functions/TinyEngine.generate").json()


def _wait(c: httpx.Client, cond: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = _view(c)
        if cond(v):
            return v
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}: {_view(c)}")


def _engines(v: dict[str, Any]) -> list[dict[str, int]]:
    return [r["engine"] for r in v["replica_list"] if r["state"] == "ready" and "engine" in r]


def test_kv_pressure_reaches_the_autoscaler_and_admission(gateway, tiny):
    results: dict[str, httpx.Response] = {}

    def call(name: str, prompt: str, max_tokens: int) -> None:
        results[name] = _call(gateway, None, prompt, max_tokens)

    def start(name: str, prompt: str, max_tokens: int) -> threading.Thread:
        t = threading.Thread(target=call, args=(name, prompt, max_tokens))
        t.start()
        return t

    threads = []
    with gateway.http() as c:
        v = _wait(c, lambda v: v["replicas"] == 1 and v["starting"] == 0, "one replica")
        # a long request takes most of the KV pool (13 of 16 blocks: 3 + 200 positions): the engine says so
        threads.append(start("long1", "w5 w6 w7", 200))
        v = _wait(c, lambda v: any(e["running"] == 1 and e["kv_used"] == 13 for e in _engines(v)),
                  "the engine's KV pool committed")
        assert [e["max_seqs"] for e in _engines(v)] == [8]  # the function's max_concurrency: sequences in the batch
        # a second one waits in the engine (the gateway had no report of a queue yet)
        threads.append(start("long2", "w8 w9", 200))
        v = _wait(c, lambda v: any(e["waiting"] >= 1 for e in _engines(v)), "a queue in the engine")
        # the report that shows the queue may already have made the autoscaler start a second replica (not ready)
        assert v["in_flight"] == 2 and v["replicas"] + v["starting"] in (1, 2) and v["replicas"] <= 2
        # now the replica is saturated: new calls wait in the gateway's queue (COCOON_QUEUE_LIMIT=4), then 429
        for i in range(6):
            threads.append(start(f"short{i}", f"w{10 + i} w11", 2))
        v = _wait(c, lambda v: len([r for r in results.values() if r.status_code == 429]) == 2,
                  "two calls refused (429)")
        refused = [r for r in results.values() if r.status_code == 429]
        assert all(r.headers["Retry-After"] == "1" for r in refused)
        assert "queued" in refused[0].json()["error"]["message"]
        # in-flight demand (2 running + 4 queued = 6 < max_concurrency 8) asks for one replica; the engine's report
        # (KV full, one waiting) asks for two
        v = _wait(c, lambda v: v["replicas"] + v["starting"] == 2, "a second replica", timeout=30)
        assert v["in_flight"] + v["queued"] <= 8
    for t in threads:
        t.join(120)
    ok = {k: r for k, r in results.items() if r.status_code == 200}
    assert len(ok) == 6 and len(ok["long1"].json()["tokens"]) == 200  # the queued ones ran once room was made


def test_sealed_calls_refused_by_a_full_engine_are_429_and_released(gateway, tiny, tmp_path: Path):
    """TinyQueue's engine runs one request and lets one wait: of six paid sealed calls sent at once, the ones it
    refuses answer 429 with Retry-After (not a sealed error inside a 200), their holds are released, the others
    are charged from their receipts, and the ledger verifies."""
    caller = Caller(tmp_path / "caller", gateway)
    caller.cli("wallet", "create")
    caller.cli("wallet", "faucet", "10")
    caller.cli("channel", "open", "--deposit", "5")
    payer = PayingClient(caller.signer())
    name = "TinyQueue.generate"
    policy = build_policy(gateway.home, gateway.url, name, allow_dev_attestation=True)
    replicas = verified_replicas(Transport(gateway.url, gateway.key), name, policy)
    most = hold(gateway, name)

    start = threading.Barrier(6)  # all six are sealed and signed first, then sent together: on a loaded box
    # a slow thread must not reach the gateway after the others finished (then nothing would be refused)

    def one(i: int) -> tuple[str, httpx.Response, Any]:
        body, ctx = seal_request(json.dumps({"prompt": f"w{5 + i} w6", "max_tokens": 40}).encode(), name, replicas)
        headers, ticket = payer.headers(most)
        cid = os.urandom(16).hex()
        start.wait(timeout=60)
        r = httpx.post(f"{gateway.url}/fn/{name}", content=bytes(body), timeout=60,
                       headers={**headers, "Content-Type": SEALED_CONTENT_TYPE, "X-Cocoon-Call-Id": cid})
        payer.settle(ticket, dict(r.headers))
        return cid, r, ctx

    with cf.ThreadPoolExecutor(6) as ex:
        done = list(ex.map(one, range(6)))
    payer.signer.flush()
    refused = [(cid, r) for cid, r, _ in done if r.status_code == 429]
    ok = [(cid, r, ctx) for cid, r, ctx in done if r.status_code == 200]
    assert len(refused) + len(ok) == 6, [r.text for _, r, _ in done]
    assert ok, "the engine runs one request at a time; at least the first one runs"
    # at least one was refused by the engine itself (the gateway's own queue refusal says "queued")
    assert any("refused the call for load" in r.json()["error"]["message"] for _, r in refused), \
        [r.text for _, r in refused]
    for cid, r in refused:
        assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "overloaded"
        assert r.headers.get("X-Cocoon-Charge", "0") == "0"
        row = ledger_call(gateway, cid)
        assert row["status"] == "released" and not row["charged"]
    charged = 0
    for cid, r, ctx in ok:
        result, receipt = ctx.open_response(r.content)
        assert len(json.loads(result)["tokens"]) == 40 and receipt.call_id == cid
        charge = int(r.headers["X-Cocoon-Charge"])
        assert ledger_call(gateway, cid)["charged"] == charge > 0
        charged += charge
    s = summary(gateway, payer.signer.channel_id)
    assert s["reserved"] == 0 and s["charged"] == charged == payer.signer.charged
    assert ledger(gateway, verify=True)["verify"]["ok"]
