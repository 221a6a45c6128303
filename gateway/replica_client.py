"""The gateway's end of the data path: one persistent, multiplexed connection per replica.

The connection opens with HELLO and the per-replica secret the controller gave the actor at creation (the data
port serves nobody else). Every frame's meta from the replica goes through the strict decoder of
`replica_wire.py`; a frame it refuses drops the replica (the controller replaces it). Metering the replica cannot
move: each final frame's `ms` is capped at the wall time this gateway observed between sending the call and
receiving that frame (`wall_ms` is added beside it, set here, never read from the replica). A stream's CHUNKs
are held to the window the gateway announced (cocoon_faas/flow.py): a replica that sends beyond it is dropped
like one that breaks the frame format, and credit goes back only as the client's connection takes items.

The direct path (COCOON_DIRECT_CALLS, default on): a second connection to the same port whose HELLO asks for
"direct"; the actor checks the secret, keeps that HELLO, and hands the socket to the sandboxed child running the
function, which answers HELLO {"direct": true}. Plain calls then go to the child without the actor's hop (sealed
calls, UNLOCK and GRANT stay on the first connection). Nothing is sent on it before that answer, so no byte is left
with the actor. Frames on it are decoded exactly as the actor's, and a call's metered time is this gateway's own
wall time for it (the child's `ms` is not read); it is tenant code's socket (docs/security.md, "The direct path"),
so a frame refused there, or its loss, drops the whole replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.errors import ReplicaLostError
from cocoon_faas.flow import FlowError, Window, credit_body
from cocoon_faas.gateway.replica_wire import decode_meta
from cocoon_faas.replica_context import LoadReport

HELLO_TIMEOUT_S = 10.0
# What a CALL on the direct connection carries (tenant code can read it): what the actor used to pass the child,
# not the call id or anything else the gateway puts in the meta for the actor
CHILD_META = ("t", "stream", "caller")
log = logging.getLogger("cocoon.replica_client")


@dataclass
class Frame:
    """One frame from a replica. `meta` holds only the checked keys of `replica_wire.decode_meta`."""

    type: int
    meta: dict[str, Any]
    body: bytes


def _cap(meta: dict[str, Any], t0: float, direct: bool = False) -> dict[str, Any]:
    """Cap the replica's reported execution time at the wall time this gateway waited for the call. A direct call's
    time is this wall time itself: its `ms` comes from the sandbox, where tenant code could lower it (and with it
    the provider's pay), so it is not read at all."""
    wall = round((time.monotonic() - t0) * 1000, 3)
    meta["wall_ms"] = wall
    if direct or ("ms" in meta and meta["ms"] > wall):
        meta["ms"] = wall
    return meta


class PendingCall:
    """Frames of one in-flight call, as they arrive."""

    __slots__ = ("queue", "future", "streaming", "t0", "window", "direct")

    def __init__(self, streaming: bool, window: int = 0, direct: bool = False) -> None:
        self.streaming = streaming
        self.direct = direct  # sent on the direct connection: only frames from there are its answers
        self.t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Frame] | None = None if streaming else loop.create_future()
        # A stream's queue holds at most its window plus one item: the replica may not send beyond it
        self.queue: asyncio.Queue[Frame | BaseException] | None = asyncio.Queue() if streaming else None
        self.window: Window | None = Window(window) if streaming and window else None

    def deliver(self, frame: Frame) -> None:
        """Raises FlowError for a CHUNK beyond the stream's window (the caller drops the replica)."""
        if frame.type != P.CHUNK:
            _cap(frame.meta, self.t0, self.direct)
        elif self.window is not None:
            self.window.received(len(frame.body))
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
    secret: bytes = b""
    load: LoadReport | None = None  # its engine's last load report (STATS frames), decoded and clamped
    max_frame: int = P.MAX_FRAME  # COCOON_MAX_FRAME_BYTES: the largest frame this replica may send
    direct: bool = False  # ask for the direct path (COCOON_DIRECT_CALLS); `is_direct` says whether it was given
    _proto: P.FrameProtocol | None = None
    _direct: P.FrameProtocol | None = None  # the connection the sandboxed child serves, when there is one
    _gone: bool = False
    _pending: dict[int, PendingCall] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    on_lost: Callable[[ReplicaHandle], None] | None = None

    async def connect(self, host: str, port: int) -> None:
        """Connect and prove the secret (HELLO), then open the direct path when asked to and the replica offers
        it; raises ReplicaLostError if the replica does not answer."""
        self.host, self.port = host, port
        self._proto = await self._open(host, port, direct=False)
        try:
            await self.control(P.HELLO, None, self.secret, HELLO_TIMEOUT_S)
            if self.direct:
                await self._open_direct(host, port)
        except ReplicaLostError:
            self.close()
            raise

    @property
    def is_direct(self) -> bool:
        return self._direct is not None and not self._direct.closed

    async def _open(self, host: str, port: int, direct: bool) -> P.FrameProtocol:
        def made() -> P.FrameProtocol:
            def on_frame(call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
                self._on_frame(call, ftype, meta, body, direct)

            def lost(exc: Exception | None) -> None:
                self._lost(exc, proto)

            proto = P.FrameProtocol(on_frame, lost, decode_meta, self.max_frame)
            return proto

        _, proto = await asyncio.get_running_loop().create_connection(made, host, port)
        return proto

    async def _open_direct(self, host: str, port: int) -> None:
        """HELLO {"direct": true} on a second connection; kept only if the answer (from the sandbox) says so. A
        replica that offers no direct path (confidential code, no sandbox) answers a plain HELLO: closed again."""
        proto = await self._open(host, port, direct=True)
        self._direct = proto
        try:
            frame = await self.control(P.HELLO, {"direct": True}, self.secret, HELLO_TIMEOUT_S, direct=True)
        except ReplicaLostError:
            if self._gone or self._proto is None or self._proto.closed:
                raise
            frame = Frame(P.HELLO, {}, b"")  # no answer in time: no direct path; the first connection still serves
        if not frame.meta.get("direct"):
            self._direct = None
            if proto.transport is not None:
                proto.transport.close()

    async def control(self, ftype: int, meta: dict[str, Any] | None, body: bytes, timeout: float,
                      direct: bool = False) -> Frame:
        """Send one control frame (HELLO, UNLOCK, GRANT) and await the replica's answer (decoded strictly)."""
        proto = self._direct if direct else self._proto
        if proto is None or proto.closed:
            raise ReplicaLostError(f"replica {self.id} is gone")
        call = next(self._ids)
        pending = PendingCall(False, direct=direct)
        self._pending[call] = pending
        proto.send(P.encode(call, ftype, meta, body))
        assert pending.future is not None
        try:
            return await asyncio.wait_for(pending.future, timeout)
        except asyncio.TimeoutError:
            name = P.TYPE_NAMES[ftype]
            raise ReplicaLostError(f"replica {self.id} did not answer {name} within {timeout:g}s") from None
        finally:
            self._pending.pop(call, None)

    def send_call(self, meta: dict[str, Any], body: bytes, streaming: bool, window: int = 0
                  ) -> tuple[int, PendingCall]:
        """Send a CALL (a plain one on the direct connection when there is one). A stream with `window` > 0
        announces it (meta "w"); see `consumed`."""
        if self._proto is None or self._proto.closed or self.state == "dead":
            raise ReplicaLostError(f"replica {self.id} is gone")
        direct = self._direct is not None and not meta.get("sealed")
        proto = self._direct if direct else self._proto
        assert proto is not None
        if direct:
            meta = {k: meta[k] for k in CHILD_META if k in meta}
        call = next(self._ids)
        if window:
            meta["w"] = window
        pending = PendingCall(streaming, window, direct)
        self._pending[call] = pending
        proto.send(P.encode(call, P.CALL, meta, body))
        return call, pending

    def _proto_of(self, call: int) -> P.FrameProtocol | None:
        """The connection call `call` went out on (a finished call's CANCEL goes to the actor: ignored there)."""
        pending = self._pending.get(call)
        return self._direct if pending is not None and pending.direct else self._proto

    @staticmethod
    def consumed(pending: PendingCall, body_len: int) -> int:
        """The client's connection took a CHUNK: the credit now due to the replica (0: keep batching)."""
        return pending.window.consumed(body_len) if pending.window is not None else 0

    def credit(self, call: int, credit: int) -> None:
        """Let the replica send `credit` more bytes of stream `call`."""
        proto = self._proto_of(call)
        if proto is not None and not proto.closed:
            proto.send(P.encode(call, P.CREDIT, None, credit_body(credit)))

    def finish(self, call: int) -> None:
        self._pending.pop(call, None)

    def cancel(self, call: int) -> None:
        proto = self._proto_of(call)
        if proto is not None and not proto.closed:
            proto.send(P.encode(call, P.CANCEL))

    def close(self) -> None:
        for proto in (self._proto, self._direct):
            if proto is not None and proto.transport is not None:
                proto.transport.close()

    def _on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes, direct: bool = False) -> None:
        if ftype == P.STATS:
            self.load = meta.get("load", self.load)
            return
        pending = self._pending.get(call)
        if pending is not None and pending.direct == direct:  # a call is answered only where it was sent
            try:
                pending.deliver(Frame(ftype, meta, body))
            except FlowError as exc:  # the replica ignored its stream window: broken or hostile
                proto = self._direct if direct else self._proto
                if proto is not None:
                    proto.abort(f"bad frame: {exc}")

    def _lost(self, exc: Exception | None, proto: P.FrameProtocol | None = None) -> None:
        """Either connection lost (or refused a frame): the replica is lost, once; the other is closed too."""
        if proto is not None and proto is not self._proto and proto is not self._direct:
            return  # a direct connection the replica did not offer, closed here on purpose
        if self._gone:
            return
        self._gone = True
        self.close()
        self.state = "dead"
        if isinstance(exc, P.FrameTooLarge):
            log.warning("replica %s of %s sent a %d-byte frame, over the %d-byte limit; dropping it", self.id,
                        self.function, exc.length, exc.limit)
            err = ReplicaLostError(
                f"function {self.function!r} answered with {exc.length} bytes in one result or stream item, over "
                f"the gateway's {exc.limit}-byte limit (COCOON_MAX_FRAME_BYTES): return less, or yield it as "
                f"smaller stream items; its replica {self.id} was dropped and is replaced")
        elif exc is not None and "bad frame" in str(exc):
            log.warning("replica %s of %s sent a frame the gateway refuses (%s); dropping it", self.id,
                        self.function, exc)
            err = ReplicaLostError(f"replica {self.id} of {self.function!r} broke the frame protocol ({exc}); it "
                                   "was dropped and is replaced")
        else:
            err = ReplicaLostError(f"replica {self.id} of {self.function!r} died during the call")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(err)
        if self.on_lost is not None:
            self.on_lost(self)
