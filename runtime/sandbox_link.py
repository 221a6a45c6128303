"""The replica actor's end of its sandbox: relays calls to the child and meters them outside the sandbox.

Plain calls are relayed with callbacks only (no task per call): the gateway's CALL goes to the child under a
number of the link's own, and the child's answer goes back under the gateway's number with the execution time
the actor measured (from forwarding the call to receiving its last frame). What the child sends is tenant
output: its meta is reduced to known fields of checked types here before anything is forwarded, and the child
never states the time a call took. Sealed calls use `unary`/`stream` (awaitables), since the actor must open
and seal around them with keys the sandbox never holds.

Plain calls of a gateway that asked for the direct path do not pass through here at all: the actor hands the
authenticated gateway connection to the child (`hand_off`, SCM_RIGHTS over the sandbox's hand-off socket), and
the child answers it in the shape the gateway reads from the actor (runtime/sandbox_child.py). The gateway then
meters those calls itself (it caps every `ms` at its own wall time) and decodes the child's frames as strictly as
the actor's (docs/security.md, "The direct path").

Streams are flow-controlled (cocoon_faas/flow.py): a relayed stream hands the child the gateway's window and
forwards the gateway's credits, so the child's generator waits for the client; a sealed stream gives the child a
window of its own, credited as the actor takes items. A child that sends beyond its window fails its call (tenant
code can reach the socket); it is not trusted to pace itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.flow import FlowError, Window, credit_body
from cocoon_faas.replica_context import LoadReport
from cocoon_faas.runtime.sandbox import SandboxProcess

CHILD_ERRORS = ("function_error", "timeout", "cancelled", "memory_exceeded", "startup_failed")
BACKSTOP_S = 2.0  # the child enforces the time limit; past it by this much the actor answers for it
BEACON_CHECK_S = 1.0  # how often the actor reads its child's beacon (runtime/beacon.py)
log = logging.getLogger("cocoon.sandbox")
Sink = Callable[[int, dict[str, Any], bytes], None]


class ChildError(Exception):
    """Raised when the child answers a call with an ERROR frame (already reduced to known fields)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__(meta.get("message", ""))
        self.meta = meta


def child_logs(value: Any) -> list[tuple[str, str]]:
    """The child's log lines, if they are [[stdout|stderr, text], ...]; anything else is dropped."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value[:P.MAX_LOG_LINES]:
        if isinstance(item, list) and len(item) == 2 and item[0] in ("stdout", "stderr") and isinstance(item[1], str):
            out.append((item[0], item[1][:65536]))
    return out


def child_error(meta: Any) -> dict[str, Any]:
    """An ERROR frame's meta from the child, reduced to the fields the gateway may see."""
    meta = meta if isinstance(meta, dict) else {}
    kind = meta.get("type")
    out: dict[str, Any] = {"type": kind if kind in CHILD_ERRORS else "function_error",
                           "message": str(meta.get("message", ""))[:2000]}
    if isinstance(meta.get("exc_type"), str):
        out["exc_type"] = meta["exc_type"][:200]
    if isinstance(meta.get("traceback"), str):
        out["traceback"] = meta["traceback"][:16384]
    logs = child_logs(meta.get("logs"))
    if logs:
        out["logs"] = logs
    return out


class _Call:
    __slots__ = ("sink", "t0", "seq", "timer", "flow")

    def __init__(self, sink: Sink, t0: float, flow: Window | None = None) -> None:
        self.sink, self.t0, self.seq = sink, t0, 0
        self.timer: asyncio.TimerHandle | None = None
        self.flow = flow  # a stream's window toward the child


class SandboxLink:
    """One child process and the frame connection to it (lives on the actor's data-plane loop)."""

    def __init__(self, proc: SandboxProcess, on_lost: Callable[[], None] | None = None,
                 on_load: Callable[[LoadReport], None] | None = None) -> None:
        self.proc = proc
        self.on_load = on_load  # the child's engines reported their load (already reduced)
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._on_lost = on_lost
        self.proto = P.FrameProtocol(self._on_frame, self._lost)
        self.inflight = 0
        self.calls = 0
        self.handed = 0  # gateway connections handed to the child (the direct path)
        self._beacon_timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: self.proto, self.proc.sock)
        self._beacon_timer = loop.call_later(BEACON_CHECK_S, self._watch_beacon)

    def _watch_beacon(self) -> None:
        """Every BEACON_CHECK_S: a child past its own end whose watchdog has stopped ticking (one C call holds its
        GIL, so no thread of it runs) cannot end itself; kill it (SIGKILL). Its socket then closes and `_lost`
        replaces the replica like any child that exited (runtime/beacon.py)."""
        if self.proto.closed:
            return
        if self.proc.beacon.stuck(time.monotonic()):
            log.warning("the sandbox child %s is past a call's end with no thread running (one C call holds its "
                        "GIL); killing it so the replica is replaced", self.proc.pid)
            self.proc.proc.kill()
            return
        self._beacon_timer = asyncio.get_running_loop().call_later(BEACON_CHECK_S, self._watch_beacon)

    async def load(self, code: bytes, spec_json: dict[str, Any], timeout: float, logs: bool = True,
                   grace: float | None = None) -> list[tuple[str, str]]:
        """Send the code; returns what its setup printed. Raises ChildError when it could not start. `logs`:
        whether the child puts what calls print in their answers (it answers direct gateway calls itself).
        `grace`: how long a call may run on after it had to stop before the child ends itself
        (COCOON_INTERRUPT_GRACE_S)."""
        fut: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()

        def sink(ftype: int, meta: dict[str, Any], body: bytes) -> None:
            if not fut.done():
                fut.set_result((ftype, meta))

        cid = next(self._ids)
        self._calls[cid] = _Call(sink, time.monotonic())
        meta: dict[str, Any] = {"spec": spec_json, "logs": logs}
        if grace is not None:
            meta["grace"] = grace
        self.proto.send(P.encode(cid, P.LOAD, meta, code))
        try:
            ftype, meta = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ChildError({"type": "startup_failed", "exc_type": "TimeoutError",
                              "message": f"loading the code and its setup hooks took over {timeout:g}s"}) from None
        finally:
            self._calls.pop(cid, None)
        if ftype != P.READY:
            raise ChildError(child_error(meta))
        return child_logs(meta.get("logs"))

    def hand_off(self, fd: int, call: int) -> None:
        """Give the child a copy of gateway connection `fd`, authenticated by the actor (whose HELLO frame,
        with the secret, the actor has read and keeps); the child answers that HELLO under `call` and serves the
        connection's plain calls from then on. Raises OSError when the child does not take it (the caller keeps
        the connection)."""
        if self.proto.closed:
            raise ConnectionError("the sandbox has exited")
        socket.send_fds(self.proc.handoff, [P.HANDOFF.pack(call)], [fd])
        self.handed += 1

    # -- relayed plain calls ---------------------------------------------------------------------------------
    def relay(self, meta: dict[str, Any], body: bytes, timeout: float, sink: Sink, flow: Window | None = None
              ) -> int:
        """Start one call; `sink(type, meta, body)` gets each answer frame, meta already metered and reduced:
        CHUNK {}, RESULT/END {"ms", "logs"?, "seq"?}, ERROR {"type", "message", "ms", ...}. A stream's `flow`
        is announced to the child; credit it with `credit` (relayed) or `consumed` (taken here)."""
        cid = next(self._ids)
        call = _Call(sink, time.monotonic(), flow)
        if flow is not None:
            meta = {**meta, "w": flow.window}
        self._calls[cid] = call
        self.inflight += 1
        self.calls += 1
        call.timer = asyncio.get_running_loop().call_later(timeout + BACKSTOP_S, self._overdue, cid, timeout)
        self.proto.send_now(P.encode(cid, P.CALL, meta, body))
        return cid

    def credit(self, cid: int, n: int) -> None:
        """Forward a credit the gateway sent for relayed call `cid`; raises FlowError when it returns more than
        was forwarded (a call that has ended meanwhile takes none)."""
        call = self._calls.get(cid)
        if call is None or call.flow is None:
            return
        call.flow.granted(n)
        if not self.proto.closed:
            self.proto.send(P.encode(cid, P.CREDIT, None, credit_body(n)))

    def consumed(self, cid: int, body_len: int) -> None:
        """This actor took an item of call `cid` (a sealed stream): credit the child once enough is taken."""
        call = self._calls.get(cid)
        if call is None or call.flow is None:
            return
        n = call.flow.consumed(body_len)
        if n and not self.proto.closed:
            self.proto.send(P.encode(cid, P.CREDIT, None, credit_body(n)))

    def cancel(self, cid: int) -> None:
        if cid in self._calls and not self.proto.closed:
            self.proto.send(P.encode(cid, P.CANCEL))

    def _finish(self, cid: int) -> _Call | None:
        call = self._calls.pop(cid, None)
        if call is not None:
            self.inflight -= 1
            if call.timer is not None:
                call.timer.cancel()
        return call

    def _overdue(self, cid: int, timeout: float) -> None:
        """The child did not stop a call at its limit (user code can swallow the interrupt): answer for it."""
        self.cancel(cid)
        call = self._finish(cid)
        if call is not None:
            call.sink(P.ERROR, {"type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s",
                                "ms": _ms(call.t0)}, b"")

    def _on_frame(self, cid: int, ftype: int, meta: Any, body: bytes) -> None:
        if ftype == P.STATS:  # tenant-made numbers: reduced to bounded integers before anyone reads them
            report = LoadReport.reduce(meta)
            if report is not None and self.on_load is not None:
                self.on_load(report)
            return
        call = self._calls.get(cid)
        if call is None:
            return
        if ftype == P.CHUNK:
            if call.flow is not None:
                try:
                    call.flow.received(len(body))
                except FlowError as exc:  # the child ignored its window: the call fails, nothing more is relayed
                    self.cancel(cid)
                    self._finish(cid)
                    call.sink(P.ERROR, {"type": "function_error", "exc_type": "StreamWindowError", "message":
                                        f"the function's process broke the stream protocol ({exc})",
                                        "ms": _ms(call.t0)}, b"")
                    return
            call.seq += 1
            call.sink(P.CHUNK, {}, body)
            return
        if call.timer is None:  # a load: the caller reads the raw answer
            call.sink(ftype, meta if isinstance(meta, dict) else {}, body)
            return
        self._finish(cid)
        ms = _ms(call.t0)
        if ftype == P.ERROR:
            call.sink(P.ERROR, {**child_error(meta), "ms": ms}, b"")
            return
        out: dict[str, Any] = {"ms": ms}
        logs = child_logs(meta.get("logs")) if isinstance(meta, dict) else []
        if logs:
            out["logs"] = logs
        if ftype == P.END:
            out["seq"] = call.seq
            call.sink(P.END, out, b"")
        elif ftype == P.RESULT:
            call.sink(P.RESULT, out, body)
        else:
            call.sink(P.ERROR, {"type": "function_error", "message": "the sandbox answered out of protocol",
                                "ms": ms}, b"")

    def _lost(self, exc: Exception | None) -> None:
        if self._on_lost is not None:  # first: the replica drops its gateway connections (a lost replica)
            self._on_lost()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.timer is not None:
                call.timer.cancel()
                self.inflight -= 1
            call.sink(P.ERROR, {"type": "function_error", "exc_type": "SandboxExited", "message":
                                "the function's process exited during the call (it may have exceeded its memory or "
                                "process limit, or called os._exit)", "ms": _ms(call.t0)},
                      b"")

    def close(self) -> None:
        if self._beacon_timer is not None:
            self._beacon_timer.cancel()
        if self.proto.transport is not None:
            self.proto.transport.close()
        self.proc.kill()

    # -- awaitable calls (sealed path) -------------------------------------------------------------------------
    async def unary(self, args_json: bytes, timeout: float, caller: str = "") -> tuple[bytes, float]:
        """(result JSON, ms); raises ChildError. Cancelling the awaiting task cancels the call in the child."""
        fut: asyncio.Future[tuple[int, dict[str, Any], bytes]] = asyncio.get_running_loop().create_future()

        def sink(ftype: int, meta: dict[str, Any], body: bytes) -> None:
            if not fut.done():
                fut.set_result((ftype, meta, body))

        cid = self.relay({"t": timeout, "caller": caller} if caller else {"t": timeout}, args_json, timeout, sink)
        try:
            ftype, meta, body = await fut
        except asyncio.CancelledError:
            self.cancel(cid)
            self._finish(cid)
            raise
        if ftype != P.RESULT:
            raise ChildError(meta)
        return body, float(meta["ms"])

    async def stream(self, args_json: bytes, timeout: float, done: list[float], caller: str = "", window: int = 0
                     ) -> AsyncGenerator[bytes, None]:
        """Each item's JSON; appends the metered ms to `done` at the end; raises ChildError. With `window`,
        the child runs at most that far ahead of the consumer of this iterator (the queue is bounded by it)."""
        queue: asyncio.Queue[tuple[int, dict[str, Any], bytes]] = asyncio.Queue()
        meta: dict[str, Any] = {"t": timeout, "stream": True, "caller": caller} if caller else \
            {"t": timeout, "stream": True}
        cid = self.relay(meta, args_json, timeout,
                         lambda t, m, b: queue.put_nowait((t, m, b)), Window(window) if window else None)
        finished = False
        try:
            while True:
                ftype, meta, body = await queue.get()
                if ftype == P.CHUNK:
                    yield body
                    self.consumed(cid, len(body))
                    continue
                finished = True
                if ftype == P.END:
                    done.append(float(meta["ms"]))
                    return
                raise ChildError(meta)
        finally:
            if not finished:
                self.cancel(cid)
                self._finish(cid)


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


__all__ = ["ChildError", "SandboxLink", "child_error", "child_logs"]
