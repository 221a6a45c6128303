"""Confidential-call costs, in one run (issue 3):

1. Sealing throughput for large payloads vs `cryptography`'s raw ChaCha20-Poly1305 (target: at least half).
   Client seal = one content encryption (into the body buffer, no copy) plus one HPKE wrap per replica; replica
   open/seal and client open measured the same way.
2. Crypto added to one call in-process (seal request, open it, seal the answer with a receipt, open and verify
   it) for a no-op payload and a 64 KiB echo. Sections 1 and 2 make every key inline (the SDK makes the next
   call's keys while it waits on the network; a tight loop has nothing to overlap them with).
3. `--gateway`: plain vs confidential calls through a real gateway and local Ray started here (dev attestation),
   for a no-op and a 64 KiB echo: p50/p99 of each, the added latency and the ratio, plus the CPU time per call of
   client, gateway and replica (psutil) — on a shared box the CPU figures are steadier than wall time. Plain and
   confidential calls alternate in blocks of 50 so both see the same load. The client's verified replica
   documents are cached (as in the SDK), so the sealed call costs one round trip like a plain one.

Run: `python benchmarks/confidential.py [--quick] [--gateway | --only-gateway]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _procs import stop_group  # benchmarks/ is on sys.path when a script here runs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cocoon_faas.confidential import ClientPolicy, ReplicaIdentity, seal_request, verify_document
from cocoon_faas.confidential.document import dev_public_key_hex

M = "be" * 32


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _pcts(fn, n: int) -> tuple[float, float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    ts.sort()
    return statistics.median(ts), ts[int(0.99 * (len(ts) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gateway", action="store_true", help="also plain vs confidential through a real gateway")
    ap.add_argument("--only-gateway", action="store_true", help="only the gateway comparison")
    args = ap.parse_args()
    if args.only_gateway:
        return gateway_compare(300 if args.quick else 2000)
    import cocoon_faas.confidential.caller as caller

    caller.PREPARE_AHEAD = False  # in a tight loop nothing overlaps: count every public-key operation inline
    dev = Ed25519PrivateKey.generate()
    reps = [ReplicaIdentity.create("echo", M, "bench", dev_key=dev) for _ in range(3)]
    policy = ClientPolicy.build([M], allow_dev_keys=[dev_public_key_hex(dev)])
    vs = [verify_document(r.document, policy) for r in reps]
    rep = reps[0]
    repeat = 3 if args.quick else 7

    print(f"== sealing throughput (MB/s, best of {repeat}) ==")
    print(f"{'size':>8} {'raw chacha':>11} {'seal x1':>9} {'seal x3':>9} {'open req':>9} {'seal resp':>10} "
          f"{'open resp':>10} {'seal/raw':>9}")
    sizes = [64 << 10, 1 << 20, 16 << 20] if not args.quick else [64 << 10, 1 << 20, 4 << 20]
    for size in sizes:
        data = os.urandom(size)
        aead = ChaCha20Poly1305(os.urandom(32))
        nonce = os.urandom(12)
        raw = _best(lambda: aead.encrypt(nonce, data, None), repeat)  # noqa: B023
        s1 = _best(lambda: seal_request(data, "echo", vs[:1]), repeat)  # noqa: B023
        s3 = _best(lambda: seal_request(data, "echo", vs), repeat)  # noqa: B023
        rep.replay.window_ms = 10**12
        bodies = [seal_request(data, "echo", vs[:1]) for _ in range(repeat)]
        it = iter(bodies)
        op = _best(lambda: rep.open_request(next(it)[0]), repeat)  # noqa: B023
        body, ctx = seal_request(data, "echo", vs[:1])
        opened = [rep.open_request(seal_request(b"{}", "echo", vs[:1])[0]).ctx for _ in range(repeat)]
        it2 = iter(opened)
        sr = _best(lambda: rep.seal_response(next(it2), "c", data, 1.0, 1), repeat)  # noqa: B023
        pairs = []
        for _ in range(repeat):
            b, c = seal_request(b"{}", "echo", vs[:1])
            pairs.append((c, rep.seal_response(rep.open_request(b).ctx, "c", data, 1.0, 1)))
        it3 = iter(pairs)

        def open_resp() -> None:
            c, f = next(it3)  # noqa: B023
            c.open_response(f)
        orr = _best(open_resp, repeat)
        mb = size / 1e6
        print(f"{size >> 10:>6}Ki {mb / raw:>11.0f} {mb / s1:>9.0f} {mb / s3:>9.0f} {mb / op:>9.0f} "
              f"{mb / sr:>10.0f} {mb / orr:>10.0f} {raw / s1:>9.2f}")

    print("\n== crypto added per call, in-process (µs: p50 / p99) ==")
    n = 300 if args.quick else 2000
    rep.replay.window_ms = 10**12
    for label, payload in (("no-op {}", b"{}"), ("echo 64 KiB", b'"' + b"a" * (64 << 10) + b'"')):
        def call() -> None:
            body, ctx = seal_request(payload, "echo", vs[:1])  # noqa: B023
            o = rep.open_request(body)
            ctx.open_response(rep.seal_response(o.ctx, "c", o.args_json, 1.0, 1))
        p50, p99 = _pcts(call, n)
        print(f"{label:>12}: {p50:8.1f} / {p99:8.1f}")
    if args.gateway:
        gateway_compare(300 if args.quick else 2000)


def _pct(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    return statistics.median(ts), ts[int(0.99 * (len(ts) - 1))]


def _server_procs(root_pid: int) -> list[list[Any]]:
    """[[gateway], [replica workers]] as psutil processes (empty when psutil is missing)."""
    try:
        import psutil
    except ImportError:
        return []
    gw = psutil.Process(root_pid)
    reps = [p for p in gw.children(recursive=True) if "Replica" in " ".join(p.cmdline()[:1])]
    return [[gw], reps]


def _cpu(procs: list[list[Any]]) -> list[float]:
    out = [time.process_time()]
    for group in procs:
        total = 0.0
        for p in group:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a worker that went away
                pass
        out.append(total)
    return out


def _interleaved(plain: Callable[[], Any], conf: Callable[[], Any], n: int, procs: list[list[Any]]
                 ) -> tuple[tuple[float, float], tuple[float, float], list[float], list[float]]:
    """Alternate blocks of plain and confidential calls, so both see the same machine load; returns the
    percentiles of each and the CPU time per call (µs) of client, gateway and replicas for each."""
    tp: list[float] = []
    tc: list[float] = []
    cpu_p = [0.0] * (1 + len(procs))
    cpu_c = [0.0] * (1 + len(procs))
    block = 50
    for _ in range(max(1, n // block)):
        for fn, ts, acc in ((plain, tp, cpu_p), (conf, tc, cpu_c)):
            c0 = _cpu(procs)
            for _ in range(block):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e6)
            for i, (a, b) in enumerate(zip(c0, _cpu(procs), strict=True)):
                acc[i] += b - a
    calls = len(tp)
    return _pct(tp), _pct(tc), [x / calls * 1e6 for x in cpu_p], [x / calls * 1e6 for x in cpu_c]


def gateway_compare(n: int) -> None:
    """Plain vs confidential through `cocoon serve` (own COCOON_HOME, local Ray, dev attestation)."""
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import httpx

    root = Path(__file__).resolve().parents[1]
    home = Path(tempfile.mkdtemp(prefix="cocoon-bench-conf-"))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "COCOON_HOME": str(home), "COCOON_GATEWAY_URL": url, "COCOON_ATTESTATION": "dev",
           "COCOON_RAY_NUM_CPUS": "4"}
    env.pop("COCOON_API_KEY", None)
    os.environ.update({k: env[k] for k in ("COCOON_HOME", "COCOON_GATEWAY_URL")})
    proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env=env,
                            stdout=open(home / "gateway.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(root / "benchmarks/apps/sealed_bench.py")],
                       env=env, check=True, capture_output=True)
        from cocoon_faas.client import Client
        from cocoon_faas.settings import reload_settings

        reload_settings()
        c = Client(url=url, payer=None)
        echo = "a" * (64 << 10)
        procs = _server_procs(proc.pid)
        print(f"\n== plain vs confidential through the gateway ({n} calls each, interleaved; µs p50 / p99) ==")
        print(f"{'call':>12} {'plain':>19} {'confidential':>19} {'added p50':>10} {'ratio p50':>10}   "
              "CPU µs/call plain -> confidential (client, gateway, replica)")
        for label, name, args in (("no-op", "bench_noop", {}), ("echo 64 KiB", "bench_echo", {"data": echo})):
            for _ in range(50):  # warm both paths (connection, document cache)
                c.call(name, args)
                c.call_confidential(name, args, allow_dev_attestation=True)
            plain, conf, cpu_p, cpu_c = _interleaved(
                lambda: c.call(name, args),  # noqa: B023
                lambda: c.call_confidential(name, args, allow_dev_attestation=True),  # noqa: B023
                n, procs)
            cpu = "  ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(cpu_p, cpu_c, strict=True))
            print(f"{label:>12} {plain[0]:8.0f} / {plain[1]:8.0f} {conf[0]:8.0f} / {conf[1]:8.0f} "
                  f"{conf[0] - plain[0]:10.0f} {conf[0] / plain[0]:10.2f}   {cpu}")
        c.close()
    finally:
        stop_group(proc)


if __name__ == "__main__":
    main()
