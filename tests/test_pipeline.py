"""The call pipeline with a fake backend (no Ray): every outcome through every entry point, paid from a channel.

A real gateway app runs under uvicorn on loopback with a real ledger and store; only the Ray edge is faked
(tests/pipeline_fakes.py: replicas are loopback servers speaking the data-path protocol). Each case asserts the
response status, the hold's final state, the ledger's charge entries and the one call record it leaves.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cocoon_faas.client import Client
from cocoon_faas.confidential import seal_request
from cocoon_faas.confidential_client import build_policy, local_dev_key, verified_replicas
from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.gateway.app import create_app
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.settings import Settings
from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey
from tests.conftest import ROOT, free_port
from tests.pipeline_fakes import EXEC_MS, USAGE_PROMPT, FakeBackend

CALLER = PrivateKey(b"\x08" * 32)
DEPOSIT = 10**12
CID = 77


class Harness:
    def __init__(self, home: Path, **settings: Any) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(home=home, gateway_url=self.url, queue_limit=16, scale_down_delay_s=3600,
                                 idle_timeout_s=3600, **settings)
        self.app = create_app(self.settings, backend=FakeBackend(home))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Harness:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        self.key = (self.home / "api_key").read_text().strip()
        self.ledger = Ledger(self.home / "ledger.db")
        op = self.app.state.gw.billing.operator_key.public_key()
        self.ledger.add_channel(CID, CALLER.public_key(), op, "0:" + "00" * 32, "alice", DEPOSIT)
        self.payer = PayingClient(ChannelSigner(self.home / "caller" / f"{CID}.json", CALLER, CID, DEPOSIT))
        self.dev = Client(self.url, api_key=self.key, payer=None)
        self.dev.deploy(ROOT / "tests" / "apps" / "pipeline_fake.py")
        self.paid = Client(self.url, payer=self.payer)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    # -- what the books say ------------------------------------------------------------------------------
    def hold(self, call_id: str) -> tuple[str, int] | None:
        rows = self.ledger.query("SELECT status, charged FROM pay_calls WHERE call_id=?", (call_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def charges(self, call_id: str) -> list[tuple[Any, ...]]:
        return self.ledger.query("SELECT provider_nanoton, royalty_nanoton, operator_nanoton, total FROM "
                                 "pay_charges WHERE call_id=?", (call_id,))

    def records(self, call_id: str) -> list[str]:
        """The call's records (status), once the store's flusher wrote their final state."""
        deadline = time.monotonic() + 10
        while True:
            with sqlite3.connect(self.home / "cocoon.db") as db:
                rows = [r[0] for r in db.execute("SELECT status FROM call_log WHERE id=? UNION ALL "
                                                 "SELECT status FROM calls WHERE id=?", (call_id, call_id))]
            if (rows and not set(rows) & {"queued", "running"}) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def settled(self, call_id: str, status: str) -> None:
        """Wait until the hold of `call_id` left 'held' (a cut stream settles when the server sees the cut)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h = self.hold(call_id)
            if h is not None and h[0] != "held":
                break
            time.sleep(0.02)
        assert self.hold(call_id) is not None and self.hold(call_id)[0] == status, self.hold(call_id)  # type: ignore[index]

    def pay_headers(self, name: str, units: int = 1) -> dict[str, str]:
        h, ticket = self.payer.headers(self.paid.hold_for(name) * units)
        # the caller books the whole hold as spent: its next state then covers whatever this call is charged
        self.payer.signer.complete(ticket, ticket.hold)
        return h


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("pipeline")).start()
    yield h
    h.stop()


def _post(gw: Harness, path: str, body: Any, name: str, units: int = 1, **kw: Any) -> httpx.Response:
    headers = {**gw.pay_headers(name, units), **kw.pop("headers", {})}
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=30, **kw)


def _charged_once(gw: Harness, cid: str) -> None:
    assert gw.hold(cid) is not None and gw.hold(cid)[0] == "charged"  # type: ignore[index]
    (prov, roy, op, total), = gw.charges(cid)
    assert total == prov + roy + op == gw.hold(cid)[1] > 0  # type: ignore[index]
    assert gw.records(cid) == ["succeeded"] or gw.records(cid) == ["failed"] or gw.records(cid) == ["cancelled"]


def _released(gw: Harness, cid: str, status: str) -> None:
    assert gw.hold(cid) == ("released", 0)
    assert gw.charges(cid) == []
    assert gw.records(cid) == [status]


# -- /fn JSON, unary ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,mode,status,settles,record", [
    ("work", "ok", 200, "charged", "succeeded"),
    ("work", "error", 500, "charged", "failed"),  # the user's own exception is charged for its time
    ("work", "timeout", 504, "released", "failed"),
    ("work", "die", 200, "charged", "succeeded"),  # replica lost, retried elsewhere
    ("fragile", "die", 502, "released", "failed"),  # replica lost, no retries left
])
def test_fn_unary(gw: Harness, name: str, mode: str, status: int, settles: str, record: str) -> None:
    r = _post(gw, f"/fn/{name}", {"mode": mode}, name)
    cid = r.headers["x-cocoon-call-id"]
    assert r.status_code == status, r.text
    assert int(r.headers["x-cocoon-charge"]) == gw.hold(cid)[1]  # type: ignore[index]
    # how many replicas it ran on: the lost one and the one that answered, when a retry was left
    assert r.headers["x-cocoon-attempts"] == ("2" if (name, mode) == ("work", "die") else "1")
    if settles == "charged":
        _charged_once(gw, cid)
        assert gw.records(cid) == [record]
    else:
        _released(gw, cid, record)


def test_fn_payment_refused_changes_nothing(gw: Harness) -> None:
    h = gw.pay_headers("work")
    ok = httpx.post(gw.url + "/fn/work", json={"mode": "ok"}, headers=h, timeout=30)
    assert ok.status_code == 200
    before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
    replay = httpx.post(gw.url + "/fn/work", json={"mode": "ok"}, headers=h, timeout=30)  # the same state again
    assert replay.status_code == 409 and replay.json()["error"]["problem"] == "replayed"
    assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before
    assert gw.records(replay.headers["x-cocoon-call-id"]) == []  # refused at admission: no call, no record
    bad = httpx.post(gw.url + "/fn/work", json={"mode": "ok"}, headers={"X-Cocoon-Payment": "AAAA"}, timeout=30)
    assert bad.status_code == 400 and gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before


# -- /fn JSON, async (/v1/calls) ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode,final,settles", [("ok", "succeeded", "charged"), ("error", "failed", "charged"),
                                                ("timeout", "failed", "released"), ("die", "succeeded", "charged")])
def test_fn_async(gw: Harness, mode: str, final: str, settles: str) -> None:
    r = _post(gw, "/fn/work", {"mode": mode}, "work", headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    cid = r.json()["id"]
    view = _poll(gw, cid)
    assert view["status"] == final
    if settles == "charged":
        _charged_once(gw, cid)
        assert view["charge"] == gw.hold(cid)[1]  # type: ignore[index]
    else:
        _released(gw, cid, "failed")
    assert gw.records(cid) == [final]


def test_fn_async_of_a_generator_is_refused_before_anything_is_held(gw: Harness) -> None:
    before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
    r = _post(gw, "/fn/gen", {"mode": "ok"}, "gen", headers={"Prefer": "respond-async"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and "generator" in err["message"] and "--stream" in err["message"]
    assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before  # nothing held, nothing charged
    assert gw.records(r.headers["x-cocoon-call-id"]) == []


def test_fn_stream_of_a_unary_function_is_refused_before_anything_is_held(gw: Harness) -> None:
    before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
    r = _post(gw, "/fn/work", {"mode": "ok"}, "work", headers={"Accept": "text/event-stream"})
    assert r.status_code == 400 and "not a generator" in r.json()["error"]["message"], r.text
    assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before
    with pytest.raises(InvalidRequestError, match="fn.remote"):  # the SDK's .stream() read no events: []
        list(gw.dev.stream("work", {"mode": "ok"}))
    assert gw.records(r.headers["x-cocoon-call-id"]) == []


def test_fn_a_huge_integer_is_the_callers_problem_not_pythons(gw: Harness) -> None:
    r = httpx.post(gw.url + "/fn/work", content=b'{"n": 1' + b"0" * 5000 + b"}", timeout=30,
                   headers={"Authorization": f"Bearer {gw.key}"})
    assert r.status_code == 400 and "more than 4300 digits" in r.json()["error"]["message"], r.text
    assert "sys.set_int_max_str_digits" not in r.text


def test_unknown_function_suggests_the_nearest_name(gw: Harness) -> None:
    r = httpx.post(gw.url + "/fn/wrok", json={}, headers={"Authorization": f"Bearer {gw.key}"}, timeout=30)
    assert r.status_code == 404 and "did you mean 'work'?" in r.json()["error"]["message"], r.text


def test_fn_async_cancel_releases(gw: Harness) -> None:
    r = _post(gw, "/fn/work", {"mode": "hang"}, "work", headers={"Prefer": "respond-async"})
    cid = r.json()["id"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.url}/v1/calls/{cid}", headers={"Authorization": f"Bearer {gw.key}"}).json()["status"] \
            != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    c = httpx.delete(f"{gw.url}/v1/calls/{cid}", headers={"Authorization": f"Bearer {gw.key}"}, timeout=30)
    assert c.status_code == 200
    assert _poll(gw, cid)["status"] == "cancelled"
    _released(gw, cid, "cancelled")


def test_fn_async_beyond_the_pending_limit_is_refused_before_anything_is_held(tmp_path: Path) -> None:
    gw = Harness(tmp_path, max_pending_async_calls=1).start()
    try:
        first = _post(gw, "/fn/work", {"mode": "hang"}, "work", headers={"Prefer": "respond-async"})
        assert first.status_code == 202
        pays_before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
        second = _post(gw, "/fn/work", {"mode": "ok"}, "work", headers={"Prefer": "respond-async"})
        assert second.status_code == 429 and second.headers["retry-after"] == "1", second.text
        assert "COCOON_MAX_PENDING_ASYNC_CALLS=1" in second.json()["error"]["message"]
        assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == pays_before  # nothing held
        assert gw.records(second.headers["x-cocoon-call-id"]) == []  # nothing recorded
        ok = _post(gw, "/fn/work", {"mode": "ok"}, "work")  # a synchronous call is not an async one
        assert ok.status_code == 200
        cid = first.json()["id"]
        assert _poll(gw, cid)["status"] == "failed"  # the hanging call hits its time limit and ends
        _released(gw, cid, "failed")
        again = _post(gw, "/fn/work", {"mode": "ok"}, "work", headers={"Prefer": "respond-async"})
        assert again.status_code == 202, again.text  # the slot came back when the first call ended
        assert _poll(gw, again.json()["id"])["status"] == "succeeded"
    finally:
        gw.stop()


def _poll(gw: Harness, cid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        v = httpx.get(f"{gw.url}/v1/calls/{cid}", headers={"Authorization": f"Bearer {gw.key}"}, timeout=30).json()
        if v["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return dict(v)
        time.sleep(0.02)


# -- /fn JSON, streams ----------------------------------------------------------------------------------------
def _sse(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = "message", None
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                raw = line[5:].strip()
                data = raw if event == "frame" or raw == "[DONE]" else json.loads(raw)  # frames: base64
        out.append((event, data))
    return out


@pytest.mark.parametrize("mode,last,settles,record", [
    ("ok", "end", "charged", "succeeded"),
    ("error", "error", "charged", "failed"),
    ("die", "end", "charged", "succeeded"),  # died before its first item: retried elsewhere
    ("die_mid", "error", "released", "failed"),  # died after an item: not resumable, not charged
])
def test_fn_stream(gw: Harness, mode: str, last: str, settles: str, record: str) -> None:
    r = _post(gw, "/fn/gen", {"mode": mode, "n": 3}, "gen")
    cid = r.headers["x-cocoon-call-id"]
    assert r.status_code == 200
    events = _sse(r.text)
    assert events[-1][0] == last
    if last == "end":
        assert events[-1][1]["charge"] == gw.hold(cid)[1]  # type: ignore[index]
        assert [d["i"] for e, d in events if e == "message"] == [0, 1, 2]
    if settles == "charged":
        _charged_once(gw, cid)
        assert gw.records(cid) == [record]
    else:
        _released(gw, cid, record)


def test_fn_stream_timeout_before_first_item(gw: Harness) -> None:
    r = _post(gw, "/fn/gen", {"mode": "timeout"}, "gen")
    assert r.status_code == 504
    _released(gw, r.headers["x-cocoon-call-id"], "failed")


def _cut(gw: Harness, path: str, body: Any, name: str, headers: dict[str, str] | None = None,
         content: bytes | None = None) -> str:
    """Read the first lines of a stream, then hang up; the call id."""
    h = {**gw.pay_headers(name), **(headers or {})}
    with httpx.stream("POST", gw.url + path, json=None if content else body, content=content, headers=h,
                      timeout=30) as r:
        assert r.status_code == 200
        cid = r.headers["x-cocoon-call-id"]
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    return cid


def test_fn_stream_client_disconnect_releases(gw: Harness) -> None:
    cid = _cut(gw, "/fn/gen", {"mode": "slow"}, "gen")
    gw.settled(cid, "released")
    _released(gw, cid, "cancelled")


# -- sealed /fn ---------------------------------------------------------------------------------------------
def _sealed_body(gw: Harness, name: str, args: dict[str, Any]) -> bytes:
    pol = build_policy(gw.home, gw.url, name, measurement=gw.dev.function(name)["measurement"],
                       allow_dev_attestation=[local_dev_key(gw.home)])
    body, _ = seal_request(json.dumps(args).encode(), name, verified_replicas(gw.dev.transport, name, pol,
                                                                              refresh=True))
    return bytes(body)


SEALED = {"Content-Type": "application/cocoon-sealed"}


@pytest.mark.parametrize("mode,status,kind,settles,record", [
    ("ok", 200, "res", "charged", "succeeded"),
    ("error", 200, "err", "charged", "failed"),  # the sealed error frame is the answer; charged like /fn
    ("timeout", 504, None, "released", "failed"),
    ("die", 200, "res", "charged", "succeeded"),
])
def test_sealed_unary(gw: Harness, mode: str, status: int, kind: str | None, settles: str, record: str) -> None:
    body = _sealed_body(gw, "work", {"mode": mode})
    r = httpx.post(gw.url + "/fn/work", content=body, headers={**gw.pay_headers("work"), **SEALED}, timeout=30)
    cid = r.headers["x-cocoon-call-id"]
    assert r.status_code == status, r.text
    assert r.headers.get("x-cocoon-sealed-kind") == kind
    if settles == "charged":
        _charged_once(gw, cid)
        assert gw.records(cid) == [record]
    else:
        _released(gw, cid, record)


def test_sealed_stream_and_its_disconnect(gw: Harness) -> None:
    r = httpx.post(gw.url + "/fn/gen", content=_sealed_body(gw, "gen", {"mode": "ok", "n": 2}),
                   headers={**gw.pay_headers("gen"), **SEALED}, timeout=30)
    cid = r.headers["x-cocoon-call-id"]
    events = _sse(r.text)
    assert [e for e, _ in events] == ["frame", "frame", "frame", "end"]
    assert events[-1][1]["charge"] == gw.hold(cid)[1] and events[-1][1]["exec_ms"] == EXEC_MS  # type: ignore[index]
    _charged_once(gw, cid)
    cut = _cut(gw, "/fn/gen", None, "gen", SEALED, _sealed_body(gw, "gen", {"mode": "slow"}))
    gw.settled(cut, "released")
    _released(gw, cut, "cancelled")


def test_sealed_calls_whose_answer_the_client_cannot_read_are_refused_before_anything_is_held(gw: Harness) -> None:
    from cocoon_faas.confidential_client import call_confidential

    before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
    for name, accept, needle in (("gen", "application/cocoon-sealed-frame", "is a generator"),
                                 ("work", "text/event-stream", "not a generator")):
        r = httpx.post(gw.url + f"/fn/{name}", content=_sealed_body(gw, name, {"mode": "ok"}), timeout=30,
                       headers={**gw.pay_headers(name), **SEALED, "Accept": accept})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert gw.records(r.headers["x-cocoon-call-id"]) == []
    assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before
    # the SDK's sealed unary call of a generator: was "not a Cocoon sealed response (magic b'even')"
    pol = build_policy(gw.home, gw.url, "gen", measurement=gw.dev.function("gen")["measurement"],
                       allow_dev_attestation=[local_dev_key(gw.home)])
    with pytest.raises(InvalidRequestError, match="stream_confidential"):
        call_confidential(gw.dev.transport, "gen", {"mode": "ok"}, pol)


# -- OpenAI routes ---------------------------------------------------------------------------------------------
def _chat(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": "fake-llm", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def _token_charge(gw: Harness, prompt: int, completion: int) -> int:
    compute = -(-(prompt * 2 * 10**9 + completion * 8 * 10**9) // 10**6)  # 2 and 8 TON per million tokens
    return compute + -(-compute * 500 // 10_000)  # + the 5% fee; no royalty


def test_openai_chat_paid_per_token(gw: Harness) -> None:
    r = _post(gw, "/v1/chat/completions", _chat("ok"), "chat")
    assert r.status_code == 200, r.text
    cid = r.headers["x-cocoon-call-id"]
    out = r.json()
    assert out["choices"][0]["message"]["content"] == "t0 t1 t2 t3 "
    assert out["usage"]["prompt_tokens"] == USAGE_PROMPT and out["usage"]["completion_tokens"] == 4
    expect = _token_charge(gw, USAGE_PROMPT, 4)
    assert out["cocoon"]["charge"] == int(r.headers["x-cocoon-charge"]) == expect
    _charged_once(gw, cid)
    s = _post(gw, "/v1/chat/completions", _chat("ok", stream=True, stream_options={"include_usage": True}), "chat")
    chunks = [d for _, d in _sse(s.text)]
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["cocoon"]["charge"] == expect == chunks[-3]["cocoon"]["charge"]
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"


def test_openai_chat_choices_and_logprobs(gw: Harness) -> None:
    """n, logprobs and top_logprobs reach the function and come back in OpenAI's shapes, whole and streamed alike;
    the per-token charge covers every choice's tokens; /v1/completions answers in its own (legacy) shape."""
    body = _chat("ok", n=2, logprobs=True, top_logprobs=2)
    r = _post(gw, "/v1/chat/completions", body, "chat")
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in out["choices"]]
    assert texts == ["t0 t1 t2 t3 ", "c1t0 c1t1 c1t2 c1t3 "]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"]
    lps = [c["logprobs"]["content"] for c in out["choices"]]
    assert [e["token"] for e in lps[1]] == ["c1t0 ", "c1t1 ", "c1t2 ", "c1t3 "]
    assert [e["logprob"] for e in lps[1]] == [-0.25, -0.5, -0.75, -1.0] and lps[1][0]["bytes"] == list(b"c1t0 ")
    assert [t["token"] for t in lps[0][0]["top_logprobs"]] == ["t0 ", "alt1"]  # 2 asked of the 6 the function sent
    assert out["usage"]["completion_tokens"] == 8
    assert out["cocoon"]["charge"] == int(r.headers["x-cocoon-charge"]) == _token_charge(gw, USAGE_PROMPT, 8)
    _charged_once(gw, r.headers["x-cocoon-call-id"])

    s = _post(gw, "/v1/chat/completions", {**body, "stream": True}, "chat")
    chunks = [d for _, d in _sse(s.text)]
    assert chunks[-1] == "[DONE]"
    streamed, streamed_lps, finish = ["", ""], [[], []], {}
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            streamed[c["index"]] += c["delta"].get("content") or ""
            streamed_lps[c["index"]] += (c["logprobs"] or {}).get("content", [])
            if c["finish_reason"]:
                finish[c["index"]] = (c["finish_reason"], ch["cocoon"]["charge"])
    assert streamed == texts and streamed_lps == lps
    assert finish == {0: ("stop", out["cocoon"]["charge"]), 1: ("length", out["cocoon"]["charge"])}

    plain = _post(gw, "/v1/chat/completions", _chat("ok"), "chat").json()
    assert len(plain["choices"]) == 1 and plain["choices"][0]["logprobs"] is None  # none asked for, none sent
    c = _post(gw, "/v1/completions", {"model": "fake-llm", "prompt": "ok", "max_tokens": 2, "logprobs": 1}, "chat")
    assert c.status_code == 200, c.text
    assert c.json()["choices"][0]["logprobs"] == {"tokens": ["t0 ", "t1 "], "token_logprobs": [-0.25, -0.5],
                                                   "top_logprobs": [{"t0 ": -0.25}, {"t1 ": -0.5}],
                                                   "text_offset": [0, 3]}


@pytest.mark.parametrize("mode,status", [("error", 500), ("timeout", 504)])
def test_openai_chat_failures_leave_one_record(gw: Harness, mode: str, status: int) -> None:
    r = _post(gw, "/v1/chat/completions", _chat(mode), "chat")
    assert r.status_code == status
    cid = r.headers["x-cocoon-call-id"]
    assert gw.records(cid) == ["failed"]  # a failure before the first chunk is recorded too
    if mode == "timeout":
        _released(gw, cid, "failed")


def test_openai_chat_stream_cut_is_billed_for_what_was_delivered(gw: Harness) -> None:
    cid = _cut(gw, "/v1/chat/completions", _chat("slow", stream=True), "chat")
    gw.settled(cid, "charged")
    charged = gw.hold(cid)[1]  # type: ignore[index]
    assert 0 < charged < _token_charge(gw, 0, 400)  # some delivered items, not the 400 the function would send
    assert gw.records(cid) == ["cancelled"]


def test_openai_completions_and_embeddings(gw: Harness) -> None:
    c = _post(gw, "/v1/completions", {"model": "fake-llm", "prompt": "ok", "max_tokens": 2}, "chat")
    assert c.status_code == 200, c.text
    assert c.json()["choices"][0]["text"] == "t0 t1 " and c.json()["object"] == "text_completion"
    _charged_once(gw, c.headers["x-cocoon-call-id"])
    e = _post(gw, "/v1/embeddings", {"model": "fake-emb", "input": ["ab", "cde"]}, "embed", units=2)
    assert e.status_code == 200, e.text
    cid = e.headers["x-cocoon-call-id"]
    assert [d["embedding"][1] for d in e.json()["data"]] == [2.0, 3.0] and e.json()["usage"]["prompt_tokens"] == 5
    _charged_once(gw, cid)
    assert gw.records(cid) == ["succeeded"]  # one request, one record, one charge
    (held,), = gw.ledger.query("SELECT hold FROM pay_calls WHERE call_id=?", (cid,))
    assert held > gw.paid.hold_for("embed")  # held for both inputs


@pytest.mark.parametrize("path,name,body", [("/v1/chat/completions", "chat", _chat("refuse")),
                                              ("/v1/chat/completions", "chat", _chat("refuse", stream=True)),
                                              ("/fn/work", "work", {"mode": "refuse"})])
def test_a_function_refusing_its_input_is_the_callers_400_not_charged(gw: Harness, path: str, name: str,
                                                                       body: dict[str, Any]) -> None:
    r = _post(gw, path, body, name)  # was 500 function_error (charged; OpenAI clients retry a 500)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text
    assert "exceeds the model's context" in r.json()["error"]["message"]
    _released(gw, r.headers["x-cocoon-call-id"], "failed")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**_chat("ok"), "stream": "true"}, "stream"),  # a string was taken as true
    ("/v1/chat/completions", {**_chat("ok"), "stream": True, "stream_options": {"include_usage": "maybe"}},
     "stream_options"),
    ("/v1/chat/completions", {**_chat("ok"), "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/embeddings", {"model": "fake-emb", "input": ["ab", ""]}, "input"),  # an empty text was embedded, paid
    # the function has no response_format parameter: was a TypeError inside it, a charged 500
    ("/v1/chat/completions", {**_chat("ok"), "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**_chat("ok"), "n": 0}, "n"),
    ("/v1/chat/completions", {**_chat("ok"), "n": 2, "max_tokens": 4000}, "n"),  # more tokens than a hold covers
    ("/v1/chat/completions", {**_chat("ok"), "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {**_chat("ok"), "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {**_chat("ok"), "presence_penalty": 1}, "presence_penalty"),  # not a parameter of it
    ("/v1/chat/completions", {**_chat("ok"), "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),  # tool calls need a function that takes response_format
    ("/v1/completions", {"model": "fake-llm", "prompt": "ok", "logprobs": 6}, "logprobs"),
])
def test_openai_bad_stream_flags_and_empty_inputs_are_refused_unpaid(gw: Harness, path: str, body: dict[str, Any],
                                                                      param: str) -> None:
    before = gw.ledger.query("SELECT COUNT(*) FROM pay_calls")
    r = _post(gw, path, body, "embed" if "embeddings" in path else "chat")
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert gw.ledger.query("SELECT COUNT(*) FROM pay_calls") == before
    assert gw.records(r.headers["x-cocoon-call-id"]) == []


def test_openai_models_retrieve(gw: Harness) -> None:
    r = httpx.get(gw.url + "/v1/models/fake-llm", timeout=30)  # public, like the list
    assert r.status_code == 200 and r.json()["id"] == "fake-llm" and r.json()["cocoon"]["function"] == "chat", r.text
    missing = httpx.get(gw.url + "/v1/models/gpt-4", timeout=30)
    assert missing.status_code == 404 and "fake-llm" in missing.json()["error"]["message"], missing.text


def test_openai_routes_honour_payments_required(gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw.app.state.gw.settings, "payments_required", True)
    r = httpx.post(gw.url + "/v1/chat/completions", json=_chat("ok"),
                   headers={"Authorization": f"Bearer {gw.key}"}, timeout=30)
    assert r.status_code == 402 and r.json()["error"]["type"] == "payment_required"
    assert httpx.post(gw.url + "/v1/chat/completions", json=_chat("ok"), timeout=30).status_code == 401  # as /fn
    paid = _post(gw, "/v1/chat/completions", _chat("ok"), "chat")
    assert paid.status_code == 200 and int(paid.headers["x-cocoon-charge"]) > 0


def test_sealed_chat_through_the_openai_route(gw: Harness) -> None:
    args = {"messages": [{"role": "user", "content": "ok"}], "max_tokens": 3}
    r = httpx.post(gw.url + "/v1/chat/completions", content=_sealed_body(gw, "chat", args),
                   headers={**gw.pay_headers("chat"), **SEALED}, timeout=30)
    assert r.status_code == 200, r.text
    cid = r.headers["x-cocoon-call-id"]
    events = _sse(r.text)
    assert events[-1][0] == "end" and events[-1][1]["usage"]["completion_tokens"] == 3
    assert events[-1][1]["charge"] == _token_charge(gw, USAGE_PROMPT, 3)  # priced from the replica's usage
    _charged_once(gw, cid)
    wrong = httpx.post(gw.url + "/v1/embeddings", content=_sealed_body(gw, "chat", args),
                       headers={**gw.pay_headers("chat"), **SEALED}, timeout=30)
    assert wrong.status_code == 400 and "serves none of" in wrong.json()["error"]["message"]
