"""Payments benchmark: what paying per call costs, through a real gateway, and the verifier's throughput.

    python benchmarks/payments.py [--calls 2000] [--n 20000]

1. States verified per second per core: decode the X-Cocoon-Payment header + all `check_state` checks + Ed25519,
   measured in CPU time of this process (one core), next to raw Ed25519 verification of the same states.
2. authorize + settle with the SQLite ledger (WAL, synchronous=NORMAL), in process.
3. Paid vs unpaid no-op calls through one real gateway (`cocoon serve` + local Ray) in the same run, alternating
   one unpaid (API key) and one paid (signed channel state) call, so load from anything else hits both alike.
   Target: < 0.5 ms added at p50; >= 5,000 states/s/core.
4. The same for the OpenAI path: `POST /v1/chat/completions` (non-streaming) on a tiny per-token priced chat
   function, unpaid (API key) vs paid (channel), alternating; the paid one is charged per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from _procs import stop_group  # benchmarks/ is on sys.path when a script here runs

from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate, check_state, decode_header
from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey

NOOP_APP = '''
import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=32)
def noop() -> int:
    return 0


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=32, min_replicas=1, serves="chat:bench-echo",
                 price_per_million_prompt_tokens="1", price_per_million_completion_tokens="2")
async def bench_chat(messages: list, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None, stop: list | None = None):  # async: see RESULTS (executor bug)
    yield {"delta": "ok"}
    yield {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
'''


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def verify_rate(n: int, tmp: Path) -> None:
    op, caller = PrivateKey(b"\x07" * 32), PrivateKey(b"\x08" * 32)
    ledger = Ledger(tmp / "ledger.db")
    ledger.add_channel(1, caller.public_key(), op.public_key(), "0:" + "00" * 32, "bench", 10**15)
    gate = PaymentGate(ledger, op)
    signer = ChannelSigner(tmp / "c.json", caller, 2, 10**15)  # states for the verifier (channel 2 is unused)
    t0 = time.perf_counter()
    tickets = []
    for _ in range(n):
        t = signer.sign_for_call(1000)
        signer.complete(t, 1000)  # as if charged in full: sent grows by a hold per state
        tickets.append(t)
    sign_s = time.perf_counter() - t0
    ch, opk = ledger.channel(1), op.public_key()
    ch = replace(ch, channel_id=2)
    t0 = time.process_time()
    for t in tickets:
        check_state(decode_header(t.header), ch, opk, 0, 1000)
    verify_s = time.process_time() - t0
    from nacl.bindings import crypto_sign_open

    pk = caller.public_key().raw
    signed = [t.state.signature + t.state.state.to_cell().hash for t in tickets]
    t0 = time.process_time()
    for sm in signed:
        crypto_sign_open(sm, pk)
    raw_s = time.process_time() - t0
    paying = ChannelSigner(tmp / "c1.json", caller, 1, 10**15)
    # the gateway checkpoints its ledger's WAL on a thread (gateway/db.py); SQLite's own automatic checkpoint,
    # inside one commit in a few hundred, is measured beside it on a second ledger, in alternating blocks
    auto = Ledger(tmp / "ledger-auto.db")
    auto.add_channel(1, caller.public_key(), op.public_key(), "0:" + "00" * 32, "bench", 10**15)
    ledger.db.checkpoint_in_background()  # type: ignore[attr-defined]
    gates = {"thread": gate, "auto": PaymentGate(auto, op)}
    lat: dict[str, list[float]] = {"thread": [], "auto": []}
    for i in range(min(n, 5000)):
        which = "thread" if (i // 100) % 2 == 0 else "auto"
        g = gates[which]
        t = paying.sign_for_call(1000)
        s = time.perf_counter()
        charged = g.settle(g.authorize(t.header, f"c{i}", "noop", 1000), "p", 500, "d", 0)
        lat[which].append(time.perf_counter() - s)
        paying.complete(t, charged)
    assert ledger.verify()["ok"] and auto.verify()["ok"]
    ledger.close()
    auto.close()
    print(f"client signing:               {n / sign_s:10.0f} states/s (state file written once per seqno lease)")
    print(f"states verified (full check): {n / verify_s:10.0f} states/s/core   target >= 5000")
    print(f"raw Ed25519 verify (libsodium): {n / raw_s:8.0f} /s/core")
    for which, title in (("thread", "checkpoints on a thread, as the gateway"), ("auto", "SQLite's own checkpoint")):
        print(f"authorize+settle (SQLite, {title}): p50 {pct(lat[which], .5) * 1e3:.3f} ms  "
              f"p99 {pct(lat[which], .99) * 1e3:.3f} ms")


@dataclass
class PaidGateway:
    """A running gateway with NOOP_APP deployed and a caller with an open channel on it."""

    url: str
    payer: PayingClient
    unpaid_headers: dict[str, str]  # the developer's API key
    holds: dict[str, int]  # function -> max_cost_nanoton (what each paid call holds)


@contextmanager
def paid_gateway(tmp: Path, port: int) -> Iterator[PaidGateway]:
    """`cocoon serve` (+ local Ray) of the running interpreter's checkout, NOOP_APP deployed, a caller wallet with a
    channel opened by the CLI; the gateway's process group is stopped on exit."""
    url = f"http://127.0.0.1:{port}"
    gw_home, caller_home = tmp / "gw", tmp / "caller"
    base = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    gw_env = {**base, "COCOON_HOME": str(gw_home), "COCOON_GATEWAY_URL": url, "COCOON_RAY_NUM_CPUS": "4"}
    caller_env = {**base, "COCOON_HOME": str(caller_home), "COCOON_GATEWAY_URL": url,
                  "COCOON_CHAIN_PATH": str(gw_home / "chain.db")}
    gw_home.mkdir(parents=True)
    log = open(tmp / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env=gw_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def cli(env: dict[str, str], *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, check=True,
                              capture_output=True, text=True).stdout

    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        app = tmp / "noop_app.py"
        app.write_text(NOOP_APP)
        cli(gw_env, "deploy", str(app))
        cli(caller_env, "wallet", "create")
        cli(caller_env, "wallet", "faucet", "100")
        cli(caller_env, "channel", "open", "--deposit", "50")
        cid = json.loads((caller_home / "channel.json").read_text())["channel_id"]
        key = PrivateKey.from_mnemonic(json.loads((caller_home / "wallet.json").read_text())["words"])
        payer = PayingClient(ChannelSigner(caller_home / "channels" / f"{cid}.json", key))
        holds = {f: int(httpx.get(f"{url}/v1/functions/{f}").json()["pricing"]["max_cost_nanoton"])
                 for f in ("noop", "bench_chat")}
        api_key = (gw_home / "api_key").read_text().strip()
        yield PaidGateway(url, payer, {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
                          holds)
    finally:
        stop_group(proc)


CHAT_BODY = b'{"model":"bench-echo","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
KINDS = {"fn": ("/fn/noop", b"{}", "noop"), "chat": ("/v1/chat/completions", CHAT_BODY, "bench_chat")}


def paid_pair(c: httpx.Client, gw: PaidGateway, kind: str, client: list[float] | None = None) -> tuple[float, float]:
    """One unpaid (API key) then one paid (channel) call of `kind` ("fn": the no-op, "chat": the per-token priced
    chat completion): seconds each, the paid one including the client's signing and its booking of the charge
    (those two alone are appended to `client` when given)."""
    path, body, fn = KINDS[kind]
    t0 = time.perf_counter()
    r = c.post(path, content=body, headers=gw.unpaid_headers)
    t1 = time.perf_counter()
    assert r.status_code == 200, r.text
    h, ticket = gw.payer.headers(gw.holds[fn])
    ts = time.perf_counter()
    r = c.post(path, content=body, headers={**h, "Content-Type": "application/json"})
    tb = time.perf_counter()
    gw.payer.settle(ticket, r.headers)
    t2 = time.perf_counter()
    assert r.status_code == 200 and int(r.headers["X-Cocoon-Charge"]) > 0, r.text
    if client is not None:
        client.append((ts - t1) + (t2 - tb))
    return t1 - t0, t2 - t1


def gateway_calls(calls: int, tmp: Path) -> None:
    with paid_gateway(tmp, 18000 + os.getpid() % 1000) as gw, httpx.Client(base_url=gw.url, timeout=30) as c:
        for kind, title in (("fn", "no-op call through the gateway"),
                            ("chat", "OpenAI chat completion (per-token priced)")):
            client: list[float] = []
            pairs = [paid_pair(c, gw, kind, client) for _ in range(calls + 50)][50:]  # 50 of warm-up
            unpaid_lat, paid_lat = [u for u, _ in pairs], [p for _, p in pairs]
            led = httpx.get(gw.url + "/v1/ledger?verify=1", headers=gw.unpaid_headers).json()["verify"]
            assert led["ok"], led
            up, pp = pct(unpaid_lat, .5) * 1e3, pct(paid_lat, .5) * 1e3
            print(f"{title}, {calls} each, alternating (client signing included in paid):")
            print(f"  unpaid (API key):  p50 {up:.3f} ms  p99 {pct(unpaid_lat, .99) * 1e3:.3f} ms")
            print(f"  paid (channel):    p50 {pp:.3f} ms  p99 {pct(paid_lat, .99) * 1e3:.3f} ms")
            print(f"  added by paying:   p50 {pp - up:+.3f} ms   target < 0.5 ms   (ledger verified: "
                  f"{led['charges']} charges)")
            print(f"  of which the caller's signing and booking: p50 {pct(client[50:], .5) * 1e3:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000, help="states for the verifier measurement")
    ap.add_argument("--calls", type=int, default=2000, help="paid and unpaid calls through the gateway")
    ap.add_argument("--no-gateway", action="store_true", help="skip the gateway measurement")
    args = ap.parse_args()
    print("load average (1/5/15 min) at the start:", "/".join(open("/proc/loadavg").read().split()[:3]))
    with tempfile.TemporaryDirectory() as tmp:
        verify_rate(args.n, Path(tmp))
        if not args.no_gateway:
            gateway_calls(args.calls, Path(tmp))
    print("load average (1/5/15 min) at the end:", "/".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
