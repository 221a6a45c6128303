"""The executor's interrupts land only inside the call they are meant for (never on an idle pool thread)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from cocoon_faas.runtime.executor import CallInterrupted, CallLog, LoadedFunction
from cocoon_faas.spec import BatchSpec, make_spec


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


# -- the watchdog: a call that goes on after it had to stop ends the process (here: `on_stuck` is recorded) ----------

GRACE = 0.3
# One event per test, by name: the functions below are pickled by reference and read theirs (a thread of an
# earlier test that is still winding down keeps seeing its own event set)
_STUCK: dict[str, threading.Event] = {}


def _stuck(key: str) -> threading.Event:
    return _STUCK.setdefault(key, threading.Event())


async def swallow_async(key: str) -> str:
    while not _STUCK[key].is_set():
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:  # the point: user code that goes on after its cancellation
            pass
    return "went on"


async def block_loop(key: str) -> str:
    give_up = time.monotonic() + 60  # without a watchdog thread nothing would end this: fail, do not hang
    while not _STUCK[key].is_set() and time.monotonic() < give_up:  # time.sleep in async def: no timer runs
        time.sleep(0.01)
    return "blocked" if _STUCK[key].is_set() else "never reported"


async def swallow_agen(key: str):
    yield 1
    while not _STUCK[key].is_set():
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            pass
    yield 2


def swallow_sync(key: str) -> str:
    while not _STUCK[key].is_set():
        try:
            time.sleep(0.02)
        except CallInterrupted:
            pass
    return "went on"


async def block_batch(key: list[str]) -> list[str]:
    give_up = time.monotonic() + 60
    while not _STUCK[key[0]].is_set() and time.monotonic() < give_up:  # blocks the loop past the limit
        time.sleep(0.01)
    return key if _STUCK[key[0]].is_set() else ["never reported"]


async def busy(s: float) -> float:
    end = time.monotonic() + s
    while time.monotonic() < end:
        time.sleep(0.01)  # blocks the loop, well within the time limit
    await asyncio.sleep(0)
    return s


async def quick(s: float) -> float:
    await asyncio.sleep(s)
    return s


def _watched(fn, kind: str, stuck: threading.Event, max_concurrency: int = 1) -> LoadedFunction:
    loaded = _loaded(fn, kind, max_concurrency)
    loaded.on_stuck = stuck.set
    loaded.grace = GRACE
    return loaded


def _until(stuck: threading.Event) -> None:
    assert stuck.wait(60), "the watchdog never reported the call stuck"


def test_an_async_call_that_swallows_its_timeout_is_reported_stuck():
    stuck = _stuck("timeout")
    loaded = _watched(swallow_async, "async", stuck)
    assert asyncio.run(asyncio.wait_for(loaded.run({"key": "timeout"}, CallLog(), 0.1), 60)) == "went on"
    _until(stuck)


def test_an_async_call_cancelled_early_that_goes_on_is_reported_stuck():
    """Its time limit is far away: only the (swallowed) cancellation, a client gone, makes it overdue."""
    if not hasattr(asyncio.Task, "cancelling"):
        pytest.skip("Task.cancelling() needs Python 3.11; on 3.10 such a call is caught at its time limit")
    stuck = _stuck("cancel")
    loaded = _watched(swallow_async, "async", stuck)

    async def main() -> str:
        task = asyncio.get_running_loop().create_task(loaded.run({"key": "cancel"}, CallLog(), 3600))
        await asyncio.sleep(0.05)
        task.cancel()
        return await asyncio.wait_for(asyncio.shield(task), 60)

    assert asyncio.run(main()) == "went on"
    _until(stuck)


def test_an_async_call_that_blocks_the_event_loop_past_its_limit_is_reported_stuck():
    stuck = _stuck("block")
    loaded = _watched(block_loop, "async", stuck)
    assert asyncio.run(loaded.run({"key": "block"}, CallLog(), 0.1)) == "blocked"  # returns only once the watchdog fired
    _until(stuck)


def test_an_async_generator_that_swallows_its_timeout_is_reported_stuck():
    stuck = _stuck("agen")
    loaded = _watched(swallow_agen, "asyncgen", stuck)

    async def main() -> list[int]:
        out = []
        try:
            async for x in loaded.stream({"key": "agen"}, CallLog(), time.monotonic() + 0.2):
                out.append(x)
        except CallInterrupted:
            pass
        return out

    assert asyncio.run(asyncio.wait_for(main(), 60))[0] == 1
    _until(stuck)


def test_a_sync_call_that_swallows_its_interrupt_is_reported_stuck_even_with_the_loop_blocked():
    stuck = _stuck("sync")
    loaded = _watched(swallow_sync, "function", stuck)

    async def main() -> None:
        try:
            await loaded.run({"key": "sync"}, CallLog(), 0.1)
        except CallInterrupted:
            pass
        while not stuck.is_set():  # the loop itself is blocked now: the watchdog is a thread of its own
            time.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 60))
    _until(stuck)


def test_a_batch_that_blocks_the_loop_past_its_limit_is_reported_stuck():
    stuck = _stuck("batch")
    spec = make_spec(name="f", kind="async", max_concurrency=4, timeout=0.1, batch=BatchSpec(4, 1.0))  # 1 ms
    loaded = LoadedFunction(cloudpickle.dumps({"format": 1, "kind": "function", "fn": block_batch}), spec)
    loaded.setup()
    loaded.on_stuck, loaded.grace = stuck.set, GRACE

    # the batch blocks the loop (no timer runs) and returns only once the watchdog fired
    assert asyncio.run(loaded.run({"key": "batch"}, CallLog(), 0.1)) == "batch"
    _until(stuck)


def test_busy_healthy_calls_within_their_limit_are_never_reported():
    """An async function that keeps the loop busy (blocking sleeps) but ends within its limit, many short calls,
    and a call cancelled that stops at once: nothing is reported, and nothing stays watched."""
    stuck = _stuck("healthy")
    hog = _watched(busy, "async", stuck)
    fine = _watched(quick, "async", stuck, max_concurrency=8)

    async def main() -> list[float]:
        out = [await hog.run({"s": 5 * GRACE}, CallLog(), 600)]
        out += await asyncio.gather(*(fine.run({"s": 0.001}, CallLog(), 600) for _ in range(50)))
        task = asyncio.get_running_loop().create_task(fine.run({"s": 600}, CallLog(), 600))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return out

    assert asyncio.run(asyncio.wait_for(main(), 120)) == [5 * GRACE] + [0.001] * 50
    assert not stuck.wait(3 * GRACE)
    for loaded in (hog, fine):
        dog = loaded._dog()
        assert dog is not None and dog.watching == 0


_PEEK: dict[str, Any] = {}  # what module-level functions share with their test (they run by reference)


def peek(s: float) -> float:
    _PEEK["seen"].append(_PEEK["beacon"].read())  # inside the call, before any tick could have run
    time.sleep(s)
    return s


def test_the_beacon_tells_the_earliest_end_from_a_calls_start_and_forgets_ended_calls():
    """The page the actor reads (runtime/beacon.py): a call's start puts its end plus the grace there at once (a
    call may take the GIL for good on its first instruction); the watchdog's tick drops calls that ended; sync
    calls are watched from their start, so a healthy sync call leaves nothing watched."""
    from cocoon_faas.runtime.beacon import Beacon

    beacon = Beacon.create()
    _PEEK["beacon"] = beacon
    seen = _PEEK.setdefault("seen", [])
    try:
        loaded = _watched(peek, "function", _stuck("beacon"), max_concurrency=2)
        loaded.beacon = beacon
        t0 = time.monotonic()
        assert asyncio.run(loaded.run({"s": 0.0}, CallLog(), 30)) == 0.0
        _, due = seen[0]
        assert t0 + 30 + GRACE <= due <= time.monotonic() + 30 + GRACE
        dog = loaded._dog()
        assert dog is not None and dog.watching == 0
        give_up = time.monotonic() + 10
        while beacon.read()[1] != 0.0 and time.monotonic() < give_up:  # the next tick forgets the ended call
            time.sleep(0.02)
        beat, due = beacon.read()
        assert due == 0.0 and time.monotonic() - 5 < beat <= time.monotonic()
        assert not beacon.stuck(time.monotonic()) and not beacon.stuck(time.monotonic())
    finally:
        beacon.close()


def test_a_beacon_reads_stuck_only_twice_stale_past_its_due():
    from cocoon_faas.runtime.beacon import MARGIN_S, Beacon

    beacon = Beacon.create()
    try:
        now = time.monotonic()
        beacon.tick(now - MARGIN_S - 1)  # due long passed, but the beat is fresh (tick writes now)
        assert not beacon.stuck(now) and not beacon.stuck(now)
        beacon.set_due(0.0)
        later = now + 3 * MARGIN_S  # nothing watched: a stale beat alone is not stuck
        assert not beacon.stuck(later) and not beacon.stuck(later)
        beacon.set_due(now)
        assert not beacon.stuck(later)  # one read could be a torn page
        assert beacon.stuck(later)
    finally:
        beacon.close()


def record(tag: str, s: float) -> str:
    _PEEK["ran"].append(tag)
    time.sleep(s)
    return tag


def test_a_sync_call_whose_limit_passed_while_it_queued_never_runs():
    ran = _PEEK.setdefault("ran", [])
    loaded = _loaded(record, "function", max_concurrency=1)

    async def main() -> list[str]:
        first = asyncio.get_running_loop().create_task(loaded.run({"tag": "first", "s": 0.5}, CallLog(), 30))
        await asyncio.sleep(0.05)
        try:
            await loaded.run({"tag": "queued", "s": 0.0}, CallLog(), 0.1)
            raise AssertionError("the queued call did not time out")
        except CallInterrupted:
            pass
        out = [await first]
        out.append(await loaded.run({"tag": "after", "s": 0.0}, CallLog(), 30))
        return out

    assert asyncio.run(asyncio.wait_for(main(), 60)) == ["first", "after"]
    assert ran == ["first", "after"]  # before: "queued" ran after its caller had its timeout
