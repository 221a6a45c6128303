"""The replica: a Ray actor that serves one function version's calls over the frame protocol.

Ray creates the actor with the spec's resources and restarts nothing on its own: the gateway's controller
decides. The actor is platform code; the function's code runs in a bubblewrap sandbox child
(runtime/sandbox.py), which the actor starts on `start()`, sends the code blob to, and relays calls to over a
Unix socket (runtime/sandbox_link.py), metering each call itself. Only with `COCOON_SANDBOX=off` (development)
does the code run in this process instead.

The gateway never fetches a Python value from this actor (it would have to unpickle what a provider's process
produced): `start()` returns nothing; it writes its facts (data port, attestation document, setup logs, or why it
failed) as JSON bytes to Ray's key-value store under `facts_key(replica_id)`, which the gateway parses with strict
decoders (gateway/replica_wire.py). The data port accepts a connection only after a HELLO frame that carries the
per-replica secret the gateway gave at actor creation; everything else, including code-key grants (UNLOCK,
GRANT), travels as frames. A HELLO that also asks for "direct" (the gateway's second connection) is checked here and
the connection handed to the sandboxed child (`hand_off`), which serves its plain calls without this actor's hop.

Confidential calls (docs/confidential.md): `start()` also creates the replica's `ReplicaIdentity` here, inside
the worker (TDX evidence when configfs-tsm exists, else a NOT SECURE dev attestation), and returns its document.
A CALL whose meta says `"sealed": true` carries a sealed envelope: it is opened here (the keys never enter the
sandbox), and every answer leaves sealed to the caller's reply key with a signed receipt. Output printed during a
sealed call is never forwarded and never written anywhere (the child's stdout/stderr are /dev/null).
A confidential deployment's code arrives sealed ("CSC1"); it stays locked until `unlock(grant)` delivers the
code key (from the developer's release agent or a peer replica, `peer_grant`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import math
import os
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas import replica_context
from cocoon_faas.bundle import measurement_of
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.keyrelease import CODE_MAGIC, peek_sealed_code
from cocoon_faas.confidential.replica import TSM_REPORT_DIR, ReplicaCallContext, ReplicaIdentity
from cocoon_faas.flow import FlowError, Window, decode_credit, window_of
from cocoon_faas.runtime.executor import (
    CallInterrupted,
    CallLog,
    LoadedFunction,
    install_output_capture,
    trimmed_traceback,
)
from cocoon_faas.runtime.sandbox import SandboxConfig, SandboxProcess
from cocoon_faas.runtime.sandbox_link import ChildError, SandboxLink
from cocoon_faas.spec import FunctionSpec

RUNTIME_VERSION = "cocoon-runtime/1"
FACTS_NAMESPACE = b"cocoon"
LOAD_TIMEOUT_S = 600.0


def facts_key(replica_id: str) -> bytes:
    """Where a replica writes its start-up facts in Ray's key-value store (bytes only: nothing unpickled)."""
    return f"replica-facts/{replica_id}".encode()


class _ServerConn:
    """One gateway connection: HELLO first (the per-replica secret; with "direct", handed to the sandbox instead),
    then each CALL relayed to the sandbox (or run as a task), cancelled on CANCEL. A stream's CREDIT goes to the sandbox with its relayed call, or to the
    window a task-run stream waits on; a malformed or excessive credit drops the connection (cocoon_faas/flow.py).
    """

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.relayed: dict[int, int] = {}  # gateway call -> sandbox call
        self.windows: dict[int, Window] = {}  # gateway call -> its stream window (streams run here as tasks)
        self.authenticated = False
        self.proto = P.FrameProtocol(self.on_frame, self.on_lost)
        replica._conns.add(self)

    def on_frame(self, call: int, ftype: int, meta: dict[str, Any], body: bytes) -> None:
        if not self.authenticated:
            if ftype == P.HELLO and hmac.compare_digest(body, self.replica.secret):
                self.authenticated = True
                if meta.get("direct") is True and self.replica.hand_off(self, call):
                    return  # the sandbox answers this HELLO and serves the connection's plain calls
                self.proto.send(P.encode(call, P.HELLO))
                if self.replica.load is not None:  # a new gateway learns the engine's load at once
                    self.proto.send(P.encode(0, P.STATS, self.replica.load.to_json()))
            else:  # not the gateway: nothing is answered, the connection is dropped
                self.proto.abort("the first frame must be HELLO with this replica's secret")
            return
        if ftype == P.CALL:
            try:
                window = window_of(meta)
            except FlowError as exc:
                self.proto.abort(str(exc))
                return
            link = self.replica.link
            if link is not None and not meta.get("sealed") and self.replica.relayable:
                self.relayed[call] = self.replica.relay(self, link, call, meta, body, window)
                return
            if window is not None:
                self.windows[call] = window
            token = replica_context.set_caller(meta.get("caller", ""))  # copied into the call's task
            try:
                self._task(call, self.replica.handle(self, call, meta, body, window))
            finally:
                replica_context.reset_caller(token)
        elif ftype == P.CREDIT:
            self.credit(call, body)
        elif ftype == P.CANCEL:
            running = self.tasks.get(call)
            if running is not None:
                running.cancel()
            cid = self.relayed.get(call)
            if cid is not None and self.replica.link is not None:
                self.replica.link.cancel(cid)
        elif ftype == P.PING:
            self.proto.send(P.encode(call, P.PONG, {"inflight": self.replica.inflight}))
        elif ftype == P.UNLOCK:
            self._task(call, self.replica.unlock_frame(self, call, body))
        elif ftype == P.GRANT:
            self._task(call, self.replica.grant_frame(self, call, body))

    def credit(self, call: int, body: bytes) -> None:
        """A credit for a stream; one for a call that has ended meanwhile is dropped (it crossed the END)."""
        try:
            n = decode_credit(body)
            cid = self.relayed.get(call)
            if cid is not None and self.replica.link is not None:
                self.replica.link.credit(cid, n)
            elif call in self.windows:
                self.windows[call].granted(n)
        except FlowError as exc:
            self.proto.abort(f"bad CREDIT from the gateway: {exc}")

    def _task(self, call: int, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks[call] = task

        def done(_t: Any) -> None:
            self.tasks.pop(call, None)
            self.windows.pop(call, None)

        task.add_done_callback(done)

    def on_lost(self, exc: Exception | None) -> None:
        self.replica._conns.discard(self)
        for task in list(self.tasks.values()):
            task.cancel()
        link = self.replica.link
        if link is not None:
            for cid in self.relayed.values():
                link.cancel(cid)
        self.relayed.clear()

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
                 forward_logs: bool = True, replica_id: str = "", secret: bytes = b"", sandbox: bool = True,
                 models_dir: str | None = None) -> None:
        self.function = function
        self.version = version
        self.spec = FunctionSpec.from_json(spec_json)
        self.replica_id = replica_id
        self.secret = secret
        self._spec_json = spec_json
        self._blob = blob
        self._host = host
        self._forward_logs = forward_logs
        self._sandbox = sandbox
        self._models_dir = models_dir
        self.loaded: LoadedFunction | None = None  # in-process code (COCOON_SANDBOX=off only)
        self.link: SandboxLink | None = None  # the sandboxed child running the code
        self.relayable = False  # plain calls go straight to the child (unlocked, not a confidential deployment)
        self._inflight = 0
        self._calls = 0
        self._server: asyncio.AbstractServer | None = None
        self.ident: ReplicaIdentity | None = None
        self._ident_error = ""
        self._sealed_code: bytes | None = None  # a confidential deployment's code, until and after unlock
        self._unlocked: asyncio.Event | None = None
        self._data_loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_ServerConn] = set()
        self.load: replica_context.LoadReport | None = None  # the code's engines' last load report
        self._watcher: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return self._inflight + (self.link.inflight if self.link is not None else 0)

    @property
    def calls(self) -> int:
        return self._calls + (self.link.calls if self.link is not None else 0)

    def _sandbox_config(self) -> SandboxConfig:
        spec = self.spec
        return SandboxConfig(memory=spec.memory, network=spec.network, env=dict(spec.env), gpu=spec.gpu is not None,
                             threads=max(1, math.ceil(spec.cpu)), enabled=self._sandbox, models_dir=self._models_dir,
                             node=_provider_node())

    async def start(self) -> None:
        """Create the identity, start the sandbox and load the function into it (unless its code is sealed),
        open the data port; then publish the facts as bytes (`facts_key`). Returns nothing on purpose."""
        install_output_capture()
        t0 = time.monotonic()
        self._data_loop = _data_plane_loop()
        try:
            info = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start(t0), self._data_loop))
        except Exception as exc:  # noqa: BLE001 - reported to the gateway, which refuses the version
            info = {"ok": False, "error_type": getattr(exc, "error_type", type(exc).__name__),
                    "message": str(exc)[:2000], "traceback": getattr(exc, "tb", "") or trimmed_traceback(exc)}
        if info.get("ok"):
            _settle_process()
        _publish(self.replica_id, info)  # last: the gateway reads the facts when this task ends (no polling)

    async def _start(self, t0: float) -> dict[str, Any]:
        """On the data-plane loop, where the sandbox link and the data port live."""
        loop = asyncio.get_running_loop()
        sealed = self._blob[:4] == CODE_MAGIC
        self._unlocked = asyncio.Event()
        if sealed:
            hdr = peek_sealed_code(self._blob)
            if hdr.function != self.function:
                raise EnvelopeError("function", f"sealed code is for {hdr.function!r}, not {self.function!r}")
            measurement = hdr.measurement
        else:
            measurement = measurement_of(self._blob, self.spec.canonical())
        # the identity (keys, attestation document; its first use in a process imports the settings, ~0.2 s) is
        # made on a thread while plain code loads into its sandbox child, a process of its own
        identity = loop.run_in_executor(None, _create_identity, self.function, measurement)
        log_lines: list[Any] = []
        if not sealed:
            try:
                log_lines = await self._load(self._blob)
            except BaseException:
                await asyncio.gather(identity, return_exceptions=True)  # ended, whatever it did
                raise
            self.relayable = True
        try:
            self.ident = await identity
        except Exception as exc:  # noqa: BLE001 - plain calls still work; sealed ones are refused
            if sealed:
                raise
            self._ident_error = f"{type(exc).__name__}: {exc}"
        if sealed:
            self._sealed_code = self._blob
        self._blob = b""
        self._server = await loop.create_server(lambda: _ServerConn(self).proto, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        info: dict[str, Any] = {"ok": True, "host": self._host, "port": port, "pid": os.getpid(),
                                "setup_s": time.monotonic() - t0, "logs": log_lines if self._forward_logs else [],
                                "runtime": RUNTIME_VERSION, "code_locked": sealed, "sandboxed": self._sandbox}
        if self.ident is not None:
            info.update(key_id=self.ident.key_id, document=self.ident.document)
        else:
            info["attestation_error"] = self._ident_error
        return info

    async def _load(self, code: bytes) -> list[Any]:
        """Load plaintext code: into a new sandbox child, or (sandbox off) into this process. Setup logs."""
        loop = asyncio.get_running_loop()
        if self._sandbox:
            proc = await loop.run_in_executor(None, SandboxProcess, self._sandbox_config(), self.replica_id or
                                              f"pid{os.getpid()}")
            link = SandboxLink(proc, self._child_exited, self._forward_load)
            await link.open()
            try:
                logs = await link.load(code, self._spec_json, LOAD_TIMEOUT_S, self._forward_logs,
                                       _interrupt_grace())
            except ChildError as exc:
                link.close()
                raise _StartFailed(exc.meta) from None
            self.link = link
            if self._unlocked is not None:
                self._unlocked.set()
            return logs
        replica_context.set_max_concurrency(self.spec.max_concurrency)  # an llm.Engine's default batch
        loaded = LoadedFunction(code, self.spec)
        log = await loop.run_in_executor(loaded.pool, loaded.setup)
        self.loaded = loaded
        self._watcher = loop.create_task(replica_context.watch(self._forward_load))
        if self._unlocked is not None:
            self._unlocked.set()
        return log.lines

    def hand_off(self, conn: _ServerConn, call: int) -> bool:
        """The direct path: give gateway connection `conn` (authenticated, its HELLO read here and kept: the secret
        never reaches the sandbox) to the sandboxed child, which answers that HELLO and serves the connection's
        plain calls without this actor's hop. Only a plaintext deployment's sandbox gets it: a confidential one
        (sealed code) and the in-process mode (COCOON_SANDBOX=off) keep every call here. False: not handed (the
        connection stays an ordinary one, and the gateway sees a HELLO without "direct")."""
        link = self.link
        transport = conn.proto.transport
        if link is None or not self.relayable or self._sealed_code is not None or transport is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        transport.pause_reading()  # not one more byte of it is read here: the gateway's calls go to the child
        try:
            link.hand_off(sock.fileno(), call)
        except OSError:
            transport.resume_reading()
            return False
        conn.proto.abort("handed to the sandbox")  # closes this process's copy only (the child holds its own)
        return True

    def _forward_load(self, report: replica_context.LoadReport) -> None:
        """An engine's load (reduced by the link, or read in this process): to every gateway, for autoscaling."""
        self.load = report
        frame = P.encode(0, P.STATS, report.to_json())
        for conn in list(self._conns):
            if conn.authenticated:
                conn.send(frame)

    def _child_exited(self) -> None:
        """The child died (os._exit, a signal, a limit): this replica is lost. Its gateway connections drop, so
        the gateway retries the calls elsewhere (as for a dead worker) and replaces the replica."""
        self.relayable = False
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.proto.abort("the replica's sandbox exited")
        if self.link is not None:
            self.link.proc.kill()

    async def unlock_frame(self, conn: _ServerConn, call: int, grant: bytes) -> None:
        res = await self.unlock(grant)
        conn.send(P.encode(call, P.RESULT, {k: v for k, v in res.items() if k in ("ok", "check", "message")}))

    async def grant_frame(self, conn: _ServerConn, call: int, body: bytes) -> None:
        try:
            grant = await self.peer_grant(json.loads(body))
        except Exception as exc:  # noqa: BLE001 - a refused peer (policy) is an answer, not a crash
            conn.send(P.encode(call, P.ERROR, {"type": "grant_refused", "check": str(getattr(exc, "check", ""))[:64]
                                               or "refused", "message": str(exc)[:2000]}))
            return
        conn.send(P.encode(call, P.RESULT, None, grant))

    async def unlock(self, grant: bytes) -> dict[str, Any]:
        """Open the sealed code with a key grant addressed to this replica, then load it and run setup hooks."""
        if self._sealed_code is None or self.ident is None:
            return {"ok": False, "check": "not_sealed", "message": "this replica's code is not sealed"}
        if self.loaded is not None or self.link is not None:
            return {"ok": True, "already": True}
        try:
            code = self.ident.open_code(self._sealed_code, grant)
            if measurement_of(code, self.spec.canonical()) != self.ident.measurement:
                raise EnvelopeError("measurement", "the opened code and spec do not hash to the sealed measurement")
            await self._load(code)  # setup output of sealed code stays here (logs are not forwarded)
        except Exception as exc:  # noqa: BLE001 - reported to whoever delivered the grant
            return {"ok": False, "check": getattr(exc, "check", type(exc).__name__), "message": str(exc)}
        return {"ok": True}

    async def peer_grant(self, peer_document: dict[str, Any]) -> bytes:
        """Release the code key this replica holds to a peer whose document passes the sealed code's policy."""
        if self.ident is None or self._sealed_code is None:
            raise EnvelopeError("no_code_key", "this replica's code is not sealed; nothing to release")
        return self.ident.peer_grant(self._sealed_code, peer_document)

    async def document(self) -> dict[str, Any] | None:
        return self.ident.document if self.ident is not None else None

    async def stats(self) -> dict[str, Any]:
        """Calls that crossed this actor (relayed or run here); calls on direct connections are counted by the
        gateway, which chooses replicas and scales by its own in-flight counts. `direct`: connections handed over."""
        return {"inflight": self.inflight, "calls": self.calls, "pid": os.getpid(),
                "direct": self.link.handed if self.link is not None else 0}

    # -- plain calls -----------------------------------------------------------------------------------------
    def relay(self, conn: _ServerConn, link: SandboxLink, call: int, meta: dict[str, Any], body: bytes,
              window: Window | None = None) -> int:
        """A plain call to the sandbox: callbacks only; the answer carries the time this actor measured. A
        stream's window passes through: the child gets the gateway's, the gateway's credits are forwarded to it
        (`SandboxLink.credit`), so this actor holds no items and the child's generator waits for the client."""
        timeout = float(meta.get("t", self.spec.timeout))
        stream = bool(meta.get("stream"))
        forward = self._forward_logs
        seq = 0
        child_meta: dict[str, Any] = {"t": timeout, "stream": True} if stream else {"t": timeout}
        caller = meta.get("caller")
        if isinstance(caller, str) and caller:
            child_meta["caller"] = caller[:replica_context.MAX_CALLER_TAG]

        def sink(ftype: int, out: dict[str, Any], data: bytes) -> None:
            nonlocal seq
            if ftype == P.CHUNK:
                conn.send(P.encode(call, P.CHUNK, {"seq": seq}, data))
                seq += 1
                return
            conn.relayed.pop(call, None)
            if not forward:
                out.pop("logs", None)
            out.pop("traceback", None)
            conn.send(P.encode(call, ftype, out, data))

        return link.relay(child_meta, body, timeout, sink, window if stream else None)

    async def handle(self, conn: _ServerConn, call: int, meta: dict[str, Any], body: bytes,
                     window: Window | None = None) -> None:
        if meta.get("sealed"):
            return await self._handle_sealed(conn, call, meta, body, window)
        if self._sealed_code is not None:
            conn.send(P.encode(call, P.ERROR, {
                "type": "invalid_request", "status": 400, "message": f"function {self.function!r} is a "
                "confidential deployment: it accepts only sealed calls (`cocoon call --confidential`)"}))
            return
        loaded = self.loaded
        if loaded is None:
            conn.send(P.encode(call, P.ERROR, {"type": "replica_lost", "status": 502, "message":
                                               "this replica's sandbox exited; retry"}))
            return
        self._inflight += 1
        self._calls += 1
        log = CallLog()
        t0 = time.monotonic()
        timeout = float(meta.get("t", self.spec.timeout))
        try:
            kwargs = json.loads(body) if body else {}
            if meta.get("stream"):
                seq = 0
                async with aclosing(loaded.stream(kwargs, log, t0 + timeout)) as items:
                    async for item in items:
                        data = P.dump_result(item)
                        conn.send(P.encode(call, P.CHUNK, {"seq": seq}, data))
                        seq += 1
                        if window is not None:  # no credit: wait for the client (timeout: as if slow)
                            await window.pace(len(data), t0 + timeout - time.monotonic())
                conn.send(P.encode(call, P.END, self._done_meta(t0, log, seq=seq)))
            else:
                result = await loaded.run(kwargs, log, timeout)
                conn.send(P.encode(call, P.RESULT, self._done_meta(t0, log), P.dump_result(result)))
        except asyncio.CancelledError:
            conn.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled", "ms": _ms(t0)}))
        except (CallInterrupted, asyncio.TimeoutError):
            conn.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", "ms": _ms(t0),
                **self._log_meta(log)}))
        except MemoryError:
            conn.send(P.encode(call, P.ERROR, {"type": "memory_exceeded", "message": "the function ran out of "
                                               "memory; raise memory= in @cocoon.function", "ms": _ms(t0)}))
        except Exception as exc:  # noqa: BLE001 - the user's exception, reported as function_error
            log.add("stderr", trimmed_traceback(exc))
            conn.send(P.encode(call, P.ERROR, {
                "type": "function_error", "exc_type": type(exc).__name__, "message": str(exc)[:2000],
                "ms": _ms(t0), **self._log_meta(log)}))
        finally:
            self._inflight -= 1

    # -- sealed calls ----------------------------------------------------------------------------------------
    async def _handle_sealed(self, conn: _ServerConn, call: int, meta: dict[str, Any], body: bytes,
                             window: Window | None = None) -> None:
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
        self._inflight += 1
        self._calls += 1
        try:
            if self.loaded is None and self.link is None:
                assert self._unlocked is not None
                try:
                    await asyncio.wait_for(self._unlocked.wait(), max(timeout, 0.001))
                except asyncio.TimeoutError:
                    conn.send(P.encode(call, P.ERROR, {
                        "type": "no_capacity", "status": 503, "check": "code_locked", "message":
                        f"the code key of confidential function {self.function!r} was not released to this replica "
                        "in time; the developer runs `cocoon deploy --confidential` (or a release agent)"}))
                    return
            await self._run_sealed(conn, call, meta, opened.args_json, opened.ctx, ident, t0, timeout, window)
        finally:
            self._inflight -= 1

    async def _unary(self, args_json: bytes, timeout: float) -> bytes:
        """Run one call on whichever side holds the code; the result's JSON. Raises the call's failure."""
        if self.link is not None:
            body, _ = await self.link.unary(args_json, timeout, replica_context.caller_tag())
            return body
        loaded = self.loaded
        assert loaded is not None
        kwargs = json.loads(args_json) if args_json.strip() else {}
        if not isinstance(kwargs, dict):
            raise TypeError("sealed arguments must be a JSON object of keyword arguments")
        return P.dump_result(await loaded.run(kwargs, CallLog(), timeout))  # output captured, never forwarded

    async def _stream(self, args_json: bytes, deadline: float, timeout: float, window: int
                      ) -> AsyncGenerator[bytes, None]:
        if self.link is not None:  # the child gets a window of its own: credited as this actor takes items
            async with aclosing(self.link.stream(args_json, timeout, [], replica_context.caller_tag(),
                                                 window)) as items:
                async for item in items:
                    yield item
            return
        loaded = self.loaded
        assert loaded is not None
        kwargs = json.loads(args_json) if args_json.strip() else {}
        if not isinstance(kwargs, dict):
            raise TypeError("sealed arguments must be a JSON object of keyword arguments")
        async with aclosing(loaded.stream(kwargs, CallLog(), deadline)) as gen:
            async for item in gen:
                yield P.dump_result(item)

    async def _run_sealed(self, conn: _ServerConn, call: int, meta: dict[str, Any], args_json: bytes,
                          ctx: ReplicaCallContext, ident: ReplicaIdentity, t0: float, timeout: float,
                          window: Window | None = None) -> None:
        call_id = str(meta.get("id", call))
        rate, royalty = float(meta.get("rate", 0.0)), int(meta.get("royalty", 0))
        stream = bool(meta.get("stream"))

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
            if stream:
                async with aclosing(self._stream(args_json, t0 + timeout, timeout,
                                                 window.window if window is not None else 0)) as items:
                    async for item in items:
                        sealed = ident.seal_chunk(ctx, seq, item)
                        conn.send(P.encode(call, P.CHUNK, {"seq": seq, "sealed": "chunk"}, sealed))
                        seq += 1
                        usage = token_usage(_loads_usage(item)) or usage
                        if window is not None:
                            await window.pace(len(sealed), t0 + timeout - time.monotonic())
                ms = _ms(t0)
                frame = ident.seal_end(ctx, call_id, ms, price(ms))
                conn.send(P.encode(call, P.END, {**final("end"), "seq": seq}, frame))
            else:
                result = await self._unary(args_json, timeout)
                usage = token_usage(_loads_usage(result))
                ms = _ms(t0)
                frame = ident.seal_response(ctx, call_id, result, ms, price(ms))
                conn.send(P.encode(call, P.RESULT, final("res"), frame))
        except asyncio.CancelledError:
            conn.send(P.encode(call, P.ERROR, {"type": "cancelled", "message": "call cancelled", "ms": _ms(t0)}))
        except (CallInterrupted, asyncio.TimeoutError):
            conn.send(P.encode(call, P.ERROR, {
                "type": "timeout", "message": f"call exceeded its time limit of {timeout:g}s", "ms": _ms(t0)}))
        except ChildError as exc:
            kind = exc.meta.get("type")
            if seq == 0 and refused_for_load(exc.meta.get("exc_type")):
                conn.send(overloaded_frame(call, t0))
                return
            if kind in ("timeout", "cancelled"):
                conn.send(P.encode(call, P.ERROR, {"type": kind, "message": "call cancelled" if kind == "cancelled"
                                                   else f"call exceeded its time limit of {timeout:g}s",
                                                   "ms": _ms(t0)}))
                return
            ms = _ms(t0)  # the user's exception (or memory): sealed, its text may hold user data
            frame = ident.seal_error(ctx, call_id, str(exc.meta.get("exc_type") or kind), exc.meta.get("message", ""),
                                     ms, price(ms))
            conn.send(P.encode(call, P.END if stream else P.RESULT, {**final("err"), "seq": seq}, frame))
        except Exception as exc:  # noqa: BLE001 - the user's exception, sealed: its text may hold user data
            if seq == 0 and refused_for_load(type(exc).__name__):
                conn.send(overloaded_frame(call, t0))
                return
            ms = _ms(t0)
            frame = ident.seal_error(ctx, call_id, type(exc).__name__, str(exc)[:2000], ms, price(ms))
            conn.send(P.encode(call, P.END if stream else P.RESULT, {**final("err"), "seq": seq}, frame))
        finally:
            asyncio.get_running_loop().call_soon(ident.prepare)  # the next response's ephemeral, made while idle

    def _log_meta(self, log: CallLog) -> dict[str, Any]:
        return {"logs": log.lines} if self._forward_logs and log.lines else {}

    def _done_meta(self, t0: float, log: CallLog, **extra: Any) -> dict[str, Any]:
        return {"ms": _ms(t0), **self._log_meta(log), **extra}


class _StartFailed(Exception):
    """The child could not load the code or its setup hook raised: the child's report, reduced."""

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__(meta.get("message", ""))
        self.error_type = str(meta.get("exc_type") or meta.get("type") or "Error")
        self.tb = str(meta.get("traceback", ""))


def _interrupt_grace() -> float:
    """COCOON_INTERRUPT_GRACE_S, for the sandbox child (which sees none of the node's settings)."""
    from cocoon_faas.settings import get_settings

    return float(get_settings().interrupt_grace_s)


def _provider_node() -> str:
    """The provider node Ray placed this actor on (its `cocoon-node:<id>` resource), or "" (the local node)."""
    try:
        import ray

        res = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - not in a Ray worker (tests), or no context: the local node
        return ""
    return next((k.split(":", 1)[1] for k in res if k.startswith("cocoon-node:")), "")


def _publish(replica_id: str, info: dict[str, Any]) -> None:
    """Write the start-up facts as JSON bytes where the gateway reads them (it never fetches actor results)."""
    from ray.experimental import internal_kv

    raw = json.dumps(info, separators=(",", ":"), allow_nan=False, default=str).encode()
    internal_kv._internal_kv_put(facts_key(replica_id), raw, overwrite=True, namespace=FACTS_NAMESPACE)


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


def _loads_usage(item: bytes) -> Any:
    """An item's JSON, parsed only when it may carry token counts (most items do not: no parse per chunk)."""
    if b'"usage"' not in item:
        return None
    try:
        return json.loads(item)
    except ValueError:
        return None


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


def refused_for_load(exc_type: Any) -> bool:
    """The function refused a call for load (an `llm.Engine` whose queue is full raises OverloadedError)."""
    return exc_type == "OverloadedError"


def overloaded_frame(call: int, t0: float) -> bytes:
    """A sealed call the function refused for load, before it sent anything: a plain ERROR the gateway answers
    with 429 + Retry-After and does not charge, instead of a sealed error it cannot tell from the user's own.
    Only the fact crosses (no text of the exception: tenant code could put the caller's data in it); it is the
    same one bit a plain call's 429 shows, and a caller sees it by timing anyway."""
    return P.encode(call, P.ERROR, {"type": "overloaded", "ms": _ms(t0),
                                    "message": "the function refused the call for load (its engine's queue is "
                                               "full)"})


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)

