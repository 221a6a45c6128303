"""Functions for the several-gateways end-to-end test (tests/test_e2e_scaleout.py)."""

import os
import time

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=16, min_replicas=1, max_replicas=1)
def echo(n: int = 0) -> dict:
    return {"n": n}


@cocoon.function(cpu=0.25, timeout=30, max_concurrency=1, min_replicas=1, max_replicas=3)
def slow(seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return os.getpid()


@cocoon.function(cpu=0.25, timeout=150, max_concurrency=1, min_replicas=1, max_replicas=1)
def spin(seconds: float = 1.0) -> int:
    """Busy for `seconds` in short sleeps (a cancel interrupts it between two; one long sleep would not)."""
    ticks = 0
    while ticks < seconds * 20:
        time.sleep(0.05)
        ticks += 1
    return ticks
