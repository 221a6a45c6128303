"""The gateway's end of the data path: one persistent, multiplexed connection per replica."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.errors import ReplicaLostError


@dataclass
class Frame:
    type: int
    meta: dict[str, Any]
    body: bytes


class PendingCall:
    """Frames of one in-flight call, as they arrive."""

    __slots__ = ("queue", "future", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Frame] | None = None if streaming else loop.create_future()
        self.queue: asyncio.Queue[Frame | BaseException] | None = asyncio.Queue() if streaming else None

    def deliver(self, frame: Frame) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(frame)
        else:
            assert self.queue is not None
            self.queue.put_nowait(frame)

    def fail(self, exc: BaseException) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(exc)
        else:
            assert self.queue is not None
            self.queue.put_nowait(exc)


@dataclass(eq=False)
class ReplicaHandle:
    """A live replica as the gateway sees it: its actor, its connection and its load."""

    id: str
    function: str
    version: int
    actor: Any
    node: str = ""
    host: str = ""
    port: int = 0
    state: str = "starting"  # starting | ready | draining | dead
    inflight: int = 0
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    _proto: P.FrameProtocol | None = None
    _pending: dict[int, PendingCall] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    on_lost: Callable[[ReplicaHandle], None] | None = None

    async def connect(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: P.FrameProtocol(self._on_frame, self._lost), host, port)
        self._proto = proto

    def send_call(self, meta: dict[str, Any], body: bytes, streaming: bool) -> tuple[int, PendingCall]:
        if self._proto is None or self._proto.closed or self.state == "dead":
            raise ReplicaLostError(f"replica {self.id} is gone")
        call = next(self._ids)
        pending = PendingCall(streaming)
        self._pending[call] = pending
        self._proto.send(P.encode(call, P.CALL, meta, body))
        return call, pending

    def finish(self, call: int) -> None:
        self._pending.pop(call, None)

    def cancel(self, call: int) -> None:
        if self._proto is not None and not self._proto.closed:
            self._proto.send(P.encode(call, P.CANCEL))

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    def _on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
        pending = self._pending.get(call)
        if pending is not None:
            pending.deliver(Frame(ftype, meta, body))

    def _lost(self, exc: Exception | None) -> None:
        self.state = "dead"
        err = ReplicaLostError(f"replica {self.id} of {self.function!r} died during the call")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(err)
        if self.on_lost is not None:
            self.on_lost(self)
