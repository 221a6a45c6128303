"""Payments benchmark: states verified per second per core (pure), and authorize+settle with the SQLite ledger.

    python benchmarks/payments.py [--n 20000]

TODO(lead, once payments are wired into the gateway's call path): add the paid-vs-unpaid no-op call latency
(p50/p99 added by X-Cocoon-Payment) by calling a deployed no-op function with and without a channel.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate, check_state, decode_header
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    op, caller = PrivateKey(b"\x07" * 32), PrivateKey(b"\x08" * 32)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db")
        ledger.add_channel(1, caller.public_key(), op.public_key(), "0:" + "00" * 32, "bench", 10**15)
        gate = PaymentGate(ledger, op)
        signer = ChannelSigner(Path(tmp) / "c.json", caller, 1, 10**15)
        t0 = time.perf_counter()
        tickets = [signer.sign_for_call(1000) for _ in range(n)]
        sign_s = time.perf_counter() - t0
        ch = ledger.channel(1)
        t0 = time.perf_counter()
        for t in tickets:
            check_state(decode_header(t.header), ch, op.public_key(), 0, 1000)
        verify_s = time.perf_counter() - t0
        m = min(n, 5000)
        lat = []
        for i, t in enumerate(tickets[:m]):
            s = time.perf_counter()
            h = gate.authorize(t.header, f"c{i}", "noop", 1000)
            gate.settle(h, "p", 500, "d", 0)
            lat.append(time.perf_counter() - s)
        lat.sort()
        assert ledger.verify()["ok"]
    print(f"client signing:            {n / sign_s:10.0f} states/s (incl. state file write)")
    print(f"states verified (pure):    {n / verify_s:10.0f} states/s/core   target >= 5000")
    print(f"authorize+settle (SQLite): p50 {lat[len(lat) // 2] * 1e3:.3f} ms  p99 {lat[int(len(lat) * .99)] * 1e3:.3f} ms"
          f"  ({m / sum(lat):.0f} calls/s)")
    print("paid vs unpaid no-op call latency: TODO once the gateway wires PaymentGate into /fn/{name}")


if __name__ == "__main__":
    main()
