"""The process inside the sandbox: loads the function's code and runs its calls (runtime/sandbox.py starts it).

`python -m cocoon_faas.runtime.sandbox_child FD MEMORY PIDS HANDOFF BEACON`: FD is its end of a Unix socket pair to
the replica actor; HANDOFF its end of a SOCK_SEQPACKET pair over which the actor passes gateway connections (below);
BEACON a memfd page its watchdog keeps current for the actor (runtime/beacon.py), which ends this process when
no thread of it can (one C call holding the GIL).
Before any tenant code is loaded it lowers its own limits (address space: what the runtime maps already plus
MEMORY bytes, unless 0; soft and hard, so the code cannot raise them again). Then it serves frames
(cocoon_faas/protocol.py):

    LOAD  meta {"spec": {...}}, body: the code blob   -> READY {"logs": [...]} | ERROR {"type": "startup_failed"}
    CALL  meta {"t": timeout, "stream": bool, "caller": tag}, body: JSON keyword arguments
          -> RESULT body / CHUNK bodies then END / ERROR {"type": function_error | timeout | memory_exceeded}
    CANCEL
    STATS (sent, call 0) meta: the load its engines report (cocoon_faas/replica_context.py), when it changes
    CREDIT body: u64 bytes, for a stream that announced a window ("w" in its CALL meta): CHUNKs stop when the
          window is spent until credit comes back (cocoon_faas/flow.py), so the generator waits for the client
    PING  -> PONG {"inflight": calls running}

On the link it reports no execution time: the actor measures that outside the sandbox. When the link closes it
exits.

The direct path: a gateway that asked for it gets its second connection to the actor handed over here (the actor
checked the secret and kept the HELLO frame that carried it; this process only gets the socket and the HELLO's
call number, and answers HELLO {"direct": true}). On that connection it serves CALL/CREDIT/CANCEL/PING with the
frames above, which are what the gateway accepts from the actor too: logs only when the actor forwards them, no
traceback field, and no execution time (the gateway meters a direct call at its own wall time). Any other frame
drops that connection; losing it ends only its calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
from contextlib import aclosing
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas import replica_context
from cocoon_faas.flow import FlowError, Window, decode_credit, window_of
from cocoon_faas.runtime.beacon import Beacon


def _limit(memory: int, threads: int) -> None:
    """Address space: what the runtime already maps (interpreter, our imports) + `memory` for the function +
    stacks of its call threads and malloc's arenas; set soft and hard before tenant code is loaded."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory <= 0:
        return
    used = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    limit = used + memory + threads * 8 * 2**20 + 2 * 64 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)  # torch and numpy report a failed allocation as RuntimeError
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "Cannot allocate memory" in text)


class Peer:
    """One connection the child serves: its link to the replica actor, or a gateway's direct connection (handed
    over by the actor once the gateway proved the replica's secret; the child never sees that HELLO). Both get the
    same frames: what the actor forwards after reducing them is already what the gateway accepts (no execution
    time: the actor meters relayed calls, the gateway direct ones). LOAD comes only over the link."""

    def __init__(self, child: Child, direct: bool) -> None:
        self.child = child
        self.direct = direct
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, Window] = {}  # a stream's window, by call
        self.proto = P.FrameProtocol(self.on_frame, self.on_lost)

    def on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
        if ftype == P.CALL:
            task = asyncio.get_running_loop().create_task(self.child.handle(self, call, meta, body))
            self.tasks[call] = task

            def done(_t: Any) -> None:
                self.tasks.pop(call, None)
                self.windows.pop(call, None)

            task.add_done_callback(done)
        elif ftype == P.CREDIT:
            try:
                n = decode_credit(body)
                window = self.windows.get(call)
                if window is not None:
                    window.granted(n)
            except FlowError as exc:  # the actor and the gateway are platform code: a bad credit means a broken link
                self.proto.abort(f"bad CREDIT: {exc}")
        elif ftype == P.CANCEL:
            running = self.tasks.get(call)
            if running is not None:
                running.cancel()
        elif ftype == P.PING:
            self.send(P.encode(call, P.PONG, {"inflight": self.child.inflight}))
        elif ftype == P.LOAD and not self.direct:
            asyncio.get_running_loop().create_task(self.child.load(call, meta, body))
        elif self.direct:  # sealed calls, code keys and loads stay with the actor
            self.proto.abort(f"a gateway's direct connection carries no {P.TYPE_NAMES.get(ftype, ftype)} frames")

    def on_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        self.child.lost(self)

    def send(self, data: bytes) -> None:
        if not self.proto.closed:
            self.proto.send_now(data)


class Child:
    def __init__(self, memory: int, beacon: Beacon | None = None) -> None:
        self.memory = memory
        self.beacon = beacon
        self.loaded: Any = None
        self.link = Peer(self, direct=False)
        self.direct: set[Peer] = set()  # gateways' direct connections
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.forward_logs = True
        self.watcher: asyncio.Task[None] | None = None  # load reports of the code's engines, if any

    @property
    def proto(self) -> P.FrameProtocol:
        return self.link.proto

    @property
    def inflight(self) -> int:
        return len(self.link.tasks) + sum(len(p.tasks) for p in self.direct)

    def lost(self, peer: Peer) -> None:
        """A connection closed: a gateway's ends only its calls; the actor's ends this process (see `main`)."""
        if peer.direct:
            self.direct.discard(peer)
        elif not self.done.done():
            self.done.set_result(None)

    def accept(self, sock: socket.socket, hello: int) -> None:
        """Serve a gateway connection the actor authenticated; answer its HELLO (the gateway sends nothing on it
        before this answer, so no byte of it was left with the actor)."""
        peer = Peer(self, direct=True)
        loop = asyncio.get_running_loop()

        async def start() -> None:
            try:
                await loop.connect_accepted_socket(lambda: peer.proto, sock)
            except OSError:
                sock.close()
                return
            self.direct.add(peer)
            peer.send(P.encode(hello, P.HELLO, {"direct": True}))

        loop.create_task(start())

    def report_load(self, report: replica_context.LoadReport) -> None:
        """Over the link only: the actor forwards it to every gateway connection (one source per gateway, so
        two copies of the reports never interleave there)."""
        self.link.send(P.encode(0, P.STATS, report.to_json()))

    async def load(self, call: int, meta: dict[str, Any], code: bytes) -> None:
        from cocoon_faas.runtime.executor import LoadedFunction, grace_from, trimmed_traceback
        from cocoon_faas.spec import FunctionSpec

        try:
            self.forward_logs = bool(meta.get("logs", True))
            spec = FunctionSpec.from_json(meta["spec"])
            _limit(self.memory, max(1, spec.max_concurrency) + 4)
            replica_context.set_max_concurrency(spec.max_concurrency)  # an llm.Engine's default batch
            self.loaded = LoadedFunction(code, spec)
            self.loaded.on_stuck = _exit_stuck
            self.loaded.beacon = self.beacon
            self.loaded.grace = grace_from(meta.get("grace"))
            log = await asyncio.get_running_loop().run_in_executor(self.loaded.pool, self.loaded.setup)
        except BaseException as exc:  # noqa: BLE001 - reported to the actor, which refuses the version
            kind = "memory_exceeded" if _is_memory_error(exc) else "startup_failed"
            self.link.send(P.encode(call, P.ERROR, {"type": kind, "exc_type": type(exc).__name__,
                                                    "message": str(exc)[:2000], "traceback": trimmed_traceback(exc)}))
            return
        self.link.send(P.encode(call, P.READY, {"logs": log.lines if self.forward_logs else []}))
        self.watcher = asyncio.get_running_loop().create_task(replica_context.watch(self.report_load))

    async def handle(self, peer: Peer, call: int, meta: dict[str, Any], body: bytes) -> None:
        """One call, for the actor or a gateway (the same code: `peer` shapes the frames)."""
        from cocoon_faas.runtime.executor import CallInterrupted, CallLog, trimmed_traceback

        loaded = self.loaded
        log = CallLog()
        timeout = float(meta.get("t", 300.0))
        loop = asyncio.get_running_loop()
        replica_context.set_caller(meta.get("caller", ""))  # this task's context: the call's own
        try:
            if loaded is None:
                raise RuntimeError("the sandbox has no code loaded")
            kwargs = json.loads(body) if body else {}
            if not isinstance(kwargs, dict):
                raise TypeError("arguments must be a JSON object of keyword arguments")
            if meta.get("stream"):
                seq = 0
                deadline = loop.time() + timeout
                window = window_of(meta)
                if window is not None:
                    peer.windows[call] = window
                async with aclosing(loaded.stream(kwargs, log, deadline)) as items:  # cancelled while waiting
                    async for item in items:  # for credit: the generator is closed (its producer stopped) at once
                        data = P.dump_result(item)
                        peer.send(P.encode(call, P.CHUNK, None, data))
                        seq += 1
                        if window is not None:  # no credit: the generator is not pulled until the client reads
                            await window.pace(len(data), deadline - loop.time())
                peer.send(P.encode(call, P.END, self._logs(log, seq=seq)))
            else:
                result = await loaded.run(kwargs, log, timeout)
                peer.send(P.encode(call, P.RESULT, self._logs(log), P.dump_result(result)))
        except asyncio.CancelledError:
            peer.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled"}))
        except (CallInterrupted, asyncio.TimeoutError):
            peer.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", **self._logs(log)}))
        except BaseException as exc:  # noqa: BLE001 - the user's exception, reported as function_error
            if _is_memory_error(exc):
                limit = f"{self.memory // 2**20} MiB" if self.memory else "the node's"
                peer.send(P.encode(call, P.ERROR, {
                    "type": "memory_exceeded", "exc_type": _exc_type(exc), "message":
                    f"the function ran out of memory (its limit is {limit}, memory= in @cocoon.function); "
                    "raise memory= or use less", **self._logs(log)}))
                return
            if not isinstance(exc, Exception):
                raise
            log.add("stderr", trimmed_traceback(exc))
            peer.send(P.encode(call, P.ERROR, {
                "type": "function_error", "exc_type": _exc_type(exc), "message": str(exc)[:2000],
                **self._logs(log)}))

    def _logs(self, log: Any, **extra: Any) -> dict[str, Any]:
        # at most P.MAX_LOG_LINES pieces: what the actor forwards, and what the gateway accepts from a direct call
        return {"logs": log.lines[:P.MAX_LOG_LINES], **extra} if log.lines and self.forward_logs else extra


def _exc_type(exc: BaseException) -> str:
    """The exception's class name as the gateway accepts it (an identifier-like name of at most 128 characters;
    another name, say a non-ASCII one, would get the replica dropped as broken)."""
    name = type(exc).__name__
    return name if P.NAME.match(name) else "Exception"


def _serve_handoffs(child: Child, handoff: socket.socket) -> None:
    """Take the gateway connections the actor hands over (one SEQPACKET message each: the HELLO's call number,
    the connection's fd)."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(handoff, 64, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(handoff.fileno())
            return
        if not msg and not fds:  # the actor closed its end
            asyncio.get_running_loop().remove_reader(handoff.fileno())
            return
        for extra in fds[1:]:
            os.close(extra)
        if len(fds) == 0 or len(msg) != P.HANDOFF.size:
            for fd in fds[:1]:
                os.close(fd)
            continue
        child.accept(socket.socket(fileno=fds[0]), P.HANDOFF.unpack(msg)[0])


async def _serve(fd: int, memory: int, handoff_fd: int, beacon_fd: int = -1) -> None:
    from cocoon_faas.runtime.executor import install_output_capture

    install_output_capture()
    sock = socket.socket(fileno=fd)
    child = Child(memory, Beacon(beacon_fd) if beacon_fd >= 0 else None)  # mapped before any tenant code runs
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: child.proto, sock)
    if handoff_fd >= 0:
        handoff = socket.socket(fileno=handoff_fd)
        handoff.setblocking(False)
        loop.add_reader(handoff_fd, _serve_handoffs, child, handoff)
    await child.done


def _exit_stuck() -> None:
    """A call ran on for the interrupt grace (COCOON_INTERRUPT_GRACE_S) after it had to stop: end this process
    (the actor sees the child exit, its replica is replaced and the calls still on it are retried per
    `retries`). Called from the executor's watchdog thread: the event loop may be the thing that is stuck."""
    sys.stderr.write("cocoon: a call is still running COCOON_INTERRUPT_GRACE_S after it had to stop (it ignored "
                     "the interrupt, is blocked in one C call, or blocks the event loop); ending the function's "
                     "process so the replica is replaced\n")
    sys.stderr.flush()
    os._exit(70)


def main(argv: list[str]) -> None:
    fd, memory = int(argv[1]), int(argv[2])
    handoff = int(argv[4]) if len(argv) > 4 else -1
    beacon = int(argv[5]) if len(argv) > 5 else -1
    try:
        import uvloop

        uvloop.run(_serve(fd, memory, handoff, beacon))
    except ImportError:
        asyncio.run(_serve(fd, memory, handoff, beacon))
    os._exit(0)  # user threads (pools, model loaders) must not keep a sandbox alive after its actor left


if __name__ == "__main__":
    main(sys.argv)
