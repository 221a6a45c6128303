"""The executor's interrupts land only inside the call they are meant for (never on an idle pool thread)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import cloudpickle

from cocoon_faas.runtime.executor import CallInterrupted, CallLog, LoadedFunction
from cocoon_faas.spec import make_spec


def _loaded(fn, kind: str, max_concurrency: int = 1) -> LoadedFunction:
    spec = make_spec(name="f", kind=kind, max_concurrency=max_concurrency)
    loaded = LoadedFunction(cloudpickle.dumps({"format": 1, "kind": "function", "fn": fn}), spec)
    loaded.setup()
    return loaded


N = 1500


def test_many_short_streams_back_to_back_keep_the_pool_alive():
    def count(n: int):
        yield from range(n)

    def square(x: int) -> int:
        return x * x

    streams = _loaded(count, "generator")
    plain = _loaded(square, "function")
    plain.pool = streams.pool  # one pool thread serves both: a stray interrupt would hit the unary calls

    async def main() -> list[list[int]]:
        out = []
        for i in range(N):
            items = [x async for x in streams.stream({"n": i % 3 + 1}, CallLog(), time.monotonic() + 30)]
            out.append(items)
            assert await asyncio.wait_for(plain.run({"x": i}, CallLog(), 30), 30) == i * i
        return out

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads trade the GIL often: the stream's end and its producer's exit interleave
    try:
        got = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        sys.setswitchinterval(switch)
    assert got == [list(range(i % 3 + 1)) for i in range(N)]
    workers = [t for t in threading.enumerate() if t.name.startswith("cocoon-call")]
    assert workers and all(t.is_alive() for t in workers)


def test_an_abandoned_stream_is_interrupted_and_the_thread_serves_the_next_call():
    def forever():
        i = 0
        while True:
            i += 1
            yield i

    loaded = _loaded(forever, "generator")

    async def main() -> tuple[list[int], list[int]]:
        first = []
        try:
            async for x in loaded.stream({}, CallLog(), time.monotonic() + 0.3):
                first.append(x)
        except CallInterrupted:
            pass
        agen = loaded.stream({}, CallLog(), time.monotonic() + 30)
        second = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return first, second

    first, second = asyncio.run(asyncio.wait_for(main(), 60))
    assert first and first == list(range(1, len(first) + 1))
    assert second == [1, 2, 3]


def test_a_timed_out_sync_call_does_not_poison_the_next_one():
    def slow_or_fast(s: float) -> float:
        end = time.monotonic() + s
        while time.monotonic() < end:
            pass
        return s

    loaded = _loaded(slow_or_fast, "function")

    async def main() -> list[float]:
        try:
            await loaded.run({"s": 5.0}, CallLog(), 0.2)
            raise AssertionError("the slow call was not interrupted")
        except CallInterrupted:
            pass
        return [await loaded.run({"s": 0.0}, CallLog(), 30) for _ in range(200)]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [0.0] * 200
