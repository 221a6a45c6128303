"""Choosing a replica for a call and queueing when none is free: `acquire` / `release`.

Power of two choices on in-flight counts among the replicas a call may use. Which ones it may use is the call's
`Eligibility` (every ready replica for a plain call; for a sealed call only those holding one of the keys the
envelope is sealed to, preferring ones whose code is unlocked). A call that finds no free slot waits in the
function's queue (bounded by COCOON_QUEUE_LIMIT) until a release wakes it or its deadline passes; a call queued
across a redeploy moves to the new version, unless its eligibility says the new replicas cannot serve it.

Pure of Ray and HTTP: the controller owns the function table and autoscaling and passes them in.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cocoon_faas.errors import CallTimeoutError, CocoonError, NotFoundError, OverloadedError

if TYPE_CHECKING:
    from cocoon_faas.gateway.controller import FunctionRuntime
    from cocoon_faas.gateway.replica_client import ReplicaHandle
    from cocoon_faas.replica_context import LoadReport


class Loaded(Protocol):
    inflight: int
    load: LoadReport | None


R = TypeVar("R", bound=Loaded)


def has_room(r: Loaded, capacity: int) -> bool:
    """A free slot: fewer calls in flight than `capacity`, and (an engine-backed replica) no requests already
    waiting in its engine, whose KV pool or batch is full: a call sent there would only queue behind them, so it
    waits in the gateway's queue instead (where any replica, or a new one, can take it; past COCOON_QUEUE_LIMIT:
    429). A report is trusted only while this gateway has calls there: an idle replica always gets the next."""
    if r.inflight >= capacity:
        return False
    return r.load is None or not r.load.saturated or r.inflight == 0


def choose(replicas: Sequence[R], capacity: int, rng: random.Random) -> R | None:
    """Pick the less loaded of two random replicas with a free slot; None when all are full."""
    if any(r.load is not None for r in replicas):  # engine-backed: skip the saturated ones
        replicas = [r for r in replicas if has_room(r, capacity)]
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


@dataclass(frozen=True)
class Eligibility:
    """Which replicas one call may use. `accept` filters; `prefer` ranks a subset first (tried before the rest);
    `none_left` is raised when no replica of the function is acceptable at all (waiting would not help)."""

    accept: Callable[[ReplicaHandle], bool]
    none_left: Callable[[FunctionRuntime], CocoonError]
    prefer: Callable[[ReplicaHandle], bool] | None = None


class Chooser:
    """acquire/release over the controller's function table."""

    def __init__(self, functions: dict[str, FunctionRuntime], queue_limit: int,
                 on_queue: Callable[[FunctionRuntime], None], rng: random.Random | None = None) -> None:
        self.functions = functions
        self.queue_limit = queue_limit
        self.on_queue = on_queue  # the autoscaler's hook: a call had to wait
        self.rng = rng or random.Random()
        self._wants: dict[asyncio.Future[Any], Eligibility | None] = {}  # each waiting call's eligibility

    def _pick(self, fr: FunctionRuntime, want: Eligibility | None) -> ReplicaHandle | None:
        cap = fr.spec.max_concurrency
        if want is None:
            r = choose(fr.ready, cap, self.rng)
        else:
            cands = [r for r in fr.ready if want.accept(r)]
            if not cands:
                raise want.none_left(fr)
            r = None
            if want.prefer is not None:
                r = choose([c for c in cands if want.prefer(c)], cap, self.rng)
            r = r or choose(cands, cap, self.rng)
        if r is not None:
            r.inflight += 1
        return r

    async def acquire(self, fr: FunctionRuntime, deadline: float, want: Eligibility | None = None
                      ) -> ReplicaHandle:
        """A replica with a free slot (its in-flight count already taken), waiting in the queue if needed.

        First come, first served: a call never takes a slot while earlier calls wait (a freed slot is handed to
        the oldest waiter by `release`); before, a new call could take the slot its woken waiter was about to
        use, and the waiter went to the back of the queue, which made the tail latency of a busy function."""
        if not fr.waiters:
            r = self._pick(fr, want)
            if r is not None:
                return r
        if fr.queued >= self.queue_limit:
            raise OverloadedError(
                f"every replica of {fr.name!r} is busy and {fr.queued} calls are queued; retry shortly",
                retry_after=1,
            )
        fr.queued += 1
        try:
            self.on_queue(fr)
            while True:
                current = self.functions.get(fr.name)
                if current is None:
                    raise NotFoundError(f"function {fr.name!r} was deleted while the call waited")
                if current is not fr:  # redeployed or rolled back while queued: wait on the new version
                    fr.queued -= 1
                    current.queued += 1
                    fr = current
                    r = self._pick(fr, want)
                    if r is not None:
                        return r
                if fr.problem is not None and not fr.ready and not fr.starting:
                    raise fr.problem
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CallTimeoutError(
                        f"no replica of {fr.name!r} became free within the call's time limit "
                        f"({fr.spec.timeout:g}s)"
                    )
                # a replica whose engine queues frees room without a release here (its report changes): look
                # again at the pace of its reports
                poll = 0.25 if any(r.load is not None and r.load.saturated for r in fr.ready) else 1.0
                handed = await self._wait(fr, want, min(remaining, poll))
                if handed is not None:
                    return handed
                r = self._pick(fr, want)
                if r is not None:
                    return r
        finally:
            fr.queued -= 1

    async def _wait(self, fr: FunctionRuntime, want: Eligibility | None, timeout: float) -> ReplicaHandle | None:
        """Wait in `fr`'s queue: a replica handed over by `release`, or None when woken to look again (a replica
        became ready, a redeploy, the timeout)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReplicaHandle | None] = loop.create_future()
        waiters = fr.waiters
        waiters.append(fut)
        self._wants[fut] = want
        timer = loop.call_later(timeout, _resolve, fut)
        try:
            handed = await fut
        except asyncio.CancelledError:
            late = fut.result() if fut.done() and not fut.cancelled() else None
            if late is not None:  # handed over just as this call was cancelled: pass the slot on
                late.inflight -= 1
                self._give_back(fr, late)
            _discard(waiters, fut)
            raise
        finally:
            timer.cancel()
            self._wants.pop(fut, None)
        if handed is None:
            _discard(waiters, fut)  # woken by the timer: still queued
        return handed

    def release(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        r.inflight -= 1
        r.calls += 1
        self._give_back(fr, r)

    def _give_back(self, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        """A slot of `r` is free: hand it to the oldest waiter that may use it, else wake one to look."""
        current = self.functions.get(r.function, fr)
        waiters = current.waiters
        if not waiters:
            return
        if r.state == "ready" and r.version == current.version and has_room(r, current.spec.max_concurrency):
            while waiters and waiters[0].done():
                waiters.popleft()
            for i, fut in enumerate(waiters):  # the oldest call this replica may serve (sealed calls filter)
                want = self._wants.get(fut)
                if not fut.done() and (want is None or want.accept(r)):
                    r.inflight += 1
                    del waiters[i]
                    fut.set_result(r)
                    return
        current.wake(1)


def _resolve(fut: asyncio.Future[ReplicaHandle | None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _discard(waiters: deque[Any], fut: asyncio.Future[Any]) -> None:
    try:
        waiters.remove(fut)
    except ValueError:
        pass
