"""The interleaved A/B timer used by the benchmarks: turn order, medians, ratios, pinned threads."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cocoon_faas.kernels import timing  # noqa: E402


def test_candidates_take_turns_and_rotate():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    r = timing.interleaved(fns, reps=3, warmup=1)
    # warm-up round abc, then bca, cab, abc: each candidate runs once per round, the first one rotating
    assert calls == list("abc" "bca" "cab" "abc")
    assert all(len(s.seconds) == 3 for s in r.samples.values())


def test_median_and_ratio_of_medians():
    s_fast = timing.Samples("ours", (1.0, 9.0, 2.0))
    s_slow = timing.Samples("base", (4.0, 3.0, 50.0))
    r = timing.ABResult({"ours": s_fast, "base": s_slow}, 2, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert s_fast.median == 2.0 and s_slow.median == 4.0 and s_slow.spread == (3.0, 50.0)
    assert r.speedup("ours", "base") == 2.0  # one outlier (50 s) does not move it
    assert "load average" in r.load_line() and "threads 2" in r.load_line()


def test_inner_calls_and_thread_pinning():
    before = torch.get_num_threads()
    n = {"x": 0}

    def fn():
        n["x"] += 1

    try:
        r = timing.interleaved({"x": fn}, reps=2, warmup=0, inner=5, threads=1)
        assert torch.get_num_threads() == 1 and r.threads == 1
    finally:
        torch.set_num_threads(before)
    assert n["x"] == 10 and len(r.samples["x"].seconds) == 2
    assert all(len(v) == 3 for v in (r.load_start, r.load_end))
    with pytest.raises(ValueError, match="reps"):
        timing.interleaved({"x": fn}, reps=0)
    with pytest.raises(ValueError, match="threads"):
        timing.pin_threads(0)
