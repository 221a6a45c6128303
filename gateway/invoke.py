"""The call path: pick a replica, forward the opaque body, enforce the time limit, retry on replica death.

A call is retried elsewhere only when the platform failed it (the replica died); the user's own exception is
an answer, not a fault, and is not retried. Metering (execution milliseconds reported by the replica) and the
outcome are returned to the caller of `invoke`, which records and charges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.errors import (
    CallCancelledError,
    CallTimeoutError,
    CocoonError,
    FunctionError,
    ReplicaLostError,
)
from cocoon_faas.gateway.controller import Controller, FunctionRuntime
from cocoon_faas.gateway.replica_client import Frame

GRACE_S = 2.0  # the replica enforces the limit itself; the gateway waits this much longer before giving up


@dataclass
class Outcome:
    body: bytes
    exec_ms: float
    replica: str
    attempts: int
    provider: str = "local"
    meta: dict[str, Any] = field(default_factory=dict)


def error_from_frame(fr: FunctionRuntime, frame: Frame) -> CocoonError:
    m = frame.meta
    kind = m.get("type")
    if kind == "timeout":
        return CallTimeoutError(f"function {fr.name!r} exceeded its time limit of {fr.spec.timeout:g}s")
    if kind == "cancelled":
        return CallCancelledError(f"call to {fr.name!r} was cancelled")
    if kind == "function_error":
        return FunctionError(f"{m.get('exc_type', 'Exception')}: {m.get('message', '')}",
                             exc_type=m.get("exc_type"), function=fr.name)
    return CocoonError(str(m.get("message", "replica error")),
                       **{k: v for k, v in m.items() if k not in ("logs", "message")})


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


class Invoker:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def call(self, fr: FunctionRuntime, body: bytes, call_meta: dict[str, Any],
                   on_running: Any = None) -> tuple[Outcome | None, CocoonError | None, dict[str, Any]]:
        """Run one unary call; returns (outcome, error, last frame meta). Raises only CancelledError."""
        deadline = time.monotonic() + fr.spec.timeout
        attempts = fr.spec.retries + 1
        last_meta: dict[str, Any] = {}
        for attempt in range(1, attempts + 1):
            try:
                r = await self.controller.acquire(fr, deadline)
            except CocoonError as exc:
                return None, exc, last_meta
            call = 0
            sent_at = time.monotonic()
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                call, pending = r.send_call({"t": remaining, **call_meta}, body, streaming=False)
                if on_running is not None:
                    on_running()
                assert pending.future is not None
                frame = await _within(pending.future, remaining + GRACE_S)
            except ReplicaLostError as exc:
                self.controller.record(r, False, time.monotonic() - sent_at)
                if attempt < attempts:
                    continue
                return None, ReplicaLostError(f"{exc}; no retries left (retries={fr.spec.retries})"), last_meta
            except asyncio.TimeoutError:
                r.cancel(call)
                return None, CallTimeoutError(
                    f"function {fr.name!r} exceeded its time limit of {fr.spec.timeout:g}s"), last_meta
            except asyncio.CancelledError:
                if call:
                    r.cancel(call)
                raise
            finally:
                if call:
                    r.finish(call)
                self.controller.release(fr, r)
            last_meta = {**frame.meta, "provider": r.node or "local"}
            self.controller.record(r, frame.type == P.RESULT or frame.meta.get("type") == "function_error",
                                   time.monotonic() - sent_at)
            if frame.type == P.RESULT:
                return (Outcome(frame.body, float(frame.meta.get("ms", 0.0)), r.id, attempt, r.node or "local",
                                frame.meta), None, last_meta)
            return None, error_from_frame(fr, frame), last_meta
        raise AssertionError("unreachable")

    async def stream(self, fr: FunctionRuntime, body: bytes, call_meta: dict[str, Any]) -> AsyncIterator[Frame]:
        """Yield CHUNK frames then one END (or raise); retried elsewhere only before the first chunk."""
        deadline = time.monotonic() + fr.spec.timeout
        attempts = fr.spec.retries + 1
        for attempt in range(1, attempts + 1):
            r = await self.controller.acquire(fr, deadline)
            call = 0
            sent_any = False
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                call, pending = r.send_call({"t": remaining, "stream": True, **call_meta}, body, streaming=True)
                assert pending.queue is not None
                while True:
                    remaining = deadline - time.monotonic() + GRACE_S
                    try:
                        item = await asyncio.wait_for(pending.queue.get(), max(remaining, 0.001))
                    except asyncio.TimeoutError:
                        r.cancel(call)
                        raise CallTimeoutError(
                            f"function {fr.name!r} exceeded its time limit of {fr.spec.timeout:g}s") from None
                    if isinstance(item, BaseException):
                        raise item
                    if item.type == P.CHUNK:
                        sent_any = True
                        yield item
                    elif item.type == P.END:
                        item.meta["provider"] = r.node or "local"
                        yield item
                        return
                    else:
                        raise error_from_frame(fr, item)
            except ReplicaLostError as exc:
                if attempt < attempts and not sent_any:
                    continue
                raise ReplicaLostError(f"{exc}; the stream cannot be resumed") from None
            except (asyncio.CancelledError, GeneratorExit):
                if call:
                    r.cancel(call)
                raise
            finally:
                if call:
                    r.finish(call)
                self.controller.release(fr, r)
