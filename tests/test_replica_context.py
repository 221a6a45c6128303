"""What the runtime and a function's code exchange inside a replica (cocoon_faas/replica_context.py): the load an
engine reports (reduced from tenant-made values), the per-call caller tag, and the gateway's keyed caller tags."""

from __future__ import annotations

import asyncio
import stat

import pytest

from cocoon_faas import replica_context as rc
from cocoon_faas.gateway.caller_tags import KEY_FILE, CallerTags
from cocoon_faas.replica_context import LoadReport


def test_reports_from_the_sandbox_are_reduced_to_bounded_integers():
    assert LoadReport.reduce({"waiting": 3, "running": 99, "max_seqs": 4, "kv_blocks": 10, "kv_used": 12}) == \
        LoadReport(3, 4, 4, 10, 10, 0)
    got = LoadReport.reduce({"waiting": "many", "running": True, "kv_blocks": -5, "max_seqs": 10**12})
    assert got == LoadReport(0, 0, rc.MAX_COUNT, 0, 0, 0)
    assert LoadReport.reduce({"x": 1}) is None and LoadReport.reduce([1, 2]) is None


def test_utilization_is_the_fuller_of_batch_and_kv_or_over_one_with_a_queue():
    assert LoadReport(0, 2, 8, 100, 50, 0).utilization() == 0.5
    assert LoadReport(0, 6, 8, 100, 50, 0).utilization() == 0.75
    assert LoadReport(3, 1, 8, 100, 100, 0).utilization() == 4.0  # full, and three more of its one-at-a-time
    assert LoadReport().utilization() == 0.0 and not LoadReport().saturated


class Source:
    def __init__(self, report: LoadReport) -> None:
        self.report = report

    def load_report(self) -> LoadReport:
        return self.report


def test_watch_sends_the_sum_of_sources_only_when_it_changes():
    a, b = Source(LoadReport(1, 1, 8, 10, 5, 4)), Source(LoadReport(0, 2, 8, 10, 3, 4))
    sent: list[LoadReport] = []

    async def main() -> None:
        rc.add_load_source(a)
        rc.add_load_source(b)
        task = asyncio.get_running_loop().create_task(rc.watch(sent.append, interval=0.001))
        try:
            while not sent:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)  # many polls, no change: nothing more is sent
            assert len(sent) == 1
            a.report = LoadReport(0, 0, 8, 10, 0, 4)
            while len(sent) < 2:
                await asyncio.sleep(0.001)
            rc.remove_load_source(a)
            rc.remove_load_source(b)  # the engines closed
            while len(sent) < 3:
                await asyncio.sleep(0.001)
        finally:
            task.cancel()
            rc.remove_load_source(a)
            rc.remove_load_source(b)

    asyncio.run(main())
    assert sent == [LoadReport(1, 3, 16, 20, 8, 8), LoadReport(0, 2, 16, 20, 3, 8), LoadReport()]
    assert rc.current_load() is None


def test_the_caller_tag_is_per_call_context_and_bounded():
    assert rc.caller_tag() == ""
    token = rc.set_caller("x" * 500)
    assert rc.caller_tag() == "x" * rc.MAX_CALLER_TAG
    rc.reset_caller(token)
    token = rc.set_caller({"not": "a string"})
    assert rc.caller_tag() == ""
    rc.reset_caller(token)


def test_gateway_caller_tags_are_keyed_per_function_and_stable(tmp_path):
    tags = CallerTags.load(tmp_path)
    key_file = tmp_path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    alice = tags.tag("chat", "dev-alice")
    assert alice == CallerTags.load(tmp_path).tag("chat", "dev-alice")  # the same key on restart
    assert len({alice, tags.tag("chat", "channel:7"), tags.tag("other", "dev-alice")}) == 3
    assert "alice" not in alice and len(alice) == 32
    (tmp_path / "elsewhere").mkdir()
    assert CallerTags.load(tmp_path / "elsewhere").tag("chat", "dev-alice") != alice  # keyed: not guessable
    key_file.write_bytes(b"short")
    with pytest.raises(RuntimeError, match="delete it"):
        CallerTags.load(tmp_path)
