"""What paying per call adds, before vs after a change: two checkouts' gateways side by side, interleaved.

    python benchmarks/payments_ab.py --before /work/main --after . [--rounds 10] [--calls 100]

Each checkout runs its own gateway (`cocoon serve` + local Ray, its own code and venv: `<dir>/.venv/bin/python`)
and its own client process, set up by benchmarks/payments.py's `paid_gateway` (the no-op and the per-token priced
chat function of NOOP_APP, a channel opened by the CLI); both sides run this folder's benchmark code. Then, round by round (the order of the two sides swapped each
round), each side makes `--calls` alternating unpaid (API key) / paid (channel) calls on `/fn/noop`, then on
`POST /v1/chat/completions`. Load from anything else on the machine hits both sides and both kinds alike; single
runs still move with it, so the script prints the load average after every round. Paid includes the client's
signing and booking of the charge, as in payments.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def worker(port: int) -> None:
    """One side: a gateway of this interpreter's checkout, driven over stdin (`round N`, `report`, `quit`)."""
    import httpx
    from payments import paid_gateway, paid_pair  # benchmarks/ is on sys.path when a script here runs

    lat: dict[str, list[float]] = {"fn_unpaid": [], "fn_paid": [], "chat_unpaid": [], "chat_paid": []}
    with tempfile.TemporaryDirectory() as tmp, paid_gateway(Path(tmp), port) as gw, \
            httpx.Client(base_url=gw.url, timeout=30) as c:
        for _ in range(50):  # warm-up
            paid_pair(c, gw, "fn")
            paid_pair(c, gw, "chat")
        print("ready", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd[0] == "round":
                for kind in ("fn", "chat"):
                    for _ in range(int(cmd[1])):
                        unpaid, paid = paid_pair(c, gw, kind)
                        lat[kind + "_unpaid"].append(unpaid)
                        lat[kind + "_paid"].append(paid)
                print("ok", flush=True)
            elif cmd[0] == "report":
                led = httpx.get(gw.url + "/v1/ledger?verify=1", headers=gw.unpaid_headers).json()["verify"]
                print(json.dumps({"lat": lat, "ledger_ok": led["ok"]}), flush=True)
            else:
                break


def load() -> str:
    return "/".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="checkout without the change (with its .venv)")
    ap.add_argument("--after", type=Path, required=True, help="checkout with the change (with its .venv)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=100, help="unpaid/paid pairs per kind, side and round")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    port = 18600 + os.getpid() % 300
    sides: dict[str, subprocess.Popen[str]] = {}
    for i, (name, d) in enumerate((("before", args.before), ("after", args.after))):
        d = d.resolve()
        # both sides run this script and this folder's payments.py (the same benchmark code) with their own
        # checkout's venv, so only the cocoon_faas package differs
        sides[name] = subprocess.Popen([str(d / ".venv" / "bin" / "python"), __file__, "--before", ".", "--after", ".",
                                        "--worker", str(port + i)], cwd=d, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)})
    try:
        for name, p in sides.items():
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", f"{name} did not start"
        print(f"load average (1/5/15 min) at the start: {load()}", flush=True)
        for r in range(args.rounds):
            for name, p in (list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))):
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(f"round {args.calls}\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "ok", f"{name} failed in round {r}"
            print(f"round {r + 1}/{args.rounds} done, load average {load()}", flush=True)
        res: dict[str, Any] = {}
        for name, p in sides.items():
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("report\n")
            p.stdin.flush()
            res[name] = json.loads(p.stdout.readline())
    finally:
        for p in sides.values():
            if p.stdin is not None:
                p.stdin.write("quit\n")
                p.stdin.flush()
            p.wait(timeout=120)
    added: dict[str, dict[str, float]] = {}
    for name, r in res.items():
        for kind, label in (("fn", "no-op /fn"), ("chat", "OpenAI chat")):
            up = statistics.median(r["lat"][kind + "_unpaid"]) * 1e3
            pp = statistics.median(r["lat"][kind + "_paid"]) * 1e3
            added.setdefault(kind, {})[name] = pp - up
            print(f"{name:6s} {label:12s} unpaid p50 {up:.3f} ms  paid p50 {pp:.3f} ms  added by paying {pp - up:+.3f} ms"
                  f"  (n={len(r['lat'][kind + '_paid'])}, ledger verified: {r['ledger_ok']})")
    for kind, a in added.items():
        print(f"{kind}: added p50 after - before = {a['after'] - a['before']:+.3f} ms   target: added < 0.5 ms")


if __name__ == "__main__":
    main()
