"""Stream flow control (cocoon_faas/flow.py): the window's rules, strict credit decoding on both sides, and a
real replica data port on loopback whose generator waits for a gateway that stops taking items."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cloudpickle
import pytest

from cocoon_faas import protocol as P
from cocoon_faas.errors import ReplicaLostError
from cocoon_faas.flow import (
    CHUNK_OVERHEAD,
    FlowError,
    Window,
    chunk_cost,
    credit_body,
    decode_credit,
    window_of,
)
from cocoon_faas.gateway.replica_client import Frame, PendingCall, ReplicaHandle
from cocoon_faas.gateway.replica_wire import ReplicaProtocolError, decode_meta
from cocoon_faas.runtime.executor import LoadedFunction
from cocoon_faas.runtime.replica import Replica, _ServerConn
from cocoon_faas.runtime.sandbox import SandboxConfig, SandboxProcess, bwrap_problem
from cocoon_faas.runtime.sandbox_link import SandboxLink
from cocoon_faas.spec import make_spec


# -- the credit frame and the announced window: strict -----------------------------------------------------
@pytest.mark.parametrize("body", [b"", b"\x00" * 7, b"\x00" * 9, credit_body(0), b"\xff" * 8, b"12345678x"])
def test_a_malformed_credit_is_refused(body):
    with pytest.raises(FlowError):
        decode_credit(body)


def test_a_credit_round_trips():
    assert decode_credit(credit_body(1)) == 1
    assert decode_credit(credit_body(3 << 20)) == 3 << 20


@pytest.mark.parametrize("w", [0, -1, True, 1.5, "65536", 1 << 41, [1]])
def test_a_malformed_window_is_refused(w):
    with pytest.raises(FlowError):
        window_of({"w": w})


def test_no_window_announced_means_no_flow_control():
    assert window_of({"t": 1}) is None
    w = window_of({"w": 4096})
    assert w is not None and w.window == 4096


# -- the window's rules ----------------------------------------------------------------------------------
def test_a_sender_stops_at_the_window_and_a_credit_beyond_what_it_sent_is_refused():
    w = Window(10_000)
    for _ in range(4):
        assert w.open
        w.sent(2000)
    assert not w.open and w.outstanding == 4 * chunk_cost(2000)
    with pytest.raises(FlowError):
        w.granted(w.outstanding + 1)  # the receiver cannot have consumed bytes it never got
    assert w.outstanding == 4 * chunk_cost(2000)  # a refused credit changes nothing
    w.granted(chunk_cost(2000))
    assert w.open


def test_a_receiver_refuses_an_item_beyond_the_window():
    w = Window(10_000)
    w.received(20_000)  # one item may be larger than the window: it is sent when nothing is outstanding
    with pytest.raises(FlowError):
        w.received(1)


def test_credit_is_batched_and_returns_exactly_what_was_consumed():
    w = Window(6000)
    w.received(1000)
    w.received(1000)
    assert w.consumed(1000) == 0  # below half the window: batched
    credit = w.consumed(1000)
    assert credit == 2 * (1000 + CHUNK_OVERHEAD) and w.outstanding == 0 and w.buffered == 0


def test_a_sender_and_receiver_never_deadlock_and_never_exceed_the_bound():
    """Random item sizes, a consumer that takes items at random moments: everything arrives, and what is in
    flight never exceeds the window plus one item."""
    rng = random.Random(7)
    window = 50_000
    sizes = [rng.choice([0, 10, 3000, 20_000, 70_000]) for _ in range(3000)]
    snd, rcv = Window(window), Window(window)
    in_flight: list[int] = []  # items sent, not yet consumed
    credits: list[int] = []  # credits sent, not yet applied at the sender
    i = consumed = 0
    while consumed < len(sizes):
        step = rng.random()
        if step < 0.4 and i < len(sizes) and snd.open:
            snd.sent(sizes[i])
            rcv.received(sizes[i])  # raises if the sender broke the rule
            in_flight.append(sizes[i])
            i += 1
        elif step < 0.7 and in_flight:
            credit = rcv.consumed(in_flight.pop(0))
            consumed += 1
            if credit:
                credits.append(credit)
        elif credits:
            snd.granted(credits.pop(0))
        elif i < len(sizes) and not snd.open and not in_flight:
            pytest.fail("deadlock: the sender waits and the receiver has consumed everything")
        assert rcv.buffered <= window + max(chunk_cost(s) for s in sizes)


def test_room_waits_for_credit():
    async def main() -> list[str]:
        w = Window(1000)
        w.sent(5000)
        seen: list[str] = []

        async def sender() -> None:
            await w.room()
            seen.append("resumed")

        task = asyncio.ensure_future(sender())
        await asyncio.sleep(0)
        seen.append("credit")
        w.granted(w.outstanding)
        await task
        return seen

    assert asyncio.run(main()) == ["credit", "resumed"]


# -- the gateway's side ------------------------------------------------------------------------------------
def test_the_gateway_refuses_a_credit_or_call_frame_from_a_replica():
    for ftype in (P.CREDIT, P.CALL, P.CANCEL, P.LOAD, P.UNLOCK):
        with pytest.raises(ReplicaProtocolError):
            decode_meta(ftype, b"")
    assert decode_meta(P.CHUNK, b'{"seq":1}') == {"seq": 1}


def test_a_pending_stream_refuses_chunks_beyond_its_window():
    async def main() -> None:
        pending = PendingCall(True, 4096)
        pending.deliver(Frame(P.CHUNK, {}, b"x" * 5000))
        with pytest.raises(FlowError):
            pending.deliver(Frame(P.CHUNK, {}, b"y"))

    asyncio.run(main())


# -- a real replica data port on loopback ------------------------------------------------------------------
PRODUCED = [0]


def flood(n: int, size: int):
    for i in range(n):
        PRODUCED[0] += 1
        yield {"i": i, "pad": "x" * size}


@asynccontextmanager
async def _serve(fn: Any, kind: str, timeout: float = 60) -> AsyncIterator[ReplicaHandle]:
    """An in-process replica (sandbox off) serving `fn` on loopback, and the gateway's handle connected to it."""
    spec = make_spec(name="flood", kind=kind, timeout=timeout)
    replica = Replica("flood", 1, b"", spec.to_json(), "127.0.0.1", secret=b"s" * 32, sandbox=False)
    loaded = LoadedFunction(cloudpickle.dumps({"format": 1, "kind": "function", "fn": fn}), spec)
    loaded.setup()
    replica.loaded = loaded
    server = await asyncio.get_running_loop().create_server(lambda: _ServerConn(replica).proto, "127.0.0.1", 0)
    handle = ReplicaHandle(id="r1", function="flood", version=1, actor=None, secret=b"s" * 32)
    try:
        await handle.connect("127.0.0.1", server.sockets[0].getsockname()[1])
        yield handle
    finally:
        handle.close()
        server.close()


async def _settled(probe: Any) -> Any:
    """Poll until `probe()` stops changing (the producer is paused or done)."""
    last, stable = probe(), 0
    while stable < 20:
        await asyncio.sleep(0.02)
        now = probe()
        stable = stable + 1 if now == last else 0
        last = now
    return last


async def take(handle: ReplicaHandle, call: int, pending: PendingCall) -> Frame:
    """The next frame of a stream, taken as a client would: a CHUNK's bytes are credited back to the replica."""
    assert pending.queue is not None
    frame = await pending.queue.get()
    assert isinstance(frame, Frame)
    if frame.type == P.CHUNK:
        credit = handle.consumed(pending, len(frame.body))
        if credit:
            handle.credit(call, credit)
    return frame


async def take_to_end(handle: ReplicaHandle, call: int, pending: PendingCall, chunks: list[Frame]) -> Frame:
    """Take a stream's CHUNKs into `chunks` (crediting each) until its final frame, which is returned."""
    while (frame := await take(handle, call, pending)).type == P.CHUNK:
        chunks.append(frame)
    return frame


def test_a_gateway_that_stops_taking_items_pauses_the_generator_then_gets_every_item_in_order():
    window, size, n = 64 * 1024, 4000, 2000

    async def main() -> None:
        PRODUCED[0] = 0
        async with _serve(flood, "generator") as handle:
            call, pending = handle.send_call({"t": 60, "stream": True}, b'{"n": %d, "size": %d}' % (n, size),
                                             True, window)
            assert pending.queue is not None and pending.window is not None
            taken = []
            for _ in range(5):  # the client takes five items, then stops reading
                taken.append(await take(handle, call, pending))
            produced = await _settled(lambda: PRODUCED[0])
            per_item = chunk_cost(len(taken[0].body))
            # producer ahead of the client: at most the window, one item, and the executor's read-ahead (8 + 2)
            assert produced - len(taken) <= window // per_item + 1 + 10, produced
            assert produced < n
            assert pending.window.buffered <= window + per_item
            assert pending.queue.qsize() * per_item <= window + per_item
            frame = await take_to_end(handle, call, pending, taken)  # the client reads again: everything arrives
            assert frame.type == P.END and frame.meta["seq"] == n
            items = [json.loads(f.body) for f in taken]
            assert [x["i"] for x in items] == list(range(n)) and all(len(x["pad"]) == size for x in items)
            assert PRODUCED[0] == n

    asyncio.run(asyncio.wait_for(main(), 120))


async def agen_flood(n: int, size: int):
    for i in range(n):
        PRODUCED[0] += 1
        yield {"i": i, "pad": "x" * size}


@pytest.mark.parametrize("credit", [credit_body(0), b"\x01", credit_body(10 << 20)])
def test_a_bad_credit_from_the_gateway_drops_the_connection(credit):
    """Zero, malformed, or more than the replica sent: refused, never applied."""
    async def main() -> None:
        PRODUCED[0] = 0
        async with _serve(agen_flood, "asyncgen") as handle:
            call, pending = handle.send_call({"t": 60, "stream": True}, b'{"n": 100000, "size": 1000}', True,
                                             16 * 1024)
            assert pending.queue is not None
            assert isinstance(await pending.queue.get(), Frame)
            await _settled(lambda: PRODUCED[0])
            assert handle._proto is not None
            handle._proto.send(P.encode(call, P.CREDIT, None, credit))
            lost = None
            while lost is None:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    lost = item
            assert isinstance(lost, ReplicaLostError) and handle.state == "dead"
            assert PRODUCED[0] < 1000  # the bad credit opened nothing

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_replica_that_ignores_its_window_is_dropped():
    """A hostile replica floods a stream without waiting for credit: the gateway drops it (and its calls)."""
    async def main() -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got: list[tuple[int, int]] = []
            frames = P.FrameProtocol(lambda call, ftype, meta, body: got.append((call, ftype)))
            while not any(ftype == P.CALL for _, ftype in got):
                frames.data_received(await reader.read(65536))
                if got and got[0][1] == P.HELLO:
                    writer.write(P.encode(got.pop(0)[0], P.HELLO))
            call = next(c for c, ftype in got if ftype == P.CALL)
            for i in range(200):
                writer.write(P.encode(call, P.CHUNK, {"seq": i}, b"z" * 4096))
            await writer.drain()
            await reader.read()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        handle = ReplicaHandle(id="evil", function="f", version=1, actor=None, secret=b"s" * 32)
        await handle.connect("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            _, pending = handle.send_call({"t": 5, "stream": True}, b"{}", True, 32 * 1024)
            assert pending.queue is not None
            items: list[Any] = []
            while not items or not isinstance(items[-1], BaseException):
                items.append(await pending.queue.get())
            assert isinstance(items[-1], ReplicaLostError) and "broke the frame protocol" in str(items[-1])
            assert len(items) - 1 <= 32 * 1024 // chunk_cost(4096) + 1
            assert handle.state == "dead"
        finally:
            handle.close()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_stream_nobody_reads_ends_at_its_time_limit():
    """Waiting for credit counts toward the call's limit: a client that never reads cannot hold a replica."""
    async def main() -> None:
        PRODUCED[0] = 0
        async with _serve(agen_flood, "asyncgen", timeout=1) as handle:
            _, pending = handle.send_call({"t": 1, "stream": True}, b'{"n": 100000, "size": 1000}', True, 8192)
            assert pending.queue is not None
            frames = []
            while not frames or frames[-1].type == P.CHUNK:
                frames.append(await pending.queue.get())
            assert frames[-1].type == P.ERROR and frames[-1].meta["type"] == "timeout"
            assert len(frames) - 1 <= 8192 // chunk_cost(1000) + 1 and PRODUCED[0] < 100000

    asyncio.run(asyncio.wait_for(main(), 60))


# -- the actor and its sandbox: tenant code can write to the child's socket ------------------------------------
@pytest.mark.skipif(shutil.which("bwrap") is None or bwrap_problem() is not None,
                    reason="bubblewrap cannot create namespaces on this machine")
def test_a_sandbox_that_overruns_its_window_fails_its_call_and_is_not_relayed():
    def rogue():
        import os
        import sys

        from cocoon_faas import protocol as P

        fd = int(sys.argv[1])  # the child's end of its link to the actor; call 2 is the first call after LOAD
        for _ in range(64):
            os.write(fd, P.encode(2, P.CHUNK, None, b'"' + b"x" * 4096 + b'"'))
        yield "done"

    spec = make_spec(name="rogue", kind="generator", memory="256Mi")
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": rogue})

    async def main() -> list[tuple[int, dict[str, Any]]]:
        link = SandboxLink(SandboxProcess(SandboxConfig(memory=spec.memory), f"rogue-{os.getpid()}"))
        await link.open()
        try:
            await link.load(blob, spec.to_json(), 60)
            frames: list[tuple[int, dict[str, Any]]] = []
            ended = asyncio.Event()

            def sink(ftype: int, meta: dict[str, Any], body: bytes) -> None:
                frames.append((ftype, meta))
                if ftype != P.CHUNK:
                    ended.set()

            link.relay({"t": 30, "stream": True}, b"{}", 30, sink, Window(16 * 1024))
            await ended.wait()
            return frames
        finally:
            link.close()

    frames = asyncio.run(asyncio.wait_for(main(), 120))
    assert frames[-1][0] == P.ERROR and frames[-1][1]["exc_type"] == "StreamWindowError"
    assert len(frames) - 1 <= 16 * 1024 // chunk_cost(4098) + 1  # relayed only what the window allowed


@pytest.mark.skipif(shutil.which("bwrap") is None or bwrap_problem() is not None,
                    reason="bubblewrap cannot create namespaces on this machine")
def test_a_sandboxed_generator_waits_while_the_actor_takes_no_items():
    """The sealed path's hop: the actor reads items itself (to seal them) and credits the child as it takes them;
    when it stops taking, the child stops pulling the generator; when it resumes, every item arrives in order."""
    counter = {"n": 0}

    def gen(n: int = 0, size: int = 0, probe: bool = False):
        if probe:
            yield counter["n"]
            return
        for i in range(n):
            counter["n"] += 1
            yield {"i": i, "pad": "x" * size}

    spec = make_spec(name="gen", kind="generator", memory="256Mi", max_concurrency=2)
    blob = cloudpickle.dumps({"format": 1, "kind": "function", "fn": gen})
    window, size, n = 64 * 1024, 4000, 1000

    async def main() -> tuple[int, list[Any]]:
        link = SandboxLink(SandboxProcess(SandboxConfig(memory=spec.memory), f"gen-{os.getpid()}"))
        await link.open()
        try:
            await link.load(blob, spec.to_json(), 60)

            async def produced() -> int:
                return int(json.loads([x async for x in link.stream(b'{"probe": true}', 30, [])][0]))

            items = link.stream(json.dumps({"n": n, "size": size}).encode(), 60, [], "", window)
            taken = [json.loads(await items.__anext__()) for _ in range(3)]
            last, stable = await produced(), 0
            while stable < 10:  # until the producer stops moving
                await asyncio.sleep(0.05)
                now = await produced()
                stable = stable + 1 if now == last else 0
                last = now
            taken += [json.loads(x) async for x in items]
            return last, taken

        finally:
            link.close()

    paused_at, items = asyncio.run(asyncio.wait_for(main(), 120))
    assert paused_at - 3 <= window // chunk_cost(size + 20) + 1 + 10  # the window, one item, the read-ahead
    assert [x["i"] for x in items] == list(range(n)) and all(len(x["pad"]) == size for x in items)
