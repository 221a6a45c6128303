import random
from dataclasses import dataclass

from cocoon_faas.gateway.autoscale import ScaleState, engine_demand, target_replicas
from cocoon_faas.gateway.chooser import choose
from cocoon_faas.replica_context import LoadReport


@dataclass(eq=False)
class R:
    inflight: int
    load: LoadReport | None = None


def test_power_of_two_prefers_the_less_loaded():
    rng = random.Random(1)
    rs = [R(5), R(0), R(5), R(5)]
    picks = [choose(rs, 10, rng) for _ in range(400)]
    # R(0) wins every draw it appears in: about half of all draws of two out of four
    assert 150 < sum(p is rs[1] for p in picks) < 250


def test_full_replicas_are_skipped_and_none_when_all_full():
    rng = random.Random(2)
    assert choose([R(2), R(2), R(1)], 2, rng).inflight == 1
    assert choose([R(2), R(2)], 2, rng) is None
    assert choose([], 2, rng) is None
    assert choose([R(0)], 1, rng).inflight == 0


def _t(state, now, current, demand, **kw):
    args = dict(max_concurrency=2, min_replicas=0, max_replicas=4, up_delay=1.0, down_delay=5.0, idle_timeout=30.0)
    args.update(kw)
    return target_replicas(now=now, current=current, demand=demand, state=state, **args)


def test_autoscale_cold_start_is_immediate_and_bounded():
    st = ScaleState(last_busy=0)
    assert _t(st, 0, 0, 3) == 2
    assert _t(ScaleState(last_busy=0), 0, 0, 100) == 4


def test_autoscale_waits_up_and_down_delays_without_flapping():
    st = ScaleState(last_busy=0)
    assert _t(st, 0, 1, 6) == 1          # overload seen, not yet sustained
    assert _t(st, 0.5, 1, 6) == 1
    assert _t(st, 1.1, 1, 6) == 3        # sustained for up_delay
    assert _t(st, 2, 3, 1) == 3          # underload starts
    assert _t(st, 2.5, 3, 6) == 3        # a burst resets the down timer
    assert _t(st, 3, 3, 1) == 3
    assert _t(st, 7.9, 3, 1) == 3
    assert _t(st, 8.1, 3, 1) == 1        # sustained for down_delay; one stays warm (idle window not over)


def test_autoscale_scales_to_zero_after_idle_and_keeps_min():
    st = ScaleState(last_busy=0)
    assert _t(st, 10, 1, 0) == 1
    assert _t(st, 31, 1, 0) == 0
    assert _t(ScaleState(last_busy=0), 100, 2, 0, min_replicas=2) == 2


# -- engine-backed functions: the engine's queue and KV pool steer choosing and scaling ------------------------
def _engine(waiting=0, running=0, kv_used=0, kv_blocks=100, max_seqs=8):
    return LoadReport(waiting=waiting, running=running, max_seqs=max_seqs, kv_blocks=kv_blocks, kv_used=kv_used,
                      max_waiting=64)


def test_a_replica_whose_engine_queues_gets_no_more_calls_unless_idle_here():
    rng = random.Random(3)
    full = R(2, _engine(waiting=1, running=1, kv_used=100))   # KV pool committed, a request already waiting
    roomy = R(5, _engine(running=5, kv_used=40))
    assert all(choose([full, roomy], 8, rng) is roomy for _ in range(20))  # despite fewer calls in flight
    assert choose([full], 8, rng) is None  # the call waits in the gateway's queue (429 when that is full)
    # the report is believed only while this gateway has calls there: a stale one cannot starve the replica
    assert choose([R(0, _engine(waiting=3, running=1, kv_used=100))], 8, rng) is not None
    assert choose([R(7, _engine(running=7, kv_used=100))], 8, rng) is not None  # full KV, nothing waiting yet


def test_engine_demand_counts_kv_pressure_and_queue_depth():
    # one replica, 3 calls of 8 in flight: in-flight demand wants 1 replica; its KV pool at 90% wants 2
    hot = [_engine(running=3, kv_used=90)]
    assert engine_demand(hot, 8, 0.8) == 9 and _t(ScaleState(), 0, 1, 9, max_concurrency=8, up_delay=0) == 2
    # a queue in the engine: it is full, and 2 more requests at its current 1-at-a-time pace want 2 replicas more
    queued = [_engine(waiting=2, running=1, kv_used=100)]
    assert _t(ScaleState(), 0, 1, engine_demand(queued, 8, 1.0), max_concurrency=8, up_delay=0) == 3
    # light load on two replicas: one is enough (after the down delay)
    light = [_engine(running=1, kv_used=20), _engine(running=2, kv_used=30)]
    assert engine_demand(light, 8, 0.8) == 5
    st = ScaleState(last_busy=0)
    assert _t(st, 0, 2, 5, max_concurrency=8) == 2 and _t(st, 6, 2, 5, max_concurrency=8) == 1
    assert engine_demand([], 8, 0.8) == 0 and engine_demand([_engine()], 8, 0.8) == 0
    # a lying replica can ask for at most max_replicas
    liar = [LoadReport.clamped({"waiting": 10**9, "running": 0, "kv_blocks": 1, "kv_used": 5})]
    assert _t(ScaleState(), 0, 1, engine_demand(liar, 8, 0.8), max_concurrency=8, up_delay=0) == 4


def test_a_call_queued_behind_a_saturated_engine_takes_it_when_its_report_clears():
    import asyncio
    import time
    from collections import deque
    from types import SimpleNamespace

    from cocoon_faas.gateway.chooser import Chooser

    r = R(1, _engine(waiting=1, running=1, kv_used=100))
    fr = SimpleNamespace(name="f", spec=SimpleNamespace(max_concurrency=8, timeout=30.0), ready=[r], queued=0,
                         waiters=deque(), problem=None, starting=0)
    queued = []
    chooser = Chooser({"f": fr}, queue_limit=4, on_queue=queued.append)

    async def main():
        waiting = asyncio.ensure_future(chooser.acquire(fr, time.monotonic() + 30))
        await asyncio.sleep(0.05)
        assert not waiting.done() and fr.queued == 1 and queued == [fr]
        r.load = _engine(running=2, kv_used=60)  # a STATS frame: the engine admitted its queue; no call ended
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(main()) is r and r.inflight == 2 and fr.queued == 0


# -- the queue: first come, first served ------------------------------------------------------------------------
def _queue_setup():  # type: ignore[no-untyped-def]
    import asyncio
    import time

    from cocoon_faas.gateway.chooser import Chooser
    from cocoon_faas.gateway.controller import DeploymentFlags, FunctionRuntime
    from cocoon_faas.signature import Signature
    from cocoon_faas.spec import make_spec

    @dataclass(eq=False)
    class Rep:
        function: str = "f"
        version: int = 1
        state: str = "ready"
        inflight: int = 0
        calls: int = 0
        load: LoadReport | None = None

    fr = FunctionRuntime("f", "dev", 1, make_spec(name="f", max_concurrency=1), Signature.of(lambda: None), "m", b"",
                         DeploymentFlags())
    rep = Rep()
    fr.ready.append(rep)  # type: ignore[arg-type]
    fr.all.add(rep)  # type: ignore[arg-type]
    ch = Chooser({"f": fr}, queue_limit=100, on_queue=lambda _fr: None, rng=random.Random(3))
    return asyncio, time, fr, rep, ch


def test_a_freed_slot_goes_to_the_oldest_waiter_not_a_new_call():
    asyncio, time, fr, rep, ch = _queue_setup()

    async def main() -> list[int]:
        order: list[int] = []
        deadline = time.monotonic() + 30

        async def call(i: int) -> None:
            r = await ch.acquire(fr, deadline)
            order.append(i)
            await asyncio.sleep(0)
            ch.release(fr, r)

        first = await ch.acquire(fr, deadline)  # the one slot is taken
        waiting = [asyncio.create_task(call(i)) for i in range(3)]
        await asyncio.sleep(0)  # 0, 1, 2 are queued
        ch.release(fr, first)  # the slot goes to 0 ...
        late = asyncio.create_task(call(99))  # ... not to a call arriving in the same loop pass
        await asyncio.gather(*waiting, late)
        return order

    assert asyncio.run(main()) == [0, 1, 2, 99]
    assert rep.inflight == 0 and not fr.waiters and fr.queued == 0


def test_a_slot_handed_to_a_call_cancelled_meanwhile_passes_on():
    asyncio, time, fr, rep, ch = _queue_setup()

    async def main() -> None:
        deadline = time.monotonic() + 30
        first = await ch.acquire(fr, deadline)
        a = asyncio.create_task(ch.acquire(fr, deadline))
        b = asyncio.create_task(ch.acquire(fr, deadline))
        await asyncio.sleep(0)
        ch.release(fr, first)  # handed to a ...
        a.cancel()  # ... which is cancelled before it runs: the slot must reach b, not leak
        got = await asyncio.wait_for(b, 5)
        assert got is rep and rep.inflight == 1
        ch.release(fr, got)

    asyncio.run(main())
    assert rep.inflight == 0 and not fr.waiters and fr.queued == 0


def test_a_freed_slot_goes_to_the_oldest_waiter_that_may_use_it():
    """A sealed call waiting for replicas holding its key does not hold up plain calls queued behind it."""
    asyncio, time, fr, rep, ch = _queue_setup()
    from cocoon_faas.errors import NoCapacityError
    from cocoon_faas.gateway.chooser import Eligibility

    never = Eligibility(accept=lambda r: False, none_left=lambda f: NoCapacityError("none"))

    async def main() -> None:
        deadline = time.monotonic() + 30
        first = await ch.acquire(fr, deadline)
        picky = asyncio.create_task(ch._wait(fr, never, 30))  # queued first, can use no replica here
        await asyncio.sleep(0)
        plain = asyncio.create_task(ch.acquire(fr, deadline))
        await asyncio.sleep(0)
        ch.release(fr, first)
        for _ in range(3):
            await asyncio.sleep(0)
        assert plain.done() and plain.result() is rep  # at once, not when its 1 s look-again comes
        picky.cancel()

    asyncio.run(main())
