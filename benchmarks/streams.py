"""Stream throughput through the real gateway at several stream windows (COCOON_STREAM_WINDOW_BYTES).

A streamed call's items flow child -> actor -> gateway -> client under a credit window per hop (docs/security.md,
"Streams and flow control"). A small window costs throughput (one CREDIT round trip per half window); the default
should cost nothing measurable for token streams and little for bulk ones. Each window runs its own gateway (own
COCOON_HOME, own Ray, on 127.0.0.1), one at a time, interleaved over `--rounds`; a 16 MiB window never fills for
these streams, so it stands in for "no flow control". The client reads as fast as it can (httpx, one stream at a
time) and counts items and bytes.

    python benchmarks/streams.py                                   # windows 64 KiB, 1 MiB, 16 MiB; 2 rounds
    python benchmarks/streams.py --windows 65536,1048576 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import stop_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "benchmarks" / "apps" / "streamer.py"
SHAPES = (("tokens", 4000, 100), ("bulk", 400, 64 * 1024))  # (name, items, bytes per item)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one(window: int, repeats: int) -> dict[str, list[float]]:
    """Start a gateway with this window, deploy the streamer, time `repeats` streams of each shape."""
    home = Path(tempfile.mkdtemp(prefix="cocoon-streams-"))
    port = free_port()
    env = {**os.environ, "COCOON_HOME": str(home), "COCOON_GATEWAY_URL": f"http://127.0.0.1:{port}",
           "COCOON_RAY_NUM_CPUS": "8", "COCOON_STREAM_WINDOW_BYTES": str(window)}
    log = open(home / "gateway.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start; see {home / 'gateway.log'}")
            time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(APP)], env=env, check=True,
                       capture_output=True, timeout=300)
        headers = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
        out: dict[str, list[float]] = {}
        with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
            c.post("/fn/streamer", json={"n": 3, "size": 10})  # the replica is up and warm
            for name, n, size in SHAPES:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    items = received = 0
                    with c.stream("POST", "/fn/streamer", json={"n": n, "size": size}) as r:
                        r.raise_for_status()
                        for chunk in r.iter_bytes():
                            received += len(chunk)
                            items += chunk.count(b"data: ")
                    seconds = time.perf_counter() - t0
                    if items != n + 1:  # the items and the `end` event
                        raise RuntimeError(f"{name}: got {items} events, expected {n + 1}")
                    out.setdefault(f"{name} items/s", []).append(n / seconds)
                    out.setdefault(f"{name} MB/s", []).append(received / seconds / 1e6)
        return out
    finally:
        stop_group(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="65536,1048576,16777216", help="comma-separated window sizes, bytes")
    ap.add_argument("--rounds", type=int, default=2, help="each window this many times, interleaved")
    ap.add_argument("--repeats", type=int, default=3, help="streams of each shape per gateway")
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    results: dict[int, dict[str, list[float]]] = {w: {} for w in windows}
    for rnd in range(args.rounds):
        for w in windows:
            print(f"round {rnd + 1}, window {w}: load average {os.getloadavg()}", flush=True)
            for k, v in run_one(w, args.repeats).items():
                results[w].setdefault(k, []).extend(v)
    keys = list(next(iter(results.values())).keys())
    ref = windows[-1]
    print(f"\nload average at the end {os.getloadavg()} (2-core box shared with other work: noisy)")
    print("| window | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for w in windows:
        cells = [f"{statistics.median(results[w][k]):,.1f} ({statistics.median(results[w][k]) / statistics.median(results[ref][k]):.2f}x)"
                 for k in keys]
        print(f"| {w:,} | " + " | ".join(cells) + " |")
    print(f"(medians; ratios against the {ref:,}-byte window)")


if __name__ == "__main__":
    main()
