"""What the sandbox costs per call: the same gateway with `COCOON_SANDBOX=on` and `off`, interleaved in one run.

Issue 9 ("Done means"): a no-op and a 64 KiB echo, sandbox on vs off, at concurrency 1 (added p50 per call,
target < 0.1 ms) and 64 (throughput on ≥ 0.9× off), and deploy-to-first-response with the sandbox on (< 2 s
with Ray up). `off` runs the function in the replica actor's process (the pre-sandbox path); `on` relays each
call over a Unix socket to the bubblewrap child and back, metered by the actor.

`relay` (with `--modes on,relay,off`) is the sandbox on with COCOON_DIRECT_CALLS=false: every call crosses the
replica actor, as before the direct path; `on` sends plain calls from the gateway straight to the child.

The gateways run at once (each its own session and Ray, on 127.0.0.1); the measurements alternate between them
round by round, so slow drifts of this shared machine hit both alike. The load generator and helpers are those
of `benchmarks/gateway.py` (wrk when installed, else an asyncio client in this process).

    python benchmarks/sandbox.py                   # 3 rounds, 4 s per measurement
    python benchmarks/sandbox.py --rounds 2 --duration 3 --json /tmp/sandbox.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "benchmarks" / "apps" / "sandbox_pair.py"
ECHO_BODY = json.dumps({"data": "x" * 65536}).encode()

_spec = importlib.util.spec_from_file_location("cocoon_bench_gateway", ROOT / "benchmarks" / "gateway.py")
assert _spec is not None and _spec.loader is not None
G = importlib.util.module_from_spec(_spec)
sys.modules["cocoon_bench_gateway"] = G
_spec.loader.exec_module(G)


def start(mode: str, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """A gateway with COCOON_SANDBOX=mode; the app deployed; deploy-to-first-response measured."""
    system = G.System(f"sandbox-{mode}", workdir)
    port = G.free_port()
    home = workdir / f"home-{mode}"
    env = {"COCOON_HOME": str(home), "COCOON_GATEWAY_URL": f"http://127.0.0.1:{port}", "COCOON_RAY_NUM_CPUS": "8",
           "COCOON_SANDBOX": "off" if mode == "off" else "on",
           "COCOON_DIRECT_CALLS": "false" if mode == "relay" else "true"}
    system._spawn([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env)
    deadline = time.monotonic() + 180
    while not G._get_ok(f"http://127.0.0.1:{port}/healthz"):
        system._check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway ({mode}) did not start; see {system.log}")
        time.sleep(0.1)
    headers = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(APP)], cwd=ROOT,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"cocoon deploy failed: {r.stdout}{r.stderr}")
    G._wait_first_response(f"http://127.0.0.1:{port}/fn/noop", headers, deadline)
    return system, {"port": port, "headers": headers, "deploy_s": time.monotonic() - t0}


def measure(info: dict[str, Any], fn: str, body: bytes, c: int, seconds: float, wrk: str | None) -> Any:
    G.BODY = body  # the load generators post G.BODY
    target = G.Target(f"http://127.0.0.1:{info['port']}/fn/{fn}", info["headers"])
    return G.run_wrk(wrk, target, c, seconds) if wrk else G.run_asyncio(target, c, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--modes", default="on,off", help="on, relay (sandbox on, direct path off), off; each is "
                    "compared with off")
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if "off" not in modes or set(modes) - {"on", "relay", "off"}:
        ap.error("--modes: a comma-separated subset of on,relay,off that includes off")
    wrk = G.wrk_path()
    workdir = Path(tempfile.mkdtemp(prefix="cocoon-bench-sandbox-"))
    systems: dict[str, Any] = {}
    infos: dict[str, dict[str, Any]] = {}
    results: dict[str, list[Any]] = {}
    try:
        for mode in modes:
            systems[mode], infos[mode] = start(mode, workdir)
        cases = [("noop", b"{}", 1), ("noop", b"{}", 64), ("echo", ECHO_BODY, 1), ("echo", ECHO_BODY, 64)]
        for fn, body, c in cases:  # warm-up, not recorded
            for mode in modes:
                measure(infos[mode], fn, body, c, 1.0, wrk)
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]
            for fn, body, c in cases:
                for mode in order:
                    s = measure(infos[mode], fn, body, c, args.duration, wrk)
                    results.setdefault(f"{fn} c={c} {mode}", []).append(s)
    finally:
        for s in systems.values():
            s.stop()
    load = os.getloadavg()
    lines = [f"sandbox on vs off, {args.rounds} interleaved rounds x {args.duration:g} s, generator "
             f"{'wrk' if wrk else 'asyncio (in this process)'}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
             "deploy-to-first-response: " + ", ".join(f"{m} {infos[m]['deploy_s']:.2f} s" for m in modes),
             "| case | mode | p50 ms | off p50 ms | added p50 ms | rps | off rps | rps / off | errors / off |",
             "|---|---|---|---|---|---|---|---|---|"]
    out: dict[str, Any] = {"deploy_s": {m: infos[m]["deploy_s"] for m in infos}, "load": load, "cases": {}}
    for fn, _, c in cases:
        off = results[f"{fn} c={c} off"]
        p50_off = statistics.median(s.p50_ms for s in off)
        rps_off = statistics.median(s.rps for s in off)
        for mode in (m for m in modes if m != "off"):
            on = results[f"{fn} c={c} {mode}"]
            p50_on = statistics.median(s.p50_ms for s in on)
            rps_on = statistics.median(s.rps for s in on)
            err = (sum(s.errors for s in on), sum(s.errors for s in off))
            lines.append(f"| {fn} c={c} | {mode} | {p50_on:.3f} | {p50_off:.3f} | {p50_on - p50_off:+.3f} | "
                         f"{rps_on:.0f} | {rps_off:.0f} | {rps_on / rps_off:.2f}x | {err[0]}/{err[1]} |")
            out["cases"][f"{fn} c={c} {mode}"] = {
                "p50_on": p50_on, "p50_off": p50_off, "rps_on": rps_on, "rps_off": rps_off, "errors": err,
                "p50_on_rounds": [s.p50_ms for s in on], "p50_off_rounds": [s.p50_ms for s in off]}
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
