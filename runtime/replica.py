"""The replica: a Ray actor that loads one function version and serves calls over the frame protocol.

Ray creates the actor with the spec's resources and restarts nothing on its own: the gateway's controller
decides. On `start()` the actor unpickles the code blob (inside the worker: the gateway never does), runs the
setup hooks, and opens a TCP port; the gateway then keeps one persistent multiplexed connection to it.

Confidential calls (docs/confidential.md): `start()` also creates the replica's `ReplicaIdentity` here, inside
the worker (TDX evidence when configfs-tsm exists, else a NOT SECURE dev attestation), and returns its document.
A CALL whose meta says `"sealed": true` carries a sealed envelope: it is opened here, and every answer leaves
sealed to the caller's reply key with a signed receipt. Output printed during a sealed call is never forwarded.
A confidential deployment's code arrives sealed ("CSC1"); it stays locked until `unlock(grant)` delivers the
code key (from the developer's release agent or a peer replica, `peer_grant`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.bundle import measurement_of
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.keyrelease import CODE_MAGIC, peek_sealed_code
from cocoon_faas.confidential.replica import TSM_REPORT_DIR, ReplicaCallContext, ReplicaIdentity
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
            task.add_done_callback(lambda _t: self.tasks.pop(call, None))
        elif ftype == P.CANCEL:
            running = self.tasks.get(call)
            if running is not None:
                running.cancel()
        elif ftype == P.PING:
            self.proto.send(P.encode(call, P.PONG, {"inflight": self.replica.inflight}))

    def on_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks.values()):
            task.cancel()

    def send(self, data: bytes) -> None:
        if not self.proto.closed:
            self.proto.send(data)


def _evidence_kind() -> str:
    """`tdx` inside a TDX guest (configfs-tsm present), else `dev`; COCOON_ATTESTATION=dev|tdx overrides."""
    from cocoon_faas.settings import get_settings

    choice = getattr(get_settings(), "attestation", "auto")
    if choice in ("dev", "tdx"):
        return choice
    return "tdx" if TSM_REPORT_DIR.is_dir() else "dev"


def _create_identity(function: str, measurement: str) -> ReplicaIdentity:
    """Fresh keys and a document; the dev key file is created under a lock (replicas start concurrently)."""
    import fcntl

    from cocoon_faas.settings import get_settings

    kind = _evidence_kind()
    if kind == "tdx":
        return ReplicaIdentity.create(function, measurement, RUNTIME_VERSION, evidence="tdx")
    home = Path(get_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "dev_attestation_key.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ReplicaIdentity.create(function, measurement, RUNTIME_VERSION, evidence="dev", dev_key=home)


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
        self.ident: ReplicaIdentity | None = None
        self._ident_error = ""
        self._sealed_code: bytes | None = None  # a confidential deployment's code, until and after unlock
        self._unlocked: asyncio.Event | None = None
        self._data_loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> dict[str, Any]:
        """Create the identity, load the function (unless its code is sealed), run setup hooks, open the data
        port; returns where to connect and the attestation document."""
        install_output_capture()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        sealed = self._blob[:4] == CODE_MAGIC
        self._unlocked = asyncio.Event()
        try:
            if sealed:
                hdr = peek_sealed_code(self._blob)
                if hdr.function != self.function:
                    raise EnvelopeError("function", f"sealed code is for {hdr.function!r}, not {self.function!r}")
                measurement = hdr.measurement
            else:
                measurement = measurement_of(self._blob, self.spec.canonical())
            try:
                self.ident = await loop.run_in_executor(None, _create_identity, self.function, measurement)
            except Exception as exc:  # noqa: BLE001 - plain calls still work; sealed ones are refused
                if sealed:
                    raise
                self._ident_error = f"{type(exc).__name__}: {exc}"
            log_lines: list[Any] = []
            if sealed:
                self._sealed_code = self._blob
            else:
                self.loaded = LoadedFunction(self._blob, self.spec)
                log = await loop.run_in_executor(self.loaded.pool, self.loaded.setup)
                log_lines = log.lines
                self._unlocked.set()
        except Exception as exc:  # noqa: BLE001 - reported to the gateway, which refuses the version
            return {"ok": False, "error_type": type(exc).__name__, "message": str(exc),
                    "traceback": trimmed_traceback(exc)}
        self._blob = b""
        self._data_loop = _data_plane_loop()

        async def listen() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(lambda: _ServerConn(self).proto, self._host, 0)

        self._server = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(listen(), self._data_loop))
        port = self._server.sockets[0].getsockname()[1]
        info: dict[str, Any] = {"ok": True, "host": self._host, "port": port, "pid": os.getpid(),
                                "setup_s": time.monotonic() - t0, "logs": log_lines if self._forward_logs else [],
                                "runtime": RUNTIME_VERSION, "code_locked": sealed}
        if self.ident is not None:
            info.update(key_id=self.ident.key_id, document=self.ident.document)
        else:
            info["attestation_error"] = self._ident_error
        _settle_process()
        return info

    async def unlock(self, grant: bytes) -> dict[str, Any]:
        """Open the sealed code with a key grant addressed to this replica, then load it and run setup hooks."""
        if self._sealed_code is None or self.ident is None:
            return {"ok": False, "check": "not_sealed", "message": "this replica's code is not sealed"}
        if self.loaded is not None:
            return {"ok": True, "already": True}
        loop = asyncio.get_running_loop()
        try:
            code = self.ident.open_code(self._sealed_code, grant)
            if measurement_of(code, self.spec.canonical()) != self.ident.measurement:
                raise EnvelopeError("measurement", "the opened code and spec do not hash to the sealed measurement")
            loaded = LoadedFunction(code, self.spec)
            await loop.run_in_executor(loaded.pool, loaded.setup)  # setup output of sealed code stays here
        except Exception as exc:  # noqa: BLE001 - reported to whoever delivered the grant
            return {"ok": False, "check": getattr(exc, "check", type(exc).__name__), "message": str(exc)}
        self.loaded = loaded
        assert self._unlocked is not None
        if self._data_loop is not None:  # the Event belongs to the data-plane loop; set it there
            self._data_loop.call_soon_threadsafe(self._unlocked.set)
        else:
            self._unlocked.set()
        return {"ok": True}

    async def peer_grant(self, peer_document: dict[str, Any]) -> bytes:
        """Release the code key this replica holds to a peer whose document passes the sealed code's policy."""
        if self.ident is None or self._sealed_code is None:
            raise EnvelopeError("no_code_key", "this replica's code is not sealed; nothing to release")
        return self.ident.peer_grant(self._sealed_code, peer_document)

    async def document(self) -> dict[str, Any] | None:
        return self.ident.document if self.ident is not None else None

    async def stats(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "calls": self.calls, "pid": os.getpid()}

    async def handle(self, conn: _ServerConn, call: int, meta: dict[str, Any], body: bytes) -> None:
        if meta.get("sealed"):
            return await self._handle_sealed(conn, call, meta, body)
        if self._sealed_code is not None:
            conn.send(P.encode(call, P.ERROR, {
                "type": "invalid_request", "status": 400, "message": f"function {self.function!r} is a "
                "confidential deployment: it accepts only sealed calls (`cocoon call --confidential`)"}))
            return
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

    async def _handle_sealed(self, conn: _ServerConn, call: int, meta: dict[str, Any], body: bytes) -> None:
        """A sealed call: open the envelope, run, answer with sealed frames. Nothing readable leaves: no logs, no
        error text from user code; plain ERROR frames carry only platform facts (check names, timeouts).

        Frames: unary -> RESULT whose body is a sealed `res` or `err` frame (meta "sealed" names the kind);
        stream -> CHUNK per sealed item, then END whose body is the sealed `end` (or `err`) frame."""
        ident = self.ident
        t0 = time.monotonic()
        if ident is None:
            conn.send(P.encode(call, P.ERROR, {"type": "attestation_error", "status": 503, "check": "identity",
                                               "message": f"this replica has no attestation identity "
                                               f"({self._ident_error}); it serves plain calls only"}))
            return
        try:
            opened = ident.open_request(body)
        except EnvelopeError as exc:
            conn.send(P.encode(call, P.ERROR, {"type": exc.type, "status": exc.status, "check": exc.check,
                                               "message": exc.message}))
            return
        timeout = float(meta.get("t", self.spec.timeout))
        self.inflight += 1
        self.calls += 1
        try:
            if self.loaded is None:
                assert self._unlocked is not None
                try:
                    await asyncio.wait_for(self._unlocked.wait(), max(timeout, 0.001))
                except asyncio.TimeoutError:
                    conn.send(P.encode(call, P.ERROR, {
                        "type": "no_capacity", "status": 503, "check": "code_locked", "message":
                        f"the code key of confidential function {self.function!r} was not released to this replica "
                        "in time; the developer runs `cocoon deploy --confidential` (or a release agent)"}))
                    return
            await self._run_sealed(conn, call, meta, opened.args_json, opened.ctx, ident, t0, timeout)
        finally:
            self.inflight -= 1

    async def _run_sealed(self, conn: _ServerConn, call: int, meta: dict[str, Any], args_json: bytes,
                          ctx: ReplicaCallContext, ident: ReplicaIdentity, t0: float, timeout: float) -> None:
        loaded = self.loaded
        assert loaded is not None
        call_id = str(meta.get("id", call))
        rate, royalty = float(meta.get("rate", 0.0)), int(meta.get("royalty", 0))
        stream = bool(meta.get("stream"))
        log = CallLog()  # sealed calls' output is captured so it is not lost in worker logs, and never forwarded

        def price(ms: float) -> int:
            return math.ceil(round(ms, 3) / 1000 * rate) + royalty

        usage: dict[str, int] | None = None  # token counts of a per-token priced function, for its charge

        def final(kind: str) -> dict[str, Any]:  # meta of the last frame: the receipt's MAC for the gateway
            meta_out: dict[str, Any] = {"ms": ms, "sealed": kind}
            tag = ident.gateway_tag(ctx, meta.get("gk"))
            if tag is not None:
                meta_out["gm"] = tag
            if usage is not None and kind != "err":
                meta_out["usage"] = usage
            return meta_out

        seq = 0
        ms = 0.0
        try:
            kwargs = json.loads(args_json) if args_json.strip() else {}
            if not isinstance(kwargs, dict):
                raise TypeError("sealed arguments must be a JSON object of keyword arguments")
            if stream:
                async for item in loaded.stream(kwargs, log, t0 + timeout):
                    conn.send(P.encode(call, P.CHUNK, {"seq": seq, "sealed": "chunk"},
                                       ident.seal_chunk(ctx, seq, _dumps(item))))
                    seq += 1
                    usage = token_usage(item) or usage
                ms = _ms(t0)
                frame = ident.seal_end(ctx, call_id, ms, price(ms))
                conn.send(P.encode(call, P.END, {**final("end"), "seq": seq}, frame))
            else:
                value = await loaded.run(kwargs, log, timeout)
                usage = token_usage(value)
                result = _dumps(value)
                ms = _ms(t0)
                frame = ident.seal_response(ctx, call_id, result, ms, price(ms))
                conn.send(P.encode(call, P.RESULT, final("res"), frame))
        except asyncio.CancelledError:
            conn.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled", "ms": _ms(t0)}))
        except (CallInterrupted, asyncio.TimeoutError):
            conn.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", "ms": _ms(t0)}))
        except Exception as exc:  # noqa: BLE001 - the user's exception, sealed: its text may hold user data
            ms = _ms(t0)
            frame = ident.seal_error(ctx, call_id, type(exc).__name__, str(exc)[:2000], ms, price(ms))
            conn.send(P.encode(call, P.END if stream else P.RESULT, {**final("err"), "seq": seq}, frame))
        finally:
            asyncio.get_running_loop().call_soon(ident.prepare)  # the next response's ephemeral, made while idle

    def _log_meta(self, log: CallLog) -> dict[str, Any]:
        return {"logs": log.lines} if self._forward_logs and log.lines else {}

    def _done_meta(self, t0: float, log: CallLog, **extra: Any) -> dict[str, Any]:
        return {"ms": _ms(t0), **self._log_meta(log), **extra}


def _data_plane_loop() -> asyncio.AbstractEventLoop:
    """An event loop (uvloop when installed) in its own thread for the data path: calls never queue behind
    Ray's actor loop, and uvloop's socket handling costs about half of asyncio's per call."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="cocoon-data-plane", daemon=True).start()
    return loop


def _settle_process() -> None:
    """After loading: freeze what start-up allocated out of the GC's reach (full collections of a model-sized
    heap stall calls for 100s of ms, as Ray Serve found), and serve at normal priority (Ray starts workers
    at nice 15, which starves latency-sensitive replicas on a busy node). Both best effort."""
    gc.collect()
    gc.freeze()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        pass


def token_usage(item: Any) -> dict[str, int] | None:
    """The token counts a sealed item reports (what its per-token charge is computed from), else None. Only the
    counts leave the sealed answer: the gateway prices them, the caller checks them against what it opened."""
    if not isinstance(item, dict):
        return None
    u = item.get("usage")
    if not isinstance(u, dict):
        return None
    out = {k: u[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens")
           if isinstance(u.get(k), int) and not isinstance(u.get(k), bool)}
    return out if "prompt_tokens" in out and "completion_tokens" in out else None


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
