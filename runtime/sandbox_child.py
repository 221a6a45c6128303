"""The process inside the sandbox: loads the function's code and runs its calls (runtime/sandbox.py starts it).

`python -m cocoon_faas.runtime.sandbox_child FD MEMORY PIDS`: FD is its end of a Unix socket pair to the replica
actor. Before any tenant code is loaded it lowers its own limits (address space: what the runtime maps already plus
MEMORY bytes, unless 0; soft and hard, so the code cannot raise them again). Then it serves frames (cocoon_faas/protocol.py):

    LOAD  meta {"spec": {...}}, body: the code blob   -> READY {"logs": [...]} | ERROR {"type": "startup_failed"}
    CALL  meta {"t": timeout, "stream": bool, "caller": tag}, body: JSON keyword arguments
          -> RESULT body / CHUNK bodies then END / ERROR {"type": function_error | timeout | memory_exceeded}
    CANCEL
    STATS (sent, call 0) meta: the load its engines report (cocoon_faas/replica_context.py), when it changes
    CREDIT body: u64 bytes, for a stream that announced a window ("w" in its CALL meta): CHUNKs stop when the
          window is spent until credit comes back (cocoon_faas/flow.py), so the generator waits for the client

It reports no execution time: the actor measures that outside the sandbox. When the socket closes it exits.
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


class Child:
    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.loaded: Any = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, Window] = {}  # a stream's window, by call
        self.proto = P.FrameProtocol(self.on_frame, self.on_lost)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.forward_logs = True
        self.watcher: asyncio.Task[None] | None = None  # load reports of the code's engines, if any

    def on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
        loop = asyncio.get_running_loop()
        if ftype == P.CALL:
            task = loop.create_task(self.handle(call, meta, body))
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
            except FlowError as exc:  # the actor is platform code: a bad credit means a broken link
                self.proto.abort(f"bad CREDIT: {exc}")
        elif ftype == P.CANCEL:
            running = self.tasks.get(call)
            if running is not None:
                running.cancel()
        elif ftype == P.LOAD:
            loop.create_task(self.load(call, meta, body))

    def on_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        if not self.done.done():
            self.done.set_result(None)

    def send(self, data: bytes) -> None:
        if not self.proto.closed:
            self.proto.send_now(data)

    async def load(self, call: int, meta: dict[str, Any], code: bytes) -> None:
        from cocoon_faas.runtime.executor import LoadedFunction, trimmed_traceback
        from cocoon_faas.spec import FunctionSpec

        try:
            self.forward_logs = bool(meta.get("logs", True))
            spec = FunctionSpec.from_json(meta["spec"])
            _limit(self.memory, max(1, spec.max_concurrency) + 4)
            replica_context.set_max_concurrency(spec.max_concurrency)  # an llm.Engine's default batch
            self.loaded = LoadedFunction(code, spec)
            self.loaded.on_stuck = _exit_stuck
            log = await asyncio.get_running_loop().run_in_executor(self.loaded.pool, self.loaded.setup)
        except BaseException as exc:  # noqa: BLE001 - reported to the actor, which refuses the version
            kind = "memory_exceeded" if _is_memory_error(exc) else "startup_failed"
            self.send(P.encode(call, P.ERROR, {"type": kind, "exc_type": type(exc).__name__,
                                               "message": str(exc)[:2000], "traceback": trimmed_traceback(exc)}))
            return
        self.send(P.encode(call, P.READY, {"logs": log.lines if self.forward_logs else []}))
        self.watcher = asyncio.get_running_loop().create_task(replica_context.watch(
            lambda r: self.send(P.encode(0, P.STATS, r.to_json()))))

    async def handle(self, call: int, meta: dict[str, Any], body: bytes) -> None:
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
                    self.windows[call] = window
                async with aclosing(loaded.stream(kwargs, log, deadline)) as items:  # cancelled while waiting
                    async for item in items:  # for credit: the generator is closed (its producer stopped) at once
                        data = P.dump_result(item)
                        self.send(P.encode(call, P.CHUNK, None, data))
                        seq += 1
                        if window is not None:  # no credit: the generator is not pulled until the client reads
                            await window.pace(len(data), deadline - loop.time())
                self.send(P.encode(call, P.END, self._logs(log, seq=seq)))
            else:
                result = await loaded.run(kwargs, log, timeout)
                self.send(P.encode(call, P.RESULT, self._logs(log), P.dump_result(result)))
        except asyncio.CancelledError:
            self.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled"}))
        except (CallInterrupted, asyncio.TimeoutError):
            self.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", **self._logs(log)}))
        except BaseException as exc:  # noqa: BLE001 - the user's exception, reported as function_error
            if _is_memory_error(exc):
                limit = f"{self.memory // 2**20} MiB" if self.memory else "the node's"
                self.send(P.encode(call, P.ERROR, {
                    "type": "memory_exceeded", "exc_type": type(exc).__name__, "message":
                    f"the function ran out of memory (its limit is {limit}, memory= in @cocoon.function); "
                    "raise memory= or use less", **self._logs(log)}))
                return
            if not isinstance(exc, Exception):
                raise
            log.add("stderr", trimmed_traceback(exc))
            self.send(P.encode(call, P.ERROR, {
                "type": "function_error", "exc_type": type(exc).__name__, "message": str(exc)[:2000],
                **self._logs(log)}))

    def _logs(self, log: Any, **extra: Any) -> dict[str, Any]:
        return {"logs": log.lines, **extra} if log.lines and self.forward_logs else extra



async def _serve(fd: int, memory: int) -> None:
    from cocoon_faas.runtime.executor import install_output_capture

    install_output_capture()
    sock = socket.socket(fileno=fd)
    child = Child(memory)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: child.proto, sock)
    await child.done


def _exit_stuck() -> None:
    """A call ignored its interrupt for INTERRUPT_GRACE_S: end this process (the actor sees the child
    exit, its replica is replaced and the calls still on it are retried per `retries`)."""
    from cocoon_faas.runtime.executor import INTERRUPT_GRACE_S

    sys.stderr.write(f"cocoon: a call is still running {INTERRUPT_GRACE_S:g} s after it was interrupted (it ignored "
                     "the interrupt or is blocked in one C call); ending the function's process so the replica is "
                     "replaced\n")
    sys.stderr.flush()
    os._exit(70)


def main(argv: list[str]) -> None:
    fd, memory = int(argv[1]), int(argv[2])
    try:
        import uvloop

        uvloop.run(_serve(fd, memory))
    except ImportError:
        asyncio.run(_serve(fd, memory))
    os._exit(0)  # user threads (pools, model loaders) must not keep a sandbox alive after its actor left


if __name__ == "__main__":
    main(sys.argv)
