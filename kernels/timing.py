"""Interleaved A/B timing for the benchmarks, made to survive a shared, noisy machine.

Why: on a loaded box the speed of a function drifts by several times within seconds, so timing "all of A, then
all of B" measures the neighbours, not A vs B. Here the candidates take turns (A B C, then B C A, ...) for
`reps` rounds after `warmup` untimed rounds; each candidate gets the median of its samples and the figure to quote
is the ratio of medians. The load average (1, 5, 15 min) at start and end is kept so a reader can judge how quiet
the run was. One thread count is pinned for every candidate. On a GPU, pass `sync=torch.cuda.synchronize`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Samples:
    """Seconds per call of one candidate, in the order they were taken."""

    name: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) seconds, to show how much the machine moved."""
        return min(self.seconds), max(self.seconds)


@dataclass(frozen=True)
class ABResult:
    samples: dict[str, Samples]
    threads: int
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]

    def median(self, name: str) -> float:
        return self.samples[name].median

    def speedup(self, ours: str, baseline: str) -> float:
        """How many times faster `ours` is than `baseline` (ratio of medians; > 1 means ours is faster)."""
        return self.samples[baseline].median / self.samples[ours].median

    def load_line(self) -> str:
        s, e = self.load_start, self.load_end
        return (f"threads {self.threads}; load average (1/5/15 min) at start {s[0]:.2f}/{s[1]:.2f}/{s[2]:.2f}, "
                f"at end {e[0]:.2f}/{e[1]:.2f}/{e[2]:.2f}")


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - platforms without it
        return (float("nan"),) * 3


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: leave torch's default); return the count in force."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1, inner: int = 1,
    sync: Callable[[], None] | None = None, threads: int | None = None,
) -> ABResult:
    """Time each fn `reps` times, the candidates taking turns and the starting one rotating every round.

    `inner` calls make one sample (for very short fns); a sample is seconds per call."""
    if not fns or reps < 1 or inner < 1:
        raise ValueError("need at least one fn, reps >= 1 and inner >= 1")
    n_threads = pin_threads(threads)
    names = list(fns)
    load_start = load_average()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + reps):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            fn = fns[name]
            if sync:
                sync()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            if sync:
                sync()
            if rnd >= warmup:
                times[name].append((time.perf_counter() - t) / inner)
    return ABResult({n: Samples(n, tuple(times[n])) for n in names}, n_threads, load_start, load_average())
