"""Confidential-call costs, in one run (issue 3):

1. Sealing throughput for large payloads vs `cryptography`'s raw ChaCha20-Poly1305 (target: at least half).
   Client seal = one content encryption plus one HPKE wrap per replica; replica open/seal and client open
   measured the same way.
2. Crypto added to one call in-process (seal request, open it, seal the answer with a receipt, open and verify
   it) for a no-op payload and a 64 KiB echo. The end-to-end plain vs confidential latency through a real
   gateway is measured by `--gateway URL` once the gateway serves sealed calls.

Run: `python benchmarks/confidential.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

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
    args = ap.parse_args()
    dev = Ed25519PrivateKey.generate()
    reps = [ReplicaIdentity.create("echo", M, "bench", dev_key=dev) for _ in range(3)]
    policy = ClientPolicy.build([M], allow_dev_keys=[dev_public_key_hex(dev)])
    vs = [verify_document(r.document, policy) for r in reps]
    rep = reps[0]
    repeat = 3 if args.quick else 7

    print(f"== sealing throughput (MB/s, best of {repeat}) ==")
    print(f"{'size':>8} {'raw chacha':>11} {'seal x1':>9} {'seal x3':>9} {'open req':>9} {'seal resp':>10} "
          f"{'open resp':>10} {'seal 0copy':>10} {'seal/raw':>9} {'0copy/raw':>9}")
    sizes = [64 << 10, 1 << 20, 16 << 20] if not args.quick else [64 << 10, 1 << 20, 4 << 20]
    for size in sizes:
        data = os.urandom(size)
        aead = ChaCha20Poly1305(os.urandom(32))
        nonce = os.urandom(12)
        raw = _best(lambda: aead.encrypt(nonce, data, None), repeat)  # noqa: B023
        s1 = _best(lambda: seal_request(data, "echo", vs[:1]), repeat)  # noqa: B023
        s3 = _best(lambda: seal_request(data, "echo", vs), repeat)  # noqa: B023
        sz = _best(lambda: seal_request(data, "echo", vs[:1], zero_copy=True), repeat)  # noqa: B023
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
              f"{mb / sr:>10.0f} {mb / orr:>10.0f} {mb / sz:>10.0f} {raw / s1:>9.2f} {raw / sz:>9.2f}")

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


if __name__ == "__main__":
    main()
