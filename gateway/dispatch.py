"""Dispatch: get one call's body to a replica and its frames back, within the time limit, retrying replica death.

A call is retried elsewhere only when the platform failed it (the replica died) and, for a stream, only before
its first chunk; the user's own exception is an answer, not a fault, and is not retried. The chooser picks the
replica (gateway/chooser.py); a `Route` lets an entry point restrict the choice and prepare the call meta for the
chosen replica (a sealed call: only replicas holding its keys, their price rate and receipt MAC key). This module
knows nothing of HTTP, payments or records: gateway/pipeline.py wraps it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cocoon_faas import protocol as P
from cocoon_faas.errors import (
    CallCancelledError,
    CallTimeoutError,
    CocoonError,
    FunctionError,
    InvalidRequestError,
    MemoryExceededError,
    OverloadedError,
    ReplicaLostError,
)
from cocoon_faas.gateway.chooser import Eligibility
from cocoon_faas.gateway.replica_client import Frame

if TYPE_CHECKING:
    from cocoon_faas.gateway.controller import FunctionRuntime
    from cocoon_faas.gateway.replica_client import PendingCall, ReplicaHandle

GRACE_S = 2.0  # the replica enforces the limit itself; the gateway waits this much longer before giving up


class Replicas(Protocol):
    """What dispatch needs from the controller: the chooser's acquire/release and node health feedback."""

    async def acquire(self, fr: FunctionRuntime, deadline: float, want: Eligibility | None = None
                      ) -> ReplicaHandle: ...

    def release(self, fr: FunctionRuntime, r: ReplicaHandle) -> None: ...

    def record(self, r: ReplicaHandle, ok: bool, latency_s: float) -> None: ...


class Route:
    """How one call may be placed: which replicas (`want`) and what meta goes with it to the chosen one."""

    want: Eligibility | None = None

    def prepare(self, r: ReplicaHandle, meta: dict[str, Any]) -> None:
        """Adjust the call meta for replica `r` just before sending (a retry may pick another)."""


@dataclass
class Answer:
    """A unary call's final frame: the body (result, or a sealed `res`/`err` frame) or the error, with metering."""

    body: bytes | None
    error: CocoonError | None
    exec_ms: float
    replica: ReplicaHandle | None
    attempts: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return (self.replica.node or "local") if self.replica is not None else "local"


def error_from_frame(fr: FunctionRuntime, frame: Frame) -> CocoonError:
    m = frame.meta
    kind = m.get("type")
    if kind == "timeout":
        return CallTimeoutError(f"function {fr.name!r} exceeded its time limit of {fr.spec.timeout:g}s")
    if kind == "cancelled":
        return CallCancelledError(f"call to {fr.name!r} was cancelled")
    if kind == "memory_exceeded":
        return MemoryExceededError(str(m.get("message", "")), function=fr.name)
    if refused_for_load(m):
        # the function refused the call for load (an llm.Engine whose queue is full): 429, not charged. A sealed
        # call's replica says so in the frame's clear meta ("overloaded"), outside the sealed answer.
        return OverloadedError(f"function {fr.name!r} is overloaded: {m.get('message', '')}", retry_after=1)
    if kind == "function_error" and m.get("exc_type") == "InvalidRequestError":
        # the function refused its input with cocoon's own error (cocoon_faas.llm: a prompt past the context):
        # the caller's 400, not charged (like OverloadedError's 429), so OpenAI clients do not retry it as a 500
        return InvalidRequestError(f"function {fr.name!r} refused the request: {m.get('message', '')}",
                                   function=fr.name)
    if kind == "function_error":
        return FunctionError(f"{m.get('exc_type', 'Exception')}: {m.get('message', '')}",
                             exc_type=m.get("exc_type"), function=fr.name)
    return CocoonError(str(m.get("message", "replica error")),
                       **{k: v for k, v in m.items() if k not in ("logs", "message")})


def refused_for_load(meta: dict[str, Any]) -> bool:
    """An ERROR frame saying the function refused the call for load: a plain call's OverloadedError, or the
    `overloaded` type a replica sends for a sealed call (runtime/replica.py)."""
    kind = meta.get("type")
    return kind == "overloaded" or (kind == "function_error" and meta.get("exc_type") == "OverloadedError")


async def _within(fut: asyncio.Future[Any], timeout: float) -> Any:
    """`await fut` with a time limit: one timer, no extra task (asyncio.wait_for costs a task per call)."""

    def expire() -> None:
        if not fut.done():
            fut.set_exception(asyncio.TimeoutError())

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await fut
    finally:
        timer.cancel()


def _timeout(fr: FunctionRuntime) -> CallTimeoutError:
    return CallTimeoutError(f"function {fr.name!r} exceeded its time limit of {fr.spec.timeout:g}s")


class _Attempt:
    """One try of a call on the replica `r` that `acquire` gave it, for unary calls and streams alike: sent with the
    time left and the route's meta; on leaving, a call abandoned (cancelled, its consumer gone) is cancelled on the
    replica, and the call and the replica's slot are always given back, once."""

    __slots__ = ("replicas", "fr", "r", "call")

    def __init__(self, replicas: Replicas, fr: FunctionRuntime, r: ReplicaHandle) -> None:
        self.replicas, self.fr, self.r = replicas, fr, r
        self.call = 0

    def send(self, route: Route, meta: dict[str, Any], body: bytes, remaining: float, streaming: bool,
             window: int = 0) -> PendingCall:
        route.prepare(self.r, meta)
        head = {"t": remaining, "stream": True, **meta} if streaming else {"t": remaining, **meta}
        self.call, pending = self.r.send_call(head, body, streaming=streaming, window=window)
        return pending

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.call:
            if et is not None and issubclass(et, (asyncio.CancelledError, GeneratorExit)):
                self.r.cancel(self.call)
            self.r.finish(self.call)
        self.replicas.release(self.fr, self.r)


async def unary(replicas: Replicas, fr: FunctionRuntime, body: bytes, meta: dict[str, Any], route: Route,
                on_running: Any = None) -> Answer:
    """Run one unary call to its final frame. Raises only CancelledError (after cancelling it on the replica)."""
    deadline = time.monotonic() + fr.spec.timeout
    attempts = fr.spec.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            r = await replicas.acquire(fr, deadline, route.want)
        except CocoonError as exc:
            return Answer(None, exc, 0.0, None, attempt)
        sent_at = time.monotonic()
        with _Attempt(replicas, fr, r) as at:
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                pending = at.send(route, meta, body, remaining, streaming=False)
                if on_running is not None:
                    on_running()
                assert pending.future is not None
                frame = await _within(pending.future, remaining + GRACE_S)
            except ReplicaLostError as exc:
                replicas.record(r, False, time.monotonic() - sent_at)
                if attempt < attempts:
                    continue
                return Answer(None, ReplicaLostError(f"{exc}; no retries left (retries={fr.spec.retries})"), 0.0,
                              r, attempt)
            except asyncio.TimeoutError:
                r.cancel(at.call)
                return Answer(None, _timeout(fr), 0.0, r, attempt)
        ok = frame.type == P.RESULT or frame.meta.get("type") in ("function_error", "overloaded")
        replicas.record(r, ok, time.monotonic() - sent_at)
        ms = float(frame.meta.get("ms") or 0.0)
        if frame.type == P.RESULT:
            return Answer(frame.body, None, ms, r, attempt, frame.meta)
        return Answer(None, error_from_frame(fr, frame), ms, r, attempt, frame.meta)
    raise AssertionError("unreachable")


class StreamFrames:
    """A stream's frames: CHUNKs, then one END (or a raised CocoonError). `replica` is the one answering."""

    def __init__(self, replicas: Replicas, fr: FunctionRuntime, body: bytes, meta: dict[str, Any],
                 route: Route, window: int = 0) -> None:
        self.replica: ReplicaHandle | None = None
        self.error_ms = 0.0  # metered time of a replica's ERROR frame (the user's exception is charged for it)
        self.window = window  # COCOON_STREAM_WINDOW_BYTES (0: no flow control)
        self.pending: PendingCall | None = None
        self._it = self._run(replicas, fr, body, meta, route)

    @property
    def buffered(self) -> int:
        """Bytes of this stream's items the gateway holds (received, not yet taken by the client)."""
        w = self.pending.window if self.pending is not None else None
        return w.buffered if w is not None else 0

    def __aiter__(self) -> StreamFrames:
        return self

    async def __anext__(self) -> Frame:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()

    async def _run(self, replicas: Replicas, fr: FunctionRuntime, body: bytes, meta: dict[str, Any],
                   route: Route) -> AsyncGenerator[Frame, None]:
        deadline = time.monotonic() + fr.spec.timeout
        attempts = fr.spec.retries + 1
        for attempt in range(1, attempts + 1):
            r = await replicas.acquire(fr, deadline, route.want)
            self.replica = r
            sent_any = False
            with _Attempt(replicas, fr, r) as at:
                try:
                    pending = at.send(route, meta, body, max(deadline - time.monotonic(), 0.001), streaming=True,
                                      window=self.window)
                    call = at.call
                    self.pending = pending
                    assert pending.queue is not None
                    while True:
                        remaining = deadline - time.monotonic() + GRACE_S
                        try:
                            item = await asyncio.wait_for(pending.queue.get(), max(remaining, 0.001))
                        except asyncio.TimeoutError:
                            r.cancel(call)
                            raise _timeout(fr) from None
                        if isinstance(item, BaseException):
                            raise item
                        if item.type == P.CHUNK:
                            sent_any = True
                            yield item
                            credit = r.consumed(pending, len(item.body))  # resumed: the client's connection took it
                            if credit:
                                # One loop pass first: a client that just hung up lets the previous sends return at
                                # once, and its disconnect (which cancels this call) must land before the replica
                                # is told to produce more. Once per half window, not per item.
                                await asyncio.sleep(0)
                                r.credit(call, credit)
                        elif item.type == P.END:
                            yield item
                            return
                        else:
                            self.error_ms = float(item.meta.get("ms") or 0.0)
                            raise error_from_frame(fr, item)
                except ReplicaLostError as exc:
                    if attempt < attempts and not sent_any:
                        continue
                    raise ReplicaLostError(f"{exc}; the stream cannot be resumed") from None
