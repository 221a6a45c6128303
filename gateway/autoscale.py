"""Autoscaling policy (pure): replicas wanted from in-flight demand, with separate up and down delays.

Demand is in-flight plus queued calls; a replica serves `max_concurrency` at once. An engine-backed replica (an
`llm.Engine` inside, whose `max_concurrency` is its batch of sequences) also reports its engine's queue, batch and
KV-pool occupancy; `engine_demand` turns those into calls' worth, and the larger of the two demands counts: a
replica whose KV pool fills (long prompts, long answers) asks for another before its calls pile up. Scaling up waits for
`up_delay` of sustained overload (except from zero: a cold start starts at once); scaling down waits for
`down_delay` of sustained underload, so a burst does not flap replicas. A `min_replicas=0` function drops to
zero after `idle_timeout` without calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cocoon_faas.replica_context import LoadReport


@dataclass
class ScaleState:
    over_since: float | None = None
    under_since: float | None = None
    last_busy: float = field(default_factory=time.monotonic)


def engine_demand(loads: Iterable[LoadReport], max_concurrency: int, target_utilization: float) -> int:
    """The demand, in calls, that replicas' engine reports stand for: their summed utilization (replicas' worth,
    `LoadReport.utilization`) over the utilization each replica should run at, so that `target_replicas`'
    ceil(demand / max_concurrency) asks for enough replicas to bring each to `target_utilization`."""
    total = sum(r.utilization() for r in loads)
    return math.ceil(total / target_utilization * max_concurrency - 1e-9) if total > 0 else 0


def target_replicas(*, now: float, current: int, demand: int, max_concurrency: int, min_replicas: int,
                    max_replicas: int, state: ScaleState, up_delay: float, down_delay: float,
                    idle_timeout: float) -> int:
    """How many replicas the function should have now (updates `state`)."""
    if demand > 0:
        state.last_busy = now
    wanted = min(max_replicas, max(min_replicas, math.ceil(demand / max_concurrency)))
    if current == 0 and demand > 0:
        state.over_since = state.under_since = None
        return max(wanted, 1)
    if wanted > current:
        state.under_since = None
        if state.over_since is None:
            state.over_since = now
        if now - state.over_since >= up_delay:
            state.over_since = None
            return wanted
        return current
    state.over_since = None
    if wanted < current:
        floor = min_replicas
        if min_replicas == 0 and now - state.last_busy < idle_timeout:
            floor = 1  # keep one warm until the idle window passes
        wanted = max(wanted, floor)
        if wanted >= current:
            state.under_since = None
            return current
        if state.under_since is None:
            state.under_since = now
        if now - state.under_since >= down_delay or wanted == 0:
            state.under_since = None
            return wanted
        return current
    state.under_since = None
    return current
