"""Replica choice: power of two choices on in-flight counts (pure; the clock and randomness are passed in)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Loaded(Protocol):
    inflight: int


R = TypeVar("R", bound=Loaded)


def choose(replicas: Sequence[R], capacity: int, rng: random.Random) -> R | None:
    """Pick the less loaded of two random replicas with a free slot; None when all are full."""
    n = len(replicas)
    if n == 0:
        return None
    if n == 1:
        r = replicas[0]
        return r if r.inflight < capacity else None
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = replicas[i], replicas[j]
    best = a if a.inflight <= b.inflight else b
    if best.inflight < capacity:
        return best
    free = [r for r in replicas if r.inflight < capacity]
    return min(free, key=lambda r: r.inflight) if free else None
