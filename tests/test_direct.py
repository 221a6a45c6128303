"""The direct path: a gateway connection the replica actor authenticates and hands to the sandboxed child (fd
passing), which then serves that connection's plain calls. A real actor data port on loopback, a real bubblewrap
child, the gateway's real ReplicaHandle; tenant code tries what it can with the socket it now holds."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cloudpickle
import pytest

from cocoon_faas import protocol as P
from cocoon_faas.errors import ReplicaLostError
from cocoon_faas.gateway.replica_client import Frame, ReplicaHandle
from cocoon_faas.runtime.replica import Replica, _ServerConn
from cocoon_faas.runtime.sandbox import SandboxConfig, SandboxProcess, bwrap_problem
from cocoon_faas.runtime.sandbox_link import SandboxLink
from cocoon_faas.spec import make_spec
from tests.test_flow import take_to_end

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or bwrap_problem() is not None,
                                reason="bubblewrap cannot create namespaces on this machine")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the sandbox cannot import the tests package


def tenant(mode: str = "echo", x: Any = None, n: int = 0, size: int = 0, secret_hex: str = "",
           marker_rev: str = "") -> Any:
    """One function for every case below (each test loads it into a fresh sandbox)."""
    import os
    import socket
    import time

    from cocoon_faas import protocol as P

    if mode == "echo":
        return {"x": x}
    if mode == "fail":
        print("about to fail")
        raise ValueError("tenant says no")
    if mode == "sleep":
        time.sleep(30)
        return None
    if mode == "exit":
        os._exit(3)
    if mode == "nap":
        time.sleep(0.3)
        return "rested"
    if mode == "underbill":  # every later answer of this process claims it took no time at all
        encode = P.encode

        def lying(call: int, ftype: int, meta: Any = None, body: bytes = b"") -> bytes:
            if ftype in (P.RESULT, P.END, P.ERROR):
                meta = {**(meta or {}), "ms": 0.0}
            return encode(call, ftype, meta, body)

        P.encode = lying
        return "patched"
    if mode == "spy":  # from now on, every byte any frame connection of this process reads is recorded
        seen: list[bytes] = []
        original = P.FrameProtocol.data_received

        def data_received(self: Any, data: bytes) -> None:
            seen.append(bytes(data))
            original(self, data)

        P.FrameProtocol.data_received = data_received  # type: ignore[method-assign]
        P.spied = seen  # type: ignore[attr-defined]
        return "spying"
    if mode == "seen":
        got = b"".join(P.spied)  # type: ignore[attr-defined]
        return {"bytes": len(got), "hex": secret_hex.encode() in got, "raw": bytes.fromhex(secret_hex) in got,
                "marker": marker_rev[::-1].encode() in got}
    if mode == "garbage":  # write junk to every TCP socket this process holds (the gateway's connection)
        hit = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                s = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue
            with s:
                if s.family == socket.AF_INET:
                    os.write(s.fileno(), b"\xff" * 64)
                    hit += 1
        time.sleep(5)
        return hit
    raise ValueError(mode)


async def stream_tenant(n: int, size: int):
    for i in range(n):
        yield {"i": i, "pad": "x" * size}


@asynccontextmanager
async def _replica(fn: Any, kind: str = "function") -> AsyncIterator[tuple[Replica, SandboxLink, int]]:
    """A replica actor (platform code, in this process) whose code runs in a real sandbox child, serving its data
    port on loopback: (replica, its link to the child, port)."""
    spec = make_spec(name="d", kind=kind, memory="256Mi", max_concurrency=4, timeout=60)
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": fn})
    replica = Replica("d", 1, b"", spec.to_json(), "127.0.0.1", secret=os.urandom(32))
    link = SandboxLink(SandboxProcess(SandboxConfig(memory=spec.memory), f"direct-{os.getpid()}-{time.time_ns()}"),
                       replica._child_exited, replica._forward_load)
    await link.open()
    try:
        await link.load(blob, spec.to_json(), 60)
        replica.link, replica.relayable = link, True
        server = await asyncio.get_running_loop().create_server(lambda: _ServerConn(replica).proto, "127.0.0.1", 0)
        replica._server = server
        yield replica, link, server.sockets[0].getsockname()[1]
        server.close()
    finally:
        link.close()


async def _handle(replica: Replica, port: int, lost: list[ReplicaHandle] | None = None) -> ReplicaHandle:
    h = ReplicaHandle(id="r", function="d", version=1, actor=None, secret=replica.secret, direct=True)
    if lost is not None:
        h.on_lost = lost.append
    await h.connect("127.0.0.1", port)
    return h


async def _unary(h: ReplicaHandle, args: dict[str, Any], **meta: Any) -> Frame:
    _, pending = h.send_call({"t": 30, **meta}, json.dumps(args).encode(), False)
    assert pending.future is not None
    return await asyncio.wait_for(pending.future, 60)


def _run(main: Any) -> Any:
    try:
        import uvloop  # the actor's data plane runs on uvloop when it is installed

        return uvloop.run(asyncio.wait_for(main(), 120))
    except ImportError:
        return asyncio.run(asyncio.wait_for(main(), 120))


def test_plain_calls_and_streams_go_to_the_child_without_the_actor(monkeypatch):
    def no_relay(*a: Any, **kw: Any) -> int:
        raise AssertionError("a plain call crossed the actor")

    async def main() -> None:
        async with _replica(tenant) as (replica, link, port):
            monkeypatch.setattr(Replica, "relay", no_relay)
            h = await _handle(replica, port)
            assert h.is_direct and link.handed == 1
            ok = await _unary(h, {"x": [1, "two"]})
            assert ok.type == P.RESULT and json.loads(ok.body) == {"x": [1, "two"]}
            assert ok.meta["ms"] == ok.meta["wall_ms"]  # metered by the gateway, not by the sandbox
            bad = await _unary(h, {"mode": "fail"})
            assert bad.type == P.ERROR and bad.meta["type"] == "function_error"
            assert bad.meta["exc_type"] == "ValueError" and "tenant says no" in bad.meta["message"]
            assert ("stdout", "about to fail\n") in bad.meta["logs"] and "ms" in bad.meta
            call, pending = h.send_call({"t": 30}, b'{"mode": "sleep"}', False)
            await asyncio.sleep(0.2)
            h.cancel(call)
            assert pending.future is not None
            cancelled = await asyncio.wait_for(pending.future, 30)
            assert cancelled.type == P.ERROR and cancelled.meta["type"] == "cancelled"
            assert link.calls == 0 and replica.calls == 0  # nothing crossed the actor
            h.close()

            # a confidential deployment's replica keeps every call: no direct connection, calls relayed
            monkeypatch.undo()
            replica._sealed_code = b"sealed"
            h2 = await _handle(replica, port)
            assert not h2.is_direct and link.handed == 1
            replica._sealed_code = None
            relayed = await _unary(h2, {"x": 3})
            assert json.loads(relayed.body) == {"x": 3} and link.calls == 1
            h2.close()

    _run(main)


def test_a_direct_stream_is_flow_controlled_by_the_gateways_credits(monkeypatch):
    window, size, n = 16 * 1024, 2000, 300

    async def main() -> None:
        async with _replica(stream_tenant, "asyncgen") as (replica, link, port):
            monkeypatch.setattr(Replica, "relay", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("relayed")))
            h = await _handle(replica, port)
            call, pending = h.send_call({"t": 30, "stream": True}, json.dumps({"n": n, "size": size}).encode(),
                                        True, window)
            assert pending.queue is not None and pending.window is not None
            first = await pending.queue.get()
            assert isinstance(first, Frame) and first.type == P.CHUNK
            await asyncio.sleep(0.5)  # the client takes nothing more: the child stops at the window
            assert pending.queue.qsize() * (size + 600) <= window + size + 600
            frames = [first]
            item = await take_to_end(h, call, pending, frames)
            assert item.type == P.END and item.meta["seq"] == n and "ms" in item.meta
            assert [json.loads(f.body)["i"] for f in frames] == list(range(n))
            assert link.calls == 0
            h.close()

    _run(main)


def test_the_child_never_receives_the_hello_the_secret_or_the_call_id():
    async def main() -> dict[str, Any]:
        async with _replica(tenant) as (replica, link, port):
            body, _ = await link.unary(b'{"mode": "spy"}', 30)  # through the actor, before the gateway connects
            assert json.loads(body) == "spying"
            h = await _handle(replica, port)
            assert h.is_direct
            call_id = os.urandom(16).hex()  # the gateway's meta for the actor: not for tenant code
            seen = await _unary(h, {"mode": "seen", "secret_hex": replica.secret.hex(), "marker_rev": call_id[::-1]},
                                id=call_id)
            h.close()
            return json.loads(seen.body)

    seen = _run(main)
    assert seen["hex"] is True and seen["bytes"] > 0  # the spy saw the direct connection's bytes (the CALL)
    assert seen["raw"] is False  # but never the secret: the HELLO that carried it stayed with the actor
    assert seen["marker"] is False  # nor the call id the gateway gives the actor


def test_a_child_that_exits_fails_its_direct_calls_as_replica_lost():
    async def main() -> None:
        async with _replica(tenant) as (replica, link, port):
            lost: list[ReplicaHandle] = []
            h = await _handle(replica, port, lost)
            _, sleeping = h.send_call({"t": 30}, b'{"mode": "sleep"}', False)
            _, exiting = h.send_call({"t": 30}, b'{"mode": "exit"}', False)
            for pending in (sleeping, exiting):
                assert pending.future is not None
                with pytest.raises(ReplicaLostError):
                    await asyncio.wait_for(pending.future, 30)
            await asyncio.sleep(0.2)
            assert h.state == "dead" and lost == [h]  # lost once, although both connections dropped
            assert not replica.relayable  # the actor saw its child exit too (the controller replaces it)
            with pytest.raises(ReplicaLostError):
                h.send_call({"t": 30}, b"{}", False)

    _run(main)


def test_a_tenant_that_writes_garbage_to_the_gateway_socket_gets_its_replica_dropped():
    async def main() -> None:
        async with _replica(tenant) as (replica, link, port), _replica(tenant) as (other, _, other_port):
            lost: list[ReplicaHandle] = []
            h = await _handle(replica, port, lost)
            bystander = await _handle(other, other_port)
            _, pending = h.send_call({"t": 30}, b'{"mode": "garbage"}', False)
            assert pending.future is not None
            with pytest.raises(ReplicaLostError, match="broke the frame protocol"):
                await asyncio.wait_for(pending.future, 30)
            assert h.state == "dead" and lost == [h]
            ok = await _unary(bystander, {"x": "still here"})  # another replica is untouched
            assert json.loads(ok.body) == {"x": "still here"} and bystander.state != "dead"
            bystander.close()

    _run(main)


def test_a_tenant_cannot_lower_its_metered_time_on_the_direct_path():
    async def main() -> tuple[Frame, Frame]:
        async with _replica(tenant) as (replica, link, port):
            h = await _handle(replica, port)
            patched = await _unary(h, {"mode": "underbill"})
            nap = await _unary(h, {"mode": "nap"})
            h.close()
            return patched, nap

    patched, nap = _run(main)
    assert json.loads(patched.body) == "patched" and json.loads(nap.body) == "rested"
    assert nap.meta["ms"] == nap.meta["wall_ms"] >= 300  # the child said 0; the gateway's own wall time counts


def test_without_a_sandbox_there_is_no_direct_connection():
    """COCOON_SANDBOX=off runs the code in the actor: a direct HELLO is answered as a plain one, calls still work."""
    from cocoon_faas.runtime.executor import LoadedFunction

    async def main() -> None:
        spec = make_spec(name="d", timeout=60)
        replica = Replica("d", 1, b"", spec.to_json(), "127.0.0.1", secret=os.urandom(32), sandbox=False)
        loaded = LoadedFunction(cloudpickle.dumps({"format": 1, "kind": "function", "fn": tenant}), spec)
        loaded.setup()
        replica.loaded = loaded
        server = await asyncio.get_running_loop().create_server(lambda: _ServerConn(replica).proto, "127.0.0.1", 0)
        try:
            h = await _handle(replica, server.sockets[0].getsockname()[1])
            assert not h.is_direct and h.state != "dead"
            ok = await _unary(h, {"x": 1})
            assert json.loads(ok.body) == {"x": 1} and replica.calls == 1
            h.close()
        finally:
            server.close()

    _run(main)
