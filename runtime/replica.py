"""The replica: a Ray actor that loads one function version and serves calls over the frame protocol.

Ray creates the actor with the spec's resources and restarts nothing on its own: the gateway's controller
decides. On `start()` the actor unpickles the code blob (inside the worker: the gateway never does), runs the
setup hooks, and opens a TCP port; the gateway then keeps one persistent multiplexed connection to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.runtime.executor import (
    CallInterrupted,
    CallLog,
    LoadedFunction,
    install_output_capture,
    trimmed_traceback,
)
from cocoon_faas.spec import FunctionSpec

RUNTIME_VERSION = "cocoon-runtime/1"


class _ServerConn:
    """One gateway connection: runs each CALL as a task, cancels on CANCEL."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.proto = P.FrameProtocol(self.on_frame, self.on_lost)

    def on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
        if ftype == P.CALL:
            task = asyncio.get_running_loop().create_task(self.replica.handle(self, call, meta, body))
            self.tasks[call] = task
            task.add_done_callback(lambda _t, c=call: self.tasks.pop(c, None))
        elif ftype == P.CANCEL:
            task = self.tasks.get(call)
            if task is not None:
                task.cancel()
        elif ftype == P.PING:
            self.proto.send(P.encode(call, P.PONG, {"inflight": self.replica.inflight}))

    def on_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks.values()):
            task.cancel()

    def send(self, data: bytes) -> None:
        if not self.proto.closed:
            self.proto.send(data)


class Replica:
    """Actor body; wrapped with `ray.remote` by the controller (so importing this needs no Ray)."""

    def __init__(self, function: str, version: int, blob: bytes, spec_json: dict[str, Any], host: str,
                 forward_logs: bool = True) -> None:
        self.function = function
        self.version = version
        self.spec = FunctionSpec.from_json(spec_json)
        self._blob = blob
        self._host = host
        self._forward_logs = forward_logs
        self.loaded: LoadedFunction | None = None
        self.inflight = 0
        self.calls = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> dict[str, Any]:
        """Load the function, run setup hooks, open the data port; returns where to connect."""
        install_output_capture()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            self.loaded = LoadedFunction(self._blob, self.spec)
            log = await loop.run_in_executor(self.loaded.pool, self.loaded.setup)
        except Exception as exc:  # noqa: BLE001 - reported to the gateway, which refuses the version
            return {"ok": False, "error_type": type(exc).__name__, "message": str(exc),
                    "traceback": trimmed_traceback(exc)}
        self._blob = b""
        self._server = await loop.create_server(lambda: _ServerConn(self).proto, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return {"ok": True, "host": self._host, "port": port, "pid": os.getpid(),
                "setup_s": time.monotonic() - t0, "logs": log.lines, "runtime": RUNTIME_VERSION}

    async def stats(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "calls": self.calls, "pid": os.getpid()}

    async def handle(self, conn: _ServerConn, call: int, meta: dict[str, Any], body: bytes) -> None:
        loaded = self.loaded
        assert loaded is not None
        self.inflight += 1
        self.calls += 1
        log = CallLog()
        t0 = time.monotonic()
        timeout = float(meta.get("t", self.spec.timeout))
        try:
            kwargs = json.loads(body) if body else {}
            if meta.get("stream"):
                seq = 0
                async for item in loaded.stream(kwargs, log, t0 + timeout):
                    conn.send(P.encode(call, P.CHUNK, {"seq": seq}, _dumps(item)))
                    seq += 1
                conn.send(P.encode(call, P.END, self._done_meta(t0, log, seq=seq)))
            else:
                result = await loaded.run(kwargs, log, timeout)
                conn.send(P.encode(call, P.RESULT, self._done_meta(t0, log), _dumps(result)))
        except asyncio.CancelledError:
            conn.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled", "ms": _ms(t0)}))
        except (CallInterrupted, asyncio.TimeoutError):
            conn.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", "ms": _ms(t0),
                **self._log_meta(log)}))
        except Exception as exc:  # noqa: BLE001 - the user's exception, reported as function_error
            log.add("stderr", trimmed_traceback(exc))
            conn.send(P.encode(call, P.ERROR, {
                "type": "function_error", "exc_type": type(exc).__name__, "message": str(exc)[:2000],
                "ms": _ms(t0), **self._log_meta(log)}))
        finally:
            self.inflight -= 1

    def _log_meta(self, log: CallLog) -> dict[str, Any]:
        return {"logs": log.lines} if self._forward_logs and log.lines else {}

    def _done_meta(self, t0: float, log: CallLog, **extra: Any) -> dict[str, Any]:
        return {"ms": _ms(t0), **self._log_meta(log), **extra}


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the function returned a value that is not JSON-serializable ({exc}); return dicts, lists, "
            "strings, numbers, booleans or None"
        ) from None
