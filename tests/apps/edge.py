"""Functions that exercise the platform's edges in the end-to-end tests."""

import os
import time
from pathlib import Path

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=1, max_concurrency=2)
def too_slow(seconds: float = 5.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # a Python loop, so an interrupt lands at once
        time.sleep(0.01)
    return {"done": True}


@cocoon.function(cpu=0.25, timeout=60, max_concurrency=1, max_replicas=1)
def busy(seconds: float, marker: str = "") -> dict:
    """Loops in Python; writes `marker` when it finishes, so a test can tell an interrupted call from a done one."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    if marker:
        Path(marker).write_text("finished")
    return {"slept": seconds}


@cocoon.function(cpu=0.25, timeout=30, retries=2, max_concurrency=4, min_replicas=2, max_replicas=2)
def crash_once(marker: str) -> dict:
    """Kills its own replica the first time (no marker yet); the retry on another replica succeeds."""
    p = Path(marker)
    if not p.exists():
        p.write_text(str(os.getpid()))
        os._exit(1)
    return {"pid": os.getpid(), "first_pid": int(p.read_text())}


@cocoon.function(cpu=0.25, timeout=30, max_concurrency=2)
def slow_stream(n: int = 3, gap: float = 0.6):
    for i in range(n):
        yield {"i": i, "t": time.time()}
        time.sleep(gap)


@cocoon.function(gpu="H100", cpu=0.25, timeout=5)
def needs_h100() -> str:
    return "never runs on a CPU cluster"


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=16)
def echo(data: str = "", n: int = 0) -> dict:
    return {"len": len(data), "n": n}


@cocoon.function(cpu=0.25, timeout=30, max_concurrency=1, min_replicas=0, max_replicas=3)
def scalable(seconds: float = 0.5) -> int:
    time.sleep(seconds)
    return os.getpid()
