import random
from dataclasses import dataclass

from cocoon_faas.gateway.autoscale import ScaleState, target_replicas
from cocoon_faas.gateway.chooser import choose


@dataclass(eq=False)
class R:
    inflight: int


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
